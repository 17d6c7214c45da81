"""Segmentation models: the demo 3D U-Net, the model registry and inference on a volume.

A spec names a model source (:mod:`pacs_sentinel.inference.sources`): ``"demo:<name>"`` (a
shipped demo model), a MONAI bundle folder, a TorchScript file with a sidecar JSON, or a card
folder (``card.json`` + ``model.pt``). :func:`load_segmentation_model` loads each spec once per
process and device and keeps it warm.

:meth:`SegmentationModel.predict` runs the MONAI preprocessing
(:mod:`pacs_sentinel.inference.preprocess`: orientation, spacing, intensity window),
sliding-window inference, optional uncertainty samples
(:mod:`pacs_sentinel.inference.uncertainty`) and the exact inverse back to the source grid.
Training uses the same preprocessing (:func:`preprocess_array`, :func:`preprocess_mask`), so
that a model always sees at inference what it saw in training.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import structlog
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.errors import ModelError
from pacs_sentinel.inference.preprocess import ModelGeometry, Prepared, Preprocessor, identity_volume
from pacs_sentinel.inference.sources import (
    CARD_DEFAULT_ORIENTATION,
    CARD_FILE,
    DEMO_MODELS_DIR,
    WEIGHTS_FILE,
    ModelDefinition,
    labels_from_entries,
    load_definition,
    resolve_spec,
)
from pacs_sentinel.inference.uncertainty import as_uncertainty, draw_samples
from pacs_sentinel.results import SegmentationResult, SegmentLabel

log = structlog.get_logger(__name__)

__all__ = [
    "CARD_FILE", "DEMO_MODELS_DIR", "DEMO_UNET_KWARGS", "WEIGHTS_FILE", "SegmentationModel",
    "build_demo_unet", "clear_model_cache", "geometry_from_card", "labels_from_card", "load_segmentation_model",
    "preprocess_array", "preprocess_mask", "resolve_device",
]

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


def geometry_from_card(card: dict[str, Any]) -> ModelGeometry:
    """The geometry a model card declares (orientation defaults to the demo models' ``"SPL"``)."""
    return ModelGeometry(
        axcodes=str(card.get("orientation", CARD_DEFAULT_ORIENTATION)),
        spacing_mm=tuple(float(v) for v in card["spacing_mm"]),  # type: ignore[arg-type]
        intensity_window=tuple(float(v) for v in card["intensity_window"]),  # type: ignore[arg-type]
        roi_size=tuple(int(v) for v in card["roi_size"]),  # type: ignore[arg-type]
        sw_batch_size=int(card.get("sw_batch_size", 1)),
        sw_overlap=float(card.get("sw_overlap", 0.25)),
    )


def labels_from_card(card: dict[str, Any]) -> list[SegmentLabel]:
    """The segment labels a card declares (``labels``: name, category, type, tracking id)."""
    return labels_from_entries(card["labels"], "softmax")[0]


# --------------------------------------------------------------------------- preprocessing for training


def preprocess_array(array: np.ndarray, spacing: tuple[float, float, float], card: dict[str, Any],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The network input for an axial ``(slices, rows, cols)`` HU array, as :meth:`predict` makes it.

    Returns:
        A ``(1, 1, d, h, w)`` float32 tensor on the card's working grid.
    """
    volume = identity_volume(np.asarray(array, dtype=np.float32), spacing)
    return Preprocessor(geometry_from_card(card)).forward(volume, device).image


def preprocess_mask(mask: np.ndarray, spacing: tuple[float, float, float], card: dict[str, Any]) -> torch.Tensor:
    """Bring an axial ground-truth mask onto the working grid (``(1, 1, d, h, w)``, 0/1)."""
    geometry = geometry_from_card(card)
    unscaled = ModelGeometry(axcodes=geometry.axcodes, spacing_mm=geometry.spacing_mm, roi_size=geometry.roi_size)
    volume = identity_volume(np.asarray(mask, dtype=np.float32), spacing)
    return (Preprocessor(unscaled).forward(volume).image >= 0.5).to(torch.float32)


# --------------------------------------------------------------------------- the model


class SegmentationModel:
    """A loaded segmentation network with its geometry; :meth:`predict` runs it on a volume.

    Attributes:
        name: Model name (e.g. ``"organ-seg"``).
        version: Version of the weights.
        labels: One label per foreground output.
        channels: Output channel of each label.
        card: A card-like description (the demo ``card.json`` as is).
        geometry: Orientation, spacing, intensity window and window size the network expects.
        reference: Reference statistics per label name, for QC.
        device: Where the network runs.
        mixed_precision: Run forward passes in float16 autocast (CUDA only).
        network: The ``torch`` module, in eval mode.
    """

    def __init__(self, *, name: str, version: str, labels: list[SegmentLabel], card: dict[str, Any],
                 network: torch.nn.Module, device: torch.device, geometry: ModelGeometry | None = None,
                 channels: list[int] | None = None, reference: dict[str, dict[str, float]] | None = None,
                 mixed_precision: bool = False) -> None:
        self.name = name
        self.version = version
        self.labels = labels
        self.card = card
        self.geometry = geometry or geometry_from_card(card)
        self.channels = channels or list(range(1, len(labels) + 1))
        self.reference = reference if reference is not None else {k: dict(v) for k, v in card.get("reference", {}).items()}
        self.device = torch.device(device)
        self.mixed_precision = bool(mixed_precision)
        self.network = network.to(self.device).eval()
        self.preprocessor = Preprocessor(self.geometry)
        self._lock = threading.Lock()

    @classmethod
    def from_definition(cls, definition: ModelDefinition, device: torch.device, *,
                        mixed_precision: bool = False) -> SegmentationModel:
        """Wrap a loaded :class:`~pacs_sentinel.inference.sources.ModelDefinition`."""
        return cls(name=definition.name, version=definition.version, labels=definition.labels, card=definition.card,
                   network=definition.network, device=device, geometry=definition.geometry,
                   channels=definition.channels, reference=definition.reference, mixed_precision=mixed_precision)

    def __repr__(self) -> str:
        return f"SegmentationModel(name={self.name!r}, version={self.version!r}, device={str(self.device)!r})"

    def with_mixed_precision(self, enabled: bool) -> SegmentationModel:
        """This model with another precision setting, sharing the loaded network and its lock."""
        if bool(enabled) == self.mixed_precision:
            return self
        other = copy.copy(self)
        other.mixed_precision = bool(enabled)
        return other

    # ---------------------------------------------------------------- stages

    def prepare(self, volume: Volume) -> Prepared:
        """Preprocess ``volume`` onto the working grid (see :mod:`~pacs_sentinel.inference.preprocess`).

        Raises:
            ModelError: The volume is empty or cannot be transformed.
        """
        if volume.array.ndim != 3 or volume.array.size == 0:
            raise ModelError(f"model {self.name}: cannot segment an array of shape {volume.array.shape}")
        try:
            return self.preprocessor.forward(volume, self.device)
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"model {self.name}: cannot preprocess a {volume.array.shape} volume: {exc}") from exc

    def probabilities(self, inputs: torch.Tensor, *, sw_overlap: float | None = None) -> torch.Tensor:
        """Label probabilities of a ``(batch, 1, *grid)`` input by sliding-window inference.

        Runs in whatever train/eval mode the network is in (MC dropout switches dropout on).
        All batch items go through each window in one forward pass.

        Returns:
            float32 ``(batch, labels, *grid)`` probabilities on the model's device.
        """
        overlap = self.geometry.sw_overlap if sw_overlap is None else float(sw_overlap)
        autocast = (torch.autocast("cuda", dtype=torch.float16)
                    if self.mixed_precision and self.device.type == "cuda" else nullcontext())
        with torch.no_grad(), autocast:
            logits = sliding_window_inference(
                inputs,
                roi_size=self.geometry.roi_size,
                sw_batch_size=self.geometry.sw_batch_size * int(inputs.shape[0]),
                predictor=self.network,
                overlap=overlap,
                mode="gaussian",
            )
        logits = logits.float()
        probs = torch.softmax(logits, dim=1) if self.geometry.activation == "softmax" else torch.sigmoid(logits)
        if max(self.channels) >= probs.shape[1]:
            raise ModelError(f"model {self.name}: the network gives {probs.shape[1]} output channels, "
                             f"labels need channel {max(self.channels)}")
        return probs[:, self.channels].clamp(0, 1)

    def predict(self, volume: Volume, *, threshold: float = 0.5, mc_dropout_samples: int = 0,
                tta_flips: Sequence[str] = (), sw_overlap: float | None = None) -> SegmentationResult:
        """Segment the volume and return probabilities and masks on its exact grid.

        Args:
            volume: Source series; slice ``i`` of the result is ``volume.datasets[i]``.
            threshold: Probability at or above which a voxel is in the mask.
            mc_dropout_samples: Monte Carlo dropout samples (0: none). A network without
                dropout layers gives none (logged).
            tta_flips: Patient axes (``"x"``, ``"y"``, ``"z"``) to mirror for test-time
                augmentation, one sample each.
            sw_overlap: Sliding-window overlap; default the model's.

        Returns:
            ``probabilities`` (float32) and ``mask`` (bool), both ``(labels, slices, rows,
            cols)`` on the source grid; ``uncertainty`` (working grid) when samples were asked
            for, else None; ``timing`` in seconds for ``preprocess``, ``forward``, ``samples``
            and ``inverse``.

        Raises:
            ModelError: The volume is empty, a flip axis is unknown, or the network fails.
        """
        started = time.perf_counter()
        prepared = self.prepare(volume)
        timing = {"preprocess": time.perf_counter() - started}
        try:
            with self._lock:
                mark = time.perf_counter()
                deterministic = self.probabilities(prepared.image, sw_overlap=sw_overlap)[0]
                self._synchronize()
                timing["forward"] = time.perf_counter() - mark
                mark = time.perf_counter()
                samples, kinds = draw_samples(
                    lambda batch: self.probabilities(batch, sw_overlap=sw_overlap), self.network, prepared.image,
                    self.geometry, mc_dropout_samples=mc_dropout_samples, tta_flips=tta_flips)
                self._synchronize()
                timing["samples"] = time.perf_counter() - mark
            if mc_dropout_samples > 0 and kinds.count("mc-dropout") == 0:
                log.warning("model has no dropout layer; no MC dropout samples", model=self.name)
            uncertainty = None
            if kinds:
                uncertainty = as_uncertainty(samples, kinds, deterministic, threshold, prepared.spacing_mm,
                                             timing["samples"])
            mark = time.perf_counter()
            probabilities = self.preprocessor.inverse(deterministic, prepared).clamp(0, 1).cpu().numpy()
            timing["inverse"] = time.perf_counter() - mark
        except ValueError as exc:
            raise ModelError(f"model {self.name}: {exc}") from exc
        except RuntimeError as exc:
            raise ModelError(f"model {self.name} failed on a {volume.array.shape} volume: {exc}") from exc
        probabilities = np.ascontiguousarray(probabilities, dtype=np.float32)
        seconds = time.perf_counter() - started
        log.debug("segmentation done", model=self.name, shape=volume.array.shape, seconds=round(seconds, 3),
                  samples=len(kinds))
        return SegmentationResult(
            probabilities=probabilities,
            mask=probabilities >= threshold,
            labels=list(self.labels),
            model_name=self.name,
            model_version=self.version,
            seconds=seconds,
            reference={k: dict(v) for k, v in self.reference.items()},
            uncertainty=uncertainty,
            timing=timing,
        )

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --------------------------------------------------------------------------- registry

_cache: dict[tuple[str, str], SegmentationModel] = {}
_cache_lock = threading.Lock()


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; any other value is given to ``torch``.

    Raises:
        ModelError: An invalid device name, or CUDA asked for where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"invalid device {device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r}: CUDA is not available on this machine")
    return resolved


def load_segmentation_model(spec: str, *, device: str = "auto", mixed_precision: bool = True) -> SegmentationModel:
    """Return the model a spec names, loading its weights once per process and device.

    Args:
        spec: ``"demo:<name>"``, a MONAI bundle folder, a TorchScript file with a sidecar JSON,
            or a card folder (see :mod:`pacs_sentinel.inference.sources`).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        mixed_precision: float16 autocast in forward passes; only takes effect on CUDA.

    Returns:
        The loaded model; callers asking for the same resolved spec and device share its
        network (a different ``mixed_precision`` gives a view on the same weights).

    Raises:
        ModelError: Unknown spec, missing or broken model files (the message names the path),
            or an unavailable device.
    """
    torch_device = resolve_device(device)
    key = (str(resolve_spec(spec)), str(torch_device))
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            model = SegmentationModel.from_definition(load_definition(spec), torch_device,
                                                      mixed_precision=mixed_precision)
            _cache[key] = model
            log.info("model loaded", spec=spec, version=model.version, device=str(torch_device))
    return model.with_mixed_precision(mixed_precision)


def clear_model_cache() -> None:
    """Forget every loaded model (tests; after retraining in the same process)."""
    with _cache_lock:
        _cache.clear()
