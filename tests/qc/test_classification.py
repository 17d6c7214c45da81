"""QC of classification results: decision confidence, sample spread, input image, fusion."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from pacs_sentinel.qc.classification import (
    MARGIN_AT_HALF,
    QC_VERSION,
    confidence_signal,
    decision_margin,
    evaluate_classification,
    familiarity_signal,
    image_signals,
    noise_sigma,
)
from pacs_sentinel.results import ClassificationResult, Code, FindingLabel, Reason, Verdict

NODULE = FindingLabel("Nodule", Code("27925004", "SCT", "Nodule"), "cxr-cls Nodule")
EFFUSION = FindingLabel("Pleural effusion", Code("60046008", "SCT", "Pleural effusion"), "cxr-cls Effusion")


def result_of(
    probabilities: list[float],
    samples: np.ndarray | None = None,
    thresholds: list[float] | None = None,
    kinds: list[str] | None = None,
) -> ClassificationResult:
    """A result with one label per probability (Nodule, Effusion, ...)."""
    labels = [NODULE, EFFUSION][: len(probabilities)]
    p = np.asarray(probabilities, dtype=np.float32)
    return ClassificationResult(
        probabilities=p,
        logits=np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1)),
        labels=labels,
        thresholds=np.asarray(thresholds or [0.5] * len(labels), dtype=np.float32),
        model_name="cxr-cls",
        model_version="0.4.1",
        samples=samples,
        sample_kinds=kinds if kinds is not None else ["mc-dropout"] * (0 if samples is None else len(samples)),
    )


def tight_samples(probabilities: list[float], n: int = 20, sd: float = 0.01, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.asarray(probabilities)[None] + rng.normal(0, sd, (n, len(probabilities))), 0, 1).astype(
        np.float32
    )


def good_radiograph(seed: int = 0) -> np.ndarray:
    """A 12-bit radiograph-like image: body, darker lungs, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32)
    body = ((yy - 64) / 61) ** 2 + ((xx - 64) / 58) ** 2 <= 1
    lungs = ((yy - 58) / 38) ** 2 + ((np.abs(xx - 64) - 26) / 15) ** 2 <= 1
    return np.where(body, 2200.0, 300.0) - np.where(lungs, 1200.0, 0.0) + rng.normal(0, 20, (128, 128))


def test_confident_findings_with_tight_samples_are_accepted():
    probabilities = [0.96, 0.03]
    qc = evaluate_classification(result_of(probabilities, tight_samples(probabilities)), image=good_radiograph())
    assert qc.qc_version == QC_VERSION == "1.2.0-cls"
    assert qc.segments == []
    assert [f.finding_number for f in qc.findings] == [1, 2]
    assert [f.positive for f in qc.findings] == [True, False]
    for finding in qc.findings:
        assert finding.verdict is Verdict.ACCEPTED
        assert finding.reasons == []
        assert finding.quality_score > 0.85
    assert qc.verdict is Verdict.ACCEPTED and qc.reasons == []
    assert qc.findings[0].probability == pytest.approx(0.96)
    assert {"decision_margin", "worst_case_margin", "mc_dropout_std", "sample_disagreement", "saturated_share",
            "contrast_to_noise"} <= set(qc.findings[0].signals)
    # Confident findings are still ranked: the surer one scores higher (no saturation at 1).
    surer = evaluate_classification(result_of([0.99], tight_samples([0.99])), image=good_radiograph()).findings[0]
    assert qc.findings[0].quality_score < surer.quality_score < 1.0


@pytest.mark.parametrize("probability", [0.5, 0.51, 0.49, 0.56])
def test_probability_near_the_threshold_is_low_model_confidence(probability):
    qc = evaluate_classification(result_of([probability]))
    (finding,) = qc.findings
    assert finding.verdict is Verdict.NEEDS_REVIEW
    assert Reason.LOW_MODEL_CONFIDENCE in finding.reasons
    assert Reason.HIGH_UNCERTAINTY not in finding.reasons  # no samples: not judged


def test_a_probability_at_the_threshold_is_a_coin_toss():
    assert decision_margin(0.5, 0.5) == 0.0
    assert decision_margin(1.0, 0.5) == decision_margin(0.0, 0.5) == 1.0
    # The margin is relative to the room on each side of an asymmetric threshold.
    assert decision_margin(0.3, 0.2) == pytest.approx(0.125)
    assert decision_margin(0.1, 0.2) == pytest.approx(0.5)
    (finding,) = evaluate_classification(result_of([0.2], thresholds=[0.2])).findings
    assert finding.positive and finding.quality_score == 0.0
    assert finding.reasons == [Reason.LOW_MODEL_CONFIDENCE]


