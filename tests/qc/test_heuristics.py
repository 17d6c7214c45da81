"""Mask heuristics and their fusion into a score and verdict."""

from __future__ import annotations

import numpy as np
import pytest

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.inference.phantoms import make_ct_phantom
from pacs_sentinel.qc.estimator import load_estimator
from pacs_sentinel.qc.evaluate import QC_VERSION, evaluate_segmentation, segment_signals, shipped_fusion
from pacs_sentinel.qc.heuristics import (
    FLAG_BELOW,
    Signal,
    body_size_signal,
    border_contact_signal,
    confidence_signal,
    expected_dice_signal,
    hole_signal,
    left_share,
    location_signal,
    patient_x_mm,
)
from pacs_sentinel.qc.image import assess_image
from pacs_sentinel.results import Code, Reason, SegmentationResult, SegmentLabel, Verdict

LIVER = SegmentLabel("Liver", Code("91723000", "SCT", "Anatomical Structure"), Code("10200004", "SCT", "Liver"), "liver")
SHAPE = (40, 96, 96)
SPACING = (5.0, 2.5, 2.5)
VOXEL_ML = np.prod(SPACING) / 1000.0


def _volume() -> Volume:
    """A clean CT-like volume: air around an elliptic soft-tissue body, mild noise."""
    _, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    body = ((y - 48) * SPACING[1] / 100.0) ** 2 + ((x - 48) * SPACING[2] / 110.0) ** 2 <= 1.0
    array = np.where(body, 40.0, -1000.0) + np.random.default_rng(0).normal(0.0, 12.0, SHAPE)
    return Volume(np.broadcast_to(array, SHAPE).astype(np.float32), SPACING, (0.0, 0.0, 0.0), np.eye(3), [])


def _ellipsoid(radii_mm: tuple[float, float, float], centre: tuple[int, int, int] = (20, 48, 48)) -> np.ndarray:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return (((z - centre[0]) * SPACING[0] / radii_mm[0]) ** 2 + ((y - centre[1]) * SPACING[1] / radii_mm[1]) ** 2
            + ((x - centre[2]) * SPACING[2] / radii_mm[2]) ** 2) <= 1.0


def _result(mask: np.ndarray, probability: float = 0.97) -> SegmentationResult:
    reference_ml = float(mask.sum() * VOXEL_ML) if mask.any() else 500.0
    # Far from the organ a trained model is sure: a diffuse background probability would count as
    # organ the mask left out (expected Dice).
    probabilities = np.where(mask, probability, 0.001).astype(np.float32)[None]
    return SegmentationResult(
        probabilities=probabilities, mask=mask[None], labels=[LIVER], model_name="test", model_version="0",
        reference={"Liver": {"volume_ml_p01": reference_ml * 0.8, "volume_ml_p99": reference_ml * 1.2}},
    )


def _phantom_case(variant: str = "normal", seed: int = 7_060_001) -> tuple[Volume, SegmentationResult]:
    """A phantom with its ground-truth liver as the mask (what the learned estimator knows as right)."""
    phantom = make_ct_phantom(seed, variant=variant)
    volume = Volume(phantom.hu.astype(np.float32), phantom.spacing, phantom.origin, np.eye(3), [])
    result = _result(phantom.liver)
    result.reference["Liver"].update({"left_share_p01": 0.05, "left_share_p99": 0.2})
    return volume, result


def test_clean_compact_mask_is_accepted_without_reasons() -> None:
    volume, result = _phantom_case()
    qc = evaluate_segmentation(volume, result)
    assert qc.verdict is Verdict.ACCEPTED
    assert qc.reasons == []
    assert qc.quality_score > 0.9
    assert qc.segments[0].volume_mm3 == pytest.approx(result.mask.sum() * volume.voxel_volume_mm3)


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
    # The finding is reported whatever the verdict: since QC 2.0.0 the verdict comes from the
    # calibrated score, in which a heuristic weighs what it predicted on the calibration set.
    assert Reason.FRAGMENTATION in qc.reasons
    assert qc.segments[0].signals["largest_component_share_subscore"] < 0.5


def test_irregular_shape_is_flagged() -> None:
    mask = np.zeros(SHAPE, bool)
    mask[5:35, 10:86, 46:50] = True  # a thin plate
    mask[5:35, 46:50, 10:86] = True  # crossed with another
    qc = evaluate_segmentation(_volume(), _result(mask))
    assert Reason.SHAPE_IRREGULARITY in qc.reasons


