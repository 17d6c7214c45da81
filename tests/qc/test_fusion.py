"""The fitted fusion: monotone, calibrated as a probability, stored with its QC version."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pacs_sentinel.errors import ModelError
from pacs_sentinel.qc.agreement import agreement_signal
from pacs_sentinel.qc.evaluate import QC_VERSION, shipped_fusion
from pacs_sentinel.qc.fusion import (
    PROBABILITY_SIGNALS,
    SIGNAL_TRANSFORMS,
    FusionModel,
    LogisticModel,
    OFFSET_FEATURES,
    fit_logistic,
    fit_offset,
    fit_ranked_logistic,
    load_fusion,
    policy_reasons,
)
from pacs_sentinel.qc.heuristics import Signal
from pacs_sentinel.results import Reason

#: A plausible good segment: (value, subscore) per signal.
GOOD = {
    "predicted_dice": (0.93, 1.0), "sample_dice": (0.95, 1.0), "mask_entropy": (0.08, 1.0),
    "mean_probability": (0.95, 1.0), "expected_dice": (0.94, 1.0), "largest_component_share": (0.99, 1.0),
    "roundness": (0.8, 1.0),
    "hole_share": (0.0, 1.0), "border_contact_share": (0.0, 1.0), "noise_hu": (15.0, 1.0),
    "edge_width_px": (3.0, 1.0), "metal_ml": (0.0, 1.0), "air_level_hu": (-1000.0, 1.0),
    "out_of_range_share": (0.0, 1.0), "contrast_range_hu": (1000.0, 1.0), "truncated_slice_share": (0.0, 1.0),
    "volume_ml": (1300.0, 1.0), "left_share": (0.12, 1.0),
}
HIGHER_IS_WORSE = {"mask_entropy", "hole_share", "border_contact_share"}
#: A third-party segment with our model's prediction at hand (the seg-qc path with agreement).
THIRD_PARTY_DROP = ("sample_dice", "mask_entropy", *PROBABILITY_SIGNALS)
AGREEMENT = Signal("agreement_dice", 0.93, 1.0, Reason.DISAGREEMENT)


def _signals(overrides: dict[str, tuple[float, float]] | None = None, drop: tuple[str, ...] = ()) -> list[Signal]:
    values = {**GOOD, **(overrides or {})}
    reasons = {"volume_ml": Reason.VOLUME_ANOMALY, "left_share": Reason.IMPLAUSIBLE_LOCATION,
               "predicted_dice": Reason.LOW_PREDICTED_DICE}
    return [Signal(name, v, s, reasons.get(name, Reason.SHAPE_IRREGULARITY)) for name, (v, s) in values.items()
            if name not in drop]


def _worse(name: str, value: float, subscore: float, step: float) -> tuple[float, float]:
    if SIGNAL_TRANSFORMS.get(name) == "log-subscore" or name not in SIGNAL_TRANSFORMS:
        return value, max(0.0, subscore - step)
    if name in HIGHER_IS_WORSE:
        return min(1.0, value + step), max(0.0, subscore - step)
    return max(0.0, value - step), max(0.0, subscore - step)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_a_strictly_worse_signal_never_raises_the_score(name: str) -> None:
    fusion = shipped_fusion()
    rng = np.random.default_rng(sum(map(ord, name)))
    for _ in range(30):
        # A random, partly bad starting point, then the one signal made worse step by step.
        start = {n: _worse(n, v, s, float(rng.uniform(0, 0.6))) for n, (v, s) in GOOD.items()}
        value, subscore = start[name]
        previous = fusion.score(_signals(start))[0]
        for _ in range(5):
            value, subscore = _worse(name, value, subscore, 0.15)
            score = fusion.score(_signals({**start, name: (value, subscore)}))[0]
            assert score <= previous + 1e-12, (name, value, subscore)
            previous = score


@pytest.mark.parametrize("name", sorted(set(GOOD) - set(THIRD_PARTY_DROP)) + ["agreement_dice"])
def test_a_strictly_worse_signal_never_raises_the_score_of_a_third_party_segment(name: str) -> None:
    fusion = shipped_fusion()
    rng = np.random.default_rng(sum(map(ord, name)))
    good = {**{n: v for n, v in GOOD.items() if n not in THIRD_PARTY_DROP}, "agreement_dice": (0.93, 1.0)}

    def signals(values: dict[str, tuple[float, float]]) -> list[Signal]:
        agreement = Signal("agreement_dice", *values["agreement_dice"], Reason.DISAGREEMENT)
        others = {n: v for n, v in values.items() if n != "agreement_dice"}
        return [*_signals(others, drop=THIRD_PARTY_DROP), agreement]

    for _ in range(30):
        start = {n: _worse(n, v, s, float(rng.uniform(0, 0.6))) for n, (v, s) in good.items()}
        value, subscore = start[name]
        previous, model = fusion.score(signals(start))
        assert model.name == "with-agreement"
        for _ in range(5):
            value, subscore = _worse(name, value, subscore, 0.15)
            score = fusion.score(signals({**start, name: (value, subscore)}))[0]
            assert score <= previous + 1e-12, (name, value, subscore)
            previous = score


def test_agreement_is_a_fitted_feature_of_the_seg_qc_path() -> None:
    """With our prediction at hand, a third-party segment is scored by the model fitted with the
    agreement (a calibrated probability, not the probability times a factor); without the
    estimator (a structure it does not cover) by that path's model without it."""
    fusion = shipped_fusion()
    third_party = _signals(drop=THIRD_PARTY_DROP)
    for signals, path in [(third_party, "with-agreement"),
                          ([s for s in third_party if s.name != "predicted_dice"], "with-agreement-no-estimator")]:
        agreeing = fusion.score([*signals, AGREEMENT])
        disagreeing = fusion.score([*signals, agreement_signal(0.4)])
        assert agreeing[1].name == disagreeing[1].name == path
        assert agreeing[0] == pytest.approx(agreeing[1].probability({s.name: s for s in [*signals, AGREEMENT]}))
        assert disagreeing[0] < 0.5 < agreeing[0]
    # Where used, a clear disagreement also sends the segment to review whatever its score (policy).
    assert policy_reasons([*third_party, agreement_signal(0.69)]) == [Reason.DISAGREEMENT]
    assert policy_reasons([*third_party, agreement_signal(0.71)]) == []
    # A fusion fitted before QC 2.7.0 (a local refit of 2.6.0) has no agreement model: there the
    # agreement leaves the score alone and decides by policy only.
    older = FusionModel("2.6.0", [m for m in fusion.models if not m.name.startswith("with-agreement")])
    assert older.score([*third_party, agreement_signal(0.5)]) == older.score(third_party)


