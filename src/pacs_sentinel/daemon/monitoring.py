"""Monitoring slices for ``sentinel report``: volumes, flag rates and scores, drift, a chart.

Every job with a result (a verdict) in the window counts once. Slices: per pipeline, per
sending AE title, per station / manufacturer of the source series (read from the header of the
series' first instance in the spool) and per QC reason. A drift warning names a sending AE
title, station or manufacturer whose flag rate or mean quality score in the window moved far
from its own history (the jobs before the window): a two-proportion z-test on the flag rate and
a z-score of the window's mean score against the history's spread, each needing enough jobs on
both sides.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
import structlog

from pacs_sentinel.dicom_io.index import Database

log = structlog.get_logger(__name__)

#: |z| above which a change counts as drift.
DRIFT_Z = 3.0
#: Fewest jobs in the window, and in the history, for a source to be judged.
DRIFT_MIN_WINDOW = 10
DRIFT_MIN_HISTORY = 20
#: Smallest change of the flag rate / mean score that is worth a warning, whatever z says.
DRIFT_MIN_RATE_CHANGE = 0.15
DRIFT_MIN_SCORE_CHANGE = 0.1


@dataclass(frozen=True)
class JobRecord:
    """One job with a result, and where its input came from."""

    job_id: int
    study_uid: str
    pipeline: str
    finished_at: float
    needs_review: bool
    quality_score: float | None
    reasons: list[str]
    calling_ae: str
    manufacturer: str
    station: str


@dataclass(frozen=True)
class SliceStats:
    """Figures of one slice (one pipeline, one AE title, ...)."""

    name: str
    jobs: int
    flagged: int
    mean_score: float | None

    @property
    def flag_rate(self) -> float:
        """Share of the slice's jobs whose verdict was "Needs review"."""
        return self.flagged / self.jobs if self.jobs else 0.0


@dataclass(frozen=True)
class DriftWarning:
    """A source whose figures moved far from its history."""

    dimension: str
    source: str
    what: str
    window_value: float
    history_value: float
    z: float

    def __str__(self) -> str:
        return (f"{self.dimension} {self.source}: {self.what} {self.window_value:.2f} in the window "
                f"vs {self.history_value:.2f} before (z = {self.z:+.1f})")


def load_records(database: Database, *, until: float | None = None) -> list[JobRecord]:
    """Every job with a verdict finished before ``until`` (default: now), oldest first.

    The sending AE title and the station / manufacturer come from the first indexed instance of
    the job's input series (``-`` when unknown); each series header is read once.
    """
    conn = database.connection()
    rows = conn.execute(
        """SELECT j.id, j.study_uid, j.pipeline, COALESCE(j.finished_at, j.updated_at), j.needs_review,
                  j.quality_score, j.reasons, j.series_uid,
                  (SELECT i.calling_ae FROM instances i WHERE i.series_uid = j.series_uid ORDER BY i.received_at LIMIT 1),
                  (SELECT i.path FROM instances i WHERE i.series_uid = j.series_uid ORDER BY i.received_at LIMIT 1)
           FROM jobs j
           WHERE j.verdict IS NOT NULL AND COALESCE(j.finished_at, j.updated_at) <= ?
           ORDER BY 4""",
        [until if until is not None else datetime.datetime.now().timestamp()],
    ).fetchall()
    headers: dict[str, tuple[str, str]] = {}
    records = []
    for job_id, study_uid, pipeline, finished, needs_review, score, reasons, series_uid, calling_ae, path in rows:
        if series_uid not in headers:
            headers[series_uid] = _source_equipment(path)
        manufacturer, station = headers[series_uid]
        records.append(JobRecord(
            job_id=int(job_id), study_uid=study_uid, pipeline=pipeline or "-", finished_at=float(finished),
            needs_review=bool(needs_review), quality_score=None if score is None else float(score),
            reasons=json.loads(reasons) if reasons else [], calling_ae=calling_ae or "-",
            manufacturer=manufacturer, station=station))
    return records


def _source_equipment(path: str | None) -> tuple[str, str]:
    if not path:
        return "-", "-"
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["Manufacturer", "ManufacturerModelName", "StationName"])
    except Exception as exc:  # a spool file gone or unreadable must not stop the report
        log.warning("source header unreadable", path=path, error=str(exc))
        return "-", "-"
    manufacturer = " ".join(str(header.get(k, "") or "").strip() for k in ("Manufacturer", "ManufacturerModelName"))
    return manufacturer.strip() or "-", str(header.get("StationName", "") or "").strip() or "-"


