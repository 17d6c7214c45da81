"""Feedback from the viewer: a radiologist's corrected segmentation sent back to us.

When a reviewer corrects our SEG in their viewer (3D Slicer, OHIF...) and sends the result to
this node, the study becomes quiet again and :meth:`FeedbackRecorder.check_study` looks at its
SEG instances. One that :func:`corrected_job` recognises as a correction of one of our results
(a SEG not written by us that references the source series of a segmentation result we delivered
for that study, and arrived after it) is compared with our mask: Dice and the 95th-percentile Hausdorff distance (MONAI
metrics, in mm on the source grid) per matched segment go into the ``feedback`` table, and the
study's review item is resolved ``ai-corrected``. Our own SEG/SR sent back is never feedback, and
any other third-party SEG is left alone (the seg-qc pipelines judge those).

Each correction is recorded once (the table is unique on its SOP Instance UID and segment); a
correction that cannot be compared is recorded with the reason, so it is not retried forever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import structlog
from pydicom.dataset import Dataset

from pacs_sentinel.daemon.jobs import Job, JobState, JobStore
from pacs_sentinel.daemon.review import ReviewStore
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.series import Volume, load_series_files
from pacs_sentinel.dicom_io.spool import Spool
from pacs_sentinel.errors import SentinelError
from pacs_sentinel.reports.identity import is_own_object

log = structlog.get_logger(__name__)

#: Our SEG in a job's output folder: sent, or kept locally under "withhold-seg".
OWN_SEG_NAMES = ("SEG.dcm", "SEG_withheld.dcm")
#: Job states in which a job's results exist (delivered or being delivered).
RESULT_STATES = frozenset({JobState.DONE, JobState.DELIVERING})


class FeedbackError(SentinelError):
    """A correction cannot be compared with our result."""


@dataclass(frozen=True)
class SegmentAgreement:
    """How one of our segments compares with the reviewer's corrected segment."""

    segment_number: int
    segment_label: str
    correction_segment_number: int
    dice: float
    hd95_mm: float | None


def referenced_series(ds: Dataset) -> set[str]:
    """Series a SEG says it was derived from (Common Instance Reference module)."""
    return {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", []) or []
            if "SeriesInstanceUID" in item}


def own_segmentation(job: Job) -> Path | None:
    """Our SEG of a job (sent or withheld), or None when the job made none (classification)."""
    if not job.output_dir:
        return None
    for name in OWN_SEG_NAMES:
        path = Path(job.output_dir) / name
        if path.is_file():
            return path
    return None


def corrected_job(header: Dataset, jobs: list[Job], delivered: dict[str, float], received_at: float) -> Job | None:
    """Which of our results a SEG corrects, if it is a correction at all.

    A SEG is a correction of one of our results when it was not written by this product,
    references a source series for which a segmentation pipeline delivered a result, and
    arrived after that delivery, and a job of the study has our SEG of that series. This is
    exactly the SEG that :func:`pacs_sentinel.daemon.seg_qc.third_party_segs` leaves to the
    review: anything else (our own objects sent back, SEGs of other series, SEGs that were
    there before our result) is not feedback.

    Args:
        header: The received SEG (header only is enough).
        jobs: The jobs of the SEG's study.
        delivered: :meth:`~pacs_sentinel.daemon.jobs.JobStore.delivered_series` of the study
            for its segmentation pipelines (series -> first acknowledged delivery).
        received_at: When the SEG's series last received an instance.

    Returns:
        The newest such job, or None.
    """
    if str(header.get("Modality", "")) != "SEG" or is_own_object(header):
        return None
    series = {uid for uid in referenced_series(header) if uid in delivered and received_at > delivered[uid]}
    study_uid = str(header.get("StudyInstanceUID", ""))
    candidates = [job for job in jobs
                  if job.study_uid == study_uid and job.series_uid in series and job.state in RESULT_STATES
                  and own_segmentation(job) is not None]
    return max(candidates, key=lambda job: job.id) if candidates else None