def test_shipped_fusion_belongs_to_this_qc_version_and_has_non_negative_weights() -> None:
    fusion = shipped_fusion()
    assert fusion.qc_version == QC_VERSION
    names = {m.name for m in fusion.models}
    paths = {"with-uncertainty", "without-uncertainty", "without-probabilities", "with-agreement"}
    assert names == paths | {f"{p}-no-estimator" for p in paths}
    for model in fusion.models:
        assert min(model.weights) >= 0.0
        assert ("predicted_dice" in model.features) is (model.name in paths)
        # Since QC 2.7.0 the agreement is a fitted feature of the seg-qc path, and it carries weight.
        assert ("agreement_dice" in model.features) is model.name.startswith("with-agreement")
        if "agreement_dice" in model.features:
            assert model.weights[model.features.index("agreement_dice")] > 0
    assert fusion.calibration["scores"] and len(fusion.calibration["scores"]) == len(fusion.calibration["dice"])


def test_good_signals_score_high_and_bad_ones_low() -> None:
    fusion = shipped_fusion()
    good, model = fusion.score(_signals())
    assert model.name == "with-uncertainty" and good > 0.8
    without, model = fusion.score(_signals(drop=("sample_dice", "mask_entropy")))
    assert model.name == "without-uncertainty" and without > 0.8
    # A third-party SEG has no probability map: its own model, not the missing signals counted as perfect.
    third_party, model = fusion.score(_signals(drop=("sample_dice", "mask_entropy", "mean_probability",
                                                     "expected_dice")))
    assert model.name == "without-probabilities" and third_party > 0.8
    assert not set(PROBABILITY_SIGNALS) & set(model.features)
    bad = fusion.score(_signals({"predicted_dice": (0.3, 0.0), "sample_dice": (0.6, 0.0),
                                 "mean_probability": (0.6, 0.2), "roundness": (0.4, 0.0)}))[0]
    assert bad < 0.3


