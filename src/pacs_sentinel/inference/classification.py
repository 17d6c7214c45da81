"""Multi-label classification of 2D images: the demo DenseNet-121, loading, prediction,
calibration and Grad-CAM.

A classification model lives in a folder holding ``model.pt`` (a ``state_dict``, float16 or
float32) and ``card.json`` (``"task": "classification"``: architecture, input size, labels with
their codes, decision thresholds, the calibration temperature, training recipe, held-out
metrics and the reference statistics QC compares results against). The demo model ships in
``demo_models/cxr-cls`` and is named ``"demo:cxr-cls"``.

Preprocessing is defined once (:func:`preprocess_image`) and used both by
:meth:`ClassificationModel.predict` and by training (:mod:`pacs_sentinel.inference.train_cxr`):
resize to the card's input size (bilinear with anti-aliasing, aspect ratio not kept, as
CheXNet-style models do), then map the 1st..99th intensity percentiles to [0, 1]. The model is
therefore indifferent to the stored value range, bit depth and window of the image.

Outputs are ``sigmoid(logits / T)`` with the temperature ``T`` fitted on a held-out
calibration split (temperature scaling, Guo et al. 2017); the thresholds and ``T`` come from
the card.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import structlog
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121
from monai.visualize import GradCAM
from pydicom.pixels import apply_modality_lut

from pacs_sentinel.dicom_io.series import rescale
from pacs_sentinel.errors import DecodeError, ModelError, SeriesError
from pacs_sentinel.inference.models import resolve_device
from pacs_sentinel.inference.sources import card_folder_files, resolve_spec
from pacs_sentinel.inference.uncertainty import mc_dropout
from pacs_sentinel.results import ClassificationResult, Code, FindingLabel

log = structlog.get_logger(__name__)

#: Architecture of the demo classifier: MONAI DenseNet-121 (block layout 6-12-24-16) with a
#: narrower growth rate and stem than the ImageNet model (1.8 M instead of 7 M parameters),
#: dropout in every dense layer so that Monte Carlo dropout can estimate uncertainty.
DEMO_DENSENET_KWARGS: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 3,
    "init_features": 32,
    "growth_rate": 16,
    "block_config": [6, 12, 24, 16],
    "dropout_prob": 0.1,
}
#: Network input (rows, cols) of the demo model.
DEMO_INPUT_SIZE = (128, 128)
#: Intensity percentiles mapped to 0 and 1.
DEMO_PERCENTILES = (1.0, 99.0)
#: Layer whose activations and gradients Grad-CAM weighs (MONAI DenseNet names).
DEMO_GRADCAM_LAYER = "class_layers.relu"
#: PatientOrientation of the demo radiographs (PA chest as displayed: rows to the patient's left, columns to the feet).
DEMO_ORIENTATION = ("L", "F")
#: Test-time flips a 2D model understands; ``"z"`` (valid for 3D pipelines) is ignored.
FLIP_DIMS = {"x": -1, "y": -2}

#: The patient axis each PatientOrientation letter runs along.
_AXIS = {"L": "x", "R": "x", "A": "y", "P": "y", "H": "z", "F": "z"}


@dataclass(frozen=True)
class Turn:
    """How to turn a stored image into the orientation a model was trained on: transpose first,
    then flip the rows (up-down) and / or the columns (left-right)."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def identity(self) -> bool:
        """Nothing to turn."""
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def apply(self, image: np.ndarray) -> np.ndarray:
        out = image.T if self.transpose else image
        if self.flip_rows:
            out = out[::-1]
        if self.flip_cols:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)

    def undo(self, image: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`apply` (a map on the turned grid back onto the stored one)."""
        out = image[:, ::-1] if self.flip_cols else image
        if self.flip_rows:
            out = out[::-1]
        return np.ascontiguousarray(out.T if self.transpose else out)


def _directions(value: Any) -> tuple[str, str] | None:
    """The dominant patient direction of the rows and of the columns of a PatientOrientation
    value (``["L", "F"]``, ``"L\\F"``, ``["LP", "FL"]``...); None when it cannot be read."""
    if value is None:
        return None
    parts = str(value).split("\\") if isinstance(value, str) else [str(v) for v in value]
    if len(parts) != 2:
        return None
    letters = [part.strip().upper()[:1] for part in parts]
    if any(letter not in _AXIS for letter in letters) or _AXIS[letters[0]] == _AXIS[letters[1]]:
        return None
    return letters[0], letters[1]


def orientation_turn(stored: Any, wanted: Any) -> Turn | None:
    """The turn that brings an image stored with PatientOrientation ``stored`` into ``wanted``
    (both as in (0020,0020): the direction of the rows, then of the columns).

    Returns:
        The turn (possibly the identity), or None when either value is missing or unreadable, or
        the two lie in different planes (a lateral view for a model of frontal views): such an
        image is classified as stored.
    """
    have, want = _directions(stored), _directions(wanted)
    if have is None or want is None:
        return None
    row, col = have
    transpose = False
    if _AXIS[row] == _AXIS[want[1]] and _AXIS[col] == _AXIS[want[0]]:
        transpose, row, col = True, col, row  # after transposing, the rows run the old columns' way
    if _AXIS[row] != _AXIS[want[0]] or _AXIS[col] != _AXIS[want[1]]:
        return None
    return Turn(transpose=transpose, flip_rows=col != want[1], flip_cols=row != want[0])


#: Normalised values are clipped to this range (outliers such as metal do not dominate).
_CLIP = (-1.0, 2.0)


def build_classifier(**kwargs: Any) -> torch.nn.Module:
    """Build a MONAI ``DenseNet121`` from card architecture keyword arguments."""
    arch = dict(kwargs)
    if "block_config" in arch:
        arch["block_config"] = tuple(arch["block_config"])
    return DenseNet121(**arch)


# --------------------------------------------------------------------------- preprocessing


def preprocess_image(image: np.ndarray | torch.Tensor, input_size: Sequence[int] = DEMO_INPUT_SIZE,
                     percentiles: Sequence[float] = DEMO_PERCENTILES) -> torch.Tensor:
    """Turn a 2D image (any value range) into the network input.

    Args:
        image: ``(rows, cols)`` array.
        input_size: Network input ``(rows, cols)``.
        percentiles: Low and high percentile mapped to 0 and 1 (after resizing).

    Returns:
        A ``(1, 1, *input_size)`` float32 tensor; a flat image gives zeros.
    """
    tensor = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
    size = (int(input_size[0]), int(input_size[1]))
    if tuple(tensor.shape[2:]) != size:
        tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
    q = torch.tensor([percentiles[0] / 100.0, percentiles[1] / 100.0])
    low, high = torch.quantile(tensor.flatten(), q)
    span = float(high - low)
    if not np.isfinite(span) or span <= 1e-6:
        return torch.zeros_like(tensor)
    return ((tensor - low) / span).clamp(*_CLIP)


#: Padding is cropped only while at least this share of each dimension remains (a nearly blank
#: image is left as it is, for the image checks to judge).
MIN_KEPT_AFTER_PADDING = 0.5


def without_padding(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``image`` without its padding: the rows and columns along its edges that hold one
    single value, the same on every side (a black or white border a modality or a PACS added
    around the exposed area, declared as Pixel Padding Value or not). A model resizes the whole
    array to its input, so a border would shrink the anatomy and add an edge no training image had.

    Returns:
        The cropped view and ``(top, bottom, left, right)``: how many rows and columns were cut.
    """
    rows, cols = image.shape
    value = image[0, 0]
    top, bottom, left, right = 0, rows, 0, cols
    while top < bottom and np.all(image[top, left:right] == value):
        top += 1
    while bottom > top and np.all(image[bottom - 1, left:right] == value):
        bottom -= 1
    while left < right and np.all(image[top:bottom, left] == value):
        left += 1
    while right > left and np.all(image[top:bottom, right - 1] == value):
        right -= 1
    if bottom - top < MIN_KEPT_AFTER_PADDING * rows or right - left < MIN_KEPT_AFTER_PADDING * cols:
        return image, (0, 0, 0, 0)
    return image[top:bottom, left:right], (top, rows - bottom, left, cols - right)


def image_from_dataset(ds: pydicom.Dataset, *, frame: int | None = None) -> np.ndarray:
    """The image of a single-frame grayscale dataset (DX, CR, CT, MR...) in modality units.

    The Modality LUT (rescale slope/intercept or LUT sequence) is applied; a MONOCHROME1 image
    is inverted over its possible value range so that, as in MONOCHROME2, higher is brighter.

    Args:
        ds: The dataset, with pixel data.
        frame: Frame index of a multi-frame dataset; None requires a single frame.

    Returns:
        A float32 ``(rows, cols)`` array.

    Raises:
        SeriesError: Not a 2D grayscale image (colour, several frames without ``frame``), or a
            rescale slope/intercept that is no number.
        DecodeError: Missing or undecodable pixel data.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError(f"instance {ds.get('SOPInstanceUID', '?')} has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesError(f"instance {ds.get('SOPInstanceUID', '?')} is a colour image "
                          f"({ds.get('PhotometricInterpretation', '?')}); classification needs grayscale")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and frame is None:
        raise SeriesError(f"instance {ds.get('SOPInstanceUID', '?')} has {frames} frames; name the frame to classify")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for unsupported or corrupt pixel data
        raise DecodeError(f"cannot decode pixel data of {ds.get('SOPInstanceUID', '?')}: {exc}") from exc
    if frames > 1:
        if not 0 <= int(frame or 0) < frames:
            raise SeriesError(f"frame {frame} out of range 0..{frames - 1}")
        pixels = pixels[int(frame or 0)]
    if pixels.ndim != 2:
        raise SeriesError(f"instance {ds.get('SOPInstanceUID', '?')}: pixel array of shape {pixels.shape} is not 2D")
    if "ModalityLUTSequence" not in ds:
        rescale(ds)  # a slope or intercept that is no number: a clear SeriesError, not numpy's TypeError
    image = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 16))
        if int(ds.get("PixelRepresentation", 0)) == 1:
            stored_range = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
        else:
            stored_range = np.array([0, 2**bits - 1])
        ends = np.asarray(apply_modality_lut(stored_range, ds), dtype=np.float64)
        image = (float(ends.min()) + float(ends.max()) - image).astype(np.float32)
    return np.ascontiguousarray(image)


# --------------------------------------------------------------------------- calibration


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, max_iter: int = 200) -> float:
    """Fit one temperature ``T`` minimising the binary NLL of ``sigmoid(logits / T)``.

    Args:
        logits: ``(cases, labels)`` raw logits of a held-out calibration split.
        labels: 0/1 array of the same shape.
        max_iter: LBFGS iterations.

    Returns:
        ``T`` (> 0); > 1 softens an over-confident model.
    """
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.exp().item())


# --------------------------------------------------------------------------- the model


def _set_dropout(network: torch.nn.Module, active: bool) -> None:
    """Switch only the dropout layers to train (sampling) mode; batch norm stays in eval."""
    for module in network.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.train(active)


def _scale_maps(maps: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Resize ``(n, 1, h, w)`` Grad-CAM maps to ``shape`` and min-max each into [0, 1]."""
    maps = F.interpolate(maps.float(), size=shape, mode="bilinear", align_corners=False)[:, 0]
    flat = maps.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1)
    span = (flat.max(1).values.view(-1, 1, 1) - low)
    scaled = torch.where(span > 1e-12, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))
    return scaled.clamp(0, 1).cpu().numpy().astype(np.float32)


