"""Mask heuristics and their fusion into a score and verdict."""

from __future__ import annotations

import numpy as np
import pytest

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.qc.evaluate import evaluate_segmentation
from pacs_sentinel.results import Code, Reason, SegmentationResult, SegmentLabel, Verdict

LIVER = SegmentLabel("Liver", Code("91723000", "SCT", "Anatomical Structure"), Code("10200004", "SCT", "Liver"), "liver")
SHAPE = (40, 96, 96)
SPACING = (5.0, 2.5, 2.5)
VOXEL_ML = np.prod(SPACING) / 1000.0


def _volume() -> Volume:
    return Volume(np.zeros(SHAPE, np.float32), SPACING, (0.0, 0.0, 0.0), np.eye(3), [])


def _ellipsoid(radii_mm: tuple[float, float, float], centre: tuple[int, int, int] = (20, 48, 48)) -> np.ndarray:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return (((z - centre[0]) * SPACING[0] / radii_mm[0]) ** 2 + ((y - centre[1]) * SPACING[1] / radii_mm[1]) ** 2
            + ((x - centre[2]) * SPACING[2] / radii_mm[2]) ** 2) <= 1.0


def _result(mask: np.ndarray, probability: float = 0.97) -> SegmentationResult:
    reference_ml = float(mask.sum() * VOXEL_ML) if mask.any() else 500.0
    probabilities = np.where(mask, probability, 0.02).astype(np.float32)[None]
    return SegmentationResult(
        probabilities=probabilities, mask=mask[None], labels=[LIVER], model_name="test", model_version="0",
        reference={"Liver": {"volume_ml_p01": reference_ml * 0.8, "volume_ml_p99": reference_ml * 1.2}},
    )


def test_clean_compact_mask_is_accepted_without_reasons() -> None:
    qc = evaluate_segmentation(_volume(), _result(_ellipsoid((60, 50, 45))))
    assert qc.verdict is Verdict.ACCEPTED
    assert qc.reasons == []
    assert qc.quality_score > 0.9
    assert qc.segments[0].volume_mm3 == pytest.approx(_ellipsoid((60, 50, 45)).sum() * np.prod(SPACING))


def test_empty_mask_needs_review() -> None:
    qc = evaluate_segmentation(_volume(), _result(np.zeros(SHAPE, bool)))
    assert qc.verdict is Verdict.NEEDS_REVIEW
    assert qc.reasons == [Reason.EMPTY_MASK]
    assert qc.quality_score == 0.0


def test_volume_far_outside_the_reference_range_is_flagged() -> None:
    result = _result(_ellipsoid((60, 50, 45)))
    result.reference["Liver"] = {"volume_ml_p01": 2000.0, "volume_ml_p99": 3000.0}
    qc = evaluate_segmentation(_volume(), result)
    assert Reason.VOLUME_ANOMALY in qc.reasons
    assert qc.verdict is Verdict.NEEDS_REVIEW


def test_fragmented_mask_is_flagged() -> None:
    mask = _ellipsoid((40, 30, 30), (12, 30, 30)) | _ellipsoid((40, 30, 30), (28, 66, 66))
    qc = evaluate_segmentation(_volume(), _result(mask))
    assert Reason.FRAGMENTATION in qc.reasons
    assert qc.verdict is Verdict.NEEDS_REVIEW


def test_irregular_shape_is_flagged() -> None:
    mask = np.zeros(SHAPE, bool)
    mask[5:35, 10:86, 46:50] = True  # a thin plate
    mask[5:35, 46:50, 10:86] = True  # crossed with another
    qc = evaluate_segmentation(_volume(), _result(mask))
    assert Reason.SHAPE_IRREGULARITY in qc.reasons


def test_low_model_confidence_is_flagged() -> None:
    qc = evaluate_segmentation(_volume(), _result(_ellipsoid((60, 50, 45)), probability=0.55))
    assert Reason.LOW_MODEL_CONFIDENCE in qc.reasons


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_verdict_is_the_score_against_the_threshold(threshold: float) -> None:
    mask = _ellipsoid((40, 30, 30), (12, 30, 30)) | _ellipsoid((30, 20, 20), (28, 66, 66))
    qc = evaluate_segmentation(_volume(), _result(mask, probability=0.8), accept_threshold=threshold)
    segment = qc.segments[0]
    assert 0.0 <= segment.quality_score <= 1.0
    expected = Verdict.ACCEPTED if segment.quality_score >= threshold else Verdict.NEEDS_REVIEW
    assert segment.verdict is expected


def test_a_result_sent_to_review_always_names_a_reason() -> None:
    # Moderate confidence and a slightly large volume: no single check fires, yet together
    # they fall below a strict threshold.
    result = _result(_ellipsoid((60, 50, 45)), probability=0.75)
    result.reference["Liver"]["volume_ml_p99"] = result.reference["Liver"]["volume_ml_p01"] / 0.8 * 0.97
    qc = evaluate_segmentation(_volume(), result, accept_threshold=0.7)
    segment = qc.segments[0]
    assert segment.verdict is Verdict.NEEDS_REVIEW
    assert all(v >= 0.5 for k, v in segment.signals.items() if k.endswith("_subscore"))
    assert len(segment.reasons) == 1