def test_samples_spread_across_the_threshold_are_high_uncertainty():
    rng = np.random.default_rng(3)
    spread = rng.uniform(0.25, 0.98, size=(30, 1)).astype(np.float32)
    qc = evaluate_classification(result_of([0.85], spread))
    (finding,) = qc.findings
    assert finding.verdict is Verdict.NEEDS_REVIEW
    # Samples on the other side of the threshold also make the worst-case margin negative.
    assert finding.reasons == [Reason.LOW_MODEL_CONFIDENCE, Reason.HIGH_UNCERTAINTY]
    assert finding.signals["mc_dropout_std"] > 0.15
    assert 0.2 < finding.signals["sample_disagreement"] < 0.6


def test_disagreement_is_counted_against_the_reported_decision():
    # Negative decision; 40 % of the samples say positive.
    samples = np.array([[0.1]] * 6 + [[0.7]] * 4, dtype=np.float32)
    (finding,) = evaluate_classification(result_of([0.2], samples)).findings
    assert not finding.positive
    assert finding.signals["sample_disagreement"] == pytest.approx(0.4)
    assert Reason.HIGH_UNCERTAINTY in finding.reasons


def test_too_few_samples_are_ignored():
    samples = np.array([[0.1], [0.9]], dtype=np.float32)
    (finding,) = evaluate_classification(result_of([0.95], samples)).findings
    assert "mc_dropout_std" not in finding.signals and "sample_disagreement" not in finding.signals
    # ... but they still count for the worst-case margin: a sample at 0.1 decides the other way.
    assert finding.signals["worst_case_margin"] == pytest.approx(-0.8)
    assert finding.verdict is Verdict.NEEDS_REVIEW and finding.reasons == [Reason.LOW_MODEL_CONFIDENCE]


def test_each_finding_is_judged_on_its_own_samples():
    rng = np.random.default_rng(5)
    samples = np.stack([np.full(20, 0.95), rng.uniform(0.1, 0.9, 20)], axis=1).astype(np.float32)
    qc = evaluate_classification(result_of([0.95, 0.9], samples))
    assert qc.findings[0].verdict is Verdict.ACCEPTED
    assert qc.findings[1].verdict is Verdict.NEEDS_REVIEW
    assert qc.verdict is Verdict.NEEDS_REVIEW
    assert Reason.HIGH_UNCERTAINTY in qc.reasons


@pytest.mark.parametrize(
    "image, why",
    [
        (np.full((64, 64), 800.0), "blank"),
        (np.where(np.arange(64 * 64).reshape(64, 64) % 3 == 0, 4095.0, 0.0), "clipped"),
        (np.random.default_rng(1).normal(1000, 50, (64, 64)), "noise only"),
    ],
)
def test_poor_input_images_are_flagged(image, why):
    qc = evaluate_classification(result_of([0.97]), image=image)
    (finding,) = qc.findings
    assert finding.verdict is Verdict.NEEDS_REVIEW, why
    assert finding.reasons == [Reason.POOR_INPUT_QUALITY], why


def test_good_images_pass_the_input_checks():
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for image in (good_radiograph(), apply_modality_lut(ct.pixel_array, ct), good_radiograph()[None]):
        assert all(signal.subscore == 1.0 for signal in image_signals(image))


def test_noise_estimate_ignores_smooth_structure():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float64)
    ramp = 10 * xx + 5 * yy
    assert noise_sigma(ramp) == pytest.approx(0.0, abs=1e-9)
    assert noise_sigma(ramp + rng.normal(0, 10, ramp.shape)) == pytest.approx(10.0, rel=0.15)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="probabilities shape"):
        evaluate_classification(
            ClassificationResult(
                probabilities=np.array([0.9, 0.1]), logits=np.zeros(2), labels=[NODULE], thresholds=np.array([0.5]),
                model_name="m", model_version="1",
            )
        )
    with pytest.raises(ValueError, match="samples shape"):
        evaluate_classification(result_of([0.9], np.zeros((5, 3), dtype=np.float32)))
    with pytest.raises(ValueError, match="2D"):
        evaluate_classification(result_of([0.9]), image=np.zeros((2, 4, 4)))


def test_nan_probability_needs_review():
    (finding,) = evaluate_classification(result_of([float("nan")])).findings
    assert finding.quality_score == 0.0 and finding.verdict is Verdict.NEEDS_REVIEW
    assert finding.reasons == [Reason.LOW_MODEL_CONFIDENCE]


def test_several_moderate_doubts_name_the_weakest():
    # Worst-case margin sub-score ~0.66 (lowest sample 0.72), sample std sub-score ~0.67
    # (std = 0.10): neither fires alone, their product (~0.44) is below 0.5.
    samples = np.array([[0.72], [0.92]] * 10, dtype=np.float32)
    (finding,) = evaluate_classification(result_of([0.82], samples)).findings
    assert finding.signals["worst_case_margin_subscore"] > 0.5
    assert finding.signals["mc_dropout_std_subscore"] > 0.5
    assert finding.quality_score < 0.5
    assert finding.verdict is Verdict.NEEDS_REVIEW
    assert finding.reasons == [Reason.HIGH_UNCERTAINTY]