def test_a_segment_the_estimator_does_not_cover_is_scored_by_its_path_without_it() -> None:
    """A structure or modality the estimator was not trained on: no predicted Dice, and the same
    path's model fitted without it, not the missing prediction counted as perfect."""
    fusion = shipped_fusion()
    probability_signals = ("mean_probability", "expected_dice")
    for drop, path in [((), "with-uncertainty"), (("sample_dice", "mask_entropy"), "without-uncertainty"),
                       (("sample_dice", "mask_entropy", *probability_signals), "without-probabilities")]:
        covered = fusion.choose({s.name: s for s in _signals(drop=drop)})
        uncovered = fusion.choose({s.name: s for s in _signals(drop=(*drop, "predicted_dice"))})
        assert covered.name == path and uncovered.name == f"{path}-no-estimator"
        # The same path: every other signal it fits is the full model's.
        assert set(uncovered.features) == set(covered.features) - {"predicted_dice"}
    # Counted as perfect, a missing prediction would lift a mask the other signals doubt.
    doubtful = _signals({"roundness": (0.45, 0.1)}, drop=("sample_dice", "mask_entropy", *probability_signals,
                                                         "predicted_dice"))
    full = next(m for m in fusion.models if m.name == "without-probabilities")
    assert fusion.score(doubtful)[0] < full.probability({s.name: s for s in doubtful})


def test_an_incomplete_set_of_signals_uses_the_model_that_uses_most_of_them() -> None:
    fusion = shipped_fusion()
    partial = {"predicted_dice": (0.9, 1.0), "mean_probability": (0.95, 1.0), "expected_dice": (0.93, 1.0)}
    assert fusion.choose({s.name: s for s in _signals(drop=tuple(n for n in GOOD if n not in partial))}).name \
        == "without-uncertainty"  # the probability signals it has are used, not dropped
    only_shared = {s.name: s for s in _signals(drop=tuple(n for n in GOOD if n not in ("predicted_dice", "roundness")))}
    assert fusion.choose(only_shared).name == "without-probabilities"  # a tie: the smaller model


def test_out_of_range_checks_send_to_review_and_unknown_signals_multiply_the_score() -> None:
    fusion = shipped_fusion()
    base = fusion.score(_signals())[0]
    out_of_range = _signals({"volume_ml": (3000.0, 0.0)})
    assert fusion.score(out_of_range)[0] == base  # the score stays a calibrated probability...
    assert policy_reasons(out_of_range) == [Reason.VOLUME_ANOMALY]  # ...the verdict goes to review
    assert policy_reasons(_signals()) == []
    # A mask on the wrong side of the body goes to review too, and (since QC 2.5.0) the location
    # check also lowers the score by what it predicts on the calibration set; in range it is no
    # feature at all.
    wrong_side = _signals({"left_share": (0.75, 0.0)})
    assert policy_reasons(wrong_side) == [Reason.IMPLAUSIBLE_LOCATION]
    assert fusion.score(wrong_side)[0] < base
    assert fusion.score(_signals({"left_share": (0.15, 1.0)}))[0] == base
    assert fusion.score(_signals({"left_share": (0.3, 0.6)}))[0] == base  # outside the range, not flagged
    assert all(m.features[-len(OFFSET_FEATURES):] == list(OFFSET_FEATURES) for m in fusion.models)
    # (With the agreement, a mask on the wrong side disagrees with ours too: the location adds
    # nothing there, and it stays policy.)
    assert all(m.weights[m.features.index("left_share")] > 0 for m in fusion.models
               if "agreement_dice" not in m.features)
    # A signal no model was fitted on keeps the product rule: it multiplies the probability.
    unknown = Signal("future_check", 0.5, 0.4, Reason.SHAPE_IRREGULARITY)
    assert fusion.score([*_signals(), unknown])[0] == pytest.approx(base * 0.4)


def test_fit_gives_non_negative_weights_and_a_calibrated_probability() -> None:
    rng = np.random.default_rng(0)
    n = 400
    dice = rng.uniform(0.3, 1.0, n)
    rows = []
    for d in dice:
        rows.append({
            # A useful signal (noisy Dice) and one that is anti-correlated noise: its weight must stay >= 0.
            "predicted_dice": Signal("predicted_dice", float(np.clip(d + rng.normal(0, 0.05), 0, 1)), 1.0,
                                     Reason.LOW_PREDICTED_DICE),
            "roundness": Signal("roundness", float(np.clip(1.2 - d + rng.normal(0, 0.3), 0, 1)), 1.0,
                                Reason.SHAPE_IRREGULARITY),
        })
    acceptable = dice >= 0.7
    model = fit_logistic("test", ["predicted_dice", "roundness"], rows, acceptable)
    assert model.weights[0] > 0 and model.weights[1] == 0.0
    p = np.array([model.probability(r) for r in rows])
    assert abs(p.mean() - acceptable.mean()) < 0.03  # a logistic fit matches the base rate
    assert p[dice > 0.85].mean() > 0.9 and p[dice < 0.55].mean() < 0.1
    with pytest.raises(ValueError, match="both"):
        fit_logistic("test", ["predicted_dice"], rows[:5], np.ones(5, bool))


