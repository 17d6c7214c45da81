"""Failure-detection benchmark of the QC (error detector) on the shipped demo organ-seg model.

For every phantom variant and seed: draw a phantom, segment it with ``demo:organ-seg``,
measure the true Dice against the phantom's ground-truth liver, and run the QC. A case
*fails* when its Dice is below 0.7 (DESIGN.md's "acceptable"). The QC quality score is then
judged as a failure detector, the way the failure-detection literature does it:

- AUROC of the score for separating failures (positive) from good cases (lower score = more
  suspicious);
- AURC, the area under the risk-coverage curve (cases sorted by score, most trusted first;
  risk at coverage k/n = share of failures among the k most trusted; AURC = mean over k),
  with the random baseline (the failure rate), the oracle minimum and E-AURC = AURC - oracle;
- bootstrap 95% intervals (1000 case resamples) for AUROC and AURC;
- at the shipped threshold (0.5): review rate, failures missed among the accepted cases, and
  false alarms (good cases sent to review).

Run: ``.venv/bin/python bench/qc_eval.py [--n-per-variant N] [--seed-base S]``. It prints the
tables and writes them into ``docs/benchmarks.md`` between ``<!-- qc_eval:start -->`` and
``<!-- qc_eval:end -->`` (the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

torch.set_num_threads(1)  # a light benchmark: the test machine is shared

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, write_section  # noqa: E402

from pacs_sentinel.inference.models import load_segmentation_model  # noqa: E402
from pacs_sentinel.inference.phantoms import PHANTOM_VARIANTS, make_ct_phantom  # noqa: E402
from pacs_sentinel.inference.training import (  # noqa: E402
    TRAIN_SEED_OFFSET,
    VAL_SEED_OFFSET,
    VARIANT_SEED_OFFSET,
    phantom_volume,
)
from pacs_sentinel.qc.evaluate import QC_VERSION, evaluate_segmentation  # noqa: E402
from pacs_sentinel.results import Verdict  # noqa: E402

MODEL_SPEC = "demo:organ-seg"
#: Dice below this is a failed AI output (DESIGN.md: acceptable means Dice >= 0.7).
FAIL_BELOW_DICE = 0.7
ACCEPT_THRESHOLD = 0.5
#: Default first seed: far from the training (10_000+), validation (20_000+) and variant
#: evaluation (30_000+) seeds of the shipped model (training seed 0).
DEFAULT_SEED_BASE = 900_000
#: Seeds of one variant are ``seed_base + SEEDS_PER_VARIANT * variant_index + i``.
SEEDS_PER_VARIANT = 10_000

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
#: Signals shown per variant (QC ``signals`` keys).
SIGNALS = ("volume_ml", "largest_component_share", "roundness", "mean_probability")


@dataclass
class Case:
    variant: str
    seed: int
    dice: float
    true_ml: float
    score: float
    review: bool
    reasons: list[str]
    signals: dict[str, float]
    predict_s: float
    qc_s: float
    failed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.failed = self.dice < FAIL_BELOW_DICE


#: Stochastic passes per case, as the shipped config.toml asks for (QC's uncertainty signals).
MC_DROPOUT_SAMPLES = 4


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of ``-scores`` for ``positive`` (lower score = more suspicious); ties count half.

    Mann-Whitney U with average ranks. NaN when one class is absent.
    """
    from scipy.stats import rankdata

    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(-scores)  # rank 1 = highest score; failures should get high ranks
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def risk_coverage(scores: np.ndarray, failed: np.ndarray) -> np.ndarray:
    """Risk at every coverage k/n (k = 1..n), cases sorted by score descending.

    Tied scores are in random order, so within a block of ties the expected number of
    failures grows linearly: the curve is the expectation over tie-breaking.
    """
    order = np.argsort(-scores, kind="stable")
    s, f = scores[order], failed[order].astype(float)
    cumulative = np.empty(len(s))
    done, before = 0, 0.0
    while done < len(s):
        end = done
        while end < len(s) and s[end] == s[done]:
            end += 1
        rate = f[done:end].mean()
        cumulative[done:end] = before + rate * np.arange(1, end - done + 1)
        before += f[done:end].sum()
        done = end
    return cumulative / np.arange(1, len(s) + 1)


def aurc(scores: np.ndarray, failed: np.ndarray) -> float:
    """Area under the risk-coverage curve (mean risk over the n coverages)."""
    return float(risk_coverage(scores, failed).mean())


