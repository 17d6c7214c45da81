"""Refit the QC fusion on radiologists' feedback: new QC versions, and when one is activated.

A *feedback case* is one judged segment of a result a person decided on, with the QC signals
the job recorded and a label "acceptable" (the fusion's target, P(Dice >= 0.7)): reviewer said
``ai-correct`` -> 1, ``ai-rejected`` -> 0, ``ai-corrected`` -> Dice(AI, correction) >= 0.7.
Gathering them from the database is the daemon's job (:mod:`pacs_sentinel.daemon.refit`).

**Refit = Platt recalibration of the active fusion**: ``new logit = a * old logit + b`` with
``a >= 0``, applied to every logistic model of the fusion (weights times ``a``, intercept
``a * intercept + b``), fitted by bounded L-BFGS on the feedback log-loss with a Gaussian prior
pulling ``(a, b)`` towards ``(1, 0)`` (the old version). Why not refit the weights: a night's
feedback is tens of cases, a few hundred at best, against 13-15 weights fitted on 480 phantom
cases; two parameters are stable with few cases, keep every weight non-negative (so a strictly
worse signal still never raises the score) and keep the ranking of the cases (``a > 0``), while
moving the probability to what reviewers actually see (a hospital's case mix, its definition of
acceptable). The fusion's calibration curve is mapped the same way, so ``target_review_rate`` /
``max_risk`` keep their meaning.

**Activation rule** (:func:`decide`): the new version is activated only when it is no worse than
the active one on (a) the held-out split of the feedback cases (log-loss, Brier, and AUROC when
both classes are present; a recalibration fitted on the other split stands in for the version,
which is then fitted on every case) and (b) qc-eval's held-out phantom cases, judged with the
version itself (AUROC and AURC of the fused score, the failure-detection figures qc-eval reports,
and the Brier score of the score as P(Dice >= 0.7): a recalibration that keeps the ranking but
flattens the scores is worse; the log-loss there is logged, not required). Each version is one file ``<data_dir>/qc/fusion-<version>.json`` (its ``info.refit``
holds the fit and both evaluations); ``<data_dir>/qc/active.json`` names the active one and is
read by the worker before each job (:class:`ActiveFusion`). The shipped file is never modified.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from pacs_sentinel import atomic
from pacs_sentinel.errors import ModelError
from pacs_sentinel.qc.fusion import SIGNAL_TRANSFORMS, FusionModel, LogisticModel, load_fusion
from pacs_sentinel.qc.heuristics import Signal
from pacs_sentinel.qc.metrics import aurc, auroc
from pacs_sentinel.results import Reason

log = structlog.get_logger(__name__)

#: Fewest feedback cases a refit is attempted on (both classes needed).
MIN_CASES = 6
#: Strength of the prior towards the old version (a = 1, b = 0), in cases.
PRIOR_CASES = 2.0
#: Share of the feedback cases held out for the activation rule.
HOLDOUT_SHARE = 1 / 3
#: Slack of "no worse" (a metric may move by this much the wrong way).
TOLERANCE = {"log_loss": 1e-3, "brier": 1e-3, "auroc": 5e-3, "aurc": 2e-3, "phantom_brier": 5e-3}
ACTIVE_FILE = "active.json"
_CLIP = 1e-6


class RefitError(ModelError):
    """A refit cannot be made (too few cases, one class only, bad files)."""


@dataclass(frozen=True)
class FeedbackCase:
    """One judged segment a person decided on: its QC signals and whether it was acceptable."""

    job_id: int
    segment_number: int
    signals: list[Signal]
    acceptable: bool
    decision: str
    qc_version: str = ""


def signals_from_rows(rows: list[dict[str, Any]]) -> list[Signal]:
    """Signals of one segment from stored ``(name, value, subscore)`` rows (the fused ones only:
    the fusion's logistic part depends on nothing else)."""
    # The reason does not enter the fusion's logistic part; a neutral one is enough.
    return [Signal(str(r["name"]), float(r["value"]), float(r["subscore"]), Reason.LOW_PREDICTED_DICE)
            for r in rows if r["name"] in SIGNAL_TRANSFORMS]


def fusion_logit(fusion: FusionModel, signals: list[Signal]) -> float:
    """The logit of the fusion's calibrated probability (before unfitted signals' factors)."""
    by_name = {s.name: s for s in signals}
    model = fusion.choose(by_name)
    return model.intercept + float(np.dot(model.weights, model.feature_vector(by_name)))


def probabilities(fusion: FusionModel, cases: list[FeedbackCase]) -> np.ndarray:
    """P(acceptable) of each case under a fusion."""
    z = np.array([fusion_logit(fusion, c.signals) for c in cases], dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def fit_platt(z: np.ndarray, y: np.ndarray, prior_cases: float = PRIOR_CASES) -> tuple[float, float]:
    """``(a, b)`` minimising the log-loss of ``sigmoid(a z + b)`` plus a prior towards (1, 0); a >= 0.

    Raises:
        RefitError: No cases.
    """
    from scipy.optimize import minimize

    z, y = np.asarray(z, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(z) == 0:
        raise RefitError("no feedback cases to recalibrate on")
    scale = max(1.0, float(np.std(z)))  # the prior is on a comparable footing for a and b

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta
        u = a * z + b
        p = 1.0 / (1.0 + np.exp(-np.clip(u, -50, 50)))
        nll = float(np.sum(np.logaddexp(0.0, u) - y * u))
        penalty = 0.5 * prior_cases * (((a - 1.0) * scale) ** 2 + b ** 2)
        grad = np.array([np.sum((p - y) * z) + prior_cases * (a - 1.0) * scale ** 2,
                         np.sum(p - y) + prior_cases * b])
        return nll + penalty, grad

    result = minimize(loss, np.array([1.0, 0.0]), jac=True, bounds=[(0.0, None), (None, None)], method="L-BFGS-B")
    return float(max(0.0, result.x[0])), float(result.x[1])


def recalibrated(fusion: FusionModel, a: float, b: float, qc_version: str) -> FusionModel:
    """The fusion with every model's logit mapped ``a z + b`` (weights stay >= 0), its calibration
    curve mapped the same way."""
    if a < 0:
        raise ValueError(f"Platt slope must be >= 0, got {a}")
    models = [LogisticModel(m.name, list(m.features), [a * w for w in m.weights], a * m.intercept + b)
              for m in fusion.models]

    def remap(scores: list[float]) -> list[float]:
        out = []
        for s in scores:
            if s <= 0.0:  # 0: an out-of-range check sends the case to review whatever its score
                out.append(0.0)
                continue
            p = min(1 - _CLIP, max(_CLIP, float(s)))
            u = a * math.log(p / (1 - p)) + b
            out.append(round(1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, u)))), 4))
        return out

    calibration = dict(fusion.calibration)
    for key in ("scores", "all_scores"):
        if isinstance(calibration.get(key), list):
            calibration[key] = remap(calibration[key])
    return FusionModel(qc_version, models, calibration, dict(fusion.info))


