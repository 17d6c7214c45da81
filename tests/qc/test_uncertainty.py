"""Uncertainty signals from stochastic samples."""

from __future__ import annotations

import numpy as np

from pacs_sentinel.qc.uncertainty import mask_entropy, sample_dice, uncertainty_signals
from pacs_sentinel.results import Reason, UncertaintySamples


def _cube(offset: int, size: int = 10, shape: tuple[int, int, int] = (20, 20, 20)) -> np.ndarray:
    volume = np.zeros(shape, bool)
    volume[5 + offset:5 + offset + size, 5:5 + size, 5:5 + size] = True
    return volume


def _samples(masks: list[np.ndarray], reference: np.ndarray) -> UncertaintySamples:
    probabilities = np.stack([np.where(m, 0.95, 0.02) for m in masks]).astype(np.float16)[:, None]
    return UncertaintySamples(probabilities, ["mc-dropout"] * len(masks), reference[None], (4.0, 4.0, 4.0))


def test_agreeing_samples_raise_nothing() -> None:
    reference = _cube(0)
    signals = uncertainty_signals(_samples([reference] * 4, reference), 0)
    assert {s.name: round(s.value, 3) for s in signals}["sample_dice"] == 1.0
    assert not any(s.fired for s in signals)


def test_disagreeing_samples_raise_high_uncertainty() -> None:
    reference = _cube(0)
    signals = uncertainty_signals(_samples([_cube(-3), _cube(3), _cube(-2), _cube(2)], reference), 0)
    fired = [s for s in signals if s.fired]
    assert fired and all(s.reason is Reason.HIGH_UNCERTAINTY for s in fired)


def test_sample_dice_and_entropy_values() -> None:
    a, b = _cube(0), _cube(5)  # half overlap
    assert sample_dice(np.stack([b.astype(np.float32)]), a) == 0.5
    half = np.full((2, 20, 20, 20), 0.5, np.float32)
    assert abs(mask_entropy(half, a) - 1.0) < 1e-4
    assert mask_entropy(half, np.zeros_like(a)) == 0.0
