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
fused < 0.5, estimator < 0.7, a signal's reason firing). Subsets: all cases, own-model masks,
held-out families only, and a 10 %-failure mix (every good own-model mask plus the first
failures in seed order until failures are about 10 %). Figures: a risk-coverage plot and a
reliability diagram of the fused score (PNG).

Classification (demo cxr-cls): misclassification detection of each finding by the QC's
finding score on held-out test phantoms (AUROC, AURC) and ECE of the probabilities before and
after temperature scaling.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pacs_sentinel.qc.cases import EVALUATION_SEED_OFFSET, QCCase, draw_cases, seeds_for
from pacs_sentinel.qc.corruptions import HELD_OUT_FAMILIES, IMAGE_FAMILIES, MASK_FAMILIES
from pacs_sentinel.qc.estimator import load_estimator
from pacs_sentinel.qc.evaluate import QC_VERSION, shipped_fusion
from pacs_sentinel.qc.fusion import ACCEPTABLE_DICE, FusionModel
from pacs_sentinel.qc.metrics import (
    aurc,
    auroc,
    expected_calibration_error,
    normalized_aurc,
    reliability_bins,
    risk_coverage,
    sensitivity_at_review_rate,
    spearman,
)

REVIEW_RATE = 0.15
MC_DROPOUT_SAMPLES = 4
UNCERTAINTY = ("sample_dice", "mask_entropy")
#: Signals added after the product rule (QC 1.2.0): left out of the two historical baselines.
LATER_SIGNALS = ("predicted_dice", "expected_dice")
NOT_HEURISTIC = (*LATER_SIGNALS, *UNCERTAINTY)
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