def feedback_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Log-loss, Brier and AUROC (failure = not acceptable; NaN with one class) of probabilities."""
    p, y = np.clip(np.asarray(p, dtype=np.float64), _CLIP, 1 - _CLIP), np.asarray(y, dtype=np.float64)
    return {
        "n": int(len(y)),
        "log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan"),
        "brier": float(np.mean((p - y) ** 2)) if len(y) else float("nan"),
        "auroc": auroc(p, y < 0.5),
    }


def split_cases(cases: list[FeedbackCase], seed: int = 0) -> tuple[list[FeedbackCase], list[FeedbackCase]]:
    """(fit, held-out): about :data:`HOLDOUT_SHARE` of each class held out (at least one of a class
    with two or more cases), grouped by job so a result's segments stay together; seeded."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for label in (True, False):
        jobs = sorted({c.job_id for c in cases if c.acceptable is label})
        order = [jobs[i] for i in rng.permutation(len(jobs))]
        n_held = int(round(len(jobs) * HOLDOUT_SHARE)) if len(jobs) >= 2 else 0
        n_held = max(1, n_held) if len(jobs) >= 2 else 0
        held_jobs = set(order[:n_held])
        for c in cases:
            if c.acceptable is label:
                (held if c.job_id in held_jobs else fit).append(c)
    return fit, held


