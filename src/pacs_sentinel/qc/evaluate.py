"""Fuse the QC signals of each segment into a quality score and a verdict.

The input-image checks (:mod:`pacs_sentinel.qc.image`, computed once per volume and applied
to every segment), the mask heuristics and, when the inference produced stochastic samples,
the uncertainty signals are fused by multiplying their fusion factors (the sub-score, raised
to the signal's fusion floor): every check can only lower trust, and one clearly failed
check without a floor (sub-score near 0) is enough to send the result to review. The
verdict is purely ``quality_score >= accept_threshold``; a result sent to review always
names at least one reason.
"""

from __future__ import annotations

import numpy as np
import structlog

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.qc.heuristics import (
    Signal,
    border_contact_signal,
    confidence_signal,
    fragmentation_signal,
    hole_signal,
    left_share,
    location_signal,
    shape_signal,
    volume_signal,
)
from pacs_sentinel.qc.image import assess_image
from pacs_sentinel.qc.uncertainty import uncertainty_signals
from pacs_sentinel.results import QCResult, Reason, SegmentationResult, SegmentQC, Verdict

log = structlog.get_logger(__name__)

QC_VERSION = "1.2.0"


def verdict_for(score: float, accept_threshold: float) -> Verdict:
    """The verdict of a quality score: accepted at or above the threshold."""
    return Verdict.ACCEPTED if score >= accept_threshold else Verdict.NEEDS_REVIEW


def crop_to_mask(mask: np.ndarray, margin: int = 1) -> np.ndarray:
    """The mask's bounding box, padded with ``margin`` empty voxels on every side."""
    coords = np.argwhere(mask)
    low, high = coords.min(axis=0), coords.max(axis=0) + 1
    box = mask[tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))]
    return np.pad(box, margin, constant_values=False)


def evaluate_segmentation(volume: Volume, result: SegmentationResult, *, accept_threshold: float = 0.5,
                          extra_signals: dict[int, list[Signal]] | None = None) -> QCResult:
    """Judge every segment of a segmentation result.

    Args:
        volume: The source volume (input-image QC, voxel spacing, patient orientation).
        result: The model's output in the source geometry. Without probabilities (a
            third-party SEG) the model-confidence signal is left out.
        accept_threshold: Scores at or above it are accepted.
        extra_signals: Further signals per label index, fused like the others (e.g. the
            agreement with our own model when judging a third-party SEG).

    Returns:
        The QC result, one :class:`SegmentQC` per label.
    """
    image_qc = assess_image(volume)
    midline_x = image_qc.midline_x_mm(volume)
    segments = []
    for index, label in enumerate(result.labels):
        mask = result.mask[index].astype(bool)
        volume_mm3 = float(mask.sum()) * volume.voxel_volume_mm3
        if not mask.any():
            segments.append(
                SegmentQC(index + 1, label, 0.0, Verdict.NEEDS_REVIEW, [Reason.EMPTY_MASK], 0.0,
                          {"volume_ml": 0.0, **{s.name: round(s.value, 6) for s in image_qc.signals}})
            )
            continue
        reference = result.reference.get(label.name)
        # Shape checks only need the mask's neighbourhood: components, roundness and holes
        # are the same on its bounding box with a one-voxel empty margin, at a fraction of the cost.
        around = crop_to_mask(mask)
        signals: list[Signal] = [
            fragmentation_signal(around),
            shape_signal(around, volume.spacing),
            hole_signal(around),
            border_contact_signal(mask),
        ]
        if result.probabilities is not None:
            signals.append(confidence_signal(result.probabilities[index], mask))
        volume_check = volume_signal(volume_mm3 / 1000.0, reference)
        if volume_check is not None:
            signals.insert(0, volume_check)
        if midline_x is not None:
            location_check = location_signal(left_share(mask, midline_x, volume.spacing, volume.direction), reference)
            if location_check is not None:
                signals.append(location_check)
        if result.uncertainty is not None:
            signals += uncertainty_signals(result.uncertainty, index)
        signals += (extra_signals or {}).get(index, [])
        signals += image_qc.signals
        score = 1.0
        for signal in signals:
            score *= signal.fusion_factor
        score = round(score, 4)  # the verdict is taken on the score as reported
        reasons = list(dict.fromkeys(s.reason for s in signals if s.fired))
        if score < accept_threshold and not reasons:
            # Several moderate doubts multiplied below the threshold: name the weakest, so a
            # result sent to review always says why.
            reasons = [min(signals, key=lambda s: s.fusion_factor).reason]
        values = {s.name: round(s.value, 6) for s in signals}
        values["volume_ml"] = round(volume_mm3 / 1000.0, 3)
        values.update({f"{s.name}_subscore": round(s.subscore, 6) for s in signals})
        segments.append(
            SegmentQC(index + 1, label, score, verdict_for(score, accept_threshold), reasons, volume_mm3, values)
        )
    qc = QCResult(qc_version=QC_VERSION, segments=segments)
    log.info("qc evaluated", verdict=qc.verdict.label, quality_score=qc.quality_score,
             reasons=[r.label for r in qc.reasons])
    return qc