def test_low_model_confidence_is_flagged() -> None:
    qc = evaluate_segmentation(_volume(), _result(_ellipsoid((60, 50, 45)), probability=0.55))
    assert Reason.LOW_MODEL_CONFIDENCE in qc.reasons


def test_expected_dice_is_one_for_a_mask_the_probabilities_back_fully() -> None:
    mask = _ellipsoid((60, 50, 45))
    signal = expected_dice_signal(mask.astype(np.float32), mask)
    assert signal.name == "expected_dice" and signal.reason is Reason.LOW_EXPECTED_DICE
    assert signal.value == pytest.approx(1.0) and signal.subscore == 1.0 and not signal.fired


def test_expected_dice_is_the_soft_dice_of_mask_and_probabilities() -> None:
    mask = _ellipsoid((40, 30, 30))
    p = np.where(mask, 0.8, 0.0).astype(np.float32)
    p[_ellipsoid((45, 35, 35)) & ~mask] = 0.4  # an unsure rim around the mask
    n, rim = int(mask.sum()), int((p == np.float32(0.4)).sum())
    expected = 2 * 0.8 * n / (0.8 * n + 0.4 * rim + n)
    assert expected_dice_signal(p, mask).value == pytest.approx(expected, rel=1e-5)


def test_expected_dice_sees_a_mask_departing_from_the_model_both_ways() -> None:
    # The model is sure of one organ; the judged mask leaves part of it out (erosion) or spills
    # over into a neighbour (leakage). The mean probability inside the mask only sees the spill.
    organ = _ellipsoid((60, 50, 45))
    p = np.where(organ, 0.97, 0.001).astype(np.float32)
    own = expected_dice_signal(p, organ)
    eroded = organ.copy()
    eroded[:, :, 46:] = False  # half of the organ left out
    leaked = organ | _ellipsoid((60, 60, 50), centre=(20, 48, 24))  # a neighbour, partly overlapping
    true_eroded = 2 * int((eroded & organ).sum()) / (int(eroded.sum()) + int(organ.sum()))
    true_leaked = 2 * int((leaked & organ).sum()) / (int(leaked.sum()) + int(organ.sum()))
    assert 0.5 < true_eroded < 0.7 and 0.5 < true_leaked < 0.7  # both are failures against the organ
    assert not own.fired and own.value > 0.95
    for mask, truth in ((eroded, true_eroded), (leaked, true_leaked)):
        signal = expected_dice_signal(p, mask)
        assert signal.fired and signal.value == pytest.approx(truth, abs=0.03)
    assert not confidence_signal(p, eroded).fired  # the erosion looks confident from inside
    assert confidence_signal(p, leaked).fired


def test_low_expected_dice_is_reported() -> None:
    organ = _ellipsoid((60, 50, 45))
    result = _result(organ)
    result.mask = (organ | _ellipsoid((60, 50, 45), centre=(20, 48, 20)))[None]  # the mask leaks, the model did not
    qc = evaluate_segmentation(_volume(), result)
    assert Reason.LOW_EXPECTED_DICE in qc.reasons and qc.verdict is Verdict.NEEDS_REVIEW
    assert qc.segments[0].signals["expected_dice"] < 0.7


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
    volume, result = _phantom_case()
    result.probabilities = np.where(result.mask, 0.75, 0.001).astype(np.float32)
    result.reference["Liver"]["volume_ml_p99"] = result.reference["Liver"]["volume_ml_p01"] / 0.8 * 0.97
    qc = evaluate_segmentation(volume, result, accept_threshold=0.99)
    segment = qc.segments[0]
    assert segment.verdict is Verdict.NEEDS_REVIEW
    assert all(v >= 0.5 for k, v in segment.signals.items() if k.endswith("_subscore"))
    assert len(segment.reasons) == 1


def test_a_solid_mask_has_no_holes_and_a_cavity_is_flagged() -> None:
    solid = _ellipsoid((60, 50, 45))
    assert hole_signal(solid).value == 0.0
    assert not hole_signal(solid).fired
    hollow = solid & ~_ellipsoid((30, 25, 22))
    signal = hole_signal(hollow)
    assert signal.value == pytest.approx((solid.sum() - hollow.sum()) / solid.sum())
    assert signal.fired and signal.reason is Reason.SHAPE_IRREGULARITY
    qc = evaluate_segmentation(_volume(), _result(hollow))
    assert Reason.SHAPE_IRREGULARITY in qc.reasons
    assert qc.segments[0].signals["hole_share"] > 0.05


