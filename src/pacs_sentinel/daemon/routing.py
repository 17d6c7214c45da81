"""Which series of a study goes to which pipeline (``[[pipelines]] match``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog
from pydicom.dataset import Dataset

from pacs_sentinel.daemon.config import PipelineConfig
from pacs_sentinel.dicom_io.seg_masks import is_segmentation, referenced_series_uids
from pacs_sentinel.errors import SentinelError
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
    """Read one header per series; series we wrote ourselves or that are not images are left out:
    a derived modality (:data:`NON_IMAGE_MODALITIES`), or no Rows (no image at all: RT Plan...)."""
    candidates = []
    for series_uid, files in series_files.items():
        try:
            header = pydicom.dcmread(files[0], stop_before_pixels=True)
        except Exception as exc:  # an unreadable file must not stop the other series
            log.warning("series header unreadable", series_uid=series_uid, error=str(exc))
            continue
        if is_own_object(header) or str(header.get("Modality", "")) in NON_IMAGE_MODALITIES or "Rows" not in header:
            continue
        candidates.append(SeriesCandidate(series_uid, files, header))
    return candidates


@dataclass(frozen=True)
class ThirdPartySeg:
    """A SEG of the study that this node did not write: input of ``seg-qc`` pipelines.

    Attributes:
        series_uid: The SEG's own series.
        path: Its file in the spool.
        header: Its header (read without pixel data).
        referenced_series: The image series it references (Referenced Series Sequence).
    """

    series_uid: str
    path: Path
    header: Dataset
    referenced_series: tuple[str, ...]

    @property
    def sop_instance_uid(self) -> str:
        """The SEG's SOP Instance UID."""
        return str(self.header.SOPInstanceUID)


def read_third_party_segs(series_files: dict[str, list[Path]]) -> list[ThirdPartySeg]:
    """Every SEG in the study's series that was not written by this node (any installation).

    Our own SEGs sent back to us never re-enter (:func:`is_own_object`); unreadable files are
    logged and left out.
    """
    segs = []
    for series_uid, files in series_files.items():
        for path in files:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:  # an unreadable file must not stop the other series
                log.warning("instance header unreadable", series_uid=series_uid, path=str(path), error=str(exc))
                break
            if not is_segmentation(header):
                break  # a series holds one kind of object: not a SEG series
            if is_own_object(header):
                continue
            segs.append(ThirdPartySeg(series_uid, path, header, tuple(referenced_series_uids(header))))
    return sorted(segs, key=lambda seg: (seg.series_uid, seg.sop_instance_uid))


def segs_to_judge(pipeline: PipelineConfig, candidates: list[SeriesCandidate],
                  segs: list[ThirdPartySeg]) -> list[tuple[ThirdPartySeg, SeriesCandidate]]:
    """The SEGs a ``seg-qc`` pipeline judges, each with the image series it references.

    A SEG is judged when one of the series it references is in the study and matches the
    pipeline's ``match`` / ``match_regex``; other SEGs are left alone.
    """
    if pipeline.kind != "seg-qc":
        return []
    by_uid = {c.series_uid: c for c in candidates}
    judged = []
    for seg in segs:
        for uid in seg.referenced_series:
            candidate = by_uid.get(uid)
            if candidate is not None and matches(pipeline, candidate.header):
                judged.append((seg, candidate))
                break
    return judged


def _value_matches(value: object, allowed: list[str]) -> bool:
    if value is None:
        return False
    values = [str(v) for v in value] if isinstance(value, pydicom.multival.MultiValue) else [str(value)]
    return any(v.strip().upper() == a.strip().upper() for v in values for a in allowed)


def _regex_matches(value: object, pattern: str) -> bool:
    if value is None:
        return False
    values = [str(v) for v in value] if isinstance(value, pydicom.multival.MultiValue) else [str(value)]
    return any(re.search(pattern, v, flags=re.IGNORECASE) for v in values)


