"""Learned confidence estimator: a small 3D CNN that looks at (image, mask) and predicts the Dice.

The mask heuristics see only the mask, the uncertainty signals only what the model itself
doubts. The estimator looks at both the image and the mask, like a reader would: does the
outline follow the organ's edges, is bright organ tissue left outside, does the mask cover
something that does not look like the organ at all? It is trained
(:mod:`pacs_sentinel.qc.train_estimator`) on the demo model's own predictions on phantoms it
was not trained on (clean and corrupted images) plus perturbed masks, with the true Dice as
the label.

Input (:func:`estimator_input`): a cube of ``BOX_MM`` mm around the centre of the mask's
bounding box, in canonical (axial, LPS) index order, averaged down to ``GRID`` voxels per
side (area interpolation: the mask channel keeps its partial volume); three channels, the
image windowed to ``WINDOW_HU`` and scaled to [0, 1], the mask's voxel fraction and (since
estimator 2.0.0) the segmentation model's probability map. A mask that comes without
probabilities (a third-party SEG) gets the mask itself in the third channel: the network was
trained with that substitution on a share of its cases (:mod:`pacs_sentinel.qc.train_estimator`),
so one estimator judges both. A fixed physical size keeps the organ's scale and its neighbours
in view. Output: the predicted Dice in [0, 1] (sigmoid). Network: MONAI ``Regressor``.
Estimators of two channels (1.x: image, mask) still load and are fed two channels.

Shipped weights live in ``qc/models/estimator/`` (``model.pt`` + ``card.json``, the card
recording the recipe, seeds, families and held-out metrics); ``sentinel train-demo
qc-estimator`` retrains them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from monai.networks.nets import Regressor

from pacs_sentinel.errors import ModelError
from pacs_sentinel.qc.agreement import same_concept
from pacs_sentinel.qc.heuristics import Signal, axial_view, bounding_box, ramp
from pacs_sentinel.results import Code, Reason, SegmentLabel

log = structlog.get_logger(__name__)

#: Folder of the shipped estimator (``model.pt``, ``card.json``).
ESTIMATOR_DIR = Path(__file__).resolve().parent / "models" / "estimator"
WEIGHTS_FILE = "model.pt"
CARD_FILE = "card.json"
#: Edge of the cube around the mask (mm) and voxels per edge of the network input.
BOX_MM = 256.0
GRID = 32
#: Intensity window (HU) of the image channel.
WINDOW_HU = (-200.0, 300.0)
#: Predicted Dice: sub-score 0 at or below LOW, 1 at or above HIGH (0.5, i.e. the reason
#: fires, at 0.7: DESIGN.md's "acceptable" Dice).
PREDICTED_DICE_LOW = 0.5
PREDICTED_DICE_HIGH = 0.9

#: What the estimator was trained on, when its card does not say (cards before QC 2.6.0): the
#: demo organ-seg task, the liver (SCT 10200004) on CT. It judges nothing else: a spleen mask
#: is not a bad liver mask, and an MR image is not in HU.
DEFAULT_SCOPE: dict[str, list] = {"modalities": ["CT"], "structures": [["10200004", "SCT", "Liver"]]}

#: Input channels: image, mask, probability map (2: the 1.x estimators' image and mask).
INPUT_CHANNELS = 3

#: Architecture of the estimator network (keyword arguments of MONAI ``Regressor``).
ESTIMATOR_ARCHITECTURE: dict[str, Any] = {
    "in_shape": [INPUT_CHANNELS, GRID, GRID, GRID],
    "out_shape": [1],
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2, 2],
    "num_res_units": 1,
}


def build_estimator_network(architecture: dict[str, Any] | None = None) -> torch.nn.Module:
    """The estimator CNN (MONAI ``Regressor``; logits, apply a sigmoid for the Dice)."""
    arch = dict(ESTIMATOR_ARCHITECTURE if architecture is None else architecture)
    return Regressor(in_shape=arch["in_shape"], out_shape=arch["out_shape"], channels=arch["channels"],
                     strides=arch["strides"], num_res_units=arch["num_res_units"], dropout=arch.get("dropout"))


def estimator_input(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float],
                    direction: np.ndarray | None = None, probabilities: np.ndarray | None = None, *,
                    channels: int = INPUT_CHANNELS) -> np.ndarray:
    """The network input for one mask: ``(channels, GRID, GRID, GRID)`` float32.

    Args:
        image: ``(slices, rows, cols)`` in HU.
        mask: Boolean mask, same shape, not empty.
        spacing: ``(slice, row, col)`` in mm.
        direction: The volume's direction matrix (columns: column, row, slice index vectors);
            None for axial LPS.
        probabilities: The segmentation model's probability map of this label, same shape,
            values in [0, 1]; None when the mask came without one (the mask stands in).
        channels: 3 (image, mask, probabilities) or 2 (image, mask: estimators 1.x).

    Raises:
        ValueError: Shapes differ, the mask is empty, or ``channels`` is not 2 or 3.
    """
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be the same 3D shape")
    if probabilities is not None and probabilities.shape != mask.shape:
        raise ValueError(f"probabilities {probabilities.shape} and mask {mask.shape} must be the same shape")
    if channels not in (2, 3):
        raise ValueError(f"the estimator input has 2 or 3 channels, not {channels}")
    if not mask.any():
        raise ValueError("the estimator needs a non-empty mask")
    image, canonical_spacing = axial_view(image, direction, spacing)
    mask, _ = axial_view(mask, direction, spacing)
    if probabilities is not None:
        probabilities, _ = axial_view(probabilities, direction, spacing)
    box = bounding_box(mask)
    assert box is not None  # the mask is not empty (checked above)
    centre = np.array([(lo + hi - 1) / 2.0 for lo, hi in box])
    size = [max(1, int(round(BOX_MM / s))) for s in canonical_spacing]
    low = [int(round(c - n / 2.0)) for c, n in zip(centre, size, strict=True)]
    src = tuple(slice(max(0, lo), min(dim, lo + n)) for lo, n, dim in zip(low, size, image.shape, strict=True))
    offset = [s.start - lo for s, lo in zip(src, low, strict=True)]  # where the image starts in the box
    lo_hu, hi_hu = WINDOW_HU

    def window(values: np.ndarray) -> np.ndarray:
        out = values.astype(np.float32)
        out -= lo_hu
        out /= hi_hu - lo_hu
        return np.clip(out, 0.0, 1.0, out=out)

    def fraction(values: np.ndarray) -> np.ndarray:
        return np.clip(values.astype(np.float32, copy=False), 0.0, 1.0)

    planes = [_area_average(image[src], window, size, offset), _area_average(mask[src], fraction, size, offset)]
    if channels == 3:
        planes.append(planes[1] if probabilities is None  # the mask stands in
                      else _area_average(probabilities[src], fraction, size, offset))
    return np.stack(planes)


def _cells(n: int) -> list[tuple[int, int]]:
    """The box indices each of the ``GRID`` output voxels averages along an axis of ``n``:
    ``[floor(i n / GRID), ceil((i + 1) n / GRID))``, the cells of area interpolation
    (adaptive average pooling; they overlap by a voxel where ``n`` is no multiple of GRID)."""
    return [((i * n) // GRID, -(-(i + 1) * n // GRID)) for i in range(GRID)]


def _area_average(region: np.ndarray, values, size: list[int], offset: list[int]) -> np.ndarray:
    """``(GRID, GRID, GRID)`` float32: the box of ``size`` voxels averaged down by area, where
    ``region`` is the part of the box inside the image (starting at box index ``offset``) and
    everything outside it counts as 0 (air, no mask, no probability).

    The average is taken one axis at a time (an average over a product of ranges is the
    average of averages), the first axis slab by slab with ``values`` applied to each slab: the
    box itself is never built. At 256 mm it holds 16M voxels per channel on a 1 mm CT and 600M
    on a 0.3 mm one; this needs the image region and a few slabs of it.
    """
    out = region
    for axis, (n, start) in enumerate(zip(size, offset, strict=True)):
        length = out.shape[axis]
        shape = list(out.shape)
        shape[axis] = GRID
        pooled = np.zeros(shape, dtype=np.float32)
        for i, (first, end) in enumerate(_cells(n)):
            lo, hi = max(first - start, 0), min(end - start, length)
            if hi <= lo:
                continue  # the cell lies outside the image: 0
            take = [slice(None)] * 3
            take[axis] = slice(lo, hi)
            slab = out[tuple(take)]
            if axis == 0:
                slab = values(slab)
            put = [slice(None)] * 3
            put[axis] = i
            pooled[tuple(put)] = slab.sum(axis=axis, dtype=np.float32) / (end - first)
        out = pooled
    return out


class QualityEstimator:
    """The trained estimator: predicts the Dice of a mask from (image, mask)."""

    def __init__(self, network: torch.nn.Module, card: dict[str, Any]) -> None:
        self.network = network.eval()
        self.card = card
        self.version = str(card.get("version", "0"))
        #: Input channels the network takes (3: image, mask, probabilities; 2: estimators 1.x).
        self.channels = int((card.get("architecture") or ESTIMATOR_ARCHITECTURE)["in_shape"][0])
        scope = card.get("scope") or DEFAULT_SCOPE
        #: Modalities and structures (segmented property types) it was trained on.
        self.modalities = [str(m).upper() for m in scope["modalities"]]
        self.structures = [Code(*(str(v) for v in code)) for code in scope["structures"]]
        self._lock = threading.Lock()

    def covers(self, label: SegmentLabel, modality: str | None) -> bool:
        """True when the estimator was trained on this structure (matched by its segmented
        property type, SRT equal to SCT) in this modality; a volume of unknown modality (no
        source datasets: a phantom) counts as CT, the modality QC's checks expect."""
        return ((modality or "CT") in self.modalities
                and any(same_concept(label.property_type, code) for code in self.structures))

    def predict_inputs(self, inputs: np.ndarray) -> np.ndarray:
        """Predicted Dice for a batch of :func:`estimator_input` arrays ``(n, channels, GRID, GRID, GRID)``."""
        with self._lock, torch.inference_mode():
            logits = self.network(torch.as_tensor(inputs, dtype=torch.float32))
        return torch.sigmoid(logits).reshape(-1).numpy().astype(np.float64)

    def predict(self, image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float],
                direction: np.ndarray | None = None, probabilities: np.ndarray | None = None) -> float:
        """Predicted Dice of ``mask`` on ``image`` (0.0 for an empty mask); ``probabilities``: the
        model's probability map of the mask's label, None for a mask that came without one."""
        if not mask.any():
            return 0.0
        inputs = estimator_input(image, mask, spacing, direction, probabilities, channels=self.channels)
        return float(self.predict_inputs(inputs[None])[0])


