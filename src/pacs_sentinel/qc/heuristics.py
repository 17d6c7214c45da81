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
#: Expected Dice (soft Dice of the mask with the model's probability map): sub-score 1 at or above
#: HIGH, 0 at or below LOW, 0.5 (the reason is raised) below 0.70, the acceptable Dice. QC
#: calibration set (seeds 50 000+): the model's own masks 0.87-0.95 (p01-p99), clean ones at least
#: 0.92; at 0.70 it fires on 1 % of the acceptable masks and 59 % of the failed ones.
EXPECTED_DICE_HIGH = 0.80
EXPECTED_DICE_LOW = 0.60
#: Share of the filled mask in enclosed cavities: sub-score 1 at or below LOW, 0 at or above HIGH.
#: Ground truth and predictions on the 64 training phantoms: 0 (a solid organ has none).
HOLE_SHARE_LOW = 0.01
HOLE_SHARE_HIGH = 0.05
#: Share of mask surface voxels on the volume's faces: sub-score 1 at or below LOW, 0 at HIGH.
#: Normal phantoms: at most 0.006 (a liver grazing the top slice); a quarter of an organ cut off: 0.04.
BORDER_CONTACT_LOW = 0.01
BORDER_CONTACT_HIGH = 0.05
#: Excess of the left share beyond the card's p01..p99 at which the location sub-score is 0
#: (0.5 at half of it). Training phantoms: liver left share 0.07-0.19; situs inversus
#: predictions 0.38-0.75.
LEFT_SHARE_ZERO_EXCESS = 0.20
#: The body's axial cross-section against the range the model card records for the images the
#: model was trained on (``body_area_cm2_p01`` .. ``_p99``): sub-score 1 up to 10 % outside it,
#: 0 at 60 % outside (ratios, on a log scale), the finding raised from about 33 % outside. The
#: demo's training phantoms: 438-635 cm²; the same phantoms scaled to 85 % (a smaller patient,
#: 0.72 of the area): the demo model's Dice 0.77-0.92; to 80 %: 0.67-0.83; to 75 %: 0.45-0.75,
#: with masks of a normal-sized liver twice the true volume that every other check accepted.
BODY_AREA_FULL_EXCESS = math.log(1.10)
BODY_AREA_ZERO_EXCESS = math.log(1.60)
#: What the body-size check leaves of the quality score at sub-score 0: the model was never
#: validated on such a patient, so the score is at most even odds, whatever the mask looks like;
#: a floor keeps the ranking of those masks among themselves (a mask that looks wrong stays lower).
BODY_AREA_FUSION_FLOOR = 0.5


@dataclass(frozen=True)
class Signal:
    """One measured signal of a check and what it means for trust in the mask."""

    name: str
    value: float
    subscore: float
    reason: Reason
    #: What the check leaves of the quality score at sub-score 0 (0: it can veto alone).
    #: Input-quality checks that explain rather than prove a failure use a floor > 0.
    fusion_floor: float = 0.0

    @property
    def fired(self) -> bool:
        """True when the check raises its reason."""
        return self.subscore < FLAG_BELOW

    @property
    def fusion_factor(self) -> float:
        """The factor this signal contributes to the product fusion, in [fusion_floor, 1]."""
        return self.fusion_floor + (1.0 - self.fusion_floor) * self.subscore


def ramp(value: float, low: float, high: float) -> float:
    """0 at or below ``low``, 1 at or above ``high``, linear in between."""
    if high <= low:
        raise ValueError(f"ramp needs low < high, got {low} and {high}")
    return float(min(1.0, max(0.0, (value - low) / (high - low))))


def _log_excess(value: float, low: float, high: float) -> float:
    """How far a positive ``value`` lies outside ``[low, high]``, as the log of the ratio to the
    nearer end (0 inside; infinite for a value of 0 or less)."""
    if value <= 0:
        return math.inf
    if value > high:
        return math.log(value / high)
    if value < low:
        return math.log(low / value)
    return 0.0


def volume_signal(volume_ml: float, reference: dict[str, float] | None) -> Signal | None:
    """Volume against the range the model card records for this label (p01..p99).

    Returns:
        The signal, or None when the model card records no volume range for the label.
    """
    if not reference or "volume_ml_p01" not in reference or "volume_ml_p99" not in reference:
        return None
    excess = _log_excess(volume_ml, float(reference["volume_ml_p01"]), float(reference["volume_ml_p99"]))
    half = math.log1p(VOLUME_HALF_SCORE_EXCESS)
    subscore = 0.0 if math.isinf(excess) else math.exp(-math.log(2) * (excess / half) ** 2)
    return Signal("volume_ml", volume_ml, subscore, Reason.VOLUME_ANOMALY)