def mismatches(pipeline: PipelineConfig, header: Dataset) -> list[str]:
    """Why a series does not match a pipeline: one line per failed rule (empty = it matches)."""
    problems = []
    for keyword, allowed in pipeline.match.items():
        if not _value_matches(header.get(keyword), allowed):
            problems.append(f"{keyword} is {_shown(header.get(keyword))}, not one of {allowed}")
    for keyword, pattern in pipeline.match_regex.items():
        if not _regex_matches(header.get(keyword), pattern):
            problems.append(f"{keyword} is {_shown(header.get(keyword))}, does not match /{pattern}/")
    return problems


def _shown(value: object) -> str:
    if value is None or value == "":
        return "absent"
    if isinstance(value, pydicom.multival.MultiValue):
        return repr("\\".join(str(v) for v in value))
    return repr(str(value))


def matches(pipeline: PipelineConfig, header: Dataset) -> bool:
    """True when every ``match`` and ``match_regex`` rule of the pipeline holds."""
    return not mismatches(pipeline, header)


def _is_axial(header: Dataset) -> bool:
    orientation = header.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return False
    row, col = [float(v) for v in orientation[:3]], [float(v) for v in orientation[3:]]
    normal_z = row[0] * col[1] - row[1] * col[0]
    return abs(normal_z) > 0.9


def _thickness(header: Dataset) -> float:
    try:
        return float(header.get("SliceThickness") or "inf")
    except (TypeError, ValueError):
        return float("inf")


def select_series(pipeline: PipelineConfig, candidates: list[SeriesCandidate]) -> SeriesCandidate | None:
    """The series a pipeline runs on, among the matching ones, by its ``series_selection``.

    ``most-images`` (default), ``thinnest`` (smallest SliceThickness, then most images) or
    ``thinnest-axial`` (axial series first, then thinnest, then most images).

    Too few images is not a reason to skip a series here: loading it then fails the job with
    a message that says so, which tells IT more than "no pipeline matches".
    """
    if pipeline.kind == "seg-qc":
        return None  # judges SEGs, see segs_to_judge
    matching = [c for c in candidates if matches(pipeline, c.header)]
    if not matching:
        return None
    policy = pipeline.series_selection
    if policy == "thinnest":
        return min(matching, key=lambda c: (_thickness(c.header), -c.image_count, c.series_uid))
    if policy == "thinnest-axial":
        return min(matching, key=lambda c: (not _is_axial(c.header), _thickness(c.header), -c.image_count, c.series_uid))
    return max(matching, key=lambda c: (c.image_count, c.series_uid))


def matching_pipelines(pipelines: list[PipelineConfig], candidates: list[SeriesCandidate],
                       segs: list[ThirdPartySeg] | None = None) -> dict[str, list[str]]:
    """The pipelines that have something to run on in this study, with their input series.

    An image pipeline's input is the series it selects; a ``seg-qc`` pipeline's inputs are
    the third-party SEGs it judges (``segs``) and the image series they reference. New
    instances of an input series re-run the pipeline (``[study] late_arrival``).
    """
    inputs: dict[str, list[str]] = {}
    for pipeline in pipelines:
        if pipeline.kind == "seg-qc":
            judged = segs_to_judge(pipeline, candidates, segs or [])
            if judged:
                uids = [uid for seg, series in judged for uid in (seg.series_uid, series.series_uid)]
                inputs[pipeline.name] = list(dict.fromkeys(uids))
            continue
        series = select_series(pipeline, candidates)
        if series is not None:
            inputs[pipeline.name] = [series.series_uid]
    return inputs


#: Series a rejection reason describes one by one; the others are counted.
REJECTION_SERIES_SHOWN = 3


