"""Fuse the QC signals of each segment into a quality score and a verdict.

The input-image checks (:mod:`pacs_sentinel.qc.image`, computed once per volume and applied
to every segment), the mask heuristics, the learned confidence estimator
(:mod:`pacs_sentinel.qc.estimator`, a predicted Dice; since QC 2.2.0 it sees the model's
probability map too when there is one), the model's own probability map (mean
probability inside the mask and, since QC 2.1.0, the expected Dice of the mask under it) and,
when the inference produced stochastic samples, the uncertainty signals are fused by the fitted
fusion model (:mod:`pacs_sentinel.qc.fusion`): a non-negative logistic model fitted on a calibration
set, so the score reads as the probability that the mask's Dice is at least 0.7; checks
the calibration never saw multiply it. The verdict is *Accepted* when ``quality_score >=
accept_threshold`` and no check against the model card's range fired (volume, location: the
model was never validated there, so such a result goes to review whatever its score). A result
sent to review always names at least one reason: the signals that fired, else the one that
lowered the score most.
"""

from __future__ import annotations

import numpy as np
import structlog

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.qc.estimator import QualityEstimator, estimator_signal, load_estimator
from pacs_sentinel.qc.fusion import FusionModel, load_fusion, policy_reasons
from pacs_sentinel.qc.heuristics import (
    Signal,
    body_size_signal,
    border_contact_signal,
    bounding_box,
    confidence_signal,
    expected_dice_signal,
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

QC_VERSION = "2.8.0"


def shipped_fusion() -> FusionModel:
    """The shipped fusion model of this QC version (read once per process)."""
    global _fusion
    if _fusion is None:
        _fusion = load_fusion(qc_version=QC_VERSION)
    return _fusion


_fusion: FusionModel | None = None


def verdict_for(score: float, accept_threshold: float, *, out_of_range: bool = False) -> Verdict:
    """The verdict of a quality score: accepted at or above the threshold, unless out of range."""
    return Verdict.ACCEPTED if score >= accept_threshold and not out_of_range else Verdict.NEEDS_REVIEW


def crop_to_mask(mask: np.ndarray, margin: int = 1) -> np.ndarray:
    """The mask's bounding box, padded with ``margin`` empty voxels on every side."""
    box = bounding_box(mask)
    if box is None:
        raise ValueError("an empty mask has no bounding box")
    return np.pad(mask[tuple(slice(lo, hi) for lo, hi in box)], margin, constant_values=False)


def segment_signals(volume: Volume, result: SegmentationResult, index: int, *, image_signals: list[Signal],
                    midline_x: float | None, estimator: QualityEstimator | None,
                    extra: list[Signal] | None = None, body_area_cm2: float | None = None) -> list[Signal]:
    """Every QC signal of one non-empty segment (``result.mask[index]``), not yet fused
    (``body_area_cm2``: :meth:`~pacs_sentinel.qc.image.ImageQC.body_area_cm2`, compared with the
    model card's range when it records one)."""
    label = result.labels[index]
    mask = result.mask[index].astype(bool)
    volume_mm3 = float(mask.sum()) * volume.voxel_volume_mm3
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
    if result.probabilities is not None:  # a third-party SEG has none
        signals.append(confidence_signal(result.probabilities[index], mask))
        signals.append(expected_dice_signal(result.probabilities[index], mask))
    volume_check = volume_signal(volume_mm3 / 1000.0, reference)
    if volume_check is not None:
        signals.insert(0, volume_check)
    body_check = body_size_signal(body_area_cm2, reference)
    if body_check is not None:
        signals.append(body_check)
    if midline_x is not None:
        location_check = location_signal(left_share(mask, midline_x, volume.spacing, volume.direction), reference)
        if location_check is not None:
            signals.append(location_check)
    if estimator is not None and estimator.covers(label, volume.modality):  # else the fusion's model without it
        probabilities = result.probabilities[index] if result.probabilities is not None else None
        signals.append(estimator_signal(estimator.predict(volume.array, mask, volume.spacing, volume.direction,
                                                          probabilities)))
    if result.uncertainty is not None:
        signals += uncertainty_signals(result.uncertainty, index)
    signals += extra or []
    signals += image_signals
    return signals


def evaluate_segmentation(volume: Volume, result: SegmentationResult, *, accept_threshold: float = 0.5,
                          fusion: FusionModel | None = None, estimator: QualityEstimator | None = None,
                          extra_signals: dict[int, list[Signal]] | None = None) -> QCResult:
    """Judge every segment of a segmentation result.

    Args:
        volume: The source volume (input-image QC, voxel spacing, patient orientation).
        result: The model's output in the source geometry. Without probabilities (a
            third-party SEG) the model-confidence signal is left out.
        accept_threshold: Scores at or above it are accepted.
        extra_signals: Further signals per label index (e.g. the agreement with our own
            model when judging a third-party SEG); a signal the fusion was not fitted on
            multiplies the calibrated probability by its fusion factor.
        fusion: The fusion model; default the shipped one of :data:`QC_VERSION`.
        estimator: The confidence estimator; default the shipped one.

    Returns:
        The QC result, one :class:`SegmentQC` per label.

    Raises:
        ModelError: The shipped estimator or fusion model is missing or invalid.
    """
    fusion = fusion if fusion is not None else shipped_fusion()
    estimator = estimator if estimator is not None else load_estimator()
    image_qc = assess_image(volume)
    midline_x = image_qc.midline_x_mm(volume)
    body_area_cm2 = image_qc.body_area_cm2(volume)
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
        signals = segment_signals(volume, result, index, image_signals=image_qc.signals, midline_x=midline_x,
                                  estimator=estimator, extra=(extra_signals or {}).get(index),
                                  body_area_cm2=body_area_cm2)
        fused, model = fusion.score(signals)
        score = round(fused, 4)  # the verdict is taken on the score as reported
        reasons = list(dict.fromkeys(s.reason for s in signals if s.fired))
        if score < accept_threshold and not reasons:
            # Several moderate doubts added up below the threshold: name the one that lowered
            # the score most, so a result sent to review always says why.
            reasons = [_weakest(signals, model.contributions({s.name: s for s in signals}))]
        values = {s.name: round(s.value, 6) for s in signals}
        values["volume_ml"] = round(volume_mm3 / 1000.0, 3)
        values.update({f"{s.name}_subscore": round(s.subscore, 6) for s in signals})
        verdict = verdict_for(score, accept_threshold, out_of_range=bool(policy_reasons(signals)))
        segments.append(SegmentQC(index + 1, label, score, verdict, reasons, volume_mm3, values))
    qc = QCResult(qc_version=fusion.qc_version, segments=segments)  # a local refit has its own version
    log.info("qc evaluated", verdict=qc.verdict.label, quality_score=qc.quality_score,
             reasons=[r.label for r in qc.reasons])
    return qc


def _weakest(signals: list[Signal], contributions: dict[str, float]) -> Reason:
    """The reason of the signal that lowered the fused score most."""
    by_name = {s.name: s for s in signals}
    if contributions and min(contributions.values()) < 0:
        return by_name[min(contributions, key=contributions.__getitem__)].reason
    return min(signals, key=lambda s: s.fusion_factor).reason