#: The model folder file of :class:`FeatureStatistics` (named by the card's ``feature_statistics``).
FEATURE_STATISTICS_FILE = "feature_statistics.npz"


def last_linear(network: torch.nn.Module) -> torch.nn.Linear:
    """The network's last linear layer, whose input is the pooled image features.

    Raises:
        ModelError: The network has no linear layer.
    """
    linears = [module for module in network.modules() if isinstance(module, torch.nn.Linear)]
    if not linears:
        raise ModelError("the network has no linear layer: no pooled features to compare")
    return linears[-1]


@contextlib.contextmanager
def pooled_features(network: torch.nn.Module) -> Iterator[list[np.ndarray]]:
    """Collect the input of the network's last linear layer (``(batch, features)`` float64)
    of every forward pass inside the block; an empty list for a network without one."""
    collected: list[np.ndarray] = []
    try:
        layer = last_linear(network)
    except ModelError:
        yield collected
        return
    handle = layer.register_forward_pre_hook(
        lambda _module, args: collected.append(args[0].detach().float().cpu().numpy().astype(np.float64)))
    try:
        yield collected
    finally:
        handle.remove()


@dataclass(frozen=True)
class FeatureStatistics:
    """Where the training images lie in the network's feature space, to tell an input unlike
    them (an inverted, rotated, cropped or blurred radiograph, another body part).

    The Mahalanobis distance of an image's pooled features (the input of the last linear
    layer) from their mean over the training images, with a covariance shrunk towards its
    average variance; the QC signal ramps from ``low`` (nothing unusual: a high percentile of
    the validation images' distances) to ``high``.

    Attributes:
        mean: ``(features,)``.
        precision: Inverse of the shrunk covariance, ``(features, features)``.
        low: Distance at and below which an input is as familiar as the validation images.
        high: Distance at and above which it is unlike anything trained on.
    """

    mean: np.ndarray
    precision: np.ndarray
    low: float
    high: float

    @property
    def limits(self) -> tuple[float, float]:
        return self.low, self.high

    def distance(self, features: np.ndarray) -> float:
        """Mahalanobis distance of one image's pooled features."""
        delta = np.asarray(features, dtype=np.float64).reshape(-1) - self.mean
        return float(math.sqrt(max(0.0, float(delta @ self.precision @ delta))))

    @classmethod
    def fit(cls, train: np.ndarray, validation: np.ndarray, *, shrinkage: float, low_quantile: float,
            high_factor: float) -> FeatureStatistics:
        """Fit on the training images' features ``(n, features)``; ``low`` is the
        ``low_quantile`` of the validation images' distances, ``high`` is ``high_factor`` times it."""
        train = np.asarray(train, dtype=np.float64)
        mean = train.mean(axis=0)
        covariance = np.cov(train - mean, rowvar=False)
        dims = covariance.shape[0]
        shrunk = (1.0 - shrinkage) * covariance + shrinkage * float(np.trace(covariance)) / dims * np.eye(dims)
        provisional = cls(mean, np.linalg.inv(shrunk), 0.0, 1.0)
        low = float(np.quantile([provisional.distance(f) for f in np.asarray(validation, dtype=np.float64)],
                                low_quantile))
        return cls(mean, provisional.precision, float(low), float(low * high_factor))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, mean=self.mean.astype(np.float32), precision=self.precision.astype(np.float32),
                            limits=np.array([self.low, self.high]))

    @classmethod
    def load(cls, path: Path) -> FeatureStatistics:
        with np.load(path) as data:
            mean, precision, limits = data["mean"], data["precision"], data["limits"]
        if mean.ndim != 1 or precision.shape != (mean.size, mean.size) or limits.shape != (2,) \
                or not 0 < float(limits[0]) < float(limits[1]):
            raise ValueError(f"{path.name}: mean {mean.shape}, precision {precision.shape}, limits {limits.tolist()}")
        return cls(mean.astype(np.float64), precision.astype(np.float64), float(limits[0]), float(limits[1]))


