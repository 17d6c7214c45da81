"""Judging a third-party SEG: label matching by code, agreement (Dice), the fused verdict."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from pacs_sentinel.dicom_io.seg_masks import MappedSegment, MappedSegmentation, map_segments
from pacs_sentinel.dicom_io.series import load_series_files, load_volume
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from pacs_sentinel.qc.agreement import (
    AGREEMENT_DICE_HIGH,
    AGREEMENT_DICE_LOW,
    REFERENCE_MIN_SCORE,
    agreement_signal,
    dice,
    matching_label,
    same_concept,
)
from pacs_sentinel.qc.estimator import load_estimator
from pacs_sentinel.qc.evaluate import segment_signals, shipped_fusion
from pacs_sentinel.qc.image import assess_image
from pacs_sentinel.qc.segqc import LabelReference, judge_segmentation
from pacs_sentinel.results import Code, Reason, SegmentationResult, SegmentLabel, Verdict
from tests.conftest import make_third_party_seg
from tests.reports.conftest import LIVER, SPLEEN, make_ct_series, sphere_mask

SEG_PHANTOM_SEED = 7_350_000  # far from every seed the models and the QC were trained or calibrated on
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
    # Full agreement with a prediction we trust (here vouched for: no own score given) never lowers
    # the score; since QC 2.7.0 it is a fitted feature and raises it (the estimator, which calls
    # this sphere a poor liver, is outweighed by a trusted model that segments the same sphere).
    assert first.quality_score >= alone.segments[0].quality_score
    assert second.verdict is Verdict.NEEDS_REVIEW and Reason.DISAGREEMENT in second.reasons
    assert second.quality_score < alone.segments[1].quality_score and second.quality_score < first.quality_score
    assert judgements[1].agreement_dice == pytest.approx(dice(shifted, sphere))
    assert second.signals["agreement_dice"] == pytest.approx(judgements[1].agreement_dice, abs=1e-6)
    # Nothing was predicted for these masks: no model-confidence signal.
    assert "mean_probability" not in first.signals and "expected_dice" not in first.signals


def test_agreement_counts_only_when_our_own_prediction_passes_its_qc(volume) -> None:
    """Where our model fails (its own mask scores low) a disagreement says nothing about the
    vendor's mask: the segment is judged as without a prediction of ours (QC 2.7.0)."""
    sphere = sphere_mask(*volume.array.shape)
    shifted = np.roll(sphere, 14, axis=2)
    mapped = mapped_with(volume, [shifted], [label("Leber", "10200004")], [1])
    _, alone, _ = judge_segmentation(volume, mapped, [LabelReference(LIVER, "organ-seg 1.1.0", {})])
    for score, used in ((0.2, False), (REFERENCE_MIN_SCORE - 0.01, False), (REFERENCE_MIN_SCORE, True),
                        (0.97, True), (None, True)):
        reference = LabelReference(LIVER, "organ-seg 1.1.0", {}, prediction=sphere, prediction_score=score)
        _, qc, judgements = judge_segmentation(volume, mapped, [reference])
        segment = qc.segments[0]
        assert judgements[0].agreement_dice == pytest.approx(dice(shifted, sphere))  # measured either way
        assert judgements[0].agreement_used is used, score
        assert ("agreement_dice" in segment.signals) is used
        assert (Reason.DISAGREEMENT in segment.reasons) is used
        if used:
            assert segment.quality_score < alone.segments[0].quality_score
        else:
            assert segment.quality_score == alone.segments[0].quality_score


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
    # Neither a label of ours nor the (liver) estimator covers a kidney: review, saying why.
    assert qc.segments[0].reasons[-1] is Reason.UNCOVERED_STRUCTURE and qc.segments[0].verdict is Verdict.NEEDS_REVIEW
    assert "predicted_dice" not in signals


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