def methods(fusion: FusionModel) -> list[Method]:
    """The detectors compared side by side."""
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

    fused = Method("fused", lambda c: score_case(fusion, c), lambda c: review_case(fusion, c))
    return [
        fused,
        Method("product (QC 1.2.0)", product, lambda c: product(c) < 0.5),
        Method("heuristics OR", lambda c: 0.0 if heuristics_fired(c) else 1.0, heuristics_fired),
        Method("entropy", *single("mask_entropy", lambda s: 1.0 - s.value, True)),
        Method("pairwise Dice", *single("sample_dice", lambda s: s.value, True)),
        Method("expected Dice", *single("expected_dice", lambda s: s.value, False), predicts_dice=True),
        Method("estimator", *single("predicted_dice", lambda s: s.value, False), predicts_dice=True),
    ]


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
    accepted = ~flag
    return {
        "n": len(scored),
        "failures": int(failed.sum()),
        "AUROC": auroc(score, failed),
        "AURC": aurc(score, 1.0 - dice),
        "nAURC": normalized_aurc(score, 1.0 - dice),
        "Spearman": spearman(score, dice),
        "MAE": float(np.mean(np.abs(score - dice))) if method.predicts_dice else nan,
        "sens@15%": sensitivity_at_review_rate(score, failed, REVIEW_RATE),
        "clean flag rate": float(flag[clean].mean()) if clean.any() else nan,
        "accepted-failure rate": float(failed[accepted].mean()) if accepted.any() else nan,
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


def subsets(cases: list[QCCase]) -> dict[str, list[QCCase]]:
    """The case subsets reported."""
    # Every mask judged on an image of a held-out family (the model's own and the perturbed
    # ones), and every mask of a held-out mask family.
    held = [c for c in cases if c.image_family in HELD_OUT_FAMILIES or c.mask_family in HELD_OUT_FAMILIES]
    return {
        "all cases": cases,
        "own-model masks": [c for c in cases if c.mask_family == "none"],
        "held-out families": held,
        "10 % failure mix": ten_percent_mix(cases),
    }


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def segmentation_tables(cases: list[QCCase], fusion: FusionModel) -> tuple[str, dict[str, dict[str, dict[str, float]]]]:
    """Markdown tables (one per subset) and the numbers behind them."""
    lines, numbers = [], {}
    for subset, members in subsets(cases).items():
        n_fail = sum(c.dice < ACCEPTABLE_DICE for c in members)
        lines.append(f"#### {subset}: {len(members)} cases, {n_fail} failures "
                     f"({100 * n_fail / max(1, len(members)):.0f} %)")
        lines.append("")
        lines.append("| method | n | " + " | ".join(METRICS) + " |")
        lines.append("|---|---|" + "---|" * len(METRICS))
        numbers[subset] = {}
        for method in methods(fusion):
            m = method_metrics(method, members)
            numbers[subset][method.name] = m
            cells = [_fmt(m[k], 4 if k in ("AURC",) else 3) for k in METRICS]
            lines.append(f"| {method.name} | {m['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines), numbers


def targets_table(numbers: dict[str, dict[str, dict[str, float]]], cls: dict[str, float]) -> str:
    """The issue's targets, each with the measured value and whether it is met."""
    held, mix, every = numbers["held-out families"], numbers["10 % failure mix"], numbers["all cases"]
    singles = ("heuristics OR", "entropy", "pairwise Dice", "expected Dice", "estimator")

    def best_single(table: dict[str, dict[str, float]], metric: str) -> float:
        values = [table[m][metric] for m in singles if not np.isnan(table[m][metric])]
        return max(values) if values else float("nan")

    rows = [
        ("fused AUROC on the held-out families", ">= 0.97", held["fused"]["AUROC"], held["fused"]["AUROC"] >= 0.97),
        ("fused Spearman on the held-out families", ">= 0.90", held["fused"]["Spearman"],
         held["fused"]["Spearman"] >= 0.90),
        ("sensitivity at 15 % review rate, 10 % failure mix", ">= 0.90", mix["fused"]["sens@15%"],
         mix["fused"]["sens@15%"] >= 0.90),
        ("failures among accepted (verdict), 10 % failure mix", "<= 0.02", mix["fused"]["accepted-failure rate"],
         mix["fused"]["accepted-failure rate"] <= 0.02),
        ("fused AUROC minus best single signal, all cases", "> 0", every["fused"]["AUROC"] - best_single(every, "AUROC"),
         every["fused"]["AUROC"] > best_single(every, "AUROC")),
        ("fused AUROC minus best single signal, held-out families", "> 0",
         held["fused"]["AUROC"] - best_single(held, "AUROC"), held["fused"]["AUROC"] > best_single(held, "AUROC")),
        ("fused AUROC minus OR-combined heuristics, all cases", "clearly > 0",
         every["fused"]["AUROC"] - every["heuristics OR"]["AUROC"],
         every["fused"]["AUROC"] - every["heuristics OR"]["AUROC"] >= 0.05),
    ]
    if cls:
        ece = cls["ECE after temperature"]
        rows.append(("classification ECE (after temperature scaling)", "<= 0.03", ece, ece <= 0.03))
    lines = ["| target | wanted | measured | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {wanted} | {_fmt(value)} | {'yes' if ok else '**no**'} |" for name, wanted, value, ok in rows]
    return "\n".join(lines)


def per_family_table(cases: list[QCCase], fusion: FusionModel) -> str:
    """Dice, failure rate and the fused verdict per family."""
    from pacs_sentinel.qc.calibrate import review_case

    rows = ["| family | kind | n | mean Dice | failures | sent to review | missed failures | false alarms |",
            "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[QCCase]] = {}
    for c in cases:
        key = (c.image_family, "image") if c.mask_family == "none" else (c.mask_family, "mask")
        groups.setdefault(key, []).append(c)
    for (family, kind), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        failed = np.array([c.dice < ACCEPTABLE_DICE for c in group])
        flagged = np.array([review_case(fusion, c) for c in group])
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


def run_qc_eval(*, n_per_family: int = 16, perturbations_per_image: int = 2, n_radiographs: int = 200, seed: int = 0,
                out_dir: Path = Path("docs"), progress: bool = True, model=None) -> tuple[str, dict[str, Any]]:
    """Run the evaluation; returns the markdown section and the numbers.

    Args:
        n_per_family: Phantoms per image family.
        perturbations_per_image: Perturbed masks per phantom (families taken in turn).
        n_radiographs: Radiograph phantoms for the classification metrics (0: skip).
        seed: Seed of the phantom sets.
        out_dir: Where the PNG figures go.
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
    tables, numbers = segmentation_tables(cases, fusion)
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
        "mask judged on their images (the model's own and the perturbed ones) and every mask of a held-out mask family.",
        "",
        f"- Machine: {platform.platform()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}); wall time {wall:.0f} s; date (UTC) "
        f"{dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()}",
        f"- Figures: `{figures[0].name}` (risk-coverage), `{figures[1].name}` (reliability of the fused score); "
        f"ECE of the fused score as P(Dice >= 0.7), all cases: {_fmt(fused_ece)}",
        "- Flags: the QC verdict for fused (score < 0.5, the shipped threshold, or volume/location outside "
        "the model card's range), product < 0.5, estimator < 0.7, a signal's reason firing "
        "(entropy, pairwise Dice, expected Dice < 0.7), any heuristic firing (OR; the product and the OR leave out "
        "the signals added after QC 1.2.0: predicted and expected Dice). MAE only for the estimator and the "
        "expected Dice (the methods that predict a Dice); sens@15% = failures among the 15 % least trusted / all "
        "failures.",
        "",
        "### Targets (issue 5)",
        "",
        targets_table(numbers, cls),
        "",
        "### Segmentation, per family (QC verdict: fused score < 0.5 or an out-of-range check)",
        "",
        per_family_table(cases, fusion),
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