def test_a_mask_cut_by_the_image_border_is_flagged() -> None:
    inside = _ellipsoid((60, 50, 45))
    assert border_contact_signal(inside).value == 0.0
    cut = _ellipsoid((60, 50, 60), centre=(20, 48, 90))  # runs out of the field of view at the right
    signal = border_contact_signal(cut)
    assert signal.fired and signal.reason is Reason.BORDER_CONTACT
    volume = _volume()
    qc = evaluate_segmentation(volume, _result(cut))
    assert Reason.BORDER_CONTACT in qc.reasons
    # The finding explains, the fitted score decides: since QC 2.1.0 a model fully sure of the very
    # mask it made (expected Dice 0.97) may keep it above the threshold. The contact never raises
    # the score, and lowers it under each fusion model that weighs it (since QC 2.3.0 the model for
    # own masks with stochastic samples does; the one without samples found no use for it).
    signals = segment_signals(volume, _result(cut), 0, image_signals=assess_image(volume).signals, midline_x=None,
                              estimator=load_estimator())
    inside = [Signal(s.name, 0.0, 1.0, s.reason) if s.name == "border_contact_share" else s for s in signals]
    assert shipped_fusion().score(signals)[0] <= shipped_fusion().score(inside)[0]
    assert qc.segments[0].quality_score == pytest.approx(shipped_fusion().score(signals)[0], abs=1e-4)
    samples = [Signal("sample_dice", 0.97, 1.0, Reason.HIGH_UNCERTAINTY),
               Signal("mask_entropy", 0.05, 1.0, Reason.HIGH_UNCERTAINTY)]
    weighing = [m for m in shipped_fusion().models
                if "border_contact_share" in m.features and m.weights[m.features.index("border_contact_share")] > 0]
    assert weighing, "no fusion model weighs border contact"
    score_cut, model = shipped_fusion().score(signals + samples)
    assert model in weighing
    assert score_cut < shipped_fusion().score(inside + samples)[0]


def test_left_share_follows_the_patient_orientation() -> None:
    mask = _ellipsoid((40, 30, 30), centre=(20, 48, 20))  # low column indices
    assert left_share(mask, 48 * SPACING[2], SPACING, np.eye(3)) == 0.0  # column index -> patient left
    flipped = np.diag([-1.0, 1.0, -1.0])  # column index -> patient right (e.g. feet-first prone)
    assert left_share(mask, -48 * SPACING[2], SPACING, flipped) == 1.0


@pytest.mark.parametrize("direction", [
    np.eye(3), np.diag([-1.0, 1.0, 1.0]),
    np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),  # sagittal slices: x follows the slice
    np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]),  # x follows the row
    np.array([[0.94, 0.0, 0.34], [0.0, 1.0, 0.0], [-0.34, 0.0, 0.94]]),  # oblique: every voxel listed
], ids=["axial", "axial-flipped", "x-by-slice", "x-by-row", "oblique"])
def test_left_share_counts_every_voxel_by_its_patient_x(direction: np.ndarray) -> None:
    # The per-axis count used when patient x follows one index axis gives what listing every
    # voxel's patient x gives.
    rng = np.random.default_rng(5)
    for _ in range(10):
        mask = rng.random((12, 17, 19)) > rng.uniform(0.3, 0.99)
        spacing = tuple(rng.uniform(0.5, 3.0, 3))
        midline = float(rng.uniform(-20.0, 40.0))
        expected = np.mean(patient_x_mm(np.argwhere(mask), spacing, direction) > midline) if mask.any() else 0.0
        assert left_share(mask, midline, spacing, direction) == pytest.approx(expected, abs=1e-12)


def test_a_right_mask_on_the_wrong_side_goes_to_review_whatever_its_score() -> None:
    # Situs inversus: the ground truth itself lies on the left, outside the card's range. The
    # score (P(Dice >= 0.7)) may stay high, but the model was never validated there.
    volume, result = _phantom_case("situs-inversus")
    segment = evaluate_segmentation(volume, result).segments[0]
    assert Reason.IMPLAUSIBLE_LOCATION in segment.reasons
    assert segment.verdict is Verdict.NEEDS_REVIEW
    normal = evaluate_segmentation(*_phantom_case()).segments[0]
    assert Reason.IMPLAUSIBLE_LOCATION not in normal.reasons and normal.verdict is Verdict.ACCEPTED