def phantom_cases(*, n_per_family: int, perturbations: int, seed: int = 0, model=None) -> list:
    """qc-eval's held-out phantom cases (:func:`pacs_sentinel.qc.evaluation.run_qc_eval`'s draw:
    same seeds, families and dropout samples) at a small size, to compare fusions on."""
    from pacs_sentinel.inference.models import load_segmentation_model
    from pacs_sentinel.qc.cases import EVALUATION_SEED_OFFSET, draw_cases, seeds_for
    from pacs_sentinel.qc.corruptions import IMAGE_FAMILIES, MASK_FAMILIES
    from pacs_sentinel.qc.estimator import load_estimator
    from pacs_sentinel.qc.evaluation import MC_DROPOUT_SAMPLES

    model = model if model is not None else load_segmentation_model("demo:organ-seg", device="cpu")
    families = list(IMAGE_FAMILIES)
    seeds = seeds_for(EVALUATION_SEED_OFFSET, n_per_family * len(families), seed)
    return draw_cases(model, seeds, families, MASK_FAMILIES, perturbations_per_image=perturbations,
                      mc_dropout_samples=MC_DROPOUT_SAMPLES, estimator=load_estimator(), collect_signals=True,
                      cycle_perturbations=True, progress=False, desc="qc-refit: phantoms")


def phantom_metrics(fusion: FusionModel, cases: list) -> dict[str, float]:
    """qc-eval's figures of the fused score on phantom cases (all cases) plus its log-loss and Brier."""
    from pacs_sentinel.qc.calibrate import score_case
    from pacs_sentinel.qc.fusion import ACCEPTABLE_DICE

    scores = np.array([score_case(fusion, c) for c in cases], dtype=np.float64)
    dice = np.array([c.dice for c in cases], dtype=np.float64)
    acceptable = (dice >= ACCEPTABLE_DICE).astype(np.float64)
    calibration = feedback_metrics(scores, acceptable)
    return {"n": int(len(cases)), "failures": int((acceptable == 0).sum()), "auroc": auroc(scores, acceptable == 0),
            "aurc": aurc(scores, 1.0 - dice), "log_loss": calibration["log_loss"], "brier": calibration["brier"]}


def _worse(old: float, new: float, metric: str, higher_is_better: bool) -> bool:
    if any(isinstance(v, float) and math.isnan(v) for v in (old, new)):
        return False  # not measurable on these cases (one class): does not decide
    return new < old - TOLERANCE[metric] if higher_is_better else new > old + TOLERANCE[metric]


def decide(feedback_old: dict[str, float], feedback_new: dict[str, float], phantom_old: dict[str, float],
           phantom_new: dict[str, float]) -> tuple[bool, list[str]]:
    """The activation rule: ``(activate, reasons it is not activated)``.

    No worse on the held-out feedback (log-loss, Brier, AUROC) and on the phantoms (AUROC,
    AURC, Brier), each within :data:`TOLERANCE` (the phantoms' Brier within ``phantom_brier``:
    their failure rate is not a hospital's, so a recalibration may move it a little).
    """
    problems = []
    for metric, higher in (("log_loss", False), ("brier", False), ("auroc", True)):
        if _worse(feedback_old[metric], feedback_new[metric], metric, higher):
            problems.append(f"held-out feedback {metric} {feedback_old[metric]:.4f} -> {feedback_new[metric]:.4f}")
    for metric, higher, tolerance in (("auroc", True, "auroc"), ("aurc", False, "aurc"),
                                      ("brier", False, "phantom_brier")):
        if _worse(phantom_old[metric], phantom_new[metric], tolerance, higher):
            problems.append(f"held-out phantoms {metric} {phantom_old[metric]:.4f} -> {phantom_new[metric]:.4f}")
    return not problems, problems


# --- versions on disk -----------------------------------------------------------------------

_VERSION_FILE = re.compile(r"^fusion-(?P<version>.+)\.json$")


def version_file(qc_dir: Path, version: str) -> Path:
    """Where a local QC version's fusion lives."""
    return Path(qc_dir) / f"fusion-{version}.json"


def local_versions(qc_dir: Path) -> list[str]:
    """Versions of the local refits in ``qc_dir``, oldest first."""
    found = []
    for path in Path(qc_dir).glob("fusion-*.json"):
        match = _VERSION_FILE.match(path.name)
        if match:
            found.append(match.group("version"))
    return sorted(found, key=lambda v: (int(v.rsplit("+fb", 1)[1]) if "+fb" in v and v.rsplit("+fb", 1)[1].isdigit()
                                        else 0, v))


