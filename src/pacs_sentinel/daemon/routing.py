"""Which series of a study goes to which pipeline (``[[pipelines]] match``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog
from pydicom.dataset import Dataset

from pacs_sentinel.daemon.config import PipelineConfig
from pacs_sentinel.reports.identity import is_own_object

log = structlog.get_logger(__name__)

#: Modalities of derived objects that never enter an image pipeline.
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "KO", "PR", "RTSTRUCT", "DOC", "REG"})


@dataclass(frozen=True)
class SeriesCandidate:
    """A series of a study with the header of its first instance."""

    series_uid: str
    files: list[Path]
    header: Dataset

    @property
    def image_count(self) -> int:
        """Images (slices) in the series: files times frames per file (enhanced multi-frame)."""
        frames = self.header.get("NumberOfFrames", 1)
        return len(self.files) * max(1, int(frames or 1))


def read_candidates(series_files: dict[str, list[Path]]) -> list[SeriesCandidate]:
    """Read one header per series; series we wrote ourselves or that are not images are left out."""
    candidates = []
    for series_uid, files in series_files.items():
        try:
            header = pydicom.dcmread(files[0], stop_before_pixels=True)
        except Exception as exc:  # an unreadable file must not stop the other series
            log.warning("series header unreadable", series_uid=series_uid, error=str(exc))
            continue
        if is_own_object(header) or str(header.get("Modality", "")) in NON_IMAGE_MODALITIES:
            continue
        candidates.append(SeriesCandidate(series_uid, files, header))
    return candidates


def _value_matches(value: object, allowed: list[str]) -> bool:
    if value is None:
        return False
    values = [str(v) for v in value] if isinstance(value, pydicom.multival.MultiValue) else [str(value)]
    return any(v.strip().upper() == a.strip().upper() for v in values for a in allowed)


def matches(pipeline: PipelineConfig, header: Dataset) -> bool:
    """True when every ``match`` attribute of the pipeline has one of its allowed values."""
    return all(_value_matches(header.get(keyword), allowed) for keyword, allowed in pipeline.match.items())


def select_series(pipeline: PipelineConfig, candidates: list[SeriesCandidate]) -> SeriesCandidate | None:
    """The series a pipeline runs on: among matching series, the one with most images.

    Too few images is not a reason to skip a series here: loading it then fails the job with
    a message that says so, which tells IT more than "no pipeline matches".
    """
    matching = [c for c in candidates if matches(pipeline, c.header)]
    if not matching:
        return None
    return max(matching, key=lambda c: (c.image_count, c.series_uid))


def matching_pipelines(pipelines: list[PipelineConfig], candidates: list[SeriesCandidate]) -> dict[str, SeriesCandidate]:
    """The pipelines that have a series to run on in this study, with that series."""
    selected = {p.name: select_series(p, candidates) for p in pipelines}
    return {name: series for name, series in selected.items() if series is not None}
