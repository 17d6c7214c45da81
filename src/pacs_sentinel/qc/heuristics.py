"""Mask heuristics: cheap, explainable checks on one segment's mask.

Each check turns a measured signal into a sub-score in [0, 1] (1 = nothing suspicious)
and raises its :class:`~pacs_sentinel.results.Reason` when the sub-score falls below
:data:`FLAG_BELOW`. The fusion in :mod:`pacs_sentinel.qc.evaluate` combines sub-scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pacs_sentinel.results import Reason

#: A check raises its reason when its sub-score is below this.
FLAG_BELOW = 0.5
#: Relative excess beyond the reference volume range at which the volume sub-score is 0.5.
VOLUME_HALF_SCORE_EXCESS = 0.05
#: Share of the mask in its largest connected component: sub-score 1 at or above HIGH,
#: 0 at or below LOW, 0.5 half way.
LARGEST_COMPONENT_HIGH = 0.95
LARGEST_COMPONENT_LOW = 0.60
#: Roundness (SimpleITK: surface of the equal-volume sphere / surface of the object):
#: sub-score 1 at or above HIGH, 0 at or below LOW.
ROUNDNESS_HIGH = 0.75
ROUNDNESS_LOW = 0.45
#: Mean foreground probability inside the mask: sub-score 1 at or above HIGH, 0 at LOW.
CONFIDENCE_HIGH = 0.85
CONFIDENCE_LOW = 0.55


@dataclass(frozen=True)
class Signal:
    """One measured signal of a check and what it means for trust in the mask."""

    name: str
    value: float
    subscore: float
    reason: Reason

    @property
    def fired(self) -> bool:
        """True when the check raises its reason."""
        return self.subscore < FLAG_BELOW


def ramp(value: float, low: float, high: float) -> float:
    """0 at or below ``low``, 1 at or above ``high``, linear in between."""
    if high <= low:
        raise ValueError(f"ramp needs low < high, got {low} and {high}")
    return float(min(1.0, max(0.0, (value - low) / (high - low))))


def volume_signal(volume_ml: float, reference: dict[str, float] | None) -> Signal | None:
    """Volume against the range the model card records for this label (p01..p99).

    Returns:
        The signal, or None when the model card records no volume range for the label.
    """
    if not reference or "volume_ml_p01" not in reference or "volume_ml_p99" not in reference:
        return None
    low, high = float(reference["volume_ml_p01"]), float(reference["volume_ml_p99"])
    if volume_ml <= 0:
        excess = math.inf
    elif volume_ml > high:
        excess = math.log(volume_ml / high)
    elif volume_ml < low:
        excess = math.log(low / volume_ml)
    else:
        excess = 0.0
    half = math.log1p(VOLUME_HALF_SCORE_EXCESS)
    subscore = 0.0 if math.isinf(excess) else math.exp(-math.log(2) * (excess / half) ** 2)
    return Signal("volume_ml", volume_ml, subscore, Reason.VOLUME_ANOMALY)


def fragmentation_signal(mask: np.ndarray) -> Signal:
    """Share of the mask in its largest 26-connected component."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        share = 1.0
    else:
        sizes = np.bincount(labels.ravel())[1:]
        share = float(sizes.max() / sizes.sum())
    subscore = ramp(share, LARGEST_COMPONENT_LOW, LARGEST_COMPONENT_HIGH)
    return Signal("largest_component_share", share, subscore, Reason.FRAGMENTATION)


def shape_signal(mask: np.ndarray, spacing: tuple[float, float, float]) -> Signal:
    """Compactness of the largest component (SimpleITK roundness; 1 for a sphere)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        component = labels == int(sizes.argmax())
    else:
        component = mask
    image = sitk.GetImageFromArray(component.astype(np.uint8))
    image.SetSpacing((spacing[2], spacing[1], spacing[0]))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOn()
    stats.Execute(image)
    roundness = float(stats.GetRoundness(1)) if stats.HasLabel(1) else 0.0
    subscore = ramp(roundness, ROUNDNESS_LOW, ROUNDNESS_HIGH)
    return Signal("roundness", roundness, subscore, Reason.SHAPE_IRREGULARITY)


def confidence_signal(probabilities: np.ndarray, mask: np.ndarray) -> Signal:
    """Mean foreground probability inside the mask (the model's own confidence)."""
    inside = probabilities[mask]
    mean = float(inside.mean()) if inside.size else 0.0
    subscore = ramp(mean, CONFIDENCE_LOW, CONFIDENCE_HIGH)
    return Signal("mean_probability", mean, subscore, Reason.LOW_MODEL_CONFIDENCE)