def _segments(seg: hd.seg.Segmentation) -> list[tuple[int, str, tuple[str, str] | None]]:
    found = []
    for item in seg.SegmentSequence:
        code = None
        if item.get("SegmentedPropertyTypeCodeSequence"):
            typed = item.SegmentedPropertyTypeCodeSequence[0]
            code = (str(typed.CodeValue), str(typed.CodingSchemeDesignator))
        found.append((int(item.SegmentNumber), str(item.get("SegmentLabel", "")), code))
    return found


def match_segments(ours: hd.seg.Segmentation, correction: hd.seg.Segmentation) -> list[tuple[int, str, int]]:
    """Pair our segments with the correction's: same property type code, else same label,
    else (one segment each) the two. Returns ``(our number, our label, correction number)``."""
    mine, theirs = _segments(ours), _segments(correction)
    pairs = []
    for number, label, code in mine:
        match = next((n for n, _, c in theirs if code is not None and c == code), None)
        if match is None:
            match = next((n for n, lab, _ in theirs if lab.strip().lower() == label.strip().lower()), None)
        if match is None and len(mine) == 1 and len(theirs) == 1:
            match = theirs[0][0]
        if match is not None:
            pairs.append((number, label, match))
    return pairs


def segment_mask(seg: hd.seg.Segmentation, volume: Volume, segment_number: int) -> np.ndarray:
    """One segment of a SEG as a boolean ``(slices, rows, cols)`` mask on the source volume's grid."""
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[segment_number], combine_segments=False,
                                               assert_missing_frames_are_empty=True)
    return np.asarray(pixels[..., 0] > 0)