def test_two_stage_fit_orders_good_masks_too_and_stays_calibrated_and_monotone() -> None:
    rng = np.random.default_rng(1)
    n = 600
    dice = rng.uniform(0.3, 1.0, n)
    rows = [{
        "predicted_dice": Signal("predicted_dice", float(np.clip(d + rng.normal(0, 0.04), 0, 1)), 1.0,
                                 Reason.LOW_PREDICTED_DICE),
        "roundness": Signal("roundness", float(np.clip(1.2 - d + rng.normal(0, 0.3), 0, 1)), 1.0,
                            Reason.SHAPE_IRREGULARITY),
    } for d in dice]
    for target in ("dice", "logit-dice"):
        model = fit_ranked_logistic("test", ["predicted_dice", "roundness"], rows, dice, target=target)
        assert model.weights[0] > 0 and model.weights[1] == 0.0  # the anti-correlated signal gets no weight
        p = np.array([model.probability(r) for r in rows])
        acceptable = dice >= 0.7
        assert abs(p.mean() - acceptable.mean()) < 0.03  # the Platt stage matches the base rate
        assert p[dice > 0.85].mean() > 0.9 and p[dice < 0.55].mean() < 0.1
        worse = dict(rows[0], predicted_dice=Signal("predicted_dice", rows[0]["predicted_dice"].value - 0.1, 1.0,
                                                    Reason.LOW_PREDICTED_DICE))
        assert model.probability(worse) < model.probability(rows[0])
    with pytest.raises(ValueError, match="both"):
        fit_ranked_logistic("test", ["predicted_dice"], rows[:5], np.ones(5))
    with pytest.raises(ValueError, match="target"):
        fit_ranked_logistic("test", ["predicted_dice"], rows, dice, target="iou")


def test_an_offset_feature_only_changes_the_rows_it_flags_by_what_it_predicts() -> None:
    rng = np.random.default_rng(3)
    n = 600
    dice = rng.uniform(0.3, 1.0, n)
    flagged = rng.random(n) < 0.1
    # On the flagged rows the mask fails more often than the other signal says: half of them are
    # made bad whatever their predicted Dice.
    dice[flagged & (rng.random(n) < 0.5)] = 0.4
    rows = [{
        "predicted_dice": Signal("predicted_dice", float(np.clip(d + rng.normal(0, 0.04), 0, 1)), 1.0,
                                 Reason.LOW_PREDICTED_DICE),
        "left_share": Signal("left_share", 0.7 if f else 0.1, 0.0 if f else 1.0, Reason.IMPLAUSIBLE_LOCATION),
    } for d, f in zip(dice, flagged, strict=True)]
    for i in np.flatnonzero(flagged & (dice == 0.4)):
        rows[i]["predicted_dice"] = Signal("predicted_dice", float(rng.uniform(0.75, 0.95)), 1.0,
                                           Reason.LOW_PREDICTED_DICE)
    acceptable = dice >= 0.7
    base = fit_ranked_logistic("test", ["predicted_dice"], rows, dice)
    model = fit_offset(base, ["left_share"], rows, acceptable)
    assert model.features == ["predicted_dice", "left_share"] and model.weights[0] == base.weights[0]
    assert model.weights[1] > 0
    before = np.array([base.probability(r) for r in rows])
    after = np.array([model.probability(r) for r in rows])
    np.testing.assert_allclose(after[~flagged], before[~flagged], rtol=1e-12)  # in range: untouched
    assert np.all(after[flagged] < before[flagged])
    # Fitted, not guessed: without the ridge the flagged rows' mean probability is their share of
    # acceptable masks (the score equation of an indicator); the ridge keeps it between that and
    # the other signals' view.
    observed = acceptable[flagged].mean()
    unpenalized = fit_offset(base, ["left_share"], rows, acceptable, l2=0.0)
    assert np.mean([unpenalized.probability(r) for r, f in zip(rows, flagged, strict=True) if f]) == \
        pytest.approx(observed, abs=1e-3)
    assert observed < after[flagged].mean() < before[flagged].mean()
    # A flag that comes with good masks only gets no weight (never a negative one).
    harmless = [dict(r, left_share=Signal("left_share", 0.7 if f else 0.1, 0.0 if f else 1.0,
                                          Reason.IMPLAUSIBLE_LOCATION))
                for r, f in zip(rows, dice >= 0.9, strict=True)]
    assert fit_offset(base, ["left_share"], harmless, acceptable).weights[1] == 0.0
    with pytest.raises(ValueError, match="already has"):
        fit_offset(model, ["left_share"], rows, acceptable)
    with pytest.raises(ValueError, match="no rows"):
        fit_offset(base, ["left_share"], [], acceptable[:0])