class ClassificationModel:
    """A loaded multi-label classifier with its card; :meth:`predict` runs it on one image.

    Attributes:
        name: Model name (e.g. ``"cxr-cls"``).
        version: Version of the weights.
        labels: One finding per output.
        card: The parsed ``card.json``.
        device: Where the network runs.
        temperature: Logits are divided by it before the sigmoid.
        thresholds: Decision threshold per label.
        network: The ``torch`` module, in eval mode.
    """

    def __init__(self, *, name: str, version: str, labels: list[FindingLabel], card: dict[str, Any],
                 network: torch.nn.Module, device: torch.device, mixed_precision: bool = True) -> None:
        self.name = name
        self.version = version
        self.labels = labels
        self.card = card
        self.device = device
        self.temperature = float(card.get("temperature", 1.0))
        self.thresholds = np.asarray(card.get("thresholds", [0.5] * len(labels)), dtype=np.float64)
        self.input_size = tuple(int(n) for n in card.get("input_size", DEMO_INPUT_SIZE))
        self.percentiles = tuple(float(p) for p in card.get("intensity_percentiles", DEMO_PERCENTILES))
        #: PatientOrientation the model was trained on (None: images are classified as stored).
        self.orientation = card.get("patient_orientation")
        self.mixed_precision = bool(mixed_precision) and device.type == "cuda"
        self.network = network.to(device).eval()
        self._gradcam: GradCAM | None = None
        self._lock = threading.Lock()
        #: The training images' pooled features (:class:`FeatureStatistics`), None when the
        #: folder ships none: the input's distance from them is then not measured.
        self.feature_statistics: FeatureStatistics | None = None

    def __repr__(self) -> str:
        return f"ClassificationModel(name={self.name!r}, version={self.version!r}, device={str(self.device)!r})"

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """The ``(1, 1, rows, cols)`` network input of an image (:func:`preprocess_image`)."""
        return preprocess_image(image, self.input_size, self.percentiles).to(self.device)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Raw float32 logits ``(batch, labels)`` of preprocessed inputs, without gradients.

        Runs in whatever mode the dropout layers are in (Monte Carlo dropout sets train).
        """
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.mixed_precision):
            return self.network(inputs).float()

    def calibrate(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """``sigmoid(logits / temperature)`` as float64."""
        z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
        return torch.sigmoid(z / self.temperature).numpy()

    def _gradcam_maps(self, inputs: torch.Tensor, indices: list[int], shape: tuple[int, int]) -> dict[int, np.ndarray]:
        """Grad-CAM of each label in ``indices`` in one batched forward/backward pass."""
        if self._gradcam is None:
            layer = str(self.card.get("gradcam_layer", DEMO_GRADCAM_LAYER))
            try:
                cam = GradCAM(nn_module=self.network, target_layers=layer,
                              upsampler=lambda _size: (lambda x: x), postprocessing=lambda x: x)
            except (AttributeError, KeyError, ValueError) as exc:
                raise ModelError(f"model {self.name}: no Grad-CAM layer {layer!r}: {exc}") from exc
            # One copy of the image per finding, each scoring its own finding's logit.
            cam.nn_module.class_score = lambda logits, idx: logits.gather(1, idx.view(-1, 1)).squeeze(1)  # type: ignore[method-assign]
            self._gradcam = cam
        batch = inputs.expand(len(indices), *inputs.shape[1:]).contiguous()
        index = torch.as_tensor(indices, device=inputs.device)
        with torch.enable_grad():
            maps = self._gradcam(batch, class_idx=index)
        self.network.zero_grad(set_to_none=True)
        return dict(zip(indices, _scale_maps(maps.detach(), shape)))

    def predict(
        self,
        image: np.ndarray,
        pixel_spacing: tuple[float, float] | None = None,
        *,
        mc_dropout_samples: int = 0,
        tta_flips: Sequence[str] = (),
        gradcam: bool = True,
        patient_orientation: Any = None,
    ) -> ClassificationResult:
        """Classify one 2D image.

        Args:
            image: ``(rows, cols)`` image in any value range, brighter = denser
                (:func:`image_from_dataset` gives it for a DICOM instance).
            pixel_spacing: Row and column spacing in mm; the demo model resizes every image
                to its input size, so it is only logged.
            mc_dropout_samples: Number of Monte Carlo dropout passes (batched into one forward
                pass); 0 disables them.
            tta_flips: Test-time flips, ``"x"`` (left-right) and/or ``"y"`` (up-down), one
                deterministic sample each; ``"z"`` is ignored for 2D images. The demo model was
                trained with left-right flips only, so ``"y"`` samples are out of distribution
                by design.
            gradcam: Compute a Grad-CAM map for every positive finding.
            patient_orientation: The image's PatientOrientation (0020,0020). When the model card
                names the orientation the model was trained on (``patient_orientation``, the demo
                cxr-cls ``["L", "F"]``), an image stored another way round (flipped, upside down,
                turned by 90 degrees) is turned to it first, and the Grad-CAM maps back onto the
                stored grid; an image in another plane (a lateral view) or without the tag is
                classified as stored.

        Returns:
            Calibrated probabilities, logits, thresholds, samples (MC dropout first, then the
            flips) and Grad-CAM maps on the source grid; timing keys ``preprocess``,
            ``forward``, ``samples`` and ``gradcam`` (seconds).

        Raises:
            ModelError: The image is not a non-empty finite 2D array, an unknown flip is asked
                for, or the network fails.
        """
        started = time.perf_counter()
        array = np.asarray(image)
        if array.ndim != 2 or array.size == 0 or min(array.shape) < 2:
            raise ModelError(f"model {self.name}: cannot classify an array of shape {array.shape}; a 2D image is needed")
        if not np.all(np.isfinite(array)):
            raise ModelError(f"model {self.name}: the image contains NaN or infinite values")
        unknown = [f for f in tta_flips if f not in FLIP_DIMS and f != "z"]
        if unknown:
            raise ModelError(f"model {self.name}: unknown test-time flip(s) {unknown}; use 'x' and/or 'y'")
        if mc_dropout_samples < 0:
            raise ModelError(f"model {self.name}: mc_dropout_samples must be >= 0, got {mc_dropout_samples}")
        timing: dict[str, float] = {}
        # None as well when the card names no orientation: the image is classified as stored.
        turn = orientation_turn(patient_orientation, self.orientation)
        if turn is not None and turn.identity:
            turn = None
        if turn is not None:
            array = turn.apply(array)
            log.info("radiograph turned to the model's orientation", model=self.name,
                     stored=_directions(patient_orientation), model_orientation=_directions(self.orientation),
                     transpose=turn.transpose, flip_rows=turn.flip_rows, flip_cols=turn.flip_cols)
            if pixel_spacing is not None and turn.transpose:
                pixel_spacing = (pixel_spacing[1], pixel_spacing[0])
        array, padding = without_padding(array)
        if any(padding):
            log.info("radiograph padding cropped", model=self.name, top=padding[0], bottom=padding[1],
                     left=padding[2], right=padding[3])
        shape = (int(array.shape[0]), int(array.shape[1]))
        try:
            with self._lock:
                mark = time.perf_counter()
                inputs = self.network_input(array)
                timing["preprocess"] = time.perf_counter() - mark

                mark = time.perf_counter()
                with pooled_features(self.network) as features:
                    logits = self.logits(inputs)[0].cpu().numpy().astype(np.float64)
                distance = (None if self.feature_statistics is None or not features
                            else self.feature_statistics.distance(features[-1][0]))
                timing["forward"] = time.perf_counter() - mark

                mark = time.perf_counter()
                sample_logits: list[np.ndarray] = []
                kinds: list[str] = []
                if mc_dropout_samples > 0:
                    batch = inputs.expand(mc_dropout_samples, *inputs.shape[1:])
                    with mc_dropout(self.network):  # same image, same samples, same verdict, any device
                        sample_logits.append(self.logits(batch).cpu().numpy())
                    kinds += ["mc-dropout"] * mc_dropout_samples
                flips = [f for f in tta_flips if f in FLIP_DIMS]
                if flips:
                    batch = torch.cat([torch.flip(inputs, dims=(FLIP_DIMS[f],)) for f in flips])
                    sample_logits.append(self.logits(batch).cpu().numpy())
                    kinds += [f"tta:flip-{f}" for f in flips]
                timing["samples"] = time.perf_counter() - mark

                probabilities = self.calibrate(logits)
                positives = [i for i in range(len(self.labels)) if probabilities[i] >= self.thresholds[i]]
                mark = time.perf_counter()
                heatmaps = self._gradcam_maps(inputs, positives, shape) if gradcam and positives else {}
                timing["gradcam"] = time.perf_counter() - mark
        except RuntimeError as exc:
            raise ModelError(f"model {self.name} failed on a {array.shape} image: {exc}") from exc
        samples = self.calibrate(np.concatenate(sample_logits)) if sample_logits else None
        if any(padding):  # the maps back onto the padded grid, 0 on the padding
            top, bottom, left, right = padding
            heatmaps = {index: np.pad(heatmap, ((top, bottom), (left, right))) for index, heatmap in heatmaps.items()}
        if turn is not None:
            heatmaps = {index: turn.undo(heatmap) for index, heatmap in heatmaps.items()}
        seconds = time.perf_counter() - started
        log.debug("classification done", model=self.name, shape=shape, pixel_spacing=pixel_spacing,
                  positive=[self.labels[i].name for i in positives], seconds=round(seconds, 3))
        return ClassificationResult(
            probabilities=probabilities,
            logits=logits,
            labels=list(self.labels),
            thresholds=self.thresholds.copy(),
            model_name=self.name,
            model_version=self.version,
            temperature=self.temperature,
            samples=samples,
            sample_kinds=kinds,
            heatmaps=heatmaps,
            seconds=seconds,
            timing=timing,
            reference={k: dict(v) for k, v in self.card.get("reference", {}).items()},
            feature_distance=distance,
            feature_distance_range=None if self.feature_statistics is None else self.feature_statistics.limits,
        )


def labels_from_card(card: dict[str, Any]) -> list[FindingLabel]:
    """The findings a classification card declares (``labels``: name, code, tracking id)."""
    return [FindingLabel(name=e["name"], code=Code(*e["code"]), tracking_id=e["tracking_id"]) for e in card["labels"]]


# --------------------------------------------------------------------------- registry

_cache: dict[tuple[str, str, bool], ClassificationModel] = {}
_cache_lock = threading.Lock()


def load_classification_dir(model_dir: Path, device: torch.device, *, spec: str | None = None,
                            mixed_precision: bool = True) -> ClassificationModel:
    """Load a classification model folder (``card.json`` + ``model.pt``) without caching.

    Raises:
        ModelError: Missing or unreadable card or weights, a card of another task, or weights
            that do not fit the architecture; the message names the spec and the path.
    """
    what = spec or str(model_dir)
    card_path, weights_path = card_folder_files(Path(model_dir), spec)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        if card.get("task", "classification") != "classification":
            raise ValueError(f"task is {card.get('task')!r}, not 'classification'")
        for key in ("name", "version", "architecture", "labels"):
            if key not in card:
                raise KeyError(key)
        labels = labels_from_card(card)
        network = build_classifier(**card["architecture"])
        if len(card.get("thresholds", labels)) != len(labels):
            raise ValueError(f"{len(card['thresholds'])} thresholds for {len(labels)} labels")
        if float(card.get("temperature", 1.0)) <= 0:
            raise ValueError(f"temperature {card['temperature']} is not positive")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"model {what}: invalid model card {card_path}: {exc!r}") from exc
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        state = {k: v.float() if torch.is_floating_point(v) else v for k, v in state.items()}
        network.load_state_dict(state)
    except Exception as exc:  # torch raises many types for a corrupt or mismatched file
        raise ModelError(f"model {what}: cannot load weights {weights_path}: {exc}") from exc
    model = ClassificationModel(name=card["name"], version=str(card["version"]), labels=labels, card=card,
                                network=network, device=device, mixed_precision=mixed_precision)
    statistics = card.get("feature_statistics")
    if statistics:
        path = Path(model_dir) / str(statistics.get("file", FEATURE_STATISTICS_FILE))
        try:
            model.feature_statistics = FeatureStatistics.load(path)
            last_linear(network)
        except (OSError, ValueError, KeyError, ModelError) as exc:
            raise ModelError(f"model {what}: invalid feature statistics {path}: {exc}") from exc
    return model


def load_classification_model(spec: str, *, device: str = "auto", mixed_precision: bool = True) -> ClassificationModel:
    """Return the classifier a spec names, loading its weights once per process and device.

    Args:
        spec: ``"demo:<name>"`` for a shipped demo model, or a folder with ``card.json`` and
            ``model.pt``.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda:0"``...
        mixed_precision: float16 autocast on CUDA; ignored on CPU.

    Returns:
        The loaded model, shared by every caller asking for the same spec, device and
        precision.

    Raises:
        ModelError: Unknown spec, missing or broken card or weights.
    """
    torch_device = resolve_device(device)
    model_dir = resolve_spec(spec)
    key = (str(model_dir), str(torch_device), bool(mixed_precision))
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            model = load_classification_dir(model_dir, torch_device, spec=spec,
                                            mixed_precision=mixed_precision)
            _cache[key] = model
            log.info("model loaded", spec=spec, version=model.version, device=str(torch_device))
        return model


def clear_classification_cache() -> None:
    """Forget every loaded classifier (tests; after retraining in the same process)."""
    with _cache_lock:
        _cache.clear()