def test_worst_case_margin_takes_every_sample_and_scores_half_at_its_constant():
    assert confidence_signal(0.5 + MARGIN_AT_HALF / 2, 0.5).subscore == pytest.approx(0.5)
    assert confidence_signal(1.0, 0.5).subscore == 1.0 and confidence_signal(0.0, 0.5).subscore == 1.0
    signal = confidence_signal(0.9, 0.5, np.array([0.95, 0.7, np.nan, 0.85]))
    assert signal.value == pytest.approx(0.4)  # the sample at 0.7
    assert confidence_signal(0.9, 0.5, np.array([0.95, 0.4])).value == pytest.approx(-0.2)
    # Monotone: a less certain probability never scores higher.
    scores = [confidence_signal(p, 0.5).subscore for p in np.linspace(0.5, 1.0, 51)]
    assert scores == sorted(scores)


def test_mc_dropout_and_test_time_flips_are_separate_signals():
    mc = [0.9, 0.91, 0.89, 0.9]
    samples = np.array([[v] for v in mc] + [[0.55]], dtype=np.float32)
    (finding,) = evaluate_classification(
        result_of([0.9], samples, kinds=["mc-dropout"] * 4 + ["tta:flip-x"])).findings
    assert finding.signals["mc_dropout_std"] < 0.01 and finding.signals["mc_dropout_std_subscore"] == 1.0
    assert finding.signals["tta_spread"] == pytest.approx(0.35, abs=1e-6)
    assert finding.signals["tta_spread_subscore"] == 0.0
    assert Reason.HIGH_UNCERTAINTY in finding.reasons and finding.verdict is Verdict.NEEDS_REVIEW
    # Samples of unknown kind are pooled, as before.
    (pooled,) = evaluate_classification(result_of([0.9], samples, kinds=[])).findings
    assert "sample_std" in pooled.signals and "tta_spread" not in pooled.signals


CASES = [
    (p, sd, threshold, accept)
    for p in (0.02, 0.3, 0.45, 0.5, 0.55, 0.62, 0.7, 0.9, 0.99)
    for sd in (0.0, 0.05, 0.12, 0.3)
    for threshold in (0.3, 0.5)
    for accept in (0.3, 0.5, 0.8)
]


@pytest.mark.parametrize("probability, sd, threshold, accept_threshold", CASES)
def test_verdict_always_equals_score_against_threshold(probability, sd, threshold, accept_threshold):
    samples = tight_samples([probability], n=16, sd=sd, seed=int(probability * 100)) if sd else None
    qc = evaluate_classification(
        result_of([probability], samples, thresholds=[threshold]), accept_threshold=accept_threshold
    )
    (finding,) = qc.findings
    assert 0.0 <= finding.quality_score <= 1.0
    expected = Verdict.ACCEPTED if finding.quality_score >= accept_threshold else Verdict.NEEDS_REVIEW
    assert finding.verdict is expected
    if finding.verdict is Verdict.NEEDS_REVIEW:
        assert finding.reasons, "a finding sent to review names at least one reason"
    assert finding.positive == (probability >= threshold)


def test_margin_constant_is_a_margin():
    assert 0.0 < MARGIN_AT_HALF < 1.0


def test_an_image_unlike_the_training_images_lowers_every_finding_and_says_so():
    probabilities = [0.96, 0.03]
    familiar, unfamiliar = result_of(probabilities, tight_samples(probabilities)), result_of(
        probabilities, tight_samples(probabilities))
    familiar.feature_distance, familiar.feature_distance_range = 10.0, (18.0, 27.0)
    unfamiliar.feature_distance, unfamiliar.feature_distance_range = 25.0, (18.0, 27.0)
    accepted = evaluate_classification(familiar, image=good_radiograph())
    assert accepted.verdict is Verdict.ACCEPTED
    assert all(f.signals["feature_distance_subscore"] == 1.0 for f in accepted.findings)
    flagged = evaluate_classification(unfamiliar, image=good_radiograph())
    for before, after in zip(accepted.findings, flagged.findings, strict=True):
        assert after.verdict is Verdict.NEEDS_REVIEW and Reason.UNFAMILIAR_INPUT in after.reasons
        assert after.quality_score == pytest.approx(before.quality_score * (1 - 7 / 9), abs=1e-3)
    # A model without feature statistics: no such signal.
    plain = evaluate_classification(result_of(probabilities, tight_samples(probabilities)), image=good_radiograph())
    assert all("feature_distance" not in f.signals for f in plain.findings)


def test_familiarity_ramps_between_its_limits():
    assert familiarity_signal(5.0, 10.0, 20.0).subscore == 1.0
    assert familiarity_signal(14.0, 10.0, 20.0).subscore == pytest.approx(0.6) and not familiarity_signal(14.0, 10.0, 20.0).fired
    assert familiarity_signal(16.0, 10.0, 20.0).fired and familiarity_signal(16.0, 10.0, 20.0).reason is Reason.UNFAMILIAR_INPUT
    assert familiarity_signal(25.0, 10.0, 20.0).subscore == 0.0
