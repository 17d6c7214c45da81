"""Families of image corruptions and mask perturbations: how QC's learned parts learn to doubt.

The learned confidence estimator (:mod:`pacs_sentinel.qc.estimator`) and the fitted fusion
(:mod:`pacs_sentinel.qc.fusion`) need cases whose true Dice is known and spread over the whole
range. They come from two kinds of family, each a function of an array and a seeded
:class:`numpy.random.Generator` (so a case is reproducible from its seed):

- **image corruptions** (:data:`IMAGE_FAMILIES`): the phantom is drawn clean or as one of the
  phantom variants, or a clean phantom is degraded (noise, blur, reduced contrast, motion
  ghosts), then the demo model segments it: its own failures, with their own uncertainty;
- **mask perturbations** (:data:`MASK_FAMILIES`): the model's mask is changed the way
  segmentations go wrong (dilation, erosion, shift, islands, holes, partial miss, leakage into
  a neighbour, the wrong organ, empty): failures the model's own samples know nothing about,
  e.g. a third-party SEG judged by a ``seg-qc`` pipeline.

:data:`HELD_OUT_FAMILIES` are never shown to the estimator nor to the fusion: ``sentinel
qc-eval`` measures on them whether QC generalises to a kind of failure it has not seen.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

#: Image families: phantom variant (``make_ct_phantom``) and corruption applied after drawing.
#: ``None`` as corruption: the variant as drawn.
IMAGE_FAMILIES: dict[str, tuple[str, str | None]] = {
    "clean": ("normal", None),
    "noise": ("normal", "noise"),
    "blur": ("normal", "blur"),
    "low-contrast": ("normal", "low-contrast"),
    "ghosting": ("normal", "ghosting"),
    "metal": ("metal-artifact", None),
    "low-dose": ("low-dose", None),
    "hepatomegaly": ("unusual-anatomy", None),
    "situs-inversus": ("situs-inversus", None),
}
#: Mask perturbation families (``"none"``: the model's own mask).
MASK_FAMILIES = ("none", "dilation", "erosion", "shift", "islands", "holes", "partial-miss", "leakage",
                 "wrong-organ", "empty")
#: Families neither the estimator nor the fusion ever sees (leave-one-family-out evaluation).
HELD_OUT_FAMILIES = ("ghosting",)

#: HU of soft tissue (liver, spleen, muscle...) that leakage grows into.
_SOFT_TISSUE_HU = (-30.0, 200.0)


def corrupt_image(hu: np.ndarray, corruption: str | None, rng: np.random.Generator,
                  spacing: tuple[float, float, float]) -> np.ndarray:
    """Apply an image corruption to a CT volume in HU.

    Args:
        hu: ``(slices, rows, cols)`` in HU; not modified.
        corruption: ``None`` (no change), ``"noise"``, ``"blur"``, ``"low-contrast"`` or ``"ghosting"``.
        rng: Draws the corruption's strength.
        spacing: ``(slice, row, col)`` in mm.

    Returns:
        A new float32 array.

    Raises:
        ValueError: Unknown corruption.
    """
    out = hu.astype(np.float32, copy=True)
    if corruption is None:
        return out
    if corruption == "noise":
        # Between routine and low-dose noise, spatially correlated a little (like real CT noise).
        noise = rng.normal(0.0, 1.0, size=out.shape).astype(np.float32)
        noise = ndimage.gaussian_filter(noise, sigma=(0.0, 0.6, 0.6))
        noise *= float(rng.uniform(50.0, 120.0)) / max(float(noise.std()), 1e-6)
        return out + noise
    if corruption == "blur":
        sigma_mm = float(rng.uniform(4.0, 9.0))
        return ndimage.gaussian_filter(out, sigma=(sigma_mm / 2 / spacing[0], sigma_mm / spacing[1], sigma_mm / spacing[2]))
    if corruption == "low-contrast":
        # A poorly timed contrast phase: every tissue drawn towards soft tissue (liver barely brighter).
        factor = float(rng.uniform(0.15, 0.45))
        body = out > -500.0
        out[body] = 45.0 + (out[body] - 45.0) * factor
        return out
    if corruption == "ghosting":
        # Breathing motion: shifted, attenuated copies of the body along the phase-encoding (row) axis.
        shift_mm = float(rng.uniform(20.0, 45.0))
        weight = float(rng.uniform(0.35, 0.6))
        shift = int(round(shift_mm / spacing[1]))
        ghost = 0.5 * (np.roll(out, shift, axis=1) + np.roll(out, -shift, axis=1))
        return (1.0 - weight) * out + weight * ghost
    raise ValueError(f"unknown image corruption {corruption!r}")


def _grow(mask: np.ndarray, mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Dilation by a ball of ``mm`` (Euclidean distance in mm, any radius at the same cost)."""
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= mm


