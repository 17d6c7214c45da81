"""Shared inputs of the refit tests: tiny held-out phantom evaluation, synthetic feedback signals."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from pacs_sentinel.qc.evaluate import shipped_fusion
from pacs_sentinel.qc.heuristics import Signal
from pacs_sentinel.qc.refit import FeedbackCase, fusion_logit
from pacs_sentinel.results import Reason


@lru_cache(maxsize=1)
def phantoms() -> tuple:
    """qc-eval's held-out phantom cases at the smallest size (one per image family), drawn once."""
    import torch

    from pacs_sentinel.qc.refit import phantom_cases

    torch.set_num_threads(1)
    return tuple(phantom_cases(n_per_family=1, perturbations=1, seed=0))


def segment_signals(quality: float) -> list[Signal]:
    """Signals of a segment whose estimator and model confidence say ``quality`` (0..1)."""
    return [
        Signal("predicted_dice", quality, min(1.0, quality / 0.7), Reason.LOW_PREDICTED_DICE),
        Signal("mean_probability", 0.5 + 0.5 * quality, min(1.0, quality / 0.7), Reason.LOW_MODEL_CONFIDENCE),
        Signal("expected_dice", 0.45 + 0.5 * quality, min(1.0, quality / 0.7), Reason.LOW_EXPECTED_DICE),
        Signal("largest_component_share", 0.9 + 0.1 * quality, 1.0, Reason.FRAGMENTATION),
    ]


def synthetic_cases(n: int, *, contradict: bool = False, seed: int = 0) -> list[FeedbackCase]:
    """``n`` feedback cases over a range of qualities, labelled as the shipped score judges them:
    acceptable where its probability is at least 0.5 (or, ``contradict``, where it is below: labels
    against the scores)."""
    qualities = np.random.default_rng(seed).uniform(0.35, 0.97, n)
    signals = [segment_signals(float(q)) for q in qualities]
    z = np.array([fusion_logit(shipped_fusion(), s) for s in signals])
    cut = 0.0
    labels = [bool((zi < cut) if contradict else (zi >= cut)) for zi in z]
    return [FeedbackCase(i + 1, 1, s, ok, "ai-correct" if ok else "ai-rejected")
            for i, (s, ok) in enumerate(zip(signals, labels, strict=True))]