def slices(records: Iterable[JobRecord], key: Callable[[JobRecord], Iterable[str]]) -> list[SliceStats]:
    """Figures per value of ``key`` (a job may fall in several slices, e.g. one per reason),
    biggest slice first."""
    groups: dict[str, list[JobRecord]] = defaultdict(list)
    for record in records:
        for name in key(record):
            groups[name].append(record)
    stats = []
    for name, members in groups.items():
        scores = [m.quality_score for m in members if m.quality_score is not None]
        stats.append(SliceStats(name, len(members), sum(m.needs_review for m in members),
                                statistics.fmean(scores) if scores else None))
    return sorted(stats, key=lambda s: (-s.jobs, s.name))


#: The report's slices: title -> which slice(s) a job belongs to.
DIMENSIONS: dict[str, Callable[[JobRecord], Iterable[str]]] = {
    "pipeline": lambda r: [r.pipeline],
    "sending AE title": lambda r: [r.calling_ae],
    "station": lambda r: [r.station],
    "manufacturer": lambda r: [r.manufacturer],
    "reason": lambda r: r.reasons or ["(none)"],
}
#: Dimensions judged for drift (where the input comes from).
SOURCE_DIMENSIONS = ("sending AE title", "station", "manufacturer")


@dataclass(frozen=True)
class Report:
    """Everything ``sentinel report`` and the report page show for one window."""

    since: float
    until: float
    window: list[JobRecord]
    history: list[JobRecord]
    slices: dict[str, list[SliceStats]]
    warnings: list[DriftWarning]

    @property
    def flagged(self) -> int:
        """Jobs of the window whose verdict was "Needs review"."""
        return sum(r.needs_review for r in self.window)


def build_report(database: Database, since: float, until: float) -> Report:
    """The figures of the window ``[since, until]``, with the jobs before it as history."""
    records = load_records(database, until=until)
    window = [r for r in records if r.finished_at >= since]
    history = [r for r in records if r.finished_at < since]
    return Report(since, until, window, history,
                  {title: slices(window, key) for title, key in DIMENSIONS.items()},
                  drift_warnings(window, history))


def drift_warnings(window: list[JobRecord], history: list[JobRecord]) -> list[DriftWarning]:
    """Sources whose flag rate or mean quality score in ``window`` moved far from ``history``."""
    warnings = []
    for dimension in SOURCE_DIMENSIONS:
        key = DIMENSIONS[dimension]
        before: dict[str, list[JobRecord]] = defaultdict(list)
        for record in history:
            for name in key(record):
                before[name].append(record)
        now: dict[str, list[JobRecord]] = defaultdict(list)
        for record in window:
            for name in key(record):
                now[name].append(record)
        for source, recent in sorted(now.items()):
            past = before.get(source, [])
            if source == "-" or len(recent) < DRIFT_MIN_WINDOW or len(past) < DRIFT_MIN_HISTORY:
                continue
            warnings += _rate_drift(dimension, source, recent, past) + _score_drift(dimension, source, recent, past)
    return warnings


def _rate_drift(dimension: str, source: str, recent: list[JobRecord], past: list[JobRecord]) -> list[DriftWarning]:
    p1 = sum(r.needs_review for r in recent) / len(recent)
    p0 = sum(r.needs_review for r in past) / len(past)
    pooled = (p1 * len(recent) + p0 * len(past)) / (len(recent) + len(past))
    se = math.sqrt(pooled * (1 - pooled) * (1 / len(recent) + 1 / len(past)))
    if se == 0 or abs(p1 - p0) < DRIFT_MIN_RATE_CHANGE:
        return []
    z = (p1 - p0) / se
    return [DriftWarning(dimension, source, "flag rate", p1, p0, z)] if abs(z) > DRIFT_Z else []