def _shrink(mask: np.ndarray, mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Erosion by a ball of ``mm``."""
    return ndimage.distance_transform_edt(mask, sampling=spacing) > mm


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _dilation(mask, hu, rng, spacing):
    return _grow(mask, float(rng.uniform(3.0, 16.0)), spacing)


def _erosion(mask, hu, rng, spacing):
    return _shrink(mask, float(rng.uniform(3.0, 14.0)), spacing)


def _shift(mask, hu, rng, spacing):
    offset_mm = _random_direction(rng) * float(rng.uniform(8.0, 45.0))
    offset = tuple(int(round(o / s)) for o, s in zip(offset_mm, spacing, strict=True))
    return ndimage.shift(mask, offset, order=0, mode="constant", cval=False)


def _islands(mask, hu, rng, spacing):
    out = mask.copy()
    body = hu > -500.0
    candidates = np.argwhere(body & ~_grow(mask, 15.0, spacing))
    if len(candidates) == 0:
        return out
    z, y, x = np.ogrid[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    for _ in range(int(rng.integers(2, 7))):
        c = candidates[rng.integers(len(candidates))]
        r = rng.uniform(10.0, 35.0, size=3)
        out |= (((z - c[0]) * spacing[0] / r[0]) ** 2 + ((y - c[1]) * spacing[1] / r[1]) ** 2
                + ((x - c[2]) * spacing[2] / r[2]) ** 2 <= 1.0) & body
    return out


def _holes(mask, hu, rng, spacing):
    out = mask.copy()
    inner = np.argwhere(_shrink(mask, 12.0, spacing))
    if len(inner) == 0:
        inner = np.argwhere(mask)
    z, y, x = np.ogrid[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    for _ in range(int(rng.integers(1, 6))):
        c = inner[rng.integers(len(inner))]
        r = rng.uniform(8.0, 30.0)
        out &= ~(((z - c[0]) * spacing[0]) ** 2 + ((y - c[1]) * spacing[1]) ** 2 + ((x - c[2]) * spacing[2]) ** 2 <= r * r)
    return out


def _half_space(mask: np.ndarray, spacing, direction: np.ndarray, share: float) -> np.ndarray:
    """Voxels of the mask whose projection on ``direction`` is in its top ``share``."""
    coords = np.argwhere(mask) * np.asarray(spacing)
    if len(coords) == 0:
        return np.zeros_like(mask)
    projection = coords @ direction
    cut = np.quantile(projection, 1.0 - share)
    selected = np.zeros_like(mask)
    index = np.argwhere(mask)[projection >= cut]
    selected[tuple(index.T)] = True
    return selected


def _partial_miss(mask, hu, rng, spacing):
    return mask & ~_half_space(mask, spacing, _random_direction(rng), float(rng.uniform(0.2, 0.65)))


def _leakage(mask, hu, rng, spacing):
    # Grow into neighbouring soft tissue on one side, as a model does when an organ boundary is faint.
    direction = _random_direction(rng)
    grown = _grow(mask, float(rng.uniform(15.0, 45.0)), spacing)
    soft = (hu >= _SOFT_TISSUE_HU[0]) & (hu <= _SOFT_TISSUE_HU[1])
    coords = np.indices(mask.shape).reshape(3, -1).T * np.asarray(spacing)
    centre = np.argwhere(mask).mean(axis=0) * np.asarray(spacing) if mask.any() else coords.mean(axis=0)
    side = ((coords - centre) @ direction > 0).reshape(mask.shape)
    return mask | (grown & soft & side)


def _wrong_organ(mask, hu, rng, spacing):
    # The same organ shape mirrored across the body's midline: where the spleen and stomach are.
    body_cols = np.argwhere((hu > -500.0).any(axis=(0, 1)))
    if len(body_cols) == 0:
        return mask[:, :, ::-1].copy()
    centre = 0.5 * (float(body_cols.min()) + float(body_cols.max()))
    mirrored = np.zeros_like(mask)
    idx = np.argwhere(mask)
    idx[:, 2] = np.clip(np.rint(2 * centre - idx[:, 2]).astype(int), 0, mask.shape[2] - 1)
    mirrored[tuple(idx.T)] = True
    return mirrored & (hu > -500.0)


def _empty(mask, hu, rng, spacing):
    return np.zeros_like(mask)


_PERTURBATIONS: dict[str, Callable[..., np.ndarray]] = {
    "dilation": _dilation,
    "erosion": _erosion,
    "shift": _shift,
    "islands": _islands,
    "holes": _holes,
    "partial-miss": _partial_miss,
    "leakage": _leakage,
    "wrong-organ": _wrong_organ,
    "empty": _empty,
}


def perturb_mask(mask: np.ndarray, family: str, rng: np.random.Generator, hu: np.ndarray,
                 spacing: tuple[float, float, float]) -> np.ndarray:
    """Apply a mask perturbation family to a boolean mask.

    Args:
        mask: Boolean ``(slices, rows, cols)``; not modified.
        family: One of :data:`MASK_FAMILIES` (``"none"`` returns a copy).
        rng: Draws the perturbation's strength and place.
        hu: The image (HU), for perturbations that follow the anatomy (islands in the body,
            leakage into soft tissue, the mirrored organ inside the body).
        spacing: ``(slice, row, col)`` in mm.

    Returns:
        A new boolean mask.

    Raises:
        ValueError: Unknown family.
    """
    if family == "none":
        return mask.copy()
    if family not in _PERTURBATIONS:
        raise ValueError(f"unknown mask perturbation {family!r}; expected one of {MASK_FAMILIES}")
    return _PERTURBATIONS[family](mask.astype(bool), hu, rng, spacing).astype(bool)
