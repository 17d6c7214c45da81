"""``sentinel feedback export``: reviewers' decisions and corrections as a data set (NIfTI + CSV).

One case per job that a reviewer decided on (a resolved review item with a decision) or whose
segmentation a reviewer corrected (a correction in the ``feedback`` table, see
:mod:`pacs_sentinel.daemon.feedback`). ``cases.csv`` has one row per case: what the AI and the
QC said, the decision, Dice / HD95 of a correction, and the case's files relative to the export
folder. For a segmentation result, ``<case>/image.nii.gz`` is the source series (CT: HU),
``ai_mask.nii.gz`` our mask and ``corrected_mask.nii.gz`` the reviewer's (label value = our
segment number), all on the source grid with its RAS affine. A case whose files cannot be
written (source no longer in the spool, a classification result) keeps its CSV row with a note.
"""

from __future__ import annotations

import csv
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from pacs_sentinel.daemon.feedback import FeedbackError, match_segments, segment_mask
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.series import Volume, load_series_files
from pacs_sentinel.dicom_io.spool import Spool
from pacs_sentinel.errors import SentinelError

log = structlog.get_logger(__name__)

CSV_COLUMNS = [
    "case", "study_uid", "series_uid", "pipeline", "job_id", "model", "model_version", "qc_version",
    "quality_score", "verdict", "reasons", "review_item", "decision", "reviewer", "resolved_at", "comments",
    "correction_sop_instance_uid", "dice", "hd95_mm", "image", "ai_mask", "corrected_mask", "note",
]


@dataclass
class ExportSummary:
    """What an export wrote."""

    csv_path: Path
    cases: int = 0
    with_images: int = 0
    notes: list[str] = field(default_factory=list)


def _iso(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).isoformat(timespec="seconds")


def export_feedback(database: Database, spool: Spool, out_dir: Path, *, since: float | None = None) -> ExportSummary:
    """Write the decided and corrected cases under ``out_dir`` (see the module docstring).

    Args:
        database: The daemon's database.
        spool: Its spool (source series).
        out_dir: The export folder (created; existing case files are overwritten).
        since: Only decisions / corrections recorded at or after this Unix time.

    Returns:
        What was written.

    Raises:
        SentinelError: ``out_dir`` is a file or cannot be created.
    """
    import nibabel as nib

    from pacs_sentinel.inference.preprocess import volume_affine

    since = since if since is not None else 0.0
    jobs = {row["id"]: row for row in database.rows("SELECT * FROM jobs WHERE verdict IS NOT NULL", [])}
    items = {row["job_id"]: row for row in database.rows("SELECT * FROM review_items WHERE status = 'resolved' AND decision IS NOT NULL AND resolved_at >= ?",
        [since])}
    corrections: dict[int, dict[str, Any]] = {}
    for row in database.rows("SELECT * FROM feedback WHERE error IS NULL AND recorded_at >= ? ORDER BY id",
                     [since]):
        corrections.setdefault(row["job_id"], row)  # the first correction of a job (one per job in the data set)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SentinelError(f"{out_dir}: exists and is not a folder") from None
    except OSError as exc:  # a parent is a file, or not writable
        raise SentinelError(f"{out_dir}: cannot create the export folder: {exc.strerror or exc}") from None
    summary = ExportSummary(csv_path=out_dir / "cases.csv")
    records = []
    for job_id in sorted(set(items) | set(corrections)):
        job = jobs.get(job_id)
        if job is None:
            continue
        item, correction = items.get(job_id), corrections.get(job_id)
        case = f"job-{job_id}"
        record: dict[str, Any] = {
            "case": case, "study_uid": job["study_uid"], "series_uid": job["series_uid"], "pipeline": job["pipeline"],
            "job_id": job_id, "model": job["model"], "model_version": job["model_version"],
            "qc_version": job["qc_version"], "quality_score": job["quality_score"], "verdict": job["verdict"],
            "reasons": "; ".join(json.loads(job["reasons"]) if job["reasons"] else []),
            "review_item": item["id"] if item else "", "decision": item["decision"] if item else "ai-corrected",
            "reviewer": (item or {}).get("reviewer") or (correction or {}).get("creator") or "",
            "resolved_at": _iso((item or {}).get("resolved_at") or (correction or {}).get("recorded_at")),
            "comments": (item or {}).get("comments") or "",
            "correction_sop_instance_uid": (correction or {}).get("sop_instance_uid", ""),
            "dice": "" if not correction or correction["dice"] is None else f"{correction['dice']:.6f}",
            "hd95_mm": "" if not correction or correction["hd95_mm"] is None else f"{correction['hd95_mm']:.3f}",
            "image": "", "ai_mask": "", "corrected_mask": "", "note": "",
        }
        try:
            written = _write_case(out_dir / case, job, correction, spool, nib, volume_affine)
            record.update({name: f"{case}/{path.name}" for name, path in written.items()})
            summary.with_images += 1
        except SentinelError as exc:
            record["note"] = str(exc)
            summary.notes.append(f"{case}: {exc}")
        records.append(record)
    with summary.csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(records)
    summary.cases = len(records)
    return summary


def _write_case(folder: Path, job: dict[str, Any], correction: dict[str, Any] | None, spool: Spool,
                nib: Any, volume_affine: Any) -> dict[str, Path]:
    import highdicom as hd

    from pacs_sentinel.daemon.feedback import OWN_SEG_NAMES

    output_dir = Path(job["output_dir"] or "")
    ours_path = next((output_dir / n for n in OWN_SEG_NAMES if (output_dir / n).is_file()), None)
    if ours_path is None:
        raise SentinelError("no segmentation of ours (classification result, or its files were removed)")
    files = spool.study_files(job["study_uid"]).get(job["series_uid"] or "", [])
    if not files:
        raise SentinelError("the source series is no longer in the spool")
    volume = load_series_files(files, min_slices=1)
    try:
        ours = hd.seg.segread(ours_path)
        ai_mask = _label_map(volume, [(ours, n, n) for n, _, _ in match_segments(ours, ours)])
        corrected_mask = None
        if correction is not None and Path(correction["path"]).is_file():
            theirs = hd.seg.segread(correction["path"])
            corrected_mask = _label_map(volume, [(theirs, other, n) for n, _, other in match_segments(ours, theirs)])
    except FeedbackError as exc:
        raise SentinelError(str(exc)) from exc
    except Exception as exc:  # highdicom raises several types for a malformed SEG
        raise SentinelError(f"cannot read a segmentation: {type(exc).__name__}: {exc}") from exc
    folder.mkdir(parents=True, exist_ok=True)
    affine = volume_affine(volume)
    written = {"image": folder / "image.nii.gz", "ai_mask": folder / "ai_mask.nii.gz"}
    nib.save(nib.Nifti1Image(volume.array.astype(np.float32), affine), written["image"])
    nib.save(nib.Nifti1Image(ai_mask, affine), written["ai_mask"])
    if corrected_mask is not None:
        written["corrected_mask"] = folder / "corrected_mask.nii.gz"
        nib.save(nib.Nifti1Image(corrected_mask, affine), written["corrected_mask"])
    return written


def _label_map(volume: Volume, segments: list[tuple[Any, int, int]]) -> np.ndarray:
    """uint8 ``(slices, rows, cols)``: each (seg, its segment number, label value) painted in order."""
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    for seg, number, value in segments:
        labels[segment_mask(seg, volume, number)] = value
    return labels