def next_version(base_version: str, qc_dir: Path) -> str:
    """``<shipped version>+fb<n>`` with n one more than any local refit's."""
    base = base_version.split("+", 1)[0]
    numbers = [int(m.group(1)) for v in local_versions(qc_dir) if (m := re.search(r"\+fb(\d+)$", v))]
    return f"{base}+fb{max(numbers, default=0) + 1}"


def read_active(qc_dir: Path) -> dict[str, Any]:
    """``active.json`` (empty when no version was ever activated: the shipped one is active).

    Raises:
        ModelError: The file is not valid JSON.
    """
    path = Path(qc_dir) / ACTIVE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"invalid {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"invalid {path}: not a JSON object")
    return data


def write_active(qc_dir: Path, data: dict[str, Any]) -> None:
    """Write ``active.json`` atomically and durably (a power cut leaves the old or the new one)."""
    atomic.write_text(Path(qc_dir) / ACTIVE_FILE, json.dumps(data, indent=1) + "\n")


def load_version(qc_dir: Path, version: str | None, shipped: FusionModel) -> FusionModel:
    """The fusion of a version: the shipped one, or a local refit's file.

    Raises:
        ModelError: A local version whose file is missing or invalid.
    """
    if version is None or version == shipped.qc_version:
        return shipped
    return load_fusion(version_file(qc_dir, version), qc_version=version)


class ActiveFusion:
    """The active QC version of a node: re-read when ``active.json`` changes (the worker asks
    before each job, so an activation applies from the next job on)."""

    def __init__(self, qc_dir: Path, shipped: FusionModel) -> None:
        self.qc_dir = Path(qc_dir)
        self.shipped = shipped
        self._stamp: tuple[int, int, int] | None = None
        self._fusion = shipped

    def get(self) -> FusionModel:
        """The active fusion.

        Raises:
            ModelError: ``active.json`` or the version it names is invalid.
        """
        path = self.qc_dir / ACTIVE_FILE
        try:
            stat = path.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # write_active replaces the file: new inode
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            version = read_active(self.qc_dir).get("qc_version") if stamp is not None else None
            self._fusion = load_version(self.qc_dir, version, self.shipped)
            self._stamp = stamp
            if stamp is not None:
                log.info("qc version active", qc_version=self._fusion.qc_version)
        return self._fusion