def rejection_reason(pipelines: list[PipelineConfig], candidates: list[SeriesCandidate],
                     segs: list[ThirdPartySeg] | None = None) -> str:
    """The one-line reason of a study no pipeline takes: per image series (the first
    :data:`REJECTION_SERIES_SHOWN`), per pipeline, the ``match`` rules it fails — what
    ``sentinel check-config --explain`` shows on several lines — and, when a ``seg-qc`` pipeline
    is configured, each third-party SEG (``segs``) that references a series the study does not hold."""
    reason = "no pipeline matches any series of the study"
    missing = []
    if any(p.kind == "seg-qc" for p in pipelines):
        held = {c.series_uid for c in candidates}
        for seg in segs or []:
            absent = [uid for uid in seg.referenced_series if uid not in held]
            if absent and len(absent) == len(seg.referenced_series):
                sop_uid = str(seg.header.get("SOPInstanceUID", "?"))
                missing.append(f"third-party SEG {sop_uid} references series {', '.join(absent)}, "
                               "which the study does not hold (not received)")
    if not candidates:
        return f"{reason}: {' | '.join(['it holds no image series', *missing])}"
    parts = []
    for candidate in candidates[:REJECTION_SERIES_SHOWN]:
        why = []
        for pipeline in pipelines:
            problems = mismatches(pipeline, candidate.header)
            if not problems and pipeline.kind == "seg-qc":
                problems = ["no third-party SEG references it"]
            why.append(f"{pipeline.name}: {', '.join(problems)}")
        modality = str(candidate.header.get("Modality", "") or "?")
        parts.append(f"series {candidate.series_uid} ({modality}): {'; '.join(why)}")
    if len(candidates) > REJECTION_SERIES_SHOWN:
        parts.append(f"and {len(candidates) - REJECTION_SERIES_SHOWN} more series")
    return f"{reason}: {' | '.join(parts + missing)}"


def explain(pipelines: list[PipelineConfig], path: Path) -> str:
    """Which pipeline would take which series of the DICOM files under ``path``, and why not.

    Raises:
        SentinelError: ``path`` does not exist or holds no readable DICOM file.
    """
    if not path.exists():
        raise SentinelError(f"{path}: no such file or folder")
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    by_series: dict[str, list[Path]] = {}
    studies: set[str] = set()
    for file in files:
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
            by_series.setdefault(str(header.SeriesInstanceUID), []).append(file)
            studies.add(str(header.StudyInstanceUID))
        except Exception:  # not DICOM, or no UIDs: not part of any series
            continue
    if not by_series:
        raise SentinelError(f"{path}: no readable DICOM files with a SeriesInstanceUID")
    candidates = read_candidates(by_series)
    lines = [f"{len(files)} file(s), {len(studies)} study(ies), {len(by_series)} series, "
             f"{len(candidates)} usable as input:"]
    for candidate in candidates:
        header = candidate.header
        lines.append(f"  series {candidate.series_uid}: {header.get('Modality', '?')} "
                     f"{str(header.get('SeriesDescription', '') or '')!r}, {candidate.image_count} image(s)")
    if len(studies) > 1:
        lines.append("  note: the daemon treats each study separately")
    segs = read_third_party_segs(by_series)
    for pipeline in pipelines:
        if pipeline.kind == "seg-qc":
            judged = segs_to_judge(pipeline, candidates, segs)
            for seg, series in judged:
                lines.append(f"pipeline {pipeline.name!r}: judges SEG {seg.sop_instance_uid} "
                             f"on series {series.series_uid}")
            if not judged:
                lines.append(f"pipeline {pipeline.name!r}: no third-party SEG references a matching series "
                             f"({len(segs)} third-party SEG(s))")
            continue
        selected = select_series(pipeline, candidates)
        if selected is not None:
            lines.append(f"pipeline {pipeline.name!r}: runs on series {selected.series_uid} "
                         f"({selected.image_count} image(s), selection {pipeline.series_selection!r})")
            if selected.image_count < pipeline.min_slices:
                lines.append(f"  but the series has {selected.image_count} image(s); the pipeline needs "
                             f"at least {pipeline.min_slices}: the job would fail")
        else:
            lines.append(f"pipeline {pipeline.name!r}: no matching series")
            for candidate in candidates:
                reasons = "; ".join(mismatches(pipeline, candidate.header))
                lines.append(f"  series {candidate.series_uid}: {reasons}")
    if not matching_pipelines(pipelines, candidates, segs):
        lines.append("the study would be REJECTED: no pipeline matches any series")
    return "\n".join(lines)
