"""Judging a third-party SEG: label matching by code, agreement (Dice), the fused verdict."""

from __future__ import annotations

import numpy as np
import pytest

from pacs_sentinel.dicom_io.seg_masks import MappedSegment, MappedSegmentation, map_segments
from pacs_sentinel.dicom_io.series import load_volume
from pacs_sentinel.qc.agreement import (
    AGREEMENT_DICE_HIGH,
    AGREEMENT_DICE_LOW,
    agreement_signal,
    dice,
    matching_label,
    same_concept,
)
from pacs_sentinel.qc.segqc import LabelReference, judge_segmentation
from pacs_sentinel.results import Code, Reason, SegmentLabel, Verdict
from tests.conftest import make_third_party_seg
from tests.reports.conftest import LIVER, SPLEEN, make_ct_series, sphere_mask

ANATOMY = Code("123037004", "SCT", "Anatomical Structure")


def label(name: str, value: str, scheme: str = "SCT", meaning: str = "x") -> SegmentLabel:
    return SegmentLabel(name, ANATOMY, Code(value, scheme, meaning), name)


def test_labels_match_by_property_type_code_not_by_name() -> None:
    ours = [LIVER, SPLEEN]
    assert matching_label(label("Leber", "10200004", meaning="Liver"), ours) is LIVER
    assert matching_label(label("Liver", "78961009", meaning="Spleen"), ours) is SPLEEN
    assert matching_label(label("Liver", "64033007", meaning="Kidney"), ours) is None
    assert matching_label(label("Liver", "10200004", scheme="LN"), ours) is None


def test_legacy_srt_code_matches_its_sct_equivalent() -> None:
    assert same_concept(Code("T-62000", "SRT", "Liver"), Code("10200004", "SCT", "Liver"))
    assert not same_concept(Code("T-62000", "SRT", "Liver"), Code("78961009", "SCT", "Spleen"))


def test_dice() -> None:
    a = np.zeros((4, 10, 10), dtype=bool)
    b = np.zeros_like(a)
    a[:, :, :5] = True  # 200 voxels
    b[:, :, 3:8] = True  # 200 voxels, 80 shared
    assert dice(a, a) == 1.0
    assert dice(a, b) == pytest.approx(2 * 80 / 400)
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        dice(a, a[:2])


def test_agreement_signal_fires_on_disagreement_and_is_monotonic() -> None:
    values = np.linspace(0, 1, 21)
    subscores = [agreement_signal(v).subscore for v in values]
    assert subscores == sorted(subscores)
    assert agreement_signal(AGREEMENT_DICE_HIGH).subscore == 1.0
    assert agreement_signal(AGREEMENT_DICE_LOW).subscore == 0.0
    assert agreement_signal(0.95).fired is False
    assert agreement_signal(0.6).fired is True
    assert agreement_signal(0.6).reason is Reason.DISAGREEMENT


@pytest.fixture(scope="module")
def volume():
    return load_volume(make_ct_series(seed=11))


def mapped_with(volume, masks: list[np.ndarray], labels: list[SegmentLabel], numbers: list[int]) -> MappedSegmentation:
    """A mapped SEG (dataset from a real highdicom SEG; masks and numbers as given)."""
    seg = make_third_party_seg(volume.datasets, [masks[0]], [("10200004", "SCT", "Liver")])
    mapped = map_segments(seg, volume)
    return MappedSegmentation(mapped.dataset, [MappedSegment(n, lab, m, "VendorSeg")
                                              for n, lab, m in zip(numbers, labels, masks, strict=True)])


def test_agreement_keeps_an_agreeing_segment_and_sends_a_disagreeing_one_to_review(volume) -> None:
    sphere = sphere_mask(*volume.array.shape)
    shifted = np.roll(sphere, 14, axis=2)
    mapped = mapped_with(volume, [sphere, shifted], [label("Leber", "10200004"), label("Leber 2", "10200004")], [3, 7])
    reference = LabelReference(LIVER, "organ-seg 1.1.0", {}, prediction=sphere)

    result, qc, judgements = judge_segmentation(volume, mapped, [reference])

    assert [s.segment_number for s in qc.segments] == [3, 7]  # the SEG's own numbers
    assert result.probabilities is None and result.model_name == "VendorSeg"
    first, second = qc.segments
    assert judgements[0].agreement_dice == 1.0 and judgements[0].matched is reference
    # Judged without our prediction, the same segments score what the fitted fusion gives them
    # (since QC 2.1.0 a mask without probabilities has its own model, which leans on the estimator:
    # on this sphere, not an abdomen phantom, it predicts a Dice of about 0.5, whatever agrees with it).
    _, alone, _ = judge_segmentation(volume, mapped, [LabelReference(LIVER, "organ-seg 1.1.0", {})])
    assert Reason.DISAGREEMENT not in first.reasons
    assert first.quality_score == alone.segments[0].quality_score  # full agreement never lowers the score
    assert second.verdict is Verdict.NEEDS_REVIEW and Reason.DISAGREEMENT in second.reasons
    assert second.quality_score < alone.segments[1].quality_score and second.quality_score < first.quality_score
    assert judgements[1].agreement_dice == pytest.approx(dice(shifted, sphere))
    assert second.signals["agreement_dice"] == pytest.approx(judgements[1].agreement_dice, abs=1e-6)
    # Nothing was predicted for these masks: no model-confidence signal.
    assert "mean_probability" not in first.signals and "expected_dice" not in first.signals


def test_unmatched_segment_is_judged_without_statistics_or_agreement(volume) -> None:
    sphere = sphere_mask(*volume.array.shape)
    mapped = mapped_with(volume, [sphere], [label("Kidney", "64033007")], [1])
    reference = LabelReference(LIVER, "organ-seg 1.1.0", {"volume_ml_p01": 900.0, "volume_ml_p99": 1800.0},
                               prediction=np.zeros_like(sphere))

    _, qc, judgements = judge_segmentation(volume, mapped, [reference])

    assert judgements[0].matched is None and judgements[0].agreement_dice is None
    signals = qc.segments[0].signals
    assert "agreement_dice" not in signals and "volume_ml_subscore" not in signals
    assert "largest_component_share" in signals  # the mask heuristics still run


def test_matched_label_statistics_are_applied(volume) -> None:
    """The card's volume range of the matched label judges the segment (here: far too small)."""
    sphere = sphere_mask(*volume.array.shape)
    mapped = mapped_with(volume, [sphere], [label("Leber", "10200004")], [1])
    reference = LabelReference(LIVER, "organ-seg 1.1.0", {"volume_ml_p01": 900.0, "volume_ml_p99": 1800.0})

    _, qc, judgements = judge_segmentation(volume, mapped, [reference])

    assert judgements[0].agreement_dice is None  # no prediction given: no agreement
    assert Reason.VOLUME_ANOMALY in qc.segments[0].reasons
    assert qc.segments[0].verdict is Verdict.NEEDS_REVIEW


def test_fragmented_segment_needs_review_without_any_model(volume) -> None:
    sphere = sphere_mask(*volume.array.shape)
    broken = sphere.copy()
    broken[::2] = False  # every other slice gone: shattered into single-slice pieces
    mapped = mapped_with(volume, [broken], [label("Leber", "10200004")], [1])

    _, qc, _ = judge_segmentation(volume, mapped, [])

    assert qc.segments[0].verdict is Verdict.NEEDS_REVIEW
    assert Reason.FRAGMENTATION in qc.segments[0].reasons