def agreement(ours: np.ndarray, theirs: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, float | None]:
    """Dice and 95 % Hausdorff distance (mm) of two boolean masks on the same grid (MONAI metrics).

    Returns:
        ``(dice, hd95)``; Dice is 1 when both are empty; the distance is None when either is empty.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    pred = torch.from_numpy(ours[None, None].astype(np.float32))
    ref = torch.from_numpy(theirs[None, None].astype(np.float32))
    dice = float(compute_dice(pred, ref, include_background=True, ignore_empty=False)[0, 0])
    if not ours.any() or not theirs.any():
        return dice, None
    hd95 = float(compute_hausdorff_distance(pred, ref, include_background=True, percentile=95,
                                            spacing=[float(s) for s in spacing])[0, 0])
    return dice, hd95


def compare_segmentations(ours_path: Path, correction_path: Path, volume: Volume) -> list[SegmentAgreement]:
    """Compare our SEG with a corrected one on the source series' grid.

    Raises:
        FeedbackError: A file cannot be read as a segmentation, the source is multi-frame, or
            no segment of ours has a counterpart in the correction.
    """
    if volume.frame_numbers is not None:
        raise FeedbackError("corrections of multi-frame source series are not compared yet")
    try:
        ours = hd.seg.segread(ours_path)
        correction = hd.seg.segread(correction_path)
    except Exception as exc:  # highdicom raises several types for a malformed SEG
        raise FeedbackError(f"cannot read segmentation: {type(exc).__name__}: {exc}") from exc
    pairs = match_segments(ours, correction)
    if not pairs:
        raise FeedbackError("no segment of the correction matches one of ours (property type or label)")
    results = []
    for number, label, theirs in pairs:
        try:
            dice, hd95 = agreement(segment_mask(ours, volume, number), segment_mask(correction, volume, theirs),
                                    volume.spacing)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise FeedbackError(f"segment {theirs} cannot be put on the source grid: {exc}") from exc
        results.append(SegmentAgreement(number, label, theirs, dice, hd95))
    return results


class FeedbackRecorder:
    """Finds corrections among a study's SEG instances and records them (see the module docstring)."""

    def __init__(self, database: Database, spool: Spool, jobs: JobStore, segmentation_pipelines: list[str]) -> None:
        self.database = database
        self.spool = spool
        self.jobs = jobs
        self.segmentation_pipelines = list(segmentation_pipelines)

    def _unseen_segs(self, study_uid: str) -> list[tuple[str, str, str, str]]:
        rows = self.database.connection().execute(
            """SELECT sop_instance_uid, path, calling_ae, series_uid FROM instances
               WHERE study_uid = ? AND modality = 'SEG'
                 AND sop_instance_uid NOT IN (SELECT sop_instance_uid FROM feedback)""",
            [study_uid]).fetchall()
        return [(str(r[0]), str(r[1]), str(r[2] or ""), str(r[3])) for r in rows]

    def check_study(self, study_uid: str) -> list[int]:
        """Record the corrections among the study's SEGs not seen yet.

        Returns:
            The ids of the feedback rows written.
        """
        written: list[int] = []
        unseen = self._unseen_segs(study_uid)
        if not unseen:
            return written
        delivered = self.jobs.delivered_series(study_uid, self.segmentation_pipelines)
        if not delivered:
            return written
        jobs: list[Job] | None = None
        for sop_instance_uid, path, calling_ae, series_uid in unseen:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:  # an unreadable file is the SCP's problem, not a correction
                log.warning("SEG header unreadable", path=path, error=str(exc))
                continue
            if jobs is None:
                jobs = self.jobs.jobs(study_uid=study_uid)
            job = corrected_job(header, jobs, delivered, self.spool.series_last_received(series_uid))
            if job is None:
                continue
            written += self._record(header, Path(path), calling_ae, job)
        return written

    def _record(self, header: Dataset, path: Path, calling_ae: str, job: Job) -> list[int]:
        bound = log.bind(study_uid=job.study_uid, job_id=job.id, correction=str(header.SOPInstanceUID))
        creator = str(header.get("ContentCreatorName", "") or "") or \
            f"{header.get('ManufacturerModelName', '') or header.get('Manufacturer', '') or 'viewer'} ({calling_ae})"
        base = {"sop_instance_uid": str(header.SOPInstanceUID), "study_uid": job.study_uid,
                "series_uid": job.series_uid, "pipeline": job.pipeline, "job_id": job.id, "path": str(path),
                "creator": creator, "recorded_at": time.time()}
        error: str | None = None
        agreements: list[SegmentAgreement] = []
        try:
            files = self.spool.study_files(job.study_uid).get(job.series_uid or "", [])
            volume = load_series_files(files, min_slices=1)
            agreements = compare_segmentations(own_segmentation(job), path, volume)  # type: ignore[arg-type]
        except SentinelError as exc:
            error = str(exc)
        ids = []
        with self.database.transaction() as tx:
            if error is not None:
                ids.append(int(tx["feedback"].insert({**base, "segment_number": 0, "error": error}).last_pk))
                bound.warning("correction received but not compared", error=error)
                return ids
            for found in agreements:
                ids.append(int(tx["feedback"].insert({
                    **base, "segment_number": found.segment_number, "segment_label": found.segment_label,
                    "correction_segment_number": found.correction_segment_number, "dice": found.dice,
                    "hd95_mm": found.hd95_mm}).last_pk))
            summary = "; ".join(
                f"{a.segment_label}: Dice {a.dice:.3f}"
                + (f", HD95 {a.hd95_mm:.1f} mm" if a.hd95_mm is not None else "") for a in agreements)
            item_id = ReviewStore.resolve_corrected(
                tx, job.study_uid, job.pipeline, creator,
                f"corrected segmentation {header.SOPInstanceUID} received from {calling_ae or 'a viewer'}: {summary}")
            if item_id is not None:
                tx.execute("UPDATE feedback SET review_item_id = ? WHERE sop_instance_uid = ?",
                           [item_id, str(header.SOPInstanceUID)])
        bound.info("correction recorded", segments=[(a.segment_label, round(a.dice, 3), a.hd95_mm)
                                                    for a in agreements], review_item_id=item_id)
        return ids