def _score_drift(dimension: str, source: str, recent: list[JobRecord], past: list[JobRecord]) -> list[DriftWarning]:
    now = [r.quality_score for r in recent if r.quality_score is not None]
    before = [r.quality_score for r in past if r.quality_score is not None]
    if len(now) < DRIFT_MIN_WINDOW or len(before) < DRIFT_MIN_HISTORY:
        return []
    spread = statistics.stdev(before) or 1e-6
    mean_now, mean_before = statistics.fmean(now), statistics.fmean(before)
    if abs(mean_now - mean_before) < DRIFT_MIN_SCORE_CHANGE:
        return []
    z = (mean_now - mean_before) / (spread / math.sqrt(len(now)))
    return [DriftWarning(dimension, source, "mean quality score", mean_now, mean_before, z)] if abs(z) > DRIFT_Z else []


def flag_rate_series(records: list[JobRecord], since: float, until: float) -> tuple[str, list[tuple[float, dict[str, float]]]]:
    """Flag rate per pipeline per time bucket (days for windows over two days, else hours).

    Returns:
        ``(bucket name, [(bucket start, {pipeline: flag rate})])``; empty buckets are left out.
    """
    width = 86400.0 if until - since > 2 * 86400 else 3600.0
    buckets: dict[float, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        start = since + math.floor((record.finished_at - since) / width) * width
        buckets[start][record.pipeline].append(record.needs_review)
    series = [(start, {p: sum(v) / len(v) for p, v in per.items()}) for start, per in sorted(buckets.items())]
    return ("day" if width == 86400.0 else "hour"), series


def render_flag_rate_chart(series: list[tuple[float, dict[str, float]]], path: Path | BinaryIO, *, bucket: str,
                           backend: str | None = None) -> str:
    """Draw the flag rate over time, one line per pipeline, as a PNG.

    Args:
        series: From :func:`flag_rate_series`.
        path: Where to write the PNG (a file path, or a binary stream).
        bucket: ``"day"`` or ``"hour"`` (axis label).
        backend: ``"matplotlib"`` or ``"pillow"``; default: matplotlib when it is installed.

    Returns:
        The backend used.
    """
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    if backend is None:
        from importlib.util import find_spec

        backend = "matplotlib" if find_spec("matplotlib") is not None else "pillow"
    pipelines = sorted({p for _, per in series for p in per})
    if backend == "matplotlib":
        # The object API (no pyplot): no global figure state, safe in the web page's threads.
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4), dpi=100)
        ax = fig.subplots()
        for pipeline in pipelines:
            points = [(datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc), per[pipeline] * 100)
                      for t, per in series if pipeline in per]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=pipeline)
        ax.set_ylim(0, 100)
        ax.set_ylabel("flagged for review (%)")
        ax.set_xlabel(f"{bucket} (UTC)")
        ax.set_title("Flag rate over time")
        if pipelines:
            ax.legend()
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(path, format="png")
        return backend
    _pillow_chart(series, pipelines, path, bucket)
    return "pillow"


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _pillow_chart(series: list[tuple[float, dict[str, float]]], pipelines: list[str], path: Path | BinaryIO,
                  bucket: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 800, 400, 60, 20, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    draw.text((left, 10), "Flag rate over time (flagged for review, %)", fill="black", font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for pct in (0, 25, 50, 75, 100):
        y = height - bottom - pct / 100 * (height - top - bottom)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((left - 40, y - 7), f"{pct}%", fill="black", font=font)
    times = [t for t, _ in series]
    span = (max(times) - min(times)) if len(times) > 1 else 1.0

    def x_of(t: float) -> float:
        return left + (t - min(times)) / span * (width - left - right) if len(times) > 1 else (left + width - right) / 2

    for index, pipeline in enumerate(pipelines):
        colour = _COLOURS[index % len(_COLOURS)]
        points = [(x_of(t), height - bottom - per[pipeline] * (height - top - bottom))
                  for t, per in series if pipeline in per]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend_x = left + 10 + 150 * index
        draw.line([legend_x, height - 13, legend_x + 16, height - 13], fill=colour, width=3)
        draw.text((legend_x + 22, height - 20), pipeline, fill=colour, font=font)
    if times:
        fmt = "%Y-%m-%d" if bucket == "day" else "%m-%d %H:00"
        for t, anchor in ((min(times), "la"), (max(times), "ra")):
            label = datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc).strftime(fmt)
            draw.text((x_of(t), height - bottom + 6), label, fill="black", font=font, anchor=anchor)
    image.save(path, format="PNG")