def test_fusion_files_are_checked(tmp_path) -> None:
    fusion = FusionModel("9.9.9", [LogisticModel("m", ["predicted_dice"], [1.0], 0.0)])
    path = tmp_path / "fusion.json"
    fusion.save(path)
    assert load_fusion(path).models[0].weights == [1.0]
    with pytest.raises(ModelError, match="QC 9.9.9"):
        load_fusion(path, qc_version=QC_VERSION)
    data = json.loads(path.read_text())
    data["models"][0]["weights"] = [-1.0]
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="negative"):
        load_fusion(path)
    with pytest.raises(ModelError, match="not found"):
        load_fusion(tmp_path / "missing.json")


def test_the_model_without_probabilities_learns_from_the_estimator_run_without_them() -> None:
    from pacs_sentinel.qc.calibrate import fit_models
    from pacs_sentinel.qc.cases import QCCase

    rng = np.random.default_rng(2)
    cases = []
    for i, d in enumerate(rng.uniform(0.3, 1.0, 300)):
        signals = [
            Signal("predicted_dice", float(np.clip(d + rng.normal(0, 0.03), 0, 1)), 1.0, Reason.LOW_PREDICTED_DICE),
            Signal("expected_dice", float(np.clip(d + rng.normal(0, 0.1), 0, 1)), 1.0, Reason.LOW_EXPECTED_DICE),
            Signal("roundness", float(np.clip(d + rng.normal(0, 0.2), 0, 1)), 1.0, Reason.SHAPE_IRREGULARITY),
        ]
        # Without the probability map the estimator here knows nothing: the same value for every mask.
        cases.append(QCCase(i, "clean", "dilation", float(d), False, signals,
                            predicted_dice_without_probabilities=0.8))
    for fit in ("two-stage", "logistic"):
        models = {m.name: m for m in fit_models(cases, 0.01, fit)}
        assert set(models) == {"without-uncertainty", "without-probabilities", "without-uncertainty-no-estimator",
                               "without-probabilities-no-estimator"}  # no own-model cases
        with_map, without = models["without-uncertainty"], models["without-probabilities"]
        assert with_map.weights[with_map.features.index("predicted_dice")] > 0
        assert without.weights[without.features.index("predicted_dice")] == 0.0  # a constant says nothing
        assert without.weights[without.features.index("roundness")] > 0
        assert "expected_dice" not in without.features
    with pytest.raises(ValueError, match="fusion fit"):
        fit_models(cases, 0.01, "isotonic")