@pytest.fixture(scope="module")
def abdomen(tmp_path_factory):
    """A phantom CT series as loaded from its DICOM files, and the phantom (organ ground truths)."""
    phantom = make_ct_phantom(SEG_PHANTOM_SEED)
    files = write_ct_series(phantom, tmp_path_factory.mktemp("abdomen"), seed=SEG_PHANTOM_SEED)
    return load_series_files(files), phantom


def test_a_structure_the_estimator_never_learned_is_judged_without_it(abdomen) -> None:
    """A vendor SEG's correct spleen is not a bad liver: the liver estimator judges only livers on
    CT, and the other segments are scored by the fusion's models fitted without it. A structure
    no label of ours covers either goes to review, saying so (QC033), not "Low predicted Dice"."""
    volume, phantom = abdomen
    spleen_code = ("78961009", "SCT", "Spleen")
    seg = make_third_party_seg(volume.datasets, [phantom.liver, phantom.organ("spleen")],
                               [("10200004", "SCT", "Liver"), spleen_code])
    mapped = map_segments(seg, volume)
    estimator = load_estimator()
    assert estimator.predict(volume.array, mapped.segments[1].mask, volume.spacing) < 0.5  # "a bad liver"

    _, qc, judgements = judge_segmentation(volume, mapped, [LabelReference(LIVER, "organ-seg 1.1.0", {})])

    liver, spleen = qc.segments
    assert "predicted_dice" in liver.signals and liver.verdict is Verdict.ACCEPTED and liver.reasons == []
    assert judgements[1].matched is None and "predicted_dice" not in spleen.signals
    assert spleen.reasons == [Reason.UNCOVERED_STRUCTURE] and spleen.verdict is Verdict.NEEDS_REVIEW
    fusion = shipped_fusion()
    signals = segment_signals(volume, SegmentationResult(None, mapped.segments[1].mask[None], [mapped.segments[1].label],
                                                         "VendorSeg", "3.1"),
                              0, image_signals=assess_image(volume).signals, midline_x=None, estimator=estimator)
    score, model = fusion.score(signals)
    assert model.name == "without-probabilities-no-estimator" and "predicted_dice" not in model.features
    assert spleen.quality_score > 0.8  # its general checks find nothing wrong; the policy decides

    # A label of ours with the spleen's code (a card that knows the spleen) covers it: accepted.
    _, known, judged = judge_segmentation(volume, mapped, [LabelReference(SPLEEN, "spleen-seg 1.0", {})])
    assert judged[1].matched is not None and known.segments[1].verdict is Verdict.ACCEPTED
    assert known.segments[1].reasons == [] and known.segments[1].quality_score == spleen.quality_score
    # The checks that apply still judge it: a spleen cut in two scores lower.
    cut = phantom.organ("spleen").copy()
    middle = int(np.flatnonzero(cut.any(axis=(1, 2))).mean())
    cut[middle - 1:middle + 1] = False
    broken = make_third_party_seg(volume.datasets, [cut], [spleen_code])
    _, worse, _ = judge_segmentation(volume, map_segments(broken, volume), [LabelReference(SPLEEN, "spleen-seg 1.0", {})])
    assert worse.segments[0].quality_score < known.segments[1].quality_score


def test_a_series_of_another_modality_is_judged_without_the_ct_estimator(abdomen) -> None:
    volume, phantom = abdomen
    as_mr = dataclasses.replace(volume, datasets=copy.deepcopy(volume.datasets))
    for ds in as_mr.datasets:
        ds.Modality = "MR"
    assert volume.modality == "CT" and as_mr.modality == "MR"
    seg = make_third_party_seg(volume.datasets, [phantom.liver], [("10200004", "SCT", "Liver")])
    _, on_ct, _ = judge_segmentation(volume, map_segments(seg, volume), [])
    _, on_mr, _ = judge_segmentation(as_mr, map_segments(seg, as_mr), [])
    assert "predicted_dice" in on_ct.segments[0].signals
    assert "predicted_dice" not in on_mr.segments[0].signals