_cache: dict[Path, QualityEstimator] = {}
_cache_lock = threading.Lock()


def load_estimator(folder: Path | None = None) -> QualityEstimator:
    """Load (once per process) the estimator in ``folder`` (default: the shipped one).

    Raises:
        ModelError: The folder lacks ``model.pt`` or ``card.json``, or they do not load.
    """
    folder = Path(folder) if folder is not None else ESTIMATOR_DIR
    with _cache_lock:
        if folder in _cache:
            return _cache[folder]
        card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
        if not card_path.is_file() or not weights_path.is_file():
            raise ModelError(f"QC estimator not found in {folder} (needs {CARD_FILE} and {WEIGHTS_FILE}); "
                             "run `sentinel train-demo qc-estimator`")
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            network = build_estimator_network(card.get("architecture"))
            network.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"cannot load the QC estimator from {folder}: {exc}") from exc
        estimator = QualityEstimator(network, card)
        _cache[folder] = estimator
        log.debug("qc estimator loaded", folder=str(folder), version=estimator.version)
        return estimator


def clear_estimator_cache() -> None:
    """Forget loaded estimators (tests, retraining)."""
    with _cache_lock:
        _cache.clear()


def estimator_signal(predicted_dice: float) -> Signal:
    """The estimator's signal: fires (QC030 "Low predicted Dice") below a predicted Dice of 0.7."""
    subscore = ramp(predicted_dice, PREDICTED_DICE_LOW, PREDICTED_DICE_HIGH)
    return Signal("predicted_dice", float(predicted_dice), subscore, Reason.LOW_PREDICTED_DICE)