def test_the_agreement_models_are_fitted_where_our_own_mask_passes_its_qc() -> None:
    from pacs_sentinel.qc.calibrate import fit_models, reference_scores, third_party_signals, vendor_masks
    from pacs_sentinel.qc.cases import QCCase

    rng = np.random.default_rng(3)

    def case(seed: int, family: str, d: float, agreement: float | None) -> QCCase:
        signals = [
            Signal("predicted_dice", float(np.clip(d + rng.normal(0, 0.15), 0, 1)), 1.0, Reason.LOW_PREDICTED_DICE),
            Signal("expected_dice", float(np.clip(d + rng.normal(0, 0.1), 0, 1)), 1.0, Reason.LOW_EXPECTED_DICE),
            Signal("roundness", float(np.clip(d + rng.normal(0, 0.2), 0, 1)), 1.0, Reason.SHAPE_IRREGULARITY),
        ]
        return QCCase(seed, "clean", family, float(d), False, signals, agreement_dice=agreement)

    cases = [case(i, "dilation", d, None) for i, d in enumerate(rng.uniform(0.3, 1.0, 200))]
    # Phantoms where our model is right (own Dice 0.95): the vendor's agreement with it follows
    # the vendor's Dice closely ...
    good = []
    for i, d in enumerate(rng.uniform(0.3, 1.0, 150)):
        good += [case(1000 + i, "none", 0.95, 1.0),
                 case(1000 + i, "shift", d, float(np.clip(0.95 * d + rng.normal(0, 0.02), 0, 1)))]
    # ... and where it failed (own Dice 0.2): agreement says nothing about the vendor's mask.
    failed = []
    for i, d in enumerate(rng.uniform(0.3, 1.0, 60)):
        failed += [case(2000 + i, "none", 0.2, 1.0), case(2000 + i, "shift", d, float(rng.uniform(0.1, 0.4)))]
    models = {m.name: m for m in fit_models(cases, 0.01, agreement_cases=good + failed)}
    assert "with-agreement" in models and "with-agreement-no-estimator" in models
    for alone in fit_models(cases, 0.01):  # the other models are fitted on the other cases alone
        assert models[alone.name].weights == alone.weights and models[alone.name].intercept == alone.intercept
    reference = reference_scores(FusionModel(QC_VERSION, list(models.values())), good + failed)
    assert min(reference[c.seed] for c in good) > 0.5 > max(reference[c.seed] for c in failed)
    # Only the phantoms where our own mask passed its QC are fitted on: the failed ones change nothing.
    only_good = {m.name: m for m in fit_models(cases, 0.01, agreement_cases=good)}
    for name in ("with-agreement", "with-agreement-no-estimator"):
        assert models[name].weights == only_good[name].weights
    with_agreement = models["with-agreement"]
    assert with_agreement.weights[with_agreement.features.index("agreement_dice")] > \
        with_agreement.weights[with_agreement.features.index("predicted_dice")]
    assert not set(PROBABILITY_SIGNALS) & set(with_agreement.features)
    assert [c.mask_family for c in vendor_masks(good[:4])] == ["shift", "shift"]
    assert vendor_masks([case(9, "truth", 1.0, 0.95)]) == []
    # As seg-qc sees a vendor's mask: no probability-map signals, the agreement added.
    names = [s.name for s in third_party_signals(good[1], agreement=True)]
    assert "agreement_dice" in names and not set(PROBABILITY_SIGNALS) & set(names)
    with pytest.raises(ValueError, match="agreement"):
        third_party_signals(cases[0], agreement=True)
    with pytest.raises(ValueError, match="own mask"):
        fit_models(cases, 0.01, agreement_cases=good[1::2])  # no own masks: no gate


def test_vendor_like_cases_carry_their_agreement_with_our_model() -> None:
    """The agreement models' data: on each phantom the truth, its perturbations and our model's
    own mask, each with its Dice against our model's mask, on seeds no other set uses."""
    from pacs_sentinel.inference.models import load_segmentation_model
    from pacs_sentinel.qc.calibrate import CALIBRATION_RECIPE, agreement_cases, vendor_masks
    from pacs_sentinel.qc.cases import AGREEMENT_SEED_OFFSET, CALIBRATION_SEED_OFFSET, EVALUATION_SEED_OFFSET
    from pacs_sentinel.qc.estimator import load_estimator

    assert CALIBRATION_SEED_OFFSET + CALIBRATION_RECIPE["n_images"] <= AGREEMENT_SEED_OFFSET
    assert AGREEMENT_SEED_OFFSET + CALIBRATION_RECIPE["agreement_images"] <= EVALUATION_SEED_OFFSET
    model = load_segmentation_model("demo:organ-seg", device="cpu")
    cases = agreement_cases(model, [AGREEMENT_SEED_OFFSET, AGREEMENT_SEED_OFFSET + 1], 2, load_estimator())
    assert len(cases) == 8
    for phantom in (cases[:4], cases[4:]):
        own, truth, *perturbed = phantom
        assert (own.mask_family, truth.mask_family) == ("none", "truth") and len(perturbed) == 2
        assert own.agreement_dice == 1.0 and truth.dice == 1.0
        assert truth.agreement_dice == pytest.approx(own.dice)  # the truth against our mask
        for case in phantom:
            assert 0.0 <= case.agreement_dice <= 1.0
            if not case.empty:
                assert case.predicted_dice_without_probabilities is not None
    # Fitted on: the perturbations only (no vendor is perfect; our own mask only gates).
    assert vendor_masks(cases) == cases[2:4] + cases[6:8]
