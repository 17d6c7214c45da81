"""Fit the QC fusion on a calibration set (``sentinel train-demo qc-fusion``).

Calibration cases (:mod:`pacs_sentinel.qc.cases`, seeds ``CALIBRATION_SEED_OFFSET``, never
seen by the estimator) are judged with every QC signal, including the shipped estimator's
and the uncertainty of ``MC_DROPOUT_SAMPLES`` dropout passes (as the shipped config asks for).
Three non-negative logistic models (:mod:`pacs_sentinel.qc.fusion`) read as P(Dice >= 0.7):
``with-uncertainty`` on the model's own masks, ``without-uncertainty`` and
``without-probabilities`` (no probability-map signals, and the estimator's prediction made
without the probability map: the third-party SEG path) on all cases. Since QC 2.6.0 each is
fitted a second time without the estimator's signal (``<name>-no-estimator``): the estimator
judges only the structure and modality it was trained on (the demo's liver on CT), and a
segment of any other structure is scored by the same path's model without it. Since QC 2.2.0 each is
fitted in two stages (:func:`~pacs_sentinel.qc.fusion.fit_ranked_logistic`): a non-negative
regression of logit(Dice) on the signals, which orders every case by its Dice (the good masks
among themselves too), then a Platt calibration of it to "Dice >= 0.7"; a direct logistic fit
(QC 2.1.0, ``fit = "logistic"``) only cares about the cases near the 0.7 line and saturates
among good masks. Since QC 2.5.0 a third stage adds the location check
(:data:`~pacs_sentinel.qc.fusion.OFFSET_FEATURES`) to each model with the other weights frozen
(:func:`~pacs_sentinel.qc.fusion.fit_offset`), so it lowers only the scores of the masks it flags.
Since QC 2.7.0 two more models score a third-party segment together with its agreement with
our model's prediction (the seg-qc path): ``with-agreement`` and ``with-agreement-no-estimator``,
the ``without-probabilities`` features plus the agreement Dice. They are fitted on a second draw
(seeds ``AGREEMENT_SEED_OFFSET``, ``CALIBRATION_RECIPE["agreement_images"]`` phantoms of the same
image families) of vendor-like masks: perturbations of the ground truth (every mask family), each
with its Dice against our model's own mask on the same image. Seg-qc uses the agreement only where our own mask
passes its own QC (:data:`~pacs_sentinel.qc.agreement.REFERENCE_MIN_SCORE`), so they are fitted
on the phantoms where it does, our mask scored by the other models just fitted: where our model
fails (metal, an unusual anatomy) a correct vendor mask disagrees with ours as much as a bad one.
The held-out families (:data:`~pacs_sentinel.qc.corruptions.HELD_OUT_FAMILIES`) and
empty masks (scored 0 by rule) are never drawn.

The risk-coverage curve that ``[qc] target_review_rate`` / ``max_risk`` and ``sentinel
qc-threshold`` derive the verdict threshold from is made of *cross-validated* scores (5 folds
grouped by phantom), so it is not flattered by the fit, of the in-range own-model cases (those
an out-of-range check sends to review whatever the threshold are left out: the threshold does
not decide them); it is stored in the fusion JSON.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from pacs_sentinel.qc.agreement import agreement_signal, reference_trusted
from pacs_sentinel.qc.cases import AGREEMENT_SEED_OFFSET, CALIBRATION_SEED_OFFSET, QCCase, draw_cases, seeds_for
from pacs_sentinel.qc.corruptions import HELD_OUT_FAMILIES
from pacs_sentinel.qc.estimator import QualityEstimator, estimator_signal, load_estimator
from pacs_sentinel.qc.evaluate import QC_VERSION
from pacs_sentinel.qc.fusion import (
    ACCEPTABLE_DICE,
    AGREEMENT_SIGNALS,
    FUSION_FILE,
    OFFSET_FEATURES,
    PROBABILITY_SIGNALS,
    SIGNAL_TRANSFORMS,
    UNCERTAINTY_SIGNALS,
    FusionModel,
    LogisticModel,
    fit_logistic,
    fit_offset,
    fit_ranked_logistic,
    policy_reasons,
)
from pacs_sentinel.qc.heuristics import Signal
from pacs_sentinel.qc.metrics import auroc, expected_calibration_error, spearman
from pacs_sentinel.qc.train_estimator import training_image_families, training_mask_families

log = structlog.get_logger(__name__)

#: Recipe of the shipped fusion; the JSON records it.
CALIBRATION_RECIPE: dict[str, Any] = {
    "n_images": 160,
    "perturbations_per_image": 2,
    "mc_dropout_samples": 4,
    "folds": 5,
    "l2": 0.01,
    "fit": "two-stage",
    "platt_l2": 0.001,
    "agreement_images": 160,
    "agreement_perturbations_per_image": 3,
}
#: The learned estimator's signal, and the suffix of the models fitted without it.
ESTIMATOR_SIGNAL = "predicted_dice"
NO_ESTIMATOR_SUFFIX = "-no-estimator"
FEATURES_WITH_UNCERTAINTY = [f for f in SIGNAL_TRANSFORMS if f not in OFFSET_FEATURES + AGREEMENT_SIGNALS]
FEATURES_WITHOUT_UNCERTAINTY = [f for f in FEATURES_WITH_UNCERTAINTY if f not in UNCERTAINTY_SIGNALS]
FEATURES_WITHOUT_PROBABILITIES = [f for f in FEATURES_WITHOUT_UNCERTAINTY if f not in PROBABILITY_SIGNALS]
FEATURES_WITH_AGREEMENT = FEATURES_WITHOUT_PROBABILITIES + list(AGREEMENT_SIGNALS)
#: Name of the seg-qc path's model with the agreement signal.
AGREEMENT_MODEL = "with-agreement"


def _rows(cases: list[QCCase]) -> list[dict]:
    return [{s.name: s for s in c.signals} for c in cases]


def third_party_signals(case: QCCase, *, agreement: bool) -> list[Signal]:
    """A case's signals as seg-qc computes them for a vendor's mask: no probability-map signals,
    the estimator's prediction made without the map and, with ``agreement``, the agreement Dice.

    Raises:
        ValueError: ``agreement`` for a case drawn without its agreement Dice.
    """
    signals = [s for s in case.signals or [] if s.name not in PROBABILITY_SIGNALS]
    if case.predicted_dice_without_probabilities is not None:
        signals = [estimator_signal(case.predicted_dice_without_probabilities) if s.name == ESTIMATOR_SIGNAL else s
                   for s in signals]
    if agreement:
        if case.agreement_dice is None:
            raise ValueError("an agreement case without its agreement Dice")
        signals.append(agreement_signal(case.agreement_dice))
    return signals


def fit_models(cases: list[QCCase], l2: float, fit: str = "two-stage",
               platt_l2: float = 0.001, agreement_cases: list[QCCase] | None = None) -> list[LogisticModel]:
    """The fusion models fitted on these cases (each needs good and failed cases).

    Args:
        agreement_cases: Vendor-like masks with their agreement Dice: when given, the
            ``with-agreement`` models are fitted on them.
        fit: ``"two-stage"`` (:func:`~pacs_sentinel.qc.fusion.fit_ranked_logistic`, ridge ``l2``
            on the regression, ``platt_l2`` on the calibration) or ``"logistic"``
            (:func:`~pacs_sentinel.qc.fusion.fit_logistic` on Dice >= 0.7, ridge ``l2``).

    Raises:
        ValueError: Unknown ``fit``, or a model without both good and failed cases.
    """
    if fit not in ("two-stage", "logistic"):
        raise ValueError(f"unknown fusion fit {fit!r}; expected 'two-stage' or 'logistic'")

    def one(name: str, features: list[str], rows: list[dict], group: list[QCCase]) -> LogisticModel:
        dice = np.array([c.dice for c in group])
        if fit == "logistic":
            model = fit_logistic(name, features, rows, dice >= ACCEPTABLE_DICE, l2=l2)
        else:
            model = fit_ranked_logistic(name, features, rows, dice, l2=l2, platt_l2=platt_l2)
        return fit_offset(model, list(OFFSET_FEATURES), rows, dice >= ACCEPTABLE_DICE, l2=l2)

    judged = [c for c in cases if c.signals is not None]
    own = [c for c in judged if c.uncertainty]
    paths = [("with-uncertainty", FEATURES_WITH_UNCERTAINTY, _rows(own), own)] if own else []
    paths += [("without-uncertainty", FEATURES_WITHOUT_UNCERTAINTY, _rows(judged), judged),
              ("without-probabilities", FEATURES_WITHOUT_PROBABILITIES,
               [{s.name: s for s in third_party_signals(c, agreement=False)} for c in judged], judged)]
    models = [one(name, features, rows, group) for name, features, rows, group in paths]
    if agreement_cases:
        # Fitted where seg-qc uses the agreement: our own mask passes its own QC (scored by the
        # models just fitted, on other phantoms).
        reference = reference_scores(FusionModel(QC_VERSION, list(models)), agreement_cases)
        vendor = [c for c in vendor_masks(agreement_cases)
                  if c.signals is not None and reference_trusted(reference[c.seed])]
        rows = [{s.name: s for s in third_party_signals(c, agreement=True)} for c in vendor]
        paths.append((AGREEMENT_MODEL, FEATURES_WITH_AGREEMENT, rows, vendor))
        models.append(one(AGREEMENT_MODEL, FEATURES_WITH_AGREEMENT, rows, vendor))
    # Each path again without the estimator, for the structures and modalities it was not
    # trained on (QualityEstimator.covers): fitted on the same cases with its signal left out.
    models += [one(f"{name}{NO_ESTIMATOR_SUFFIX}", [f for f in features if f != ESTIMATOR_SIGNAL], rows, group)
               for name, features, rows, group in paths]
    return models


def vendor_masks(agreement_cases: list[QCCase]) -> list[QCCase]:
    """The vendor-like masks of an agreement draw: the perturbations of the ground truth, not
    our model's own mask nor the truth itself (no vendor's model is perfect, and with a Dice of
    exactly 1 the truth would weigh most in the regression of logit(Dice), which agreement
    cannot tell from a mask of Dice 0.95: fitted with it, a mask shifted to a Dice of 0.55 that
    disagreed with ours kept a score of 0.67)."""
    return [c for c in agreement_cases if c.mask_family not in ("none", "truth")]


def reference_scores(fusion: FusionModel, agreement_cases: list[QCCase]) -> dict[int, float]:
    """The QC score of our model's own mask on each phantom of an agreement draw (the gate of
    its agreement with the vendor-like masks, :func:`~pacs_sentinel.qc.agreement.reference_trusted`).

    Raises:
        ValueError: A phantom without our model's own mask.
    """
    scores = {c.seed: score_case(fusion, c) for c in agreement_cases if c.mask_family == "none"}
    missing = sorted({c.seed for c in agreement_cases} - set(scores))
    if missing:
        raise ValueError(f"agreement cases without our model's own mask on phantoms {missing[:5]}")
    return scores


def score_case(fusion: FusionModel, case: QCCase) -> float:
    """The fused score of a case as QC reports it (0 for an empty mask)."""
    if case.empty or case.signals is None:
        return 0.0
    return round(fusion.score(case.signals)[0], 4)


def review_case(fusion: FusionModel, case: QCCase, accept_threshold: float = 0.5) -> bool:
    """The verdict QC gives a case: review below the threshold or when an out-of-range check fired."""
    if case.empty or case.signals is None:
        return True
    return score_case(fusion, case) < accept_threshold or bool(policy_reasons(case.signals))


def _fold_of(cases: list[QCCase], folds: int, seed: int) -> dict[int, int]:
    """The fold of each phantom seed (cases of one phantom share a fold)."""
    phantoms = sorted({c.seed for c in cases})
    order = np.random.default_rng(seed).permutation(len(phantoms))
    return {phantoms[i]: k % folds for k, i in enumerate(order)}


def cross_validated_scores(cases: list[QCCase], l2: float, folds: int, seed: int, fit: str = "two-stage",
                           platt_l2: float = 0.001) -> np.ndarray:
    """Scores of each case from models fitted without its phantom (folds grouped by seed)."""
    fold_of = _fold_of(cases, folds, seed)
    scores = np.zeros(len(cases))
    for fold in range(folds):
        train = [c for c in cases if fold_of[c.seed] != fold]
        fusion = FusionModel(QC_VERSION, fit_models(train, l2, fit, platt_l2))
        for i, case in enumerate(cases):
            if fold_of[case.seed] == fold:
                scores[i] = score_case(fusion, case)
    return scores


def third_party_score(fusion: FusionModel, case: QCCase, *, reference_score: float | None) -> float:
    """The fused score seg-qc gives a case as a vendor's mask (0 for an empty mask): with its
    agreement when our own mask's score ``reference_score`` is trusted, without it when that is
    too low or None (no reference prediction)."""
    if case.empty or case.signals is None:
        return 0.0
    use = reference_score is not None and reference_trusted(reference_score)
    return round(fusion.score(third_party_signals(case, agreement=use))[0], 4)


def cross_validated_agreement_scores(cases: list[QCCase], agreement_cases: list[QCCase], l2: float, folds: int,
                                     seed: int, fit: str = "two-stage",
                                     platt_l2: float = 0.001) -> tuple[np.ndarray, np.ndarray]:
    """Seg-qc scores of each vendor-like mask (:func:`vendor_masks`), with a reference prediction
    (its agreement used where our mask is trusted) and without one, from models fitted without
    its phantom (the agreement models' folds grouped by seed; the other models are fitted on
    ``cases``, other phantoms)."""
    vendor = vendor_masks(agreement_cases)
    fold_of = _fold_of(agreement_cases, folds, seed)
    with_reference, without = np.zeros(len(vendor)), np.zeros(len(vendor))
    for fold in range(folds):
        train = [c for c in agreement_cases if fold_of[c.seed] != fold]
        fusion = FusionModel(QC_VERSION, fit_models(cases, l2, fit, platt_l2, agreement_cases=train))
        reference = reference_scores(fusion, agreement_cases)
        for i, case in enumerate(vendor):
            if fold_of[case.seed] == fold:
                with_reference[i] = third_party_score(fusion, case, reference_score=reference[case.seed])
                without[i] = third_party_score(fusion, case, reference_score=None)
    return with_reference, without


def agreement_cases(model, seeds: list[int], perturbations_per_image: int, estimator: QualityEstimator,
                    progress: bool = False) -> list[QCCase]:
    """Vendor-like masks for the agreement models: on each phantom (the calibration's image
    families) ``perturbations_per_image`` perturbations of the ground truth, each with its Dice
    against our model's own mask (:func:`vendor_masks`), and our model's own mask (its QC score
    gates the agreement: :func:`reference_scores`). The ground truth is drawn too (the draw's
    truth share), not fitted on."""
    return draw_cases(model, seeds, training_image_families(), training_mask_families(),
                      perturbations_per_image=perturbations_per_image, truth_share=1.0, estimator=estimator,
                      collect_signals=True, collect_without_probabilities=True, collect_agreement=True,
                      progress=progress, desc="fusion: vendor-like masks")


def fit_fusion(out_path: Path | None = None, *, seed: int = 0, n_images: int | None = None,
               agreement_images: int | None = None, progress: bool = True,
               model=None, estimator: QualityEstimator | None = None) -> dict[str, Any]:
    """Draw the calibration set, fit the fusion, write the JSON.

    Args:
        out_path: Where to write; default the shipped ``qc/models/fusion.json``.
        seed: Seeds the phantom set and the folds.
        n_images: Calibration phantoms (default from the recipe).
        agreement_images: Phantoms of the agreement models' vendor-like masks (default from the recipe).
        model: Segmentation model (default ``demo:organ-seg``); estimator: default the shipped one.

    Returns:
        Cross-validated metrics on the calibration set.
    """
    from pacs_sentinel.inference.models import load_segmentation_model

    recipe = dict(CALIBRATION_RECIPE)
    if n_images is not None:
        recipe["n_images"] = int(n_images)
    if agreement_images is not None:
        recipe["agreement_images"] = int(agreement_images)
    started = time.perf_counter()
    model = model if model is not None else load_segmentation_model("demo:organ-seg", device="cpu")
    estimator = estimator if estimator is not None else load_estimator()
    seeds = seeds_for(CALIBRATION_SEED_OFFSET, recipe["n_images"], seed)
    cases = draw_cases(model, seeds, training_image_families(), training_mask_families(),
                       perturbations_per_image=recipe["perturbations_per_image"],
                       mc_dropout_samples=recipe["mc_dropout_samples"], estimator=estimator, collect_signals=True,
                       collect_without_probabilities=True,
                       progress=progress, desc="fusion: calibration cases")
    agreement_seeds = seeds_for(AGREEMENT_SEED_OFFSET, recipe["agreement_images"], seed)
    vendor = agreement_cases(model, agreement_seeds, recipe["agreement_perturbations_per_image"], estimator, progress)
    cv = cross_validated_scores(cases, recipe["l2"], recipe["folds"], seed, recipe["fit"], recipe["platt_l2"])
    cv_with, cv_without = cross_validated_agreement_scores(cases, vendor, recipe["l2"], recipe["folds"], seed,
                                                           recipe["fit"], recipe["platt_l2"])
    models = fit_models(cases, recipe["l2"], recipe["fit"], recipe["platt_l2"], agreement_cases=vendor)
    reference = reference_scores(FusionModel(QC_VERSION, models), vendor)
    vendor_dice = np.array([c.dice for c in vendor_masks(vendor)])
    vendor_ok = vendor_dice >= ACCEPTABLE_DICE
    dice = np.array([c.dice for c in cases])
    own = np.array([c.uncertainty for c in cases])
    # A case an out-of-range check flags goes to review whatever the threshold: the threshold
    # curve holds only the in-range own-model cases, the ones the threshold decides.
    in_range = np.array([c.signals is not None and not policy_reasons(c.signals) for c in cases])
    curve = own & in_range
    acceptable = dice >= ACCEPTABLE_DICE
    metrics = {
        "n_cases": len(cases),
        "n_own_model": int(own.sum()),
        "failure_rate": round(float((~acceptable).mean()), 4),
        "cv_auroc_all": round(auroc(cv, ~acceptable), 4),
        "cv_auroc_own_model": round(auroc(cv[own], ~acceptable[own]), 4),
        "cv_spearman_all": round(spearman(cv, dice), 4),
        "cv_ece_all": round(expected_calibration_error(cv, acceptable), 4),
        "n_agreement_cases": len(vendor_dice),
        "agreement_failure_rate": round(float((~vendor_ok).mean()), 4),
        "agreement_used_share": round(float(np.mean([reference_trusted(reference[c.seed])
                                                     for c in vendor_masks(vendor)])), 4),
        "cv_auroc_agreement": round(auroc(cv_with, ~vendor_ok), 4),
        "cv_auroc_agreement_no_reference": round(auroc(cv_without, ~vendor_ok), 4),
        "cv_ece_agreement": round(expected_calibration_error(cv_with, vendor_ok), 4),
        "cv_ece_agreement_no_reference": round(expected_calibration_error(cv_without, vendor_ok), 4),
    }
    fusion = FusionModel(
        QC_VERSION, models,
        calibration={
            "description": ("cross-validated fused scores of the calibration set's own-model masks "
                            "(the segmentation pipeline's path, with MC-dropout samples) that no "
                            "out-of-range check sends to review anyway: the curve [qc] "
                            "target_review_rate / max_risk derive the threshold from"),
            "scores": [round(float(s), 4) for s in cv[curve]],
            "dice": [round(float(d), 4) for d in dice[curve]],
            "families": [c.image_family for c, o in zip(cases, curve, strict=True) if o],
            "all_scores": [round(float(s), 4) for s in cv],
            "all_dice": [round(float(d), 4) for d in dice],
        },
        info={
            "seed": seed,
            **recipe,
            "seeds": f"{seeds[0]}..{seeds[-1]}",
            "agreement_seeds": f"{agreement_seeds[0]}..{agreement_seeds[-1]}",
            "image_families": training_image_families(),
            "mask_families": training_mask_families(),
            "held_out_families": list(HELD_OUT_FAMILIES),
            "estimator_version": estimator.version,
            "metrics": metrics,
            "date": dt.date.today().isoformat(),
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    fusion.save(Path(out_path) if out_path is not None else FUSION_FILE)
    from pacs_sentinel.qc import evaluate

    evaluate._fusion = None  # the next evaluation reads the new file
    log.info("qc fusion fitted", **metrics)
    return metrics
