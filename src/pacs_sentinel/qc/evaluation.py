"""``sentinel qc-eval``: how well QC knows when not to trust the AI, measured like the literature.

Segmentation: a held-out phantom set (seeds ``EVALUATION_SEED_OFFSET``, never used to train
the organ-seg model, the estimator or the fusion) over every image family, including the
held-out ones (:data:`~pacs_sentinel.qc.corruptions.HELD_OUT_FAMILIES`), with the model's own
masks (with MC-dropout samples) and perturbed masks of every family. A case **fails** when its
Dice is below 0.7. For each method, on the same cases:

- ``fused``: the shipped QC score (fitted fusion, P(Dice >= 0.7));
- ``product (QC 1.2.0)``: the previous product-of-factors rule over the same heuristics;
- ``heuristics OR``: flagged when any mask heuristic or input-image check fires (score 0/1);
- ``entropy``, ``pairwise Dice``: the uncertainty signals alone (own-model masks only);
- ``expected Dice``: the soft Dice of the mask with the model's probability map alone (QC 2.1.0;
  not part of the two historical baselines above);
- ``estimator``: the predicted Dice alone.

Metrics: AUROC (failure = positive), AURC and normalized AURC with risk = 1 - Dice, Spearman
between score and Dice, MAE of the predicted Dice (estimator, expected Dice), sensitivity at a 15 % review
rate, flag rate on clean cases and failure rate among accepted cases (each method's own flag:
fused below the verdict threshold, estimator < 0.7, a signal's reason firing). Subsets: all cases, own-model masks,
held-out families only, and a 10 %-failure mix (every good own-model mask plus the first
failures in seed order until failures are about 10 %). The held-out subset also takes an extra
draw of the held-out families (:data:`HELD_OUT_PHANTOMS` phantoms, seeds
``EVALUATION_HELD_OUT_SEED_OFFSET``): 16 phantoms of one family give about ten failures, too few
to tell detectors apart (one mis-ordered pair moves the AUROC by 0.003). The fused score is
compared with each single signal on the same cases, on every figure a target names
(:data:`COMPARED_FIGURES`, :func:`signal_margins`, with a paired bootstrap interval).
Figures: a risk-coverage plot and a reliability diagram of the fused score (PNG).

Classification (demo cxr-cls): misclassification detection of each finding by the QC's
finding score on held-out test phantoms (AUROC, AURC) and ECE of the probabilities before and
after temperature scaling.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pacs_sentinel.qc.cases import (
    EVALUATION_HELD_OUT_SEED_OFFSET,
    EVALUATION_SEED_OFFSET,
    QCCase,
    draw_cases,
    seeds_for,
)
from pacs_sentinel.qc.corruptions import HELD_OUT_FAMILIES, IMAGE_FAMILIES, MASK_FAMILIES
from pacs_sentinel.qc.estimator import load_estimator
from pacs_sentinel.qc.evaluate import QC_VERSION, shipped_fusion
from pacs_sentinel.qc.fusion import ACCEPTABLE_DICE, FusionModel
from pacs_sentinel.qc.metrics import (
    aurc,
    auroc,
    expected_calibration_error,
    normalized_aurc,
    paired_difference_interval,
    reliability_bins,
    risk_coverage,
    sensitivity_at_review_rate,
    spearman,
)

REVIEW_RATE = 0.15
#: Extra phantoms of the held-out families in ``sentinel qc-eval`` (their subset only).
HELD_OUT_PHANTOMS = 96
MC_DROPOUT_SAMPLES = 4
UNCERTAINTY = ("sample_dice", "mask_entropy")
#: Signals added after the product rule (QC 1.2.0): left out of the two historical baselines.
LATER_SIGNALS = ("predicted_dice", "expected_dice")
NOT_HEURISTIC = (*LATER_SIGNALS, *UNCERTAINTY)
#: Metrics where lower is better; they are computed from a method's review flags, not its scores.
LOWER_IS_BETTER = ("accepted-failure rate",)
#: Metrics every method reports, in print order.
METRICS = ("AUROC", "AURC", "nAURC", "Spearman", "MAE", "sens@15%", "clean flag rate", "accepted-failure rate")


@dataclass
class Method:
    """A failure detector under evaluation: a score and a flag per case (None: not applicable)."""

    name: str
    score: Callable[[QCCase], float | None]
    flag: Callable[[QCCase], bool | None]
    predicts_dice: bool = False


def _signal(case: QCCase, name: str):
    for s in case.signals or []:
        if s.name == name:
            return s
    return None


def methods(fusion: FusionModel, accept_threshold: float = 0.5) -> list[Method]:
    """The detectors compared side by side (the fused verdict at ``accept_threshold``)."""
    from pacs_sentinel.qc.calibrate import review_case, score_case

    def heuristics_fired(c: QCCase) -> bool:
        return c.empty or any(s.fired for s in c.signals or [] if s.name not in NOT_HEURISTIC)

    def product(c: QCCase) -> float:
        if c.empty:
            return 0.0
        return float(np.prod([s.fusion_factor for s in c.signals if s.name not in LATER_SIGNALS]))

    def single(name: str, value: Callable[[Any], float], own_only: bool) -> tuple[Callable, Callable]:
        def score(c: QCCase) -> float | None:
            if own_only and not c.uncertainty:
                return None
            if c.empty:
                return 0.0
            s = _signal(c, name)
            return None if s is None else value(s)

        def flag(c: QCCase) -> bool | None:
            if own_only and not c.uncertainty:
                return None
            if c.empty:
                return True
            s = _signal(c, name)
            return None if s is None else s.fired
        return score, flag

    fused = Method("fused", lambda c: score_case(fusion, c), lambda c: review_case(fusion, c, accept_threshold))
    return [
        fused,
        Method("product (QC 1.2.0)", product, lambda c: product(c) < 0.5),
        Method("heuristics OR", lambda c: 0.0 if heuristics_fired(c) else 1.0, heuristics_fired),
        Method("entropy", *single("mask_entropy", lambda s: 1.0 - s.value, True)),
        Method("pairwise Dice", *single("sample_dice", lambda s: s.value, True)),
        Method("expected Dice", *single("expected_dice", lambda s: s.value, False), predicts_dice=True),
        Method("estimator", *single("predicted_dice", lambda s: s.value, False), predicts_dice=True),
    ]


def _figure(metric: str, dice: np.ndarray) -> Callable[[np.ndarray, np.ndarray], float]:
    """``figure(values, index)`` of one metric on the cases ``index`` (values: scores, or review
    flags for the failures among accepted, :data:`LOWER_IS_BETTER`): the one definition the
    side-by-side tables and the comparisons with the fused score share."""
    failed = dice < ACCEPTABLE_DICE
    if metric == "AUROC":
        return lambda v, i: auroc(v[i], failed[i])
    if metric == "Spearman":
        return lambda v, i: spearman(v[i], dice[i])
    if metric == "sens@15%":
        return lambda v, i: sensitivity_at_review_rate(v[i], failed[i], REVIEW_RATE)
    if metric == "accepted-failure rate":
        return lambda v, i: float(failed[i][~v[i]].mean()) if (~v[i]).any() else float("nan")
    raise ValueError(f"no comparison for metric {metric!r}")


def method_metrics(method: Method, cases: list[QCCase]) -> dict[str, float]:
    """Every metric of one method on the cases it applies to."""
    scored = [(c, method.score(c), method.flag(c)) for c in cases]
    scored = [(c, s, f) for c, s, f in scored if s is not None]
    nan = float("nan")
    if not scored:
        return {m: nan for m in METRICS} | {"n": 0}
    dice = np.array([c.dice for c, _, _ in scored])
    score = np.array([s for _, s, _ in scored], dtype=np.float64)
    flag = np.array([bool(f) for _, _, f in scored])
    failed = dice < ACCEPTABLE_DICE
    clean = np.array([c.image_family == "clean" and c.mask_family == "none" for c, _, _ in scored])
    everything = np.arange(len(scored))

    def figure(metric: str) -> float:
        return _figure(metric, dice)(flag if metric in LOWER_IS_BETTER else score, everything)

    return {
        "n": len(scored),
        "failures": int(failed.sum()),
        "AUROC": figure("AUROC"),
        "AURC": aurc(score, 1.0 - dice),
        "nAURC": normalized_aurc(score, 1.0 - dice),
        "Spearman": figure("Spearman"),
        "MAE": float(np.mean(np.abs(score - dice))) if method.predicts_dice else nan,
        "sens@15%": figure("sens@15%"),
        "clean flag rate": float(flag[clean].mean()) if clean.any() else nan,
        "accepted-failure rate": figure("accepted-failure rate"),
    }


def ten_percent_mix(cases: list[QCCase]) -> list[QCCase]:
    """Every good own-model case plus failures (seed order) until failures are about 10 %."""
    own = [c for c in cases if c.mask_family == "none"]
    good = [c for c in own if c.dice >= ACCEPTABLE_DICE]
    failures = [c for c in cases if c.dice < ACCEPTABLE_DICE]
    own_failures = [c for c in failures if c.mask_family == "none"]
    others = [c for c in failures if c.mask_family != "none"]
    wanted = max(1, int(round(len(good) / 9)))
    # Interleave own-model failures and perturbed ones so both kinds are represented.
    chosen: list[QCCase] = []
    for pair in zip(own_failures, others, strict=False):
        chosen.extend(pair)
    chosen += own_failures[len(others):] + others[len(own_failures):]
    return good + chosen[:wanted]


def subsets(cases: list[QCCase], held_out_cases: Sequence[QCCase] = ()) -> dict[str, list[QCCase]]:
    """The case subsets reported.

    Args:
        cases: The main draw (every image family alike).
        held_out_cases: An extra draw of the held-out families; it enters the held-out subset
            only (the other subsets keep the main draw's mix of families).
    """
    # Every mask judged on an image of a held-out family (the model's own and the perturbed
    # ones), and every mask of a held-out mask family.
    held = [c for c in (*cases, *held_out_cases)
            if c.image_family in HELD_OUT_FAMILIES or c.mask_family in HELD_OUT_FAMILIES]
    return {
        "all cases": cases,
        "own-model masks": [c for c in cases if c.mask_family == "none"],
        "held-out families": held,
        "10 % failure mix": ten_percent_mix(cases),
    }


def _seed_range(offset: int, n: int, seed: int) -> str:
    seeds = seeds_for(offset, n, seed)
    return f"{seeds[0]}..{seeds[-1]}" if seeds else "none"


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def segmentation_tables(parts: dict[str, list[QCCase]], fusion: FusionModel, accept_threshold: float = 0.5
                        ) -> tuple[str, dict[str, dict[str, dict[str, float]]]]:
    """Markdown tables (one per subset of :func:`subsets`) and the numbers behind them."""
    lines, numbers = [], {}
    for subset, members in parts.items():
        n_fail = sum(c.dice < ACCEPTABLE_DICE for c in members)
        lines.append(f"#### {subset}: {len(members)} cases, {n_fail} failures "
                     f"({100 * n_fail / max(1, len(members)):.0f} %)")
        lines.append("")
        lines.append("| method | n | " + " | ".join(METRICS) + " |")
        lines.append("|---|---|" + "---|" * len(METRICS))
        numbers[subset] = {}
        for method in methods(fusion, accept_threshold):
            m = method_metrics(method, members)
            numbers[subset][method.name] = m
            cells = [_fmt(m[k], 4 if k in ("AURC",) else 3) for k in METRICS]
            lines.append(f"| {method.name} | {m['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines), numbers


#: The single signals the fused score is compared with.
SINGLE_SIGNALS = ("heuristics OR", "entropy", "pairwise Dice", "expected Dice", "estimator")
#: The figures of the targets the fused score must be better at than every single signal, per
#: subset: issue 5 asks it of "each figure" (lower is better for the failures among accepted).
COMPARED_FIGURES: dict[str, tuple[str, ...]] = {
    "held-out families": ("AUROC", "Spearman"),
    "10 % failure mix": ("sens@15%", "accepted-failure rate"),
    "all cases": ("AUROC",),
}


@dataclass(frozen=True)
class Margin:
    """The fused score against one single signal on the cases that signal scores."""

    signal: str
    n: int
    failures: int
    fused: float
    single: float
    low: float
    high: float
    metric: str = "AUROC"

    @property
    def margin(self) -> float:
        """How much better the fused score is (positive: better, whichever way the figure goes)."""
        if self.metric in LOWER_IS_BETTER:
            return self.single - self.fused
        return self.fused - self.single

    @property
    def tied_at_ceiling(self) -> bool:
        """Both are perfect at it (AUROC or sensitivity 1, no failure accepted): nothing is left
        to be better at."""
        best = 0.0 if self.metric in LOWER_IS_BETTER else 1.0
        return self.fused == best and self.single == best


def signal_margins(members: list[QCCase], fusion: FusionModel, metrics: Sequence[str] = ("AUROC",),
                   accept_threshold: float = 0.5) -> list[Margin]:
    """The fused score's figure minus each single signal's, for each of ``metrics``, on the same
    cases (those the signal scores: the uncertainty signals only the model's own masks), with a
    95 % paired bootstrap interval (phantoms resampled) of the difference as :attr:`Margin.margin`
    reads it (positive: the fused score is better)."""
    by_name = {m.name: m for m in methods(fusion, accept_threshold)}
    fused_method = by_name["fused"]
    fused_values = [(fused_method.score(c), fused_method.flag(c)) for c in members]
    out = []
    for metric in metrics:
        lower_is_better = metric in LOWER_IS_BETTER  # the failures among accepted: compared by the review flags
        for name in SINGLE_SIGNALS:
            single = by_name[name]
            rows = [(c, f, single.score(c), single.flag(c)) for c, f in zip(members, fused_values, strict=True)]
            rows = [r for r in rows if r[2] is not None]
            dice = np.array([r[0].dice for r in rows])
            failed = dice < ACCEPTABLE_DICE
            if not rows or failed.all() or not failed.any():
                continue
            if lower_is_better:
                fused = np.array([bool(f[1]) for _, f, _, _ in rows])
                values = np.array([bool(g) for _, _, _, g in rows])
            else:
                fused = np.array([f[0] for _, f, _, _ in rows], dtype=np.float64)
                values = np.array([s for _, _, s, _ in rows], dtype=np.float64)
            figure = _figure(metric, dice)
            everything = np.arange(len(rows))
            better, worse = (values, fused) if lower_is_better else (fused, values)
            low, high = paired_difference_interval(figure, better, worse, [r[0].seed for r in rows])
            out.append(Margin(name, len(rows), int(failed.sum()), figure(fused, everything),
                              figure(values, everything), low, high, metric))
    return out


def margins_table(margins: list[Margin]) -> str:
    """Markdown table of :func:`signal_margins` (``better by``: positive when the fused score is
    better, 95 % CI of that)."""
    lines = ["| figure | single signal | cases | failures | fused | signal | fused better by | 95 % CI |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m.metric} | {m.signal} | {m.n} | {m.failures} | {_fmt(m.fused)} | {_fmt(m.single)} "
              f"| {m.margin:+.3f} | {_fmt(m.low)} to {_fmt(m.high)} |" for m in margins]
    return "\n".join(lines)


def _met(ok: bool, within_noise: bool = False) -> str:
    """The "met" cell: yes, no, or yes on the point estimate only."""
    if not ok:
        return "**no**"
    return "yes, within noise (95 % CI reaches 0)" if within_noise else "yes"


def _margin_target(margins: list[Margin]) -> tuple[float, str, str]:
    """(smallest margin, met cell, note) of the target "fused better than every single signal":
    met when every margin is positive, a signal tied with the fused score at the best possible
    value excepted (there is nothing to be better at); "within noise" when the smallest
    margin's interval reaches 0."""
    ties = [m for m in margins if m.tied_at_ceiling]
    others = [m for m in margins if not m.tied_at_ceiling]
    if not others:
        return float("nan"), _met(bool(ties)), " (every signal tied at the best value)" if ties else ""
    worst = min(others, key=lambda m: m.margin)
    note = (f" (vs {worst.signal}, same {worst.n} cases: {_fmt(worst.fused)} vs {_fmt(worst.single)}; "
            f"95 % CI {_fmt(worst.low)} to {_fmt(worst.high)}")
    note += f"; tied at the best value: {', '.join(m.signal for m in ties)})" if ties else ")"
    return worst.margin, _met(worst.margin > 0, within_noise=not worst.low > 0), note


#: Target rows "fused better than every single signal": (subset, metric) -> row name.
MARGIN_TARGETS = {
    ("held-out families", "AUROC"): "fused AUROC minus each single signal, held-out families",
    ("held-out families", "Spearman"): "fused Spearman minus each single signal, held-out families",
    ("10 % failure mix", "sens@15%"): "fused sensitivity at 15 % minus each single signal, 10 % failure mix",
    ("10 % failure mix", "accepted-failure rate"):
        "each single signal's failures among accepted minus fused's, 10 % failure mix",
    ("all cases", "AUROC"): "fused AUROC minus each single signal, all cases",
}


def targets_table(numbers: dict[str, dict[str, dict[str, float]]], cls: dict[str, float],
                  margins: dict[str, list[Margin]]) -> str:
    """The issue's targets, each with the measured value and whether it is met.

    Args:
        numbers: :func:`segmentation_tables`' numbers.
        cls: Classification metrics (empty: no classification row).
        margins: :func:`signal_margins` per subset, with the metrics of :data:`COMPARED_FIGURES`:
            the fused score is compared with each single signal on the same cases.
    """
    held, mix, every = numbers["held-out families"], numbers["10 % failure mix"], numbers["all cases"]
    heuristics_margin = every["fused"]["AUROC"] - every["heuristics OR"]["AUROC"]
    rows = [
        ("fused AUROC on the held-out families", ">= 0.97", held["fused"]["AUROC"],
         _met(held["fused"]["AUROC"] >= 0.97), ""),
        ("fused Spearman on the held-out families", ">= 0.90", held["fused"]["Spearman"],
         _met(held["fused"]["Spearman"] >= 0.90), ""),
        ("sensitivity at 15 % review rate, 10 % failure mix", ">= 0.90", mix["fused"]["sens@15%"],
         _met(mix["fused"]["sens@15%"] >= 0.90), ""),
        ("failures among accepted (verdict), 10 % failure mix", "<= 0.02", mix["fused"]["accepted-failure rate"],
         _met(mix["fused"]["accepted-failure rate"] <= 0.02), ""),
    ]
    for (subset, metric), name in MARGIN_TARGETS.items():
        value, met, note = _margin_target([m for m in margins.get(subset, []) if m.metric == metric])
        rows.append((name, "> 0", value, met, note))
    rows.append(("fused AUROC minus OR-combined heuristics, all cases", "clearly > 0", heuristics_margin,
                 _met(heuristics_margin >= 0.05), ""))
    if cls:
        ece = cls["ECE after temperature"]
        rows.append(("classification ECE (after temperature scaling)", "<= 0.03", ece, _met(ece <= 0.03), ""))
    lines = ["| target | wanted | measured | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {wanted} | {_fmt(value)}{note} | {met} |" for name, wanted, value, met, note in rows]
    return "\n".join(lines)


def per_family_table(cases: list[QCCase], fusion: FusionModel, accept_threshold: float = 0.5) -> str:
    """Dice, failure rate and the fused verdict (at ``accept_threshold``) per family."""
    from pacs_sentinel.qc.calibrate import review_case

    rows = ["| family | kind | n | mean Dice | failures | sent to review | missed failures | false alarms |",
            "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[QCCase]] = {}
    for c in cases:
        key = (c.image_family, "image") if c.mask_family == "none" else (c.mask_family, "mask")
        groups.setdefault(key, []).append(c)
    for (family, kind), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        failed = np.array([c.dice < ACCEPTABLE_DICE for c in group])
        flagged = np.array([review_case(fusion, c, accept_threshold) for c in group])
        held = " (held out)" if family in HELD_OUT_FAMILIES else ""
        rows.append(f"| {family}{held} | {kind} | {len(group)} | {np.mean([c.dice for c in group]):.3f} "
                    f"| {int(failed.sum())} | {int(flagged.sum())} | {int((failed & ~flagged).sum())} "
                    f"| {int((~failed & flagged).sum())} |")
    return "\n".join(rows)


def write_figures(cases: list[QCCase], fusion: FusionModel, out_dir: Path) -> list[Path]:
    """Risk-coverage plot (every method, own-model masks and all cases) and reliability diagram (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (title, members) in zip(axes, [("own-model masks", [c for c in cases if c.mask_family == "none"]),
                                           ("all cases", cases)], strict=True):
        for colour, method in enumerate(methods(fusion)):
            pairs = [(method.score(c), c.dice) for c in members]
            if len(pairs) < 2 or any(s is None for s, _ in pairs):
                continue  # a method that does not score every case of the panel (uncertainty on own masks only)
            s, d = np.array(pairs).T
            curve = risk_coverage(s, 1.0 - d)
            ax.plot(np.arange(1, len(curve) + 1) / len(curve), curve, color=f"C{colour}",  # one colour per method
                    label=f"{method.name} (AURC {aurc(s, 1 - d):.3f})")
        ax.set_xlabel("coverage (share of cases accepted, most trusted first)")
        ax.set_ylabel("risk (mean 1 - Dice of accepted)")
        ax.set_title(f"Risk-coverage, {title} (n = {len(members)})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "qc_risk_coverage.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    from pacs_sentinel.qc.calibrate import score_case

    scores = np.array([score_case(fusion, c) for c in cases])
    acceptable = np.array([c.dice >= ACCEPTABLE_DICE for c in cases])
    bins = reliability_bins(scores, acceptable)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot([b[0] for b in bins], [b[1] for b in bins], "o-", label=f"fused score (ECE {expected_calibration_error(scores, acceptable):.3f})")
    for p, y, n in bins:
        ax.annotate(str(n), (p, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("fused score (predicted P(Dice >= 0.7))")
    ax.set_ylabel("observed share with Dice >= 0.7")
    ax.set_title("Reliability of the QC score (all cases)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "qc_reliability.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def classification_metrics(n_images: int, seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Misclassification detection and calibration of the demo cxr-cls on held-out test phantoms."""
    from tqdm import tqdm

    from pacs_sentinel.inference.classification import load_classification_model
    from pacs_sentinel.inference.radiographs import make_cxr_phantom
    from pacs_sentinel.inference.train_cxr import TEST_SEED_OFFSET
    from pacs_sentinel.qc.classification import evaluate_classification

    model = load_classification_model("demo:cxr-cls", device="cpu")
    wrong, scores, calibrated, raw, outcomes = [], [], [], [], []
    for i in tqdm(range(n_images), desc="qc-eval: radiographs", disable=not progress, unit="image"):
        phantom = make_cxr_phantom(seed * 1_000_000 + TEST_SEED_OFFSET + i)
        result = model.predict(phantom.image, mc_dropout_samples=8, tta_flips=("x",), gradcam=False)
        qc = evaluate_classification(result, image=phantom.image)
        for j, finding in enumerate(qc.findings):
            truth = bool(phantom.findings[finding.label.name])
            wrong.append(finding.positive != truth)
            scores.append(finding.quality_score)
            calibrated.append(float(result.probabilities[j]))
            raw.append(float(1.0 / (1.0 + np.exp(-float(result.logits[j])))))
            outcomes.append(truth)
    wrong_a, scores_a = np.array(wrong), np.array(scores)
    return {
        "findings judged": float(len(wrong)),
        "misclassified": float(wrong_a.sum()),
        "misclassification AUROC": auroc(scores_a, wrong_a),
        "misclassification AURC": aurc(scores_a, wrong_a.astype(float)),
        "ECE before temperature": expected_calibration_error(np.array(raw), np.array(outcomes)),
        "ECE after temperature": expected_calibration_error(np.array(calibrated), np.array(outcomes)),
    }


def held_out_draw(model, n: int, perturbations_per_image: int, seed: int, estimator, progress: bool = False
                  ) -> list[QCCase]:
    """The extra draw of the held-out families (seeds ``EVALUATION_HELD_OUT_SEED_OFFSET``).

    ``n`` phantoms of the held-out image families, each with the model's own mask and perturbed
    masks of every family in turn; when only mask families are held out, phantoms of every
    image family with masks of the held-out mask families.
    """
    if n <= 0:
        return []
    images = [f for f in IMAGE_FAMILIES if f in HELD_OUT_FAMILIES]
    masks = list(MASK_FAMILIES) if images else [f for f in MASK_FAMILIES if f in HELD_OUT_FAMILIES]
    if not masks:
        return []
    return draw_cases(model, seeds_for(EVALUATION_HELD_OUT_SEED_OFFSET, n, seed), images or list(IMAGE_FAMILIES), masks,
                      perturbations_per_image=perturbations_per_image, include_own=bool(images),
                      mc_dropout_samples=MC_DROPOUT_SAMPLES, estimator=estimator, collect_signals=True,
                      cycle_perturbations=True, progress=progress, desc="qc-eval: held-out phantoms")


def run_qc_eval(*, n_per_family: int = 16, perturbations_per_image: int = 2, n_radiographs: int = 200, seed: int = 0,
                n_held_out: int = HELD_OUT_PHANTOMS, out_dir: Path = Path("docs"), progress: bool = True,
                model=None, accept_threshold: float = 0.5, threshold_source: str = "") -> tuple[str, dict[str, Any]]:
    """Run the evaluation; returns the markdown section and the numbers.

    Args:
        n_per_family: Phantoms per image family.
        perturbations_per_image: Perturbed masks per phantom (families taken in turn).
        n_radiographs: Radiograph phantoms for the classification metrics (0: skip).
        seed: Seed of the phantom sets.
        n_held_out: Extra phantoms of the held-out families (:func:`held_out_draw`), for the
            held-out subset only: ``n_per_family`` phantoms leave it too few failures to tell
            detectors apart.
        out_dir: Where the PNG figures go.
        accept_threshold: The fused verdict's threshold (the product's: the shipped
            configuration's, which the command line passes).
        threshold_source: Where that threshold comes from, for the text.
    """
    import torch

    from pacs_sentinel.inference.models import load_segmentation_model

    started = time.perf_counter()
    fusion = shipped_fusion()
    estimator = load_estimator()
    model = model if model is not None else load_segmentation_model("demo:organ-seg", device="cpu")
    families = list(IMAGE_FAMILIES)
    seeds = seeds_for(EVALUATION_SEED_OFFSET, n_per_family * len(families), seed)
    cases = draw_cases(model, seeds, families, MASK_FAMILIES, perturbations_per_image=perturbations_per_image,
                       mc_dropout_samples=MC_DROPOUT_SAMPLES, estimator=estimator, collect_signals=True,
                       cycle_perturbations=True, progress=progress, desc="qc-eval: phantoms")
    extra = held_out_draw(model, n_held_out, perturbations_per_image, seed, estimator, progress)
    parts = subsets(cases, extra)
    tables, numbers = segmentation_tables(parts, fusion, accept_threshold)
    held_members = parts["held-out families"]
    margins = {subset: signal_margins(parts[subset], fusion, metrics, accept_threshold)
               for subset, metrics in COMPARED_FIGURES.items()}
    figures = write_figures(cases, fusion, out_dir)
    cls = classification_metrics(n_radiographs, seed, progress) if n_radiographs > 0 else {}
    from pacs_sentinel.qc.calibrate import score_case

    fused_ece = expected_calibration_error(np.array([score_case(fusion, c) for c in cases]),
                                           np.array([c.dice >= ACCEPTABLE_DICE for c in cases]))
    wall = time.perf_counter() - started
    lines = [
        "## QC failure detection: `sentinel qc-eval`",
        "",
        f"Generated by `sentinel qc-eval --n-per-family {n_per_family} --perturbations {perturbations_per_image} "
        f"--radiographs {n_radiographs} --seed {seed}`. QC `{QC_VERSION}` (estimator {estimator.version}, fusion fitted "
        f"{fusion.info.get('date', '?')}), model `demo:organ-seg`. Phantom seeds {seeds[0]}..{seeds[-1]}: never used to "
        "train the model, the estimator or the fusion. A case **fails** when its Dice is below 0.7. Held-out families "
        f"(never seen by the estimator nor the fusion): {', '.join(HELD_OUT_FAMILIES)}; the held-out subset is every "
        "mask judged on their images (the model's own and the perturbed ones) and every mask of a held-out mask family, "
        f"from this draw and an extra draw of {len(extra)} cases on {n_held_out} phantoms of the held-out families "
        f"(seeds {_seed_range(EVALUATION_HELD_OUT_SEED_OFFSET, n_held_out, seed)}, cycling every mask family); "
        f"{len(held_members)} cases in all. The other subsets, the per-family table and the figures are of the "
        "main draw only. The fused score is compared with each single signal on the same cases (those the "
        "signal scores: entropy and pairwise Dice only the model's own masks), on every figure a target names "
        "(AUROC and Spearman on the held-out families, sensitivity at 15 % and failures among accepted on the "
        "10 % failure mix, AUROC on all cases), with a 95 % paired bootstrap interval of the difference "
        "(phantoms resampled, 2000 times); a signal as perfect as the fused score at a figure (AUROC or "
        "sensitivity 1, no failure accepted) is tied, not beaten.",
        "",
        f"- Machine: {platform.platform()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}); wall time {wall:.0f} s; date (UTC) "
        f"{dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()}",
        f"- Figures: `{figures[0].name}` (risk-coverage), `{figures[1].name}` (reliability of the fused score); "
        f"ECE of the fused score as P(Dice >= 0.7), all cases: {_fmt(fused_ece)}",
        f"- Flags: the QC verdict for fused (score < {accept_threshold:.4g}{threshold_source}, "
        "or volume/location outside the model card's range), product < 0.5, estimator < 0.7, a signal's reason firing "
        "(entropy, pairwise Dice, expected Dice < 0.7), any heuristic firing (OR; the product and the OR leave out "
        "the signals added after QC 1.2.0: predicted and expected Dice). MAE only for the estimator and the "
        "expected Dice (the methods that predict a Dice); sens@15% = failures among the 15 % least trusted / all "
        "failures.",
        "",
        "### Targets (issue 5)",
        "",
        targets_table(numbers, cls, margins),
        "",
        "Fused score against each single signal on the same cases, held-out families:",
        "",
        margins_table(margins["held-out families"]),
        "",
        "10 % failure mix (the failures among accepted are each method's own verdict; fewer is better):",
        "",
        margins_table(margins["10 % failure mix"]),
        "",
        "All cases:",
        "",
        margins_table(margins["all cases"]),
        "",
        f"### Segmentation, per family (QC verdict: fused score < {accept_threshold:.4g} or an out-of-range check)",
        "",
        per_family_table(cases, fusion, accept_threshold),
        "",
        "### Segmentation, methods side by side",
        "",
        tables,
    ]
    if cls:
        lines += ["### Classification (demo cxr-cls, held-out test phantoms, every finding)", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, 0) if k in ('findings judged', 'misclassified') else _fmt(v, 4)} |"
                  for k, v in cls.items()]
        lines.append("")
    return "\n".join(lines), {"segmentation": numbers, "classification": cls, "cases": len(cases)}