def body_size_signal(area_cm2: float | None, reference: dict[str, float] | None) -> Signal | None:
    """The patient's size (the body's axial cross-section) against the range of the images the
    model was trained on (``body_area_cm2_p01`` / ``_p99`` in the model card's statistics).

    A model that learned organ sizes in millimetres can segment an organ of the usual size in a
    much smaller (or larger) patient, which every check of the mask alone finds plausible.
    Raises :attr:`~pacs_sentinel.results.Reason.UNFAMILIAR_INPUT`; the fitted fusion never saw
    such images, so its factor multiplies the quality score (down to :data:`BODY_AREA_FUSION_FLOOR`).

    Returns:
        The signal, or None when the card records no range or the volume shows no body.
    """
    if area_cm2 is None or not reference or "body_area_cm2_p01" not in reference or "body_area_cm2_p99" not in reference:
        return None
    excess = _log_excess(area_cm2, float(reference["body_area_cm2_p01"]), float(reference["body_area_cm2_p99"]))
    subscore = 1.0 - ramp(excess, BODY_AREA_FULL_EXCESS, BODY_AREA_ZERO_EXCESS) if math.isfinite(excess) else 0.0
    return Signal("body_area_cm2", area_cm2, subscore, Reason.UNFAMILIAR_INPUT, fusion_floor=BODY_AREA_FUSION_FLOOR)


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


def expected_dice_signal(probabilities: np.ndarray, mask: np.ndarray) -> Signal:
    """Soft Dice ``2 sum(p m) / (sum(p) + sum(m))`` of the mask with the model's probability map.

    Read voxel by voxel as the chance that the voxel is organ, the probability map gives the
    Dice the mask can expect (the "expected Dice" confidence estimate). It compares the two
    both ways: for the model's own mask it is low when the probabilities on and around the mask
    are far from 0 and 1 (the model is unsure); for a mask that departs from what the model
    believes it drops with the departure on either side (tissue added, as leakage or islands,
    and tissue left out, as erosion or a partial miss), where the mean probability inside the
    mask (:func:`confidence_signal`) only sees what was added. Only where the probabilities
    exist (our own model); a third-party SEG has the agreement signal instead.
    """
    # Sums accumulate in float64 without a float64 copy of the map (630 MB on a 512x512x300 CT).
    total = float(np.sum(probabilities, dtype=np.float64)) + float(np.count_nonzero(mask))
    value = 2.0 * float(np.sum(probabilities[mask], dtype=np.float64)) / total if total > 0 else 0.0
    subscore = ramp(value, EXPECTED_DICE_LOW, EXPECTED_DICE_HIGH)
    return Signal("expected_dice", value, subscore, Reason.LOW_EXPECTED_DICE)


def hole_signal(mask: np.ndarray) -> Signal:
    """Share of the filled mask that is internal cavities (3D holes, 6-connected background).

    A solid organ's mask has no enclosed cavity; a cavity means the model missed tissue
    inside the organ (a lesion, an artefact) and is reported as a shape irregularity.
    """
    filled = ndimage.binary_fill_holes(mask)
    filled_count = int(filled.sum())
    share = float(filled_count - int(mask.sum())) / filled_count if filled_count else 0.0
    subscore = 1.0 - ramp(share, HOLE_SHARE_LOW, HOLE_SHARE_HIGH)
    return Signal("hole_share", share, subscore, Reason.SHAPE_IRREGULARITY)


def bounding_box(mask: np.ndarray) -> list[tuple[int, int]] | None:
    """``(first, last + 1)`` of the mask's voxels along each axis, or None for an empty mask.

    The same bounds as ``np.argwhere(mask).min/max`` from one ``any`` per axis, without
    listing every voxel.
    """
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return box