def bootstrap_ci(scores: np.ndarray, failed: np.ndarray, metric, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of ``metric`` over case resamples (resamples with one class skipped)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        index = rng.integers(0, len(scores), len(scores))
        if failed[index].all() or not failed[index].any():
            continue
        values.append(metric(scores[index], failed[index]))
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def run_case(model, variant: str, seed: int) -> Case:
    phantom = make_ct_phantom(seed, variant=variant)
    volume = phantom_volume(phantom)
    started = time.perf_counter()
    result = model.predict(volume, mc_dropout_samples=MC_DROPOUT_SAMPLES)
    predict_s = time.perf_counter() - started
    started = time.perf_counter()
    qc = evaluate_segmentation(volume, result, accept_threshold=ACCEPT_THRESHOLD)
    qc_s = time.perf_counter() - started
    return Case(
        variant=variant,
        seed=seed,
        dice=dice(result.mask[0].astype(bool), phantom.liver),
        true_ml=phantom.liver_volume_ml,
        score=float(qc.quality_score),
        review=qc.verdict is Verdict.NEEDS_REVIEW,
        reasons=[r.label for r in qc.reasons],
        signals=dict(qc.segments[0].signals) if qc.segments else {},
        predict_s=predict_s,
        qc_s=qc_s,
    )


def _pct(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{100 * x:.0f}%"


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if np.isnan(x) else f"{x:.{digits}f}"


def summarise(cases: list[Case], args: argparse.Namespace, device: str, model_version: str, wall_s: float) -> str:
    """The markdown section (without markers)."""
    lines: list[str] = []
    lines.append("## QC failure detection (demo organ-seg)")
    lines.append("")
    lines.append(
        f"Generated by `bench/qc_eval.py --n-per-variant {args.n_per_variant} --seed-base {args.seed_base}`. "
        f"Model `{MODEL_SPEC}` {model_version}, QC `{QC_VERSION}`, accept threshold {ACCEPT_THRESHOLD}. "
        f"A case **fails** when its Dice against the phantom's ground truth is below {FAIL_BELOW_DICE}. "
        f"Phantom seeds {args.seed_base}+{SEEDS_PER_VARIANT}·variant+i, disjoint from the model's training "
        f"({TRAIN_SEED_OFFSET}+), validation ({VAL_SEED_OFFSET}+) and variant-evaluation ({VARIANT_SEED_OFFSET}+) seeds."
    )
    lines.append("")
    lines.append(
        f"- Machine: {platform.platform()}, {cpu_name()}, "
        f"{os.cpu_count()} logical CPUs (benchmark runs with torch.set_num_threads(1)); device `{device}`"
    )
    lines.append(f"- Date (UTC): {dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()}")
    lines.append(f"- Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    lines.append(f"- Wall time: {wall_s:.0f} s for {len(cases)} cases")
    lines.append("")

    # Per-variant table.
    lines.append("### Per variant")
    lines.append("")
    lines.append("| variant | n | mean Dice | failure rate | review rate | mean score | missed failures | false alarms | most common reasons |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    by_variant: dict[str, list[Case]] = collections.defaultdict(list)
    for case in cases:
        by_variant[case.variant].append(case)
    for variant, group in list(by_variant.items()) + [("**all**", cases)]:
        n = len(group)
        failures = sum(c.failed for c in group)
        missed = sum(c.failed and not c.review for c in group)
        alarms = sum((not c.failed) and c.review for c in group)
        counter = collections.Counter(r for c in group for r in c.reasons)
        reasons = ", ".join(f"{name} ({count})" for name, count in counter.most_common(3)) or "none"
        lines.append(
            f"| {variant} | {n} | {np.mean([c.dice for c in group]):.3f} | {_pct(failures / n)} "
            f"| {_pct(sum(c.review for c in group) / n)} | {np.mean([c.score for c in group]):.3f} "
            f"| {missed}/{failures} | {alarms}/{n - failures} | {reasons} |"
        )
    lines.append("")
    lines.append("Missed failures: failed cases that QC accepted / failed cases. False alarms: good cases sent to review / good cases. "
                 "Reasons: how many cases raised each QC finding.")
    lines.append("")

    # Overall failure-detection metrics.
    scores = np.array([c.score for c in cases])
    failed = np.array([c.failed for c in cases])
    review = np.array([c.review for c in cases])
    n, n_fail = len(cases), int(failed.sum())
    n_good = n - n_fail
    accepted = ~review
    missed = int((failed & accepted).sum())
    alarms = int((~failed & review).sum())
    rc_oracle = aurc(np.where(failed, 0.0, 1.0), failed)  # good cases first
    value = aurc(scores, failed)
    lines.append("### Failure detection (all variants pooled)")
    lines.append("")
    lines.append("| metric | value |")
    lines.append("|---|---|")
    lines.append(f"| cases / failures (Dice < {FAIL_BELOW_DICE}) | {n} / {n_fail} ({_pct(n_fail / n)}) |")
    lo, hi = bootstrap_ci(scores, failed, auroc)
    lines.append(f"| AUROC of the quality score (failure = positive) | {_f(auroc(scores, failed))} (95% CI {_f(lo)}–{_f(hi)}) |")
    lo, hi = bootstrap_ci(scores, failed, aurc)
    lines.append(f"| AURC (risk = failure indicator), lower is better | {_f(value, 4)} (95% CI {_f(lo, 4)}–{_f(hi, 4)}) |")
    lines.append(f"| AURC of a random score (= failure rate) / oracle | {_f(n_fail / n, 4)} / {_f(rc_oracle, 4)} |")
    lines.append(f"| E-AURC (AURC − oracle) | {_f(value - rc_oracle, 4)} |")
    lines.append(f"| review rate at threshold {ACCEPT_THRESHOLD} | {_pct(review.mean())} ({int(review.sum())}/{n}) |")
    lines.append(f"| failures caught (sensitivity) | {_pct((failed & review).sum() / n_fail if n_fail else float('nan'))} "
                 f"({int((failed & review).sum())}/{n_fail}) |")
    lines.append(f"| missed failures among accepted | {missed}/{int(accepted.sum())} accepted "
                 f"({_pct(missed / accepted.sum() if accepted.any() else float('nan'))}) |")
    lines.append(f"| false alarms (good cases sent to review) | {alarms}/{n_good} good "
                 f"({_pct(alarms / n_good if n_good else float('nan'))}) |")
    silent = sum(c.review and not c.reasons for c in cases)
    lines.append(f"| reviews that carry no QC finding (score < threshold, no single check fired) | {silent}/{int(review.sum())} |")
    lines.append(f"| inference s/case (mean) | {np.mean([c.predict_s for c in cases]):.2f} |")
    lines.append(f"| QC s/case (mean) | {np.mean([c.qc_s for c in cases]):.3f} |")
    lines.append("")

    # Signals per variant, split by good / failed: what the QC sees.
    lines.append("### QC signals per variant (mean; good / failed cases)")
    lines.append("")
    lines.append("| variant | true volume ml | " + " | ".join(SIGNALS) + " |")
    lines.append("|---|---|" + "---|" * len(SIGNALS))
    for variant, group in by_variant.items():
        cells = [f"{np.mean([c.true_ml for c in group]):.0f}"]
        for name in SIGNALS:
            parts = []
            for sub in ([c for c in group if not c.failed], [c for c in group if c.failed]):
                vals = [c.signals[name] for c in sub if name in c.signals]
                parts.append(_f(float(np.mean(vals)), 0 if name == "volume_ml" else 3) if vals else "–")
            cells.append(" / ".join(parts))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-per-variant", type=int, default=20, help="phantoms per variant (default 20)")
    parser.add_argument("--seed-base", type=int, default=DEFAULT_SEED_BASE,
                        help=f"first phantom seed (default {DEFAULT_SEED_BASE}, disjoint from training)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"markdown file to update (default {DOC.relative_to(ROOT)})")
    parser.add_argument("--no-doc", action="store_true", help="print only, do not write the markdown file")
    args = parser.parse_args(argv)
    if args.n_per_variant < 1:
        parser.error("--n-per-variant must be at least 1")
    if args.n_per_variant > SEEDS_PER_VARIANT:
        parser.error(f"--n-per-variant must be at most {SEEDS_PER_VARIANT}")

    import structlog
    import logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    model = load_segmentation_model(MODEL_SPEC, device=args.device)
    started = time.perf_counter()
    cases: list[Case] = []
    for v_index, variant in enumerate(PHANTOM_VARIANTS):
        for i in range(args.n_per_variant):
            seed = args.seed_base + SEEDS_PER_VARIANT * v_index + i
            case = run_case(model, variant, seed)
            cases.append(case)
            print(f"{variant:16s} seed {seed}: dice {case.dice:.3f} score {case.score:.3f} "
                  f"{'REVIEW' if case.review else 'accept'} {'FAIL' if case.failed else 'ok  '} "
                  f"{', '.join(case.reasons)}", file=sys.stderr, flush=True)
    section = summarise(cases, args, str(model.device), model.version, time.perf_counter() - started)
    print(section)
    if not args.no_doc:
        write_section("qc_eval", section, args.doc)
        print(f"\nwritten to {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
