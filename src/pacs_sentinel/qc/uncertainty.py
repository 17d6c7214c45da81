"""Uncertainty signals from repeated stochastic predictions (MC dropout, test-time augmentation).

The strongest single failure detector in Zenk et al. (2025)'s benchmark of segmentation
failure detection is the agreement between stochastic samples: where the model is unsure,
its dropout samples disagree. Two signals per segment, both on the model's working grid:

- ``sample_dice``: mean pairwise Dice between the thresholded samples and the deterministic
  mask (1 = every pass agrees);
- ``mask_entropy``: mean binary entropy (in bits, so in [0, 1]) of the mean sample
  probability inside the deterministic mask.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from pacs_sentinel.qc.heuristics import Signal, ramp
from pacs_sentinel.results import Reason, UncertaintySamples

#: Mean pairwise sample Dice: sub-score 1 at or above HIGH, 0 at or below LOW. Chosen from the
#: demo model's phantoms (bench/qc_eval.py): good masks agree at 0.92-0.97.
SAMPLE_DICE_HIGH = 0.93
SAMPLE_DICE_LOW = 0.85
#: Mean entropy inside the mask (bits): sub-score 1 at or below LOW, 0 at or above HIGH.
ENTROPY_LOW = 0.15
ENTROPY_HIGH = 0.45
#: Probability at which a sample's voxel counts as foreground.
SAMPLE_THRESHOLD = 0.5


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def sample_dice(samples: np.ndarray, mask: np.ndarray) -> float:
    """Mean pairwise Dice among the thresholded samples and the reference mask."""
    members = [mask.astype(bool)] + [s >= SAMPLE_THRESHOLD for s in samples]
    pairs = list(combinations(range(len(members)), 2))
    return float(np.mean([_dice(members[i], members[j]) for i, j in pairs])) if pairs else 1.0


def mask_entropy(samples: np.ndarray, mask: np.ndarray) -> float:
    """Mean binary entropy (bits) of the mean sample probability inside the mask."""
    inside = mask.astype(bool)
    if not inside.any():
        return 0.0
    p = np.clip(samples.astype(np.float32).mean(axis=0)[inside], 1e-6, 1 - 1e-6)
    return float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p))))


def uncertainty_signals(uncertainty: UncertaintySamples, label_index: int) -> list[Signal]:
    """The uncertainty signals of one label (empty when there are fewer than one sample)."""
    samples = uncertainty.probabilities[:, label_index]
    if samples.shape[0] == 0:
        return []
    mask = uncertainty.mask[label_index]
    agreement = sample_dice(samples, mask)
    entropy = mask_entropy(samples, mask)
    return [
        Signal("sample_dice", agreement, ramp(agreement, SAMPLE_DICE_LOW, SAMPLE_DICE_HIGH), Reason.HIGH_UNCERTAINTY),
        Signal("mask_entropy", entropy, 1.0 - ramp(entropy, ENTROPY_LOW, ENTROPY_HIGH), Reason.HIGH_UNCERTAINTY),
    ]