@dataclass
class RefitOutcome:
    """What a refit did."""

    version: str | None
    activated: bool
    active_version: str
    n_cases: int
    a: float | None = None
    b: float | None = None
    feedback: dict[str, dict[str, float]] = field(default_factory=dict)
    phantoms: dict[str, dict[str, float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None

    def describe(self) -> list[str]:
        """Lines for people."""
        if self.skipped:
            return [f"no refit: {self.skipped} (active QC version {self.active_version})"]
        lines = [f"QC {self.version}: Platt a = {self.a:.4f}, b = {self.b:.4f} on {self.n_cases} feedback case(s)"]
        for title, figures in (("held-out feedback", self.feedback), ("held-out phantoms", self.phantoms)):
            for which in ("old", "new"):
                f = figures.get(which, {})
                lines.append(f"  {title}, {which} ({f.get('qc_version', '?')}): " + ", ".join(
                    f"{k} {_fmt(v)}" for k, v in f.items() if k != "qc_version"))
        lines.append(f"  activated: QC {self.version} is now active" if self.activated else
                     f"  not activated ({'; '.join(self.problems)}): QC {self.active_version} stays active")
        return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def refit(cases: list[FeedbackCase], *, qc_dir: Path, shipped: FusionModel, eval_n_per_family: int,
          eval_perturbations: int, seed: int = 0, model=None, phantoms: list | None = None,
          now: dt.datetime | None = None, extra_state: dict[str, Any] | None = None) -> RefitOutcome:
    """Recalibrate the active fusion on feedback cases, write the new version, activate it if no worse.

    Args:
        cases: The feedback cases (:class:`FeedbackCase`).
        qc_dir: ``<data_dir>/qc``: versions and ``active.json``.
        shipped: The shipped fusion (the base version).
        eval_n_per_family, eval_perturbations: Size of the phantom evaluation.
        phantoms: Phantom cases already drawn (tests), else drawn here.
        extra_state: Merged into ``active.json`` (e.g. the daemon's last-refit mark).

    Returns:
        What was done; the new version's file holds the same figures under ``info.refit``.

    Raises:
        RefitError: Fewer than :data:`MIN_CASES` cases, one class only, or nothing to fit on.
        ModelError: The active version's file is invalid.
    """
    qc_dir = Path(qc_dir)
    now = now or dt.datetime.now(dt.timezone.utc)
    state = read_active(qc_dir)
    old = load_version(qc_dir, state.get("qc_version"), shipped)
    labels = {c.acceptable for c in cases}
    if len(cases) < MIN_CASES or len(labels) < 2:
        raise RefitError(f"a refit needs at least {MIN_CASES} feedback cases of both kinds (acceptable and not); "
                         f"got {len(cases)} ({sum(c.acceptable for c in cases)} acceptable)")
    fit_cases, held_cases = split_cases(cases, seed)
    version = next_version(shipped.qc_version, qc_dir)
    # (a) held-out feedback: a recalibration fitted without the held-out cases stands in for the version.
    y_fit = np.array([c.acceptable for c in fit_cases], dtype=np.float64)
    a_fit, b_fit = fit_platt(np.array([fusion_logit(old, c.signals) for c in fit_cases]), y_fit)
    candidate = recalibrated(old, a_fit, b_fit, version)
    y_held = np.array([c.acceptable for c in held_cases], dtype=np.float64)
    feedback = {"old": {"qc_version": old.qc_version, **feedback_metrics(probabilities(old, held_cases), y_held)},
                "new": {"qc_version": version, **feedback_metrics(probabilities(candidate, held_cases), y_held)}}
    # The version itself is fitted on every case; (b) the phantoms, never part of the feedback,
    # judge exactly the fusion that would be activated.
    y_all = np.array([c.acceptable for c in cases], dtype=np.float64)
    a, b = fit_platt(np.array([fusion_logit(old, c.signals) for c in cases]), y_all)
    final = recalibrated(old, a, b, version)
    if phantoms is None:
        phantoms = phantom_cases(n_per_family=eval_n_per_family, perturbations=eval_perturbations, seed=seed,
                                 model=model)
    phantom = {"old": {"qc_version": old.qc_version, **phantom_metrics(old, phantoms)},
               "new": {"qc_version": version, **phantom_metrics(final, phantoms)}}
    activate, problems = decide(feedback["old"], feedback["new"], phantom["old"], phantom["new"])
    final.info = {**old.info, "refit": {
        "based_on": old.qc_version, "method": "Platt recalibration: logit' = a * logit + b, a >= 0",
        "a": round(a, 6), "b": round(b, 6), "n_cases": len(cases), "n_acceptable": int(y_all.sum()),
        "decisions": {d: sum(c.decision == d for c in cases) for d in sorted({c.decision for c in cases})},
        "holdout": {"n_fit": len(fit_cases), "n_held_out": len(held_cases), "a": round(a_fit, 6),
                    "b": round(b_fit, 6)},
        "feedback": feedback, "phantoms": phantom,
        "phantom_eval": {"n_per_family": eval_n_per_family, "perturbations": eval_perturbations, "seed": seed},
        "activated": activate, "problems": problems, "date": now.isoformat(timespec="seconds"),
    }}
    final.save(version_file(qc_dir, version))
    new_state = {**state, **(extra_state or {})}
    if activate:
        new_state.update({"qc_version": version, "activated_at": now.isoformat(timespec="seconds"),
                          "previous": old.qc_version})
    new_state["last_refit"] = {"version": version, "at": now.isoformat(timespec="seconds"), "activated": activate}
    new_state.setdefault("qc_version", old.qc_version)
    write_active(qc_dir, new_state)
    outcome = RefitOutcome(version, activate, version if activate else old.qc_version, len(cases), a, b,
                           feedback, phantom, problems)
    log.info("qc refit", version=version, activated=activate, a=round(a, 4), b=round(b, 4), n_cases=len(cases),
             feedback_old=feedback["old"], feedback_new=feedback["new"], phantoms_old=phantom["old"],
             phantoms_new=phantom["new"], problems=problems)
    return outcome
