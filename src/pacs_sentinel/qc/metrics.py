"""Failure-detection metrics, the way the literature measures an error detector.

Scores follow the QC convention: higher = more trustworthy. A *failure* is a case whose
Dice is below 0.7 (DESIGN.md's "acceptable"); the detector is good when failures get low scores.

- :func:`auroc`: AUROC of the score for separating failures (lower score = more suspicious);
  :func:`roc_auc` the same in the usual orientation (higher score = positive).
- :func:`risk_coverage`, :func:`aurc`: cases sorted by score, most trusted first; the risk at
  coverage k/n is the mean risk of the k most trusted (risk = failure indicator or 1 - Dice).
  AURC is its mean; the normalized AURC (:func:`normalized_aurc`) scales it between the
  oracle (0) and a random ranking (1).
- :func:`derive_threshold`: the operating point of a target review rate or a maximum risk
  among accepted cases on a calibration set's risk-coverage curve.
- :func:`expected_calibration_error`: ECE of probabilities against binary outcomes.
- :func:`paired_difference_interval`: a paired bootstrap interval of the difference of any
  figure of two detectors on the same cases, resampling groups (phantoms) rather than cases;
  :func:`auroc_difference_interval` for the AUROC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata, spearmanr


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (Mann-Whitney U with mid-ranks for
    ties); NaN with one class."""
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of ``-scores`` for ``positive`` (a low score flags a failure); NaN with one class."""
    return roc_auc(positive, -np.asarray(scores, dtype=np.float64))


def paired_difference_interval(statistic: Callable[[np.ndarray, np.ndarray], float], a: np.ndarray, b: np.ndarray,
                               groups: Sequence, *, resamples: int = 2000, level: float = 0.95,
                               seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(a, index) - statistic(b, index)`` on the same cases.

    The groups (e.g. the phantom each case was judged on: its masks are not independent) are
    drawn with replacement, every case of a drawn group entering the resample (``index``:
    the resampled cases' positions); resamples where either statistic is NaN (e.g. one class
    only) are skipped.

    Args:
        statistic: ``statistic(values, index)``: the figure of one detector's per-case values
            on the resampled cases.
        a, b: The two detectors' per-case values (scores, or flags), one per case.
        groups: Group of each case.
        resamples: Bootstrap resamples.
        level: Coverage of the interval.
        seed: Seeds the resampling.

    Returns:
        ``(low, high)``; NaNs when no resample gives both figures.

    Raises:
        ValueError: Lengths differ, or ``level`` outside (0, 1).
    """
    a, b, groups = np.asarray(a), np.asarray(b), np.asarray(groups)
    if not len(a) == len(b) == len(groups):
        raise ValueError(f"lengths differ: {len(a)}, {len(b)}, {len(groups)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(resamples):
        index = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        difference = statistic(a, index) - statistic(b, index)
        if not np.isnan(difference):
            differences.append(difference)
    if not differences:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(differences, [tail, 100.0 - tail])
    return float(low), float(high)


def auroc_difference_interval(a: np.ndarray, b: np.ndarray, positive: np.ndarray, groups: Sequence,
                              *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``auroc(a) - auroc(b)`` on the same cases
    (:func:`paired_difference_interval`; resamples with one class only are skipped).

    Args:
        a, b: Scores of the two detectors (higher = more trustworthy), one per case.
        positive: Failure flags.

    Raises:
        ValueError: Lengths differ, or ``level`` outside (0, 1).
    """
    positive = np.asarray(positive, dtype=bool)
    if len(positive) != len(a):
        raise ValueError(f"lengths differ: {len(a)}, {len(b)}, {len(positive)}, {len(groups)}")
    return paired_difference_interval(lambda scores, index: auroc(scores[index], positive[index]),
                                      np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), groups,
                                      resamples=resamples, level=level, seed=seed)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; NaN when either is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def risk_coverage(scores: np.ndarray, risks: np.ndarray) -> np.ndarray:
    """Mean risk of the k most trusted cases for k = 1..n (ties: expectation over orderings)."""
    scores, risks = np.asarray(scores, dtype=np.float64), np.asarray(risks, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    s, r = scores[order], risks[order]
    cumulative = np.empty(len(s))
    done, before = 0, 0.0
    while done < len(s):
        end = done
        while end < len(s) and s[end] == s[done]:
            end += 1
        rate = r[done:end].mean()
        cumulative[done:end] = before + rate * np.arange(1, end - done + 1)
        before += r[done:end].sum()
        done = end
    return cumulative / np.arange(1, len(s) + 1)


def aurc(scores: np.ndarray, risks: np.ndarray) -> float:
    """Area under the risk-coverage curve (mean risk over the n coverages); lower is better."""
    return float(risk_coverage(scores, risks).mean()) if len(scores) else float("nan")


def normalized_aurc(scores: np.ndarray, risks: np.ndarray) -> float:
    """``(AURC - oracle) / (random - oracle)``: 0 = perfect ranking, 1 = random; NaN when degenerate."""
    risks = np.asarray(risks, dtype=np.float64)
    oracle = aurc(-risks, risks)
    random = float(risks.mean())
    if random - oracle <= 1e-12:
        return float("nan")
    return (aurc(scores, risks) - oracle) / (random - oracle)


def sensitivity_at_review_rate(scores: np.ndarray, failed: np.ndarray, review_rate: float) -> float:
    """Share of failures among the ``review_rate`` least trusted cases (ties broken pessimistically)."""
    scores, failed = np.asarray(scores, dtype=np.float64), np.asarray(failed, dtype=bool)
    if not failed.any():
        return float("nan")
    k = int(round(review_rate * len(scores)))
    order = np.lexsort((~failed, scores))  # lowest scores first; among ties, good cases first
    return float(failed[order[:k]].sum() / failed.sum())


def expected_calibration_error(probabilities: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[float],
                               n_bins: int = 10) -> float:
    """Expected calibration error of binary (or multi-label) probabilities.

    Every (case, label) pair is one binary prediction. Predictions are put in ``n_bins``
    equal-width bins of their probability (1.0 in the last bin); the ECE is the mean over bins,
    weighted by their share of predictions, of ``|observed frequency - mean probability|``.

    Args:
        probabilities: Predicted probabilities of the positive class, any shape.
        labels: 0/1 ground truth of the same shape.
        n_bins: Number of bins.

    Returns:
        The ECE in [0, 1]; 0.0 for empty input.

    Raises:
        ValueError: Shapes differ, probabilities outside [0, 1], or ``n_bins`` < 1.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if np.shape(probabilities) != np.shape(labels):
        raise ValueError(f"probabilities shape {np.shape(probabilities)} differs from labels shape {np.shape(labels)}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if p.size == 0:
        return 0.0
    if np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
        raise ValueError("probabilities must lie in [0, 1]")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for k in range(n_bins):
        in_bin = bins == k
        if in_bin.any():
            ece += in_bin.mean() * abs(y[in_bin].mean() - p[in_bin].mean())
    return float(ece)


def reliability_bins(probabilities: np.ndarray, outcomes: np.ndarray, bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean probability, outcome rate, count) per non-empty equal-width bin."""
    p, y = np.asarray(probabilities, dtype=np.float64), np.asarray(outcomes, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    return [(float(p[index == b].mean()), float(y[index == b].mean()), int((index == b).sum()))
            for b in range(bins) if (index == b).any()]


@dataclass(frozen=True)
class OperatingPoint:
    """A verdict threshold and what it does on a set of cases."""

    threshold: float
    n: int
    coverage: float
    review_rate: float
    risk: float
    sensitivity: float

    def describe(self) -> str:
        """One line for people."""
        return (f"threshold {self.threshold:.4f}: review rate {100 * self.review_rate:.1f} %, coverage "
                f"{100 * self.coverage:.1f} %, failures among accepted {100 * self.risk:.1f} %, failures caught "
                f"{'n/a' if np.isnan(self.sensitivity) else f'{100 * self.sensitivity:.1f} %'} (n = {self.n})")


def operating_point(scores: np.ndarray, failed: np.ndarray, threshold: float) -> OperatingPoint:
    """What ``score >= threshold`` (accept) does on these cases."""
    scores, failed = np.asarray(scores, dtype=np.float64), np.asarray(failed, dtype=bool)
    accepted = scores >= threshold
    n = len(scores)
    risk = float(failed[accepted].mean()) if accepted.any() else 0.0
    sensitivity = float((failed & ~accepted).sum() / failed.sum()) if failed.any() else float("nan")
    return OperatingPoint(float(threshold), n, float(accepted.mean()) if n else 0.0,
                          float((~accepted).mean()) if n else 0.0, risk, sensitivity)


def derive_threshold(scores: np.ndarray, failed: np.ndarray, *, target_review_rate: float | None = None,
                     max_risk: float | None = None) -> OperatingPoint:
    """The verdict threshold for a target review rate or a maximum risk among accepted cases.

    Candidate thresholds are the distinct scores and 1.0 (accept only perfect scores).

    - ``target_review_rate``: the lowest threshold that sends at least that share to review;
    - ``max_risk``: the lowest threshold (largest coverage) at which the failure rate among
      accepted cases is at most ``max_risk``; 1.0 when no threshold reaches it.

    Raises:
        ValueError: Not exactly one of the two given, a value out of range, or no cases.
    """
    if (target_review_rate is None) == (max_risk is None):
        raise ValueError("give exactly one of target_review_rate and max_risk")
    scores, failed = np.asarray(scores, dtype=np.float64), np.asarray(failed, dtype=bool)
    if len(scores) == 0:
        raise ValueError("no calibration cases to derive a threshold from")
    candidates = np.unique(np.concatenate([scores, [1.0]]))  # ascending
    if target_review_rate is not None:
        if not 0.0 <= target_review_rate <= 1.0:
            raise ValueError(f"target_review_rate must be in [0, 1], got {target_review_rate}")
        for t in candidates:
            if np.mean(scores < t) >= target_review_rate - 1e-12:
                return operating_point(scores, failed, float(t))
        return operating_point(scores, failed, float(candidates[-1]))
    assert max_risk is not None
    if not 0.0 <= max_risk <= 1.0:
        raise ValueError(f"max_risk must be in [0, 1], got {max_risk}")
    for t in candidates:
        accepted = scores >= t
        if not accepted.any() or failed[accepted].mean() <= max_risk + 1e-12:
            return operating_point(scores, failed, float(t))
    return operating_point(scores, failed, 1.0)
