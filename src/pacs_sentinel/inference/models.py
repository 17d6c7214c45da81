"""Segmentation models: the demo 3D U-Net, the model registry and inference on a volume.

A model lives in a folder holding ``model.pt`` (a ``state_dict``) and ``card.json`` (its
machine-readable model card: architecture, preprocessing, labels, metrics and the reference
statistics QC compares results against). The demo models ship in :data:`DEMO_MODELS_DIR`
and are named by specs such as ``"demo:organ-seg"``; a spec may also be a folder path.

Preprocessing is defined once here (:func:`to_canonical`, :func:`resample`,
:func:`scale_intensity`) and used both by :meth:`SegmentationModel.predict` and by the
training code, so that a model always sees at inference what it saw in training.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.errors import ModelError
from pacs_sentinel.results import Code, SegmentationResult, SegmentLabel

log = structlog.get_logger(__name__)

#: Folder of the demo models shipped with the package, one sub-folder per model name.
DEMO_MODELS_DIR = Path(__file__).parent / "demo_models"
WEIGHTS_FILE = "model.pt"
CARD_FILE = "card.json"

#: Architecture of the demo U-Net (keyword arguments of :func:`build_demo_unet`).
DEMO_UNET_KWARGS: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 2,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 1,
    "dropout": 0.1,
}


def build_demo_unet(
    *,
    in_channels: int = 1,
    out_channels: int = 2,
    channels: tuple[int, ...] | list[int] = (8, 16, 32, 64),
    strides: tuple[int, ...] | list[int] = (2, 2, 2),
    num_res_units: int = 1,
    dropout: float = 0.1,
) -> torch.nn.Module:
    """Build the small 3D U-Net of the demo models (MONAI ``UNet``, batch norm, dropout).

    Dropout sits in every residual unit so that Monte Carlo dropout can estimate uncertainty.
    Output channel 0 is background, channel ``i`` is label ``i`` (softmax over channels).
    """
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        dropout=dropout,
    )


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Reorientation:
    """How an array was permuted and flipped into canonical (inferior->superior, anterior->
    posterior, right->left) axis order; :meth:`undo` maps a result back to the source grid."""

    axes: tuple[int, int, int]  # canonical axis i is source axis axes[i]
    flips: tuple[bool, bool, bool]  # flip applied to canonical axis i

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Return ``array`` (``(..., slices, rows, cols)``) in canonical order."""
        lead = array.ndim - 3
        out = np.transpose(array, tuple(range(lead)) + tuple(lead + a for a in self.axes))
        flip_axes = tuple(lead + i for i, f in enumerate(self.flips) if f)
        return np.flip(out, flip_axes) if flip_axes else out

    def undo(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`apply`."""
        lead = array.ndim - 3
        flip_axes = tuple(lead + i for i, f in enumerate(self.flips) if f)
        out = np.flip(array, flip_axes) if flip_axes else array
        inverse = tuple(int(i) for i in np.argsort(self.axes))
        return np.transpose(out, tuple(range(lead)) + tuple(lead + a for a in inverse))


def to_canonical(direction: np.ndarray) -> Reorientation:
    """Find the axis permutation and flips that bring a volume closest to axial LPS order.

    Args:
        direction: 3x3 matrix whose columns are the patient-space directions of the column,
            row and slice indices (:attr:`Volume.direction`).

    Returns:
        The reorientation; identity for a standard axial series.
    """
    direction = np.asarray(direction, dtype=float)
    # Array axis 0 (slices) follows direction column 2, axis 1 (rows) column 1, axis 2 column 0.
    array_dirs = [direction[:, 2], direction[:, 1], direction[:, 0]]
    wanted = [2, 1, 0]  # patient axis (z, y, x) that canonical axes 0, 1, 2 follow
    axes: list[int] = []
    flips: list[bool] = []
    remaining = [0, 1, 2]
    for patient_axis in wanted:
        best = max(remaining, key=lambda a: abs(array_dirs[a][patient_axis]))
        remaining.remove(best)
        axes.append(best)
        flips.append(bool(array_dirs[best][patient_axis] < 0))
    return Reorientation(axes=(axes[0], axes[1], axes[2]), flips=(flips[0], flips[1], flips[2]))


def working_shape(shape: tuple[int, ...], spacing: tuple[float, ...], working_spacing: tuple[float, ...]) -> tuple[int, int, int]:
    """Grid size that covers the same extent as ``shape`` at ``spacing`` at the working spacing."""
    return tuple(max(1, int(round(n * s / w))) for n, s, w in zip(shape, spacing, working_spacing))  # type: ignore[return-value]


def resample(tensor: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resample a ``(batch, channels, d, h, w)`` tensor to ``shape``, keeping its extent.

    Axes shrunk by two or more are first box-averaged (integer factor), so that downsampling
    averages noise instead of aliasing it; the rest is trilinear (``align_corners=False``).
    """
    factors = [max(1, int(src // dst)) for src, dst in zip(tensor.shape[2:], shape)]
    if any(f > 1 for f in factors):
        tensor = F.avg_pool3d(tensor, kernel_size=factors, stride=factors, ceil_mode=True, count_include_pad=False)
    if tuple(tensor.shape[2:]) != tuple(shape):
        tensor = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
    return tensor


def scale_intensity(tensor: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """Clip to the HU ``window`` and scale it to ``[0, 1]``."""
    low, high = window
    return ((tensor.clamp(low, high) - low) / (high - low)).to(torch.float32)


def preprocess_array(array: np.ndarray, spacing: tuple[float, float, float], card: dict[str, Any],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Turn a canonical ``(slices, rows, cols)`` HU array into the network input.

    Returns:
        A ``(1, 1, d, h, w)`` float32 tensor at the card's working spacing, scaled to [0, 1].
    """
    tensor = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32), device=device)[None, None]
    shape = working_shape(array.shape, spacing, tuple(card["spacing_mm"]))
    return scale_intensity(resample(tensor, shape), tuple(card["intensity_window"]))


def preprocess_mask(mask: np.ndarray, spacing: tuple[float, float, float], card: dict[str, Any]) -> torch.Tensor:
    """Bring a canonical ground-truth mask onto the working grid (``(1, 1, d, h, w)``, 0/1)."""
    tensor = torch.as_tensor(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    shape = working_shape(mask.shape, spacing, tuple(card["spacing_mm"]))
    return (resample(tensor, shape) >= 0.5).to(torch.float32)


# --------------------------------------------------------------------------- the model


class SegmentationModel:
    """A loaded segmentation network with its card; :meth:`predict` runs it on a volume.

    Attributes:
        name: Model name (e.g. ``"organ-seg"``).
        version: Version of the weights, from the card.
        labels: One label per foreground output channel.
        card: The parsed ``card.json``.
        device: Where the network runs.
        network: The ``torch`` module, in eval mode.
    """

    def __init__(self, *, name: str, version: str, labels: list[SegmentLabel], card: dict[str, Any],
                 network: torch.nn.Module, device: torch.device) -> None:
        self.name = name
        self.version = version
        self.labels = labels
        self.card = card
        self.device = device
        self.network = network.to(device).eval()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SegmentationModel(name={self.name!r}, version={self.version!r}, device={str(self.device)!r})"

    def network_input(self, array: np.ndarray, spacing: tuple[float, float, float]) -> torch.Tensor:
        """Network input for a canonical HU array (see :func:`preprocess_array`)."""
        return preprocess_array(array, spacing, self.card, self.device)

    def infer_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the network over ``inputs`` with sliding windows of the card's ``roi_size``.

        Runs in whatever train/eval mode the network is in (Monte Carlo dropout sets train).
        """
        with torch.no_grad():
            return sliding_window_inference(
                inputs,
                roi_size=tuple(self.card["roi_size"]),
                sw_batch_size=int(self.card.get("sw_batch_size", 1)),
                predictor=self.network,
                overlap=float(self.card.get("sw_overlap", 0.25)),
                mode="gaussian",
            )

    def predict(self, volume: Volume, *, threshold: float = 0.5) -> SegmentationResult:
        """Segment the volume and return probabilities and masks on its exact grid.

        Args:
            volume: Source series; slice ``i`` of the result is ``volume.datasets[i]``.
            threshold: Probability at or above which a voxel is in the mask.

        Returns:
            ``probabilities`` (float32) and ``mask`` (bool), both
            ``(labels, slices, rows, cols)``, with the card's reference statistics.

        Raises:
            ModelError: The volume is empty or the network fails.
        """
        started = time.perf_counter()
        if volume.array.ndim != 3 or volume.array.size == 0:
            raise ModelError(f"model {self.name}: cannot segment an array of shape {volume.array.shape}")
        reorientation = to_canonical(volume.direction)
        array = reorientation.apply(volume.array)
        spacing = tuple(float(volume.spacing[a]) for a in reorientation.axes)
        try:
            with self._lock:
                logits = self.infer_logits(self.network_input(array, spacing))  # type: ignore[arg-type]
            probs = torch.softmax(logits, dim=1)[:, 1:]
            probs = F.interpolate(probs, size=array.shape, mode="trilinear", align_corners=False)
        except RuntimeError as exc:
            raise ModelError(f"model {self.name} failed on a {volume.array.shape} volume: {exc}") from exc
        probabilities = reorientation.undo(probs[0].clamp(0, 1).cpu().numpy().astype(np.float32))
        probabilities = np.ascontiguousarray(probabilities)
        seconds = time.perf_counter() - started
        log.debug("segmentation done", model=self.name, shape=volume.array.shape, seconds=round(seconds, 3))
        return SegmentationResult(
            probabilities=probabilities,
            mask=probabilities >= threshold,
            labels=list(self.labels),
            model_name=self.name,
            model_version=self.version,
            seconds=seconds,
            reference={k: dict(v) for k, v in self.card.get("reference", {}).items()},
        )


def labels_from_card(card: dict[str, Any]) -> list[SegmentLabel]:
    """The segment labels a card declares (``labels``: name, category, type, tracking id)."""
    labels = []
    for entry in card["labels"]:
        labels.append(
            SegmentLabel(
                name=entry["name"],
                property_category=Code(*entry["property_category"]),
                property_type=Code(*entry["property_type"]),
                tracking_id=entry["tracking_id"],
            )
        )
    return labels


# --------------------------------------------------------------------------- registry

_cache: dict[tuple[str, str], SegmentationModel] = {}
_cache_lock = threading.Lock()


def resolve_model_dir(spec: str) -> Path:
    """The folder a spec names: ``demo:<name>`` is a shipped demo model, else a folder path.

    Raises:
        ModelError: Unknown demo name.
    """
    if spec.startswith("demo:"):
        name = spec.removeprefix("demo:")
        known = sorted(p.name for p in DEMO_MODELS_DIR.iterdir() if p.is_dir()) if DEMO_MODELS_DIR.is_dir() else []
        if name not in known:
            raise ModelError(f"unknown demo model {spec!r}; known demo models: {', '.join(known) or 'none'}")
        return DEMO_MODELS_DIR / name
    return Path(spec).expanduser()


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; any other value is given to ``torch``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"invalid device {device!r}: {exc}") from exc


def load_model_dir(model_dir: Path, device: torch.device, *, spec: str | None = None) -> SegmentationModel:
    """Load a model folder (``card.json`` + ``model.pt``) without caching.

    Raises:
        ModelError: Missing or unreadable card or weights, or weights that do not fit.
    """
    what = spec or str(model_dir)
    card_path = model_dir / CARD_FILE
    weights_path = model_dir / WEIGHTS_FILE
    if not card_path.is_file():
        raise ModelError(f"model {what}: no model card at {card_path}")
    if not weights_path.is_file():
        hint = f" (run `sentinel train-demo {model_dir.name}`)" if spec and spec.startswith("demo:") else ""
        raise ModelError(f"model {what}: no weights at {weights_path}{hint}")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        labels = labels_from_card(card)
        network = build_demo_unet(**card["architecture"])
        for key in ("spacing_mm", "intensity_window", "roi_size", "version", "name"):
            if key not in card:
                raise KeyError(key)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"model {what}: invalid model card {card_path}: {exc!r}") from exc
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except Exception as exc:  # torch raises many types for a corrupt or mismatched file
        raise ModelError(f"model {what}: cannot load weights {weights_path}: {exc}") from exc
    return SegmentationModel(name=card["name"], version=str(card["version"]), labels=labels, card=card,
                             network=network, device=device)


def load_segmentation_model(spec: str, *, device: str = "auto") -> SegmentationModel:
    """Return the model a spec names, loading its weights once per process and device.

    Args:
        spec: ``"demo:<name>"`` for a shipped demo model, or a folder with ``card.json`` and
            ``model.pt``.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda:0"``...

    Returns:
        The loaded model, shared by every caller asking for the same spec and device.

    Raises:
        ModelError: Unknown spec, missing or broken card or weights.
    """
    torch_device = resolve_device(device)
    key = (spec, str(torch_device))
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            model = load_model_dir(resolve_model_dir(spec), torch_device, spec=spec)
            _cache[key] = model
            log.info("model loaded", spec=spec, version=model.version, device=str(torch_device))
        return model


def clear_model_cache() -> None:
    """Forget every loaded model (tests; after retraining in the same process)."""
    with _cache_lock:
        _cache.clear()