def _surface_in_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask's surface voxels and which of them lie on the volume's faces, in its bounding box.

    The surface is ``mask & ~binary_erosion(mask, border_value=1)`` (6-connected; outside the
    volume counts as mask), computed on the bounding box only: outside it there is no mask
    voxel, so a neighbour there is background unless it lies outside the volume.

    Returns:
        ``(surface, on_border)``, both the shape of the bounding box (empty for an empty mask).
    """
    box = bounding_box(mask)
    if box is None:
        return np.zeros((0, 0, 0), bool), np.zeros((0, 0, 0), bool)
    inner = mask[tuple(slice(lo, hi) for lo, hi in box)]
    # One voxel around the box: outside the volume (border_value=1) where the box touches a
    # face of the volume, else background; the box's layers on those faces are on the border.
    padded = np.zeros(tuple(n + 2 for n in inner.shape), bool)
    padded[1:-1, 1:-1, 1:-1] = inner
    on_border = np.zeros(inner.shape, bool)
    for axis, (lo, hi) in enumerate(box):
        for touches, face in ((lo == 0, 0), (hi == mask.shape[axis], -1)):
            if touches:
                index: list[slice | int] = [slice(None)] * 3
                index[axis] = face
                padded[tuple(index)] = True
                on_border[tuple(index)] = True
    eroded = inner.copy()
    for axis in range(3):
        for step in (-1, 1):
            shifted = [slice(1, -1)] * 3
            shifted[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            eroded &= padded[tuple(shifted)]
    return inner & ~eroded, on_border


def border_contact_signal(mask: np.ndarray) -> Signal:
    """Share of the mask's surface voxels that lie on the volume's outer faces.

    Surface voxels are mask voxels with a 6-neighbour outside the mask; a mask cut off by the
    field of view (in-plane) or the scan range (first/last slice) has part of its surface on
    the border, and its volume and shape are then unreliable.
    """
    surface, on_border = _surface_in_box(np.asarray(mask, dtype=bool))
    total = int(surface.sum())
    if total == 0:
        return Signal("border_contact_share", 0.0, 1.0, Reason.BORDER_CONTACT)
    share = float(int((surface & on_border).sum())) / total
    subscore = 1.0 - ramp(share, BORDER_CONTACT_LOW, BORDER_CONTACT_HIGH)
    return Signal("border_contact_share", share, subscore, Reason.BORDER_CONTACT)


def patient_x_mm(indices: np.ndarray, spacing: tuple[float, float, float], direction: np.ndarray) -> np.ndarray:
    """Patient x (LPS: + = patient left) of voxel indices ``(n, 3)`` as (slice, row, col), up to a constant.

    ``direction``'s columns are the patient-space unit vectors of the column, row and slice
    index (:class:`~pacs_sentinel.dicom_io.series.Volume`).
    """
    direction = np.asarray(direction, dtype=np.float64)
    weights = np.array([direction[0, 2] * spacing[0], direction[0, 1] * spacing[1], direction[0, 0] * spacing[2]])
    return indices.astype(np.float64) @ weights


def left_share(mask: np.ndarray, midline_x_mm: float, spacing: tuple[float, float, float],
               direction: np.ndarray) -> float:
    """Share of the mask's voxels on the patient's left of ``midline_x_mm`` (same origin as :func:`patient_x_mm`)."""
    box = bounding_box(mask)
    if box is None:
        return 0.0
    x_per_step = patient_x_mm(np.eye(3), spacing, direction)
    moving = np.flatnonzero(x_per_step)
    if len(moving) == 1:
        # Patient x follows one index axis (axial, coronal or sagittal slices): count the
        # voxels per position along it instead of listing every voxel (a liver on a 512x512x300
        # CT is ~3 million of them).
        axis = int(moving[0])
        lo, hi = box[axis]
        inside = mask[tuple(slice(a, b) for a, b in box)]
        counts = np.count_nonzero(inside, axis=tuple(a for a in range(3) if a != axis))
        left = np.arange(lo, hi) * x_per_step[axis] > midline_x_mm
        return float(counts[left].sum()) / float(counts.sum())
    indices = np.argwhere(mask)
    return float(np.mean(patient_x_mm(indices, spacing, direction) > midline_x_mm))


def location_signal(share_left: float, reference: dict[str, float] | None) -> Signal | None:
    """Side of the body the mask lies on, against the range the model card records.

    The card records ``left_share_p01`` / ``left_share_p99``: the share of the label's mask on
    the patient's left of the body's midline on its training data (a liver: about 0.1, on
    the right; situs inversus: mostly left). The sub-score falls from 1 at the recorded range
    to 0 at ``LEFT_SHARE_ZERO_EXCESS`` beyond it. A mask in an implausible place is reported
    as QC028 "Implausible location".

    Returns:
        The signal, or None when the card records no range for the label.
    """
    if not reference or "left_share_p01" not in reference or "left_share_p99" not in reference:
        return None
    low, high = float(reference["left_share_p01"]), float(reference["left_share_p99"])
    excess = max(0.0, share_left - high, low - share_left)
    subscore = 1.0 - ramp(excess, 0.0, LEFT_SHARE_ZERO_EXCESS)
    return Signal("left_share", share_left, subscore, Reason.IMPLAUSIBLE_LOCATION)


def axial_view(array: np.ndarray, direction: np.ndarray | None, spacing: tuple[float, float, float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``array`` in axial LPS index order when ``direction`` is a signed axis permutation.

    ``direction``'s columns are the patient-space vectors of the column, row and slice index
    (:class:`~pacs_sentinel.dicom_io.series.Volume`). Oblique volumes are used as they are.
    """
    if direction is None:
        return array, spacing
    d = np.asarray(direction, dtype=np.float64)
    rounded = np.rint(d)
    if not np.allclose(d, rounded, atol=1e-3) or sorted(np.abs(rounded).sum(axis=0)) != [1, 1, 1]:
        return array, spacing
    # array axes are (slice, row, col) = direction columns (2, 1, 0); patient axis of each:
    axis_of_index = [int(np.argmax(np.abs(rounded[:, c]))) for c in (2, 1, 0)]
    signs = [float(rounded[axis_of_index[i], c]) for i, c in enumerate((2, 1, 0))]
    # Target order (slice, row, col) = patient (z, y, x) = axes (2, 1, 0).
    order = [axis_of_index.index(p) for p in (2, 1, 0)]
    out = np.transpose(array, order)
    for target, source in enumerate(order):
        if signs[source] < 0:
            out = np.flip(out, axis=target)
    return out, tuple(float(spacing[i]) for i in order)  # type: ignore[return-value]
