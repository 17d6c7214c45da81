"""Fitted fusion of the QC signals: one score that reads as P(Dice >= 0.7).

The fusion is a logistic model on monotone transforms of the signals, fitted on a
calibration set of phantom cases (:mod:`pacs_sentinel.qc.calibrate`), with every weight
constrained to be non-negative: each transform grows with the signal's "goodness", so a
strictly worse signal can never raise the score (monotonicity, tested). Since QC 2.2.0 it is
fitted in two stages (:func:`fit_ranked_logistic`: a non-negative regression of logit(Dice)
on the features, then a Platt calibration of that predictor to Dice >= 0.7), so the score
orders good masks by their Dice too instead of saturating among them; the stored model is
the same logistic model (:func:`fit_logistic` fits it directly on Dice >= 0.7). Transforms:

- ``"logit"``: ``logit(value)`` for signals where higher is better (predicted Dice, sample
  Dice, mean probability, expected Dice, largest-component share, roundness), clipped to [0.01, 0.99];
- ``"logit-complement"``: ``logit(1 - value)`` for shares where higher is worse (entropy,
  holes, border contact);
- ``"log-subscore"``: ``log(subscore)``, clipped at 0.02, for the input-image checks;
- ``"flag"``: -1 when the check raises its reason, else 0, for the location check (since QC
  2.5.0; a graded form, ``log(subscore)``, lowered also masks just outside the card's range
  that are mostly fine, and fitted worse: cross-validated ECE 0.038 against 0.032).

Three models are fitted: ``with-uncertainty`` (the own-model path with MC-dropout/TTA samples),
``without-uncertainty`` (our model's probabilities but no samples) and, since QC 2.1.0,
``without-probabilities`` (no probability map either: a third-party SEG); a result uses the most
complete model whose features it has, else the model that uses most of its signals (missing
features counting as neutral). The third model
keeps a mask that comes with no probabilities from being scored as if the (missing) expected
Dice were perfect, a strong feature of the other two. Since QC 2.6.0 each of the three is
fitted again without the learned estimator's prediction (``<name>-no-estimator``): the
estimator judges only the structure and modality it was trained on (the demo's liver on CT:
:meth:`~pacs_sentinel.qc.estimator.QualityEstimator.covers`), so a vendor's spleen segment, or
the segment of a user's model of another organ, is scored by the signals that do apply to it
instead of by a liver estimator (which calls a perfect spleen a bad liver) or by its missing
prediction counted as perfect.

*Out-of-range* checks (volume outside the model card's range, implausible location and, since
QC 2.6.0, a third-party segment of a structure that neither a model card nor the estimator
covers) are policy: the model was never validated there, so a result they flag goes to review
whatever its score (:func:`policy_reasons`), while the score stays a calibrated probability. So,
since QC 2.7.0, is a third-party segment that disagrees (Dice below 0.7) with our own prediction
where that prediction passes its own QC: on the calibration's vendor-like masks (in sample) the fitted score
alone (at 0.5) caught 65 of 89 failures there, with the disagreement as policy 88 (good masks sent
to review 20 of 187 instead of 3). Since QC 2.5.0
the location check (:data:`OFFSET_FEATURES`) also lowers that probability when it fires, by
what that predicts on the calibration set, where a liver segmented on the wrong side of the body
fails more often than not. It is fitted last, with the other weights frozen (:func:`fit_offset`):
its feature is 0 when it does not fire, so the score of every other mask is the one the other
signals give. (QC 2.4.0 fitted it jointly with them, which moved weight from the mean probability to
the entropy and made the score more confident on failure modes it had never seen; withdrawn.)
The volume check stays policy only: an unusually large organ segmented well is no failure.
Since QC 2.7.0 the agreement of a third-party segment with our own model's prediction
(:mod:`pacs_sentinel.qc.agreement`) is a feature of two further models, ``with-agreement`` and
``with-agreement-no-estimator`` (the ``without-probabilities`` paths plus the agreement Dice),
fitted on vendor-like masks (perturbations of the ground truth) on phantoms where our own mask
passes its own QC, the only place seg-qc uses the agreement
(:data:`~pacs_sentinel.qc.agreement.REFERENCE_MIN_SCORE`); before, the agreement multiplied the
calibrated probability by its fusion factor, so a seg-qc score with agreement did not read as a
probability. A signal the chosen model does
not take as a feature (one the calibration never saw) still keeps that product rule. The model,
its calibration curve and the QC version it belongs to are one JSON file, ``qc/models/fusion.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pacs_sentinel import atomic
from pacs_sentinel.errors import ModelError
from pacs_sentinel.qc.heuristics import FLAG_BELOW, Signal
from pacs_sentinel.results import Reason

#: The shipped fusion model.
FUSION_FILE = Path(__file__).resolve().parent / "models" / "fusion.json"
#: Dice at or above which a mask is acceptable (DESIGN.md); the score is P(Dice >= this).
ACCEPTABLE_DICE = 0.7
#: Reasons of out-of-range checks: a result they flag goes to review whatever its score. Since
#: QC 2.7.0 also a third-party segment's disagreement with our prediction where that prediction
#: passed its own QC (QC029 is raised only then): a fitted feature of the score too, and alone
#: the strongest evidence against the segment (see :mod:`pacs_sentinel.qc.agreement`).
POLICY_REASONS = (Reason.VOLUME_ANOMALY, Reason.IMPLAUSIBLE_LOCATION, Reason.UNCOVERED_STRUCTURE,
                  Reason.DISAGREEMENT)
#: Transform of each signal the fusion can use.
SIGNAL_TRANSFORMS: dict[str, str] = {
    "predicted_dice": "logit",
    "sample_dice": "logit",
    "mask_entropy": "logit-complement",
    "mean_probability": "logit",
    "expected_dice": "logit",
    "largest_component_share": "logit",
    "roundness": "logit",
    "hole_share": "logit-complement",
    "border_contact_share": "logit-complement",
    "left_share": "flag",
    "noise_hu": "log-subscore",
    "edge_width_px": "log-subscore",
    "metal_ml": "log-subscore",
    "air_level_hu": "log-subscore",
    "out_of_range_share": "log-subscore",
    "contrast_range_hu": "log-subscore",
    "truncated_slice_share": "log-subscore",
    "agreement_dice": "logit",
}
UNCERTAINTY_SIGNALS = ("sample_dice", "mask_entropy")
#: Features fitted after the others, with those frozen (:func:`fit_offset`): checks whose feature
#: is 0 unless they fire, so they change only the scores of the masks they flag.
OFFSET_FEATURES = ("left_share",)
#: Signals of the model's own probability map (absent for a third-party SEG).
PROBABILITY_SIGNALS = ("mean_probability", "expected_dice")
#: Signals of a third-party segment's comparison with our own model (only the seg-qc path).
AGREEMENT_SIGNALS = ("agreement_dice",)
_LOGIT_CLIP = 0.01
_SUBSCORE_CLIP = 0.02


def policy_reasons(signals: list[Signal]) -> list[Reason]:
    """The out-of-range checks that fired: each sends the result to review on its own."""
    return list(dict.fromkeys(s.reason for s in signals if s.reason in POLICY_REASONS and s.fired))


def transform(kind: str, value: float, subscore: float) -> float:
    """The fusion feature of one signal (grows with the signal's goodness).

    Raises:
        ValueError: Unknown transform.
    """
    if kind == "logit":
        p = min(1.0 - _LOGIT_CLIP, max(_LOGIT_CLIP, value))
        return math.log(p / (1.0 - p))
    if kind == "logit-complement":
        p = min(1.0 - _LOGIT_CLIP, max(_LOGIT_CLIP, 1.0 - value))
        return math.log(p / (1.0 - p))
    if kind == "log-subscore":
        return math.log(max(_SUBSCORE_CLIP, subscore))
    if kind == "flag":
        return -1.0 if subscore < FLAG_BELOW else 0.0
    raise ValueError(f"unknown fusion transform {kind!r}")


def best_feature(kind: str) -> float:
    """The feature of a perfect signal (neutral value for a missing one)."""
    return transform(kind, 1.0, 1.0) if kind == "logit" else transform(kind, 0.0, 1.0)


@dataclass
class LogisticModel:
    """``sigmoid(intercept + sum(weight * feature))`` over named signals, weights >= 0."""

    name: str
    features: list[str]
    weights: list[float]
    intercept: float

    def feature_vector(self, signals: dict[str, Signal]) -> np.ndarray:
        """Features of ``signals`` in model order; a missing signal counts as perfect."""
        return np.array([
            transform(SIGNAL_TRANSFORMS[f], signals[f].value, signals[f].subscore) if f in signals
            else best_feature(SIGNAL_TRANSFORMS[f])
            for f in self.features
        ])

    def probability(self, signals: dict[str, Signal]) -> float:
        """The calibrated probability for these signals."""
        z = self.intercept + float(np.dot(self.weights, self.feature_vector(signals)))
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    def contributions(self, signals: dict[str, Signal]) -> dict[str, float]:
        """How much each present feature lowers the logit against a perfect signal (<= 0)."""
        x = self.feature_vector(signals)
        return {f: w * (xi - best_feature(SIGNAL_TRANSFORMS[f]))
                for f, w, xi in zip(self.features, self.weights, x, strict=True) if f in signals}


@dataclass
class FusionModel:
    """The fitted fusion of one QC version (``qc/models/fusion.json``)."""

    qc_version: str
    models: list[LogisticModel]
    calibration: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def choose(self, signals: dict[str, Signal]) -> LogisticModel:
        """The most complete model whose features are all present; else the one that uses most of
        the signals present (the smaller one on a tie)."""
        complete = [m for m in self.models if all(f in signals for f in m.features)]
        if complete:
            return max(complete, key=lambda m: len(m.features))
        return max(self.models, key=lambda m: (sum(f in signals for f in m.features), -len(m.features)))

    def score(self, signals: list[Signal]) -> tuple[float, LogisticModel]:
        """The fused score of one segment's signals and the model that produced it."""
        by_name = {s.name: s for s in signals}
        model = self.choose(by_name)
        score = model.probability(by_name)
        for signal in signals:
            # A signal this model was not fitted on (e.g. the agreement, under a fusion fitted
            # before QC 2.7.0) keeps the product rule rather than being ignored.
            if signal.name not in model.features and signal.reason not in POLICY_REASONS:
                score *= signal.fusion_factor
        return score, model

    def to_json(self) -> dict[str, Any]:
        return {
            "qc_version": self.qc_version,
            "target": f"P(Dice >= {ACCEPTABLE_DICE})",
            "policy_reasons": [r.value.value for r in POLICY_REASONS],
            "transforms": SIGNAL_TRANSFORMS,
            "models": [{"name": m.name, "features": m.features, "weights": [round(w, 6) for w in m.weights],
                        "intercept": round(m.intercept, 6)} for m in self.models],
            "calibration": self.calibration,
            "info": self.info,
        }

    def save(self, path: Path) -> None:
        """Write the model as JSON (atomically and durably)."""
        atomic.write_text(Path(path), json.dumps(self.to_json(), indent=1) + "\n")


def load_fusion(path: Path | None = None, *, qc_version: str | None = None) -> FusionModel:
    """Read a fusion model.

    Args:
        path: JSON file; default the shipped ``qc/models/fusion.json``.
        qc_version: When given, the file must belong to this QC version.

    Raises:
        ModelError: Missing or invalid file, unknown signal, or another QC version.
    """
    path = Path(path) if path is not None else FUSION_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        models = [LogisticModel(m["name"], list(m["features"]), [float(w) for w in m["weights"]], float(m["intercept"]))
                  for m in data["models"]]
        fusion = FusionModel(str(data["qc_version"]), models, data.get("calibration", {}), data.get("info", {}))
    except FileNotFoundError:
        raise ModelError(f"QC fusion model not found: {path}; run `sentinel train-demo qc-fusion`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"invalid QC fusion model {path}: {exc}") from exc
    for model in fusion.models:
        unknown = [f for f in model.features if f not in SIGNAL_TRANSFORMS]
        if unknown or len(model.weights) != len(model.features) or min(model.weights, default=0.0) < 0:
            raise ModelError(f"invalid QC fusion model {path}: model {model.name!r} has unknown features {unknown} "
                             "or negative / missing weights")
    if not fusion.models:
        raise ModelError(f"invalid QC fusion model {path}: no models")
    if qc_version is not None and fusion.qc_version != qc_version:
        raise ModelError(f"QC fusion model {path} is for QC {fusion.qc_version}, this is QC {qc_version}; "
                         "run `sentinel train-demo qc-fusion`")
    return fusion


def _standardized(name: str, features: list[str],
                  rows: list[dict[str, Signal]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows' feature vectors standardized per feature, with the means and scales used.

    A constant feature gets an infinite scale, so its standardized column is 0 (weight 0).
    """
    probe = LogisticModel(name, features, [0.0] * len(features), 0.0)
    x = np.stack([probe.feature_vector(r) for r in rows])
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std < 1e-9] = np.inf
    return (x - mean) / std, mean, std


def fit_logistic(name: str, features: list[str], rows: list[dict[str, Signal]], acceptable: np.ndarray,
                 l2: float = 1e-2) -> LogisticModel:
    """Fit a non-negative-weight logistic regression of ``acceptable`` on the signals' features.

    Features are standardised for the fit (a positive scale keeps weights non-negative) and
    the L2 penalty (``l2`` per case) keeps the fit stable when a feature separates the
    classes. Solved with SciPy's L-BFGS-B with bounds.

    Raises:
        ValueError: No rows, or only one class.
    """
    y = np.asarray(acceptable, dtype=np.float64)
    if len(rows) == 0 or y.min() == y.max():
        raise ValueError(f"fusion model {name!r} needs both acceptable and failed cases (got {len(rows)} rows)")
    xs, mean, std = _standardized(name, features, rows)
    w, c = _nonnegative_logistic(xs, y, l2, np.zeros(len(features) + 1))
    weights = w / std
    intercept = float(c - np.sum(w * mean / std))
    return LogisticModel(name, list(features), [float(max(0.0, v)) for v in weights], intercept)


def _nonnegative_logistic(xs: np.ndarray, y: np.ndarray, l2: float, start: np.ndarray,
                          offset: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """``(w, c)`` minimising the mean log-loss of ``sigmoid(xs @ w + c)`` on ``y`` plus
    ``l2 / 2 |w|^2``, with ``w >= 0`` and ``c`` free (SciPy's L-BFGS-B with bounds), from
    ``start = [c, *w]``. With an ``offset`` the logits are ``offset + xs @ w`` (``c`` stays 0)."""
    from scipy.optimize import minimize

    n = len(y)
    base = np.zeros(n) if offset is None else np.asarray(offset, dtype=np.float64)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = base + theta[0] + xs @ theta[1:]
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
        nll = np.sum(np.logaddexp(0.0, z) - y * z) / n + 0.5 * l2 * np.sum(theta[1:] ** 2)
        grad = np.concatenate([[np.sum(p - y) / n], xs.T @ (p - y) / n + l2 * theta[1:]])
        return float(nll), grad

    bounds = [(None, None) if offset is None else (0.0, 0.0)] + [(0.0, None)] * xs.shape[1]
    result = minimize(loss, start, jac=True, bounds=bounds, method="L-BFGS-B")
    return result.x[1:], float(result.x[0])


def calibration_curve(fusion: FusionModel) -> tuple[np.ndarray, np.ndarray]:
    """The calibration set's cross-validated scores and failure flags (Dice < 0.7).

    Raises:
        ModelError: The fusion model carries no calibration curve.
    """
    scores, dice = fusion.calibration.get("scores"), fusion.calibration.get("dice")
    if not scores or not dice or len(scores) != len(dice):
        raise ModelError("the QC fusion model carries no calibration curve; run `sentinel train-demo qc-fusion`")
    return np.asarray(scores, dtype=np.float64), np.asarray(dice, dtype=np.float64) < ACCEPTABLE_DICE


def calibrated_threshold(fusion: FusionModel, *, target_review_rate: float | None = None,
                         max_risk: float | None = None):
    """The operating point of a target review rate or a maximum risk on the calibration curve.

    Returns:
        :class:`~pacs_sentinel.qc.metrics.OperatingPoint`.

    Raises:
        ModelError: No calibration curve. ValueError: not exactly one target.
    """
    from pacs_sentinel.qc.metrics import derive_threshold

    scores, failed = calibration_curve(fusion)
    return derive_threshold(scores, failed, target_review_rate=target_review_rate, max_risk=max_risk)


def fit_ranked_logistic(name: str, features: list[str], rows: list[dict[str, Signal]], dice: np.ndarray,
                        l2: float = 1e-2, platt_l2: float = 1e-3, target: str = "logit-dice") -> LogisticModel:
    """Fit in two stages: a non-negative linear predictor of the Dice, then its calibration.

    Stage 1 regresses the Dice (``target="dice"``) or its logit (``"logit-dice"``, the Dice
    clipped to [0.01, 0.99]) on the standardised features, weights >= 0 (ridge penalty ``l2``
    per case): the predictor orders *every* case by its Dice, where a logistic fit on
    ``Dice >= 0.7`` only cares about the cases near that line and saturates among good masks.
    Stage 2 is a one-dimensional Platt calibration of that predictor to P(Dice >=
    :data:`ACCEPTABLE_DICE`) (``sigmoid(a z + b)``, a >= 0, a ridge ``platt_l2`` on ``a`` of
    the standardised predictor: light, since a strong one flattens the probabilities, a very
    light one lets the scores of the worst and best masks saturate and tie at the reported
    four decimals). The product is a :class:`LogisticModel` with weights ``a * w`` (still >= 0:
    monotone) and the same reading as :func:`fit_logistic`'s.

    Raises:
        ValueError: No rows, only one class, or an unknown target.
    """
    from scipy.optimize import lsq_linear

    dice = np.asarray(dice, dtype=np.float64)
    y = (dice >= ACCEPTABLE_DICE).astype(np.float64)
    if len(rows) == 0 or y.min() == y.max():
        raise ValueError(f"fusion model {name!r} needs both acceptable and failed cases (got {len(rows)} rows)")
    if target == "dice":
        t = dice
    elif target == "logit-dice":
        clipped = np.clip(dice, _LOGIT_CLIP, 1.0 - _LOGIT_CLIP)
        t = np.log(clipped / (1.0 - clipped))
    else:
        raise ValueError(f"unknown regression target {target!r}; expected 'dice' or 'logit-dice'")
    xs, mean, std = _standardized(name, features, rows)
    n, k = xs.shape
    # Ridge as extra rows: minimise |xs w + c - t|^2 / n + l2 |w|^2 with w >= 0, c free.
    design = np.vstack([np.hstack([xs, np.ones((n, 1))]) / math.sqrt(n),
                        np.hstack([math.sqrt(l2) * np.eye(k), np.zeros((k, 1))])])
    rhs = np.concatenate([(t - t.mean()) / math.sqrt(n), np.zeros(k)])
    lower, upper = np.r_[np.zeros(k), -np.inf], np.full(k + 1, np.inf)
    solution = lsq_linear(design, rhs, bounds=(lower, upper), method="bvls").x
    w, c = solution[:k], solution[k]
    z = xs @ w + c
    scale = float(z.std()) if z.std() > 1e-12 else 1.0
    a, b = _platt(z / scale, y, platt_l2)
    weights = a / scale * w / std
    intercept = float(a / scale * (c - np.sum(w * mean / std)) + b)
    return LogisticModel(name, list(features), [float(max(0.0, v)) for v in weights], intercept)


def _platt(z: np.ndarray, y: np.ndarray, l2: float) -> tuple[float, float]:
    """``(a, b)`` of the logistic fit ``sigmoid(a z + b)`` to ``y``, a >= 0, ridge ``l2`` on a."""
    a, b = _nonnegative_logistic(z[:, None], y, l2, np.array([0.0, 1.0]))
    return float(a[0]), b


def fit_offset(model: LogisticModel, features: list[str], rows: list[dict[str, Signal]], acceptable: np.ndarray,
               l2: float = 1e-2) -> LogisticModel:
    """``model`` with ``features`` added, their weights fitted with the model's own frozen.

    A non-negative logistic fit of ``acceptable`` with the model's logit as a fixed offset and
    no intercept of its own, on each feature's distance from its perfect value (ridge ``l2``,
    unstandardised): a row whose added signals are perfect (or missing) keeps its probability
    exactly, so the added checks can only lower the scores of the masks they flag, by what they
    predict beyond the other signals.

    Raises:
        ValueError: No rows, or a feature the model already has.
    """
    if len(rows) == 0:
        raise ValueError(f"fusion model {model.name!r}: no rows to fit {features} on")
    if set(features) & set(model.features):
        raise ValueError(f"fusion model {model.name!r} already has features {sorted(set(features) & set(model.features))}")
    if not features:
        return model
    probe = LogisticModel(model.name, list(features), [0.0] * len(features), 0.0)
    best = np.array([best_feature(SIGNAL_TRANSFORMS[f]) for f in features])
    xs = np.stack([probe.feature_vector(r) for r in rows]) - best
    base = np.array([model.intercept + float(np.dot(model.weights, model.feature_vector(r))) for r in rows])
    y = np.asarray(acceptable, dtype=np.float64)
    w, _ = _nonnegative_logistic(xs, y, l2, np.zeros(len(features) + 1), offset=base)
    weights = [float(max(0.0, v)) for v in w]
    return LogisticModel(model.name, [*model.features, *features], [*model.weights, *weights],
                         float(model.intercept - np.dot(weights, best)))