def test_a_mask_on_the_wrong_side_of_the_body_is_flagged() -> None:
    reference = {"left_share_p01": 0.05, "left_share_p99": 0.2}
    right = _ellipsoid((40, 30, 30), centre=(20, 48, 30))  # patient right (low x)
    left = _ellipsoid((40, 30, 30), centre=(20, 48, 66))  # patient left
    for mask, expect_fired in ((right, False), (left, True)):
        result = _result(mask)
        result.reference["Liver"].update(reference)
        qc = evaluate_segmentation(_volume(), result)
        segment = qc.segments[0]
        assert segment.signals["left_share"] == pytest.approx(0.0 if not expect_fired else 1.0)
        assert (Reason.IMPLAUSIBLE_LOCATION in segment.reasons) is expect_fired
        if expect_fired:
            assert segment.verdict is Verdict.NEEDS_REVIEW


def test_body_size_against_the_cards_range() -> None:
    reference = {"body_area_cm2_p01": 400.0, "body_area_cm2_p99": 600.0}
    for area, subscore in ((500.0, 1.0), (400.0, 1.0), (400.0 / 1.1, 1.0), (600.0 * 1.1, 1.0),
                           (400.0 / 1.6, 0.0), (600.0 * 1.6, 0.0), (100.0, 0.0), (0.0, 0.0)):
        signal = body_size_signal(area, reference)
        assert signal is not None and signal.reason is Reason.UNFAMILIAR_INPUT
        assert signal.subscore == pytest.approx(subscore), area
    smaller, larger = body_size_signal(400.0 / 1.3, reference), body_size_signal(600.0 * 1.3, reference)
    assert smaller.subscore == pytest.approx(larger.subscore) and 0.5 < smaller.subscore < 1.0 and not smaller.fired
    assert body_size_signal(400.0 / 1.4, reference).fired
    # Far outside, the score keeps at most even odds (the ranking among such masks stays).
    assert body_size_signal(100.0, reference).fusion_factor == pytest.approx(0.5)
    # Smaller still is never more trusted.
    subscores = [body_size_signal(a, reference).subscore for a in np.linspace(500.0, 150.0, 36)]
    assert all(b <= a for a, b in zip(subscores, subscores[1:]))
    assert body_size_signal(None, reference) is None
    assert body_size_signal(300.0, {"volume_ml_p01": 1.0, "volume_ml_p99": 2.0}) is None
    assert body_size_signal(300.0, None) is None


def test_a_patient_much_smaller_than_the_training_images_goes_to_review_with_qc032() -> None:
    """The same phantom and its true liver at 70 % of the spacing: a patient half the
    cross-section of any the model was trained on. Every check of the mask alone finds it fine;
    the model was never validated there, so the score drops and the finding says why."""
    volume, result = _phantom_case()
    result.reference["Liver"].update({"body_area_cm2_p01": 440.3, "body_area_cm2_p99": 637.0})
    normal = evaluate_segmentation(volume, result).segments[0]
    assert normal.verdict is Verdict.ACCEPTED and Reason.UNFAMILIAR_INPUT not in normal.reasons
    assert normal.signals["body_area_cm2_subscore"] == 1.0
    small = Volume(volume.array, tuple(0.7 * s for s in volume.spacing), volume.origin, volume.direction, [])
    segment = evaluate_segmentation(small, result).segments[0]
    assert segment.signals["body_area_cm2"] == pytest.approx(0.49 * normal.signals["body_area_cm2"], rel=0.01)
    assert Reason.UNFAMILIAR_INPUT in segment.reasons
    assert segment.verdict is Verdict.NEEDS_REVIEW and segment.quality_score < 0.5 * normal.quality_score


def test_the_demo_models_normal_sized_liver_in_a_small_patient_goes_to_review() -> None:
    """Found from outside: the demo model segments a liver of the usual size in a patient scaled
    to 75 % (its mask twice the true volume, Dice 0.65). Before the body-size check every signal
    found it plausible and QC accepted it with a score of 0.98."""
    from pacs_sentinel.inference.models import load_segmentation_model
    from pacs_sentinel.inference.training import phantom_volume
    from pacs_sentinel.qc.agreement import dice

    phantom = make_ct_phantom(3)
    small = phantom_volume(phantom)
    small = Volume(small.array, tuple(0.75 * s for s in small.spacing), small.origin, small.direction, [])
    model = load_segmentation_model("demo:organ-seg", device="cpu")
    result = model.predict(small, mc_dropout_samples=4)
    assert dice(result.mask[0] > 0, phantom.liver) < 0.7  # the model fails there
    segment = evaluate_segmentation(small, result, accept_threshold=0.8934).segments[0]
    assert segment.verdict is Verdict.NEEDS_REVIEW and Reason.UNFAMILIAR_INPUT in segment.reasons
    normal = model.predict(phantom_volume(phantom), mc_dropout_samples=4)
    assert evaluate_segmentation(phantom_volume(phantom), normal, accept_threshold=0.8934).segments[0].verdict \
        is Verdict.ACCEPTED


