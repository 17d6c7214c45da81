"""Judge a segmentation made by someone else (a third-party SEG, ``seg-qc`` pipelines).

The SEG's segments, placed on the referenced series' volume by
:func:`~pacs_sentinel.dicom_io.seg_masks.map_segments`, go through the same QC as our own
model's output (:func:`~pacs_sentinel.qc.evaluate.evaluate_segmentation`): input-image QC and
the mask heuristics, with the label statistics (model card reference distributions) of the
label each segment matches by its segmented property type code. There is no model
confidence and no uncertainty (nothing was predicted here); instead, when one of our models
segments the same label, the Dice between its prediction and the segment is the agreement
signal (:mod:`pacs_sentinel.qc.agreement`), used when our model's own mask passes its own QC
(since QC 2.7.0; a feature of the fusion's ``with-agreement`` models).

The learned estimator judges only the structure and modality it was trained on (the demo's
liver on CT); any other segment is scored by the fusion's models fitted without it. A segment
that neither matches one of our labels nor is covered by the estimator can only be checked in
general terms (empty, fragments, holes, border, image): nothing tells whether it outlines the
right organ, so it goes to review with the finding QC033 "Structure not covered by QC" (a
policy reason, like a volume outside the model card's range), its score what those checks give.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import structlog
from pydicom.multival import MultiValue

from pacs_sentinel.dicom_io.seg_masks import MappedSegmentation
from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.qc.agreement import agreement_signal, dice, matching_label, reference_trusted
from pacs_sentinel.qc.estimator import load_estimator
from pacs_sentinel.qc.evaluate import evaluate_segmentation
from pacs_sentinel.qc.heuristics import Signal
from pacs_sentinel.results import QCResult, Reason, SegmentationResult, SegmentLabel

log = structlog.get_logger(__name__)

#: Model name shown for a SEG that names neither a segment algorithm nor a manufacturer model.
UNKNOWN_ALGORITHM = "third-party segmentation"


@dataclass
class LabelReference:
    """What one of our models knows about a label.

    Attributes:
        label: Our label (name and codes).
        model: The model whose card or prediction this is (``name version``).
        statistics: The model card's reference statistics for the label (volume and location
            percentiles); empty when the card records none.
        prediction: The model's boolean mask of the label on the volume being judged, or None
            when no agreement is computed.
        prediction_score: That mask's own QC score (P(Dice >= 0.7)); its agreement with a
            segment is used only from :data:`~pacs_sentinel.qc.agreement.REFERENCE_MIN_SCORE`
            on. None: not judged (the caller vouches for the prediction).
    """

    label: SegmentLabel
    model: str
    statistics: dict[str, float] = field(default_factory=dict)
    prediction: np.ndarray | None = None
    prediction_score: float | None = None


@dataclass
class SegmentJudgement:
    """How one segment was matched: our label (or None), its agreement Dice (or None) and
    whether the agreement was used (our prediction passed its own QC)."""

    segment_number: int
    matched: LabelReference | None
    agreement_dice: float | None
    agreement_used: bool = False


def producer(mapped: MappedSegmentation) -> tuple[str, str]:
    """(name, version) of what made the SEG: the segments' algorithm name, else the SEG's
    Manufacturer's Model Name / Manufacturer; version from the algorithm sequence or Software
    Versions (``"unknown"`` when neither says)."""
    ds = mapped.dataset
    names = [s.algorithm_name for s in mapped.segments if s.algorithm_name]
    name = names[0] if names else (str(ds.get("ManufacturerModelName", "") or "") or str(ds.get("Manufacturer", "") or "")
                                   or UNKNOWN_ALGORITHM)
    version = ""
    for item in ds.get("SegmentSequence", []):
        for algorithm in item.get("SegmentationAlgorithmIdentificationSequence", []):
            version = version or str(algorithm.get("AlgorithmVersion", "") or "")
    if not version:
        software = ds.get("SoftwareVersions")
        if software not in (None, ""):
            version = str(software[0] if isinstance(software, MultiValue) else software)
    return name[:64], (version or "unknown")[:64]


def uncovered_structure_signal() -> Signal:
    """The finding of a segment whose structure no label of ours and not the estimator covers
    (QC033, policy: such a segment goes to review whatever its score)."""
    return Signal("structure_covered", 0.0, 0.0, Reason.UNCOVERED_STRUCTURE)


def judge_segmentation(
    volume: Volume,
    mapped: MappedSegmentation,
    references: list[LabelReference],
    *,
    accept_threshold: float = 0.5,
) -> tuple[SegmentationResult, QCResult, list[SegmentJudgement]]:
    """Judge every segment of a third-party SEG.

    Args:
        volume: The referenced image series.
        mapped: The SEG's segments on the volume's grid.
        references: Our labels with their statistics and, where computed, our predictions;
            each segment uses the first reference whose segmented property type matches.
        accept_threshold: Scores at or above it are accepted.

    Returns:
        The segments as a :class:`SegmentationResult` (no probabilities, ``reference`` from
        the matched labels), the QC result whose segment numbers are the SEG's own, and how
        each segment was matched.
    """
    labels = [segment.label for segment in mapped.segments]
    estimator = load_estimator()
    extra: dict[int, list[Signal]] = {}
    statistics: dict[str, dict[str, float]] = {}
    judgements = []
    for index, segment in enumerate(mapped.segments):
        matched_label = matching_label(segment.label, [r.label for r in references])
        matched = next((r for r in references if r.label is matched_label), None)
        agreement, used = None, False
        if matched is not None:
            if matched.statistics:
                statistics.setdefault(segment.label.name, dict(matched.statistics))
            if matched.prediction is not None:
                agreement = dice(segment.mask, matched.prediction)
                used = reference_trusted(matched.prediction_score)
                if used:
                    extra[index] = [agreement_signal(agreement)]
        if matched is None and not estimator.covers(segment.label, volume.modality):
            extra.setdefault(index, []).append(uncovered_structure_signal())
        judgements.append(SegmentJudgement(segment.number, matched, agreement, used))
    name, version = producer(mapped)
    mask = np.stack([segment.mask for segment in mapped.segments])
    result = SegmentationResult(probabilities=None, mask=mask, labels=labels, model_name=name, model_version=version,
                                reference=statistics)
    qc = evaluate_segmentation(volume, result, accept_threshold=accept_threshold, extra_signals=extra,
                               estimator=estimator)
    for segment_qc, segment in zip(qc.segments, mapped.segments, strict=True):
        segment_qc.segment_number = segment.number
    log.info("third-party SEG judged", seg_uid=mapped.sop_instance_uid, producer=f"{name} {version}",
             segments=[{"number": j.segment_number, "matched": j.matched.label.name if j.matched else None,
                        "agreement_dice": None if j.agreement_dice is None else round(j.agreement_dice, 4),
                        "agreement_used": j.agreement_used,
                        "reference_score": None if j.matched is None else j.matched.prediction_score,
                        "verdict": s.verdict.label, "score": s.quality_score}
                       for j, s in zip(judgements, qc.segments, strict=True)])
    return result, qc, judgements