def test_location_is_skipped_without_a_card_reference() -> None:
    assert location_signal(0.9, {"volume_ml_p01": 1.0, "volume_ml_p99": 2.0}) is None
    assert location_signal(0.9, None) is None
    qc = evaluate_segmentation(_volume(), _result(_ellipsoid((40, 30, 30), centre=(20, 48, 66))))
    assert "left_share" not in qc.segments[0].signals


def test_every_signal_is_recorded_and_the_version_is_bumped() -> None:
    qc = evaluate_segmentation(_volume(), _result(_ellipsoid((60, 50, 45))))
    assert qc.qc_version == QC_VERSION == "2.8.0"
    signals = qc.segments[0].signals
    for name in ("predicted_dice", "mean_probability", "expected_dice", "hole_share", "border_contact_share",
                 "noise_hu", "edge_width_px", "metal_ml",
                 "air_level_hu", "out_of_range_share", "contrast_range_hu", "truncated_slice_share"):
        assert name in signals and f"{name}_subscore" in signals


def test_a_floored_signal_lowers_but_cannot_veto_alone() -> None:
    floored = Signal("noise_hu", 120.0, 0.0, Reason.POOR_INPUT_QUALITY, fusion_floor=0.6)
    assert floored.fired and floored.fusion_factor == pytest.approx(0.6)
    assert Signal("x", 1.0, 0.3, Reason.FRAGMENTATION).fusion_factor == pytest.approx(0.3)
    assert FLAG_BELOW == 0.5


def test_jpeg_blocks_lower_the_fused_score_by_their_factor_and_say_why() -> None:
    """Blockiness is no feature of the fitted fusion (the calibration phantoms carry no
    compression): its factor multiplies the calibrated score, and the finding says why."""
    from tests.qc.test_image import _through_jpeg

    volume, result = _phantom_case()
    clean = evaluate_segmentation(volume, result).segments[0]
    volume.array = _through_jpeg(volume.array, 10)
    qc = evaluate_segmentation(volume, result, accept_threshold=0.8934)
    segment = qc.segments[0]
    assert segment.signals["blockiness_subscore"] == 0.0 and segment.signals["blockiness"] > 3.0
    assert Reason.POOR_INPUT_QUALITY in segment.reasons and qc.verdict is Verdict.NEEDS_REVIEW
    image_qc = assess_image(volume)
    signals = segment_signals(volume, result, 0, image_signals=image_qc.signals,
                              midline_x=image_qc.midline_x_mm(volume), estimator=load_estimator())
    without = [s for s in signals if s.name != "blockiness"]
    assert segment.quality_score == pytest.approx(shipped_fusion().score(without)[0] * 0.8, abs=1e-4)
    assert clean.quality_score > 0.95 and clean.verdict is Verdict.ACCEPTED  # the same mask, uncompressed


def test_a_noisy_input_is_reported_but_a_good_mask_stays_accepted() -> None:
    volume, result = _phantom_case()
    volume.array = volume.array + np.random.default_rng(1).normal(0.0, 120.0, volume.array.shape).astype(np.float32)
    qc = evaluate_segmentation(volume, result)
    assert Reason.POOR_INPUT_QUALITY in qc.reasons
    assert qc.verdict is Verdict.ACCEPTED


def _border_contact_by_ndimage(mask: np.ndarray) -> float:
    """The signal's definition, on the whole volume: the code before the bounding-box version."""
    from scipy import ndimage

    surface = mask & ~ndimage.binary_erosion(mask, border_value=1)
    on_border = np.zeros_like(mask)
    on_border[[0, -1], :, :] = on_border[:, [0, -1], :] = on_border[:, :, [0, -1]] = True
    total = int(surface.sum())
    return float(int((surface & on_border).sum())) / total if total else 0.0


def test_border_contact_on_the_bounding_box_equals_the_whole_volume() -> None:
    rng = np.random.default_rng(5)
    masks = [np.zeros((4, 5, 6), bool), np.ones((4, 5, 6), bool), np.ones((1, 1, 1), bool)]
    for shape in ((3, 4, 5), (8, 9, 10), (12, 20, 16)):
        for share in (0.05, 0.4, 0.9):
            masks.append(rng.random(shape) < share)
    liver = make_ct_phantom(7).liver
    masks += [liver, liver[:10], liver[:, 40:, :], liver[::-1, :, :30]]
    for mask in masks:
        assert border_contact_signal(mask).value == _border_contact_by_ndimage(mask)
