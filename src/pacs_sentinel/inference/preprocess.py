"""From a DICOM volume to the network's working grid and back, with MONAI transforms.

The forward path is three MONAI transforms on a :class:`~monai.data.MetaTensor` that carries
the volume's affine:

1. ``Orientation`` to the model's axis codes (e.g. ``"RAS"`` for most MONAI bundles, ``"SPL"``
   for the demo models, whose array axes run inferior->superior, anterior->posterior and
   right->left). This only permutes and flips axes: no interpolation.
2. ``SpatialResample`` to the model's spacing on a grid with the **same centre and extent** as
   the source (the number of voxels along each axis is ``round(n * spacing / model_spacing)``).
   For an integer downsampling factor ``k`` the bilinear samples fall exactly between source
   voxels, so a factor of two is the 2x2 box average the demo models were trained on.
3. ``ScaleIntensityRange`` of the model's intensity window (HU) to its output range, clipped.

The inverse resamples the network's probabilities with the inverse of that affine
(``SpatialResample.inverse``, trilinear) and undoes the orientation (``Orientation.inverse``),
so the result has the source array's shape and slice ``i`` of a mask is source slice ``i``.

Step 2 and its inverse are computed separably (:class:`AxisAlignedResample`): the working
grid has the oriented source's axes, so the voxel-to-voxel map between the two grids is a
scale and shift per axis, and trilinear interpolation with border padding (what
``SpatialResample`` does through ``grid_sample``) is three 1-D linear interpolations, one per
axis, each a matrix product. Same values up to float32 rounding (tests compare it with
MONAI's). The inverse (upsampling onto the source grid) is always done so: 15x faster for a
128x128x64 study, also for a 512x512x300 one. The forward is done so when its matrix products
cost less than ``grid_sample`` would (:data:`GRID_SAMPLE_MULTIPLY_ADDS`): 128x128x64 studies
and the like, not a 512x512x300 CT, whose products cost more than sampling the small working
grid. A map that is not axis-aligned (never produced by :func:`working_affine`, checked
anyway) goes through MONAI's transforms both ways.

DICOM patient coordinates are LPS, MONAI's (and NIfTI's) are RAS: the MetaTensor's affine is
the DICOM affine with its first two world axes negated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, ScaleIntensityRange, SpatialResample

from pacs_sentinel.dicom_io.series import Volume

#: LPS (DICOM) <-> RAS (MONAI, NIfTI) world coordinates.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Patient axis ("x", "y", "z") that each orientation code letter runs along.
CODE_AXIS = {"L": "x", "R": "x", "A": "y", "P": "y", "S": "z", "I": "z"}


@dataclass(frozen=True)
class ModelGeometry:
    """What the network expects: axis order, spacing, intensity scaling and window size.

    Attributes:
        axcodes: Orientation codes of the network's three array axes, each the direction the
            axis runs towards (nibabel/MONAI convention), e.g. ``"RAS"`` or ``"SPL"``.
        spacing_mm: Working-grid spacing along those axes.
        intensity_window: ``(a_min, a_max)`` input range (HU for CT), or None for no scaling.
        intensity_range: ``(b_min, b_max)`` the window is mapped to.
        clip: Clip to the output range after scaling.
        roi_size: Sliding-window size along the array axes.
        sw_batch_size: Windows per forward pass (per sample).
        sw_overlap: Default sliding-window overlap (a pipeline may override it).
        activation: ``"softmax"`` (channel 0 is background) or ``"sigmoid"`` (one channel per
            label, multi-label).
    """

    axcodes: str = "RAS"
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    intensity_window: tuple[float, float] | None = None
    intensity_range: tuple[float, float] = (0.0, 1.0)
    clip: bool = True
    roi_size: tuple[int, int, int] = (96, 96, 96)
    sw_batch_size: int = 1
    sw_overlap: float = 0.25
    activation: str = "softmax"

    def __post_init__(self) -> None:
        codes = self.axcodes.upper()
        if len(codes) != 3 or sorted(CODE_AXIS[c] for c in codes if c in CODE_AXIS) != ["x", "y", "z"]:
            raise ValueError(f"invalid orientation {self.axcodes!r}: expected three codes such as 'RAS'")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"invalid spacing {self.spacing_mm!r}: expected three positive values (mm)")
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"invalid roi_size {self.roi_size!r}: expected three positive integers")
        if self.intensity_window is not None and self.intensity_window[1] <= self.intensity_window[0]:
            raise ValueError(f"invalid intensity window {self.intensity_window!r}: expected (low, high)")
        if self.activation not in ("softmax", "sigmoid"):
            raise ValueError(f"invalid activation {self.activation!r}: expected 'softmax' or 'sigmoid'")
        if not 0 <= self.sw_overlap < 1:
            raise ValueError(f"invalid sw_overlap {self.sw_overlap!r}: expected 0 <= overlap < 1")

    def array_axis(self, patient_axis: str) -> int:
        """Index of the working-grid axis that runs along patient axis ``"x"``, ``"y"`` or ``"z"``."""
        for i, code in enumerate(self.axcodes.upper()):
            if CODE_AXIS[code] == patient_axis:
                return i
        raise ValueError(f"unknown patient axis {patient_axis!r}; expected 'x', 'y' or 'z'")


def volume_affine(volume: Volume) -> np.ndarray:
    """The RAS affine of the volume's ``(slices, rows, cols)`` array (voxel index -> mm).

    Column ``j`` of the 3x3 part is the world step of array axis ``j``: the slice direction
    times the slice spacing, then the row (down a column) and column (along a row) directions.
    """
    direction = np.asarray(volume.direction, dtype=float)
    affine = np.eye(4)
    affine[:3, 0] = direction[:, 2] * float(volume.spacing[0])
    affine[:3, 1] = direction[:, 1] * float(volume.spacing[1])
    affine[:3, 2] = direction[:, 0] * float(volume.spacing[2])
    affine[:3, 3] = np.asarray(volume.origin, dtype=float)
    return LPS_TO_RAS @ affine


def working_affine(source_affine: np.ndarray, source_shape: tuple[int, ...],
                   spacing_mm: tuple[float, float, float]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The working grid for an oriented source grid: same axes, centre and extent, new spacing.

    Returns:
        The working grid's affine and its shape, ``max(1, round(n * spacing / spacing_mm))``.
    """
    steps = np.linalg.norm(source_affine[:3, :3], axis=0)
    n = np.asarray(source_shape, dtype=float)
    shape = np.maximum(1, np.round(n * steps / np.asarray(spacing_mm, dtype=float))).astype(int)
    directions = source_affine[:3, :3] / steps
    centre = source_affine @ np.r_[(n - 1) / 2, 1.0]
    affine = np.eye(4)
    affine[:3, :3] = directions * np.asarray(spacing_mm, dtype=float)
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((shape - 1) / 2)
    return affine, (int(shape[0]), int(shape[1]), int(shape[2]))


#: Largest off-diagonal term (in voxels per voxel) of a grid-to-grid map still treated as
#: axis-aligned; :func:`working_affine` gives exact zeros up to float64 rounding (~1e-16).
AXIS_ALIGNED_TOLERANCE = 1e-9
#: What ``grid_sample`` costs per output voxel, in multiply-adds of the separable matrix
#: products (measured on 2 CPU cores: ~36 ns a voxel, the products ~30 G multiply-adds/s).
#: The forward resampling is separable when its products cost less per working-grid voxel.
GRID_SAMPLE_MULTIPLY_ADDS = 1000


def linear_weights(n_out: int, n_in: int, scale: float, offset: float) -> torch.Tensor:
    """The ``(n_out, n_in)`` matrix of 1-D linear interpolation at ``scale * i + offset``.

    Row ``i`` interpolates between the two input samples around source coordinate
    ``scale * i + offset`` (index units, sample centres at integers), clamped to
    ``[0, n_in - 1]``: ``grid_sample``'s ``padding_mode="border"``.
    """
    x = (torch.arange(n_out, dtype=torch.float64) * scale + offset).clamp(0, n_in - 1)
    low = x.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    fraction = x - low
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights.index_put_((rows, low), 1 - fraction, accumulate=True)
    weights.index_put_((rows, high), fraction, accumulate=True)
    return weights.to(torch.float32)


@dataclass(frozen=True)
class AxisAlignedResample:
    """Trilinear resampling between two grids with the same axes, one axis at a time.

    ``index_map`` maps an output voxel index to an input voxel index (4x4, diagonal 3x3
    part); the result equals MONAI's ``SpatialResample`` (``mode="bilinear"``,
    ``padding_mode="border"``) up to float32 rounding.

    Attributes:
        index_map: Output index -> input index.
        in_shape: Spatial shape of the input grid.
        out_shape: Spatial shape of the output grid.
    """

    index_map: np.ndarray
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]

    @classmethod
    def between(cls, in_affine: np.ndarray, in_shape: tuple[int, ...], out_affine: np.ndarray,
                out_shape: tuple[int, ...]) -> AxisAlignedResample | None:
        """The resampling from grid ``in`` onto grid ``out``, or None when it is not axis-aligned."""
        index_map = np.linalg.solve(np.asarray(in_affine, dtype=float), np.asarray(out_affine, dtype=float))
        linear = index_map[:3, :3]
        if np.abs(linear - np.diag(np.diag(linear))).max() > AXIS_ALIGNED_TOLERANCE or \
                np.abs(index_map[3] - [0, 0, 0, 1]).max() > AXIS_ALIGNED_TOLERANCE:
            return None
        return cls(index_map=index_map, in_shape=tuple(int(n) for n in in_shape),  # type: ignore[arg-type]
                   out_shape=tuple(int(n) for n in out_shape))  # type: ignore[arg-type]

    def multiply_adds(self) -> int:
        """Multiply-adds per channel of :meth:`__call__` (its three matrix products)."""
        (i0, i1, i2), (o0, o1, o2) = self.in_shape, self.out_shape
        return i0 * i1 * i2 * o2 + i0 * i1 * o2 * o1 + i0 * o1 * o2 * o0

    def cheaper_than_grid_sample(self) -> bool:
        """Whether the matrix products cost less than ``grid_sample`` on the output grid."""
        return self.multiply_adds() <= GRID_SAMPLE_MULTIPLY_ADDS * int(np.prod(self.out_shape))

    def inverse(self) -> AxisAlignedResample:
        """The resampling from the output grid back onto the input grid."""
        return AxisAlignedResample(index_map=np.linalg.inv(self.index_map), in_shape=self.out_shape,
                                   out_shape=self.in_shape)

    def __call__(self, data: torch.Tensor) -> torch.Tensor:
        """Resample ``(channels, *in_shape)`` data to float32 ``(channels, *out_shape)``."""
        if tuple(data.shape[1:]) != self.in_shape:
            raise ValueError(f"cannot resample a {tuple(data.shape[1:])} grid: expected {self.in_shape}")
        a, b, c = self.out_shape
        w0, w1, w2 = (linear_weights(self.out_shape[k], self.in_shape[k], float(self.index_map[k, k]),
                                     float(self.index_map[k, 3])).to(data.device) for k in range(3))
        channels = data.shape[0]
        x = data.to(torch.float32)
        x = torch.matmul(x, w2.T)  # (channels, in0, in1, c)
        x = torch.matmul(w1, x)  # (channels, in0, b, c)
        x = torch.matmul(w0, x.reshape(channels, self.in_shape[0], b * c))  # (channels, a, b * c)
        return x.reshape(channels, a, b, c)


@dataclass
class Prepared:
    """A volume on the working grid, with what is needed to map results back.

    Attributes:
        image: The network input, ``(1, 1, *working_shape)`` float32 on the model's device.
        spacing_mm: Working-grid spacing along the array axes.
        source_shape: Shape of the source ``(slices, rows, cols)`` array.
        operations: MONAI's record of the invertible transforms applied: the orientation,
            and the resampling when MONAI did it.
        affine: RAS affine of the working grid.
        axis_map: The separable resampling from the oriented source grid onto the working
            grid (None when the map is not axis-aligned); :meth:`Preprocessor.inverse` runs
            its inverse.
        oriented_affine: RAS affine of the oriented source grid.
        orientation_operations: MONAI's record of the orientation alone.
    """

    image: torch.Tensor
    spacing_mm: tuple[float, float, float]
    source_shape: tuple[int, int, int]
    operations: list[dict[str, Any]] = field(default_factory=list)
    affine: torch.Tensor | None = None
    axis_map: AxisAlignedResample | None = None
    oriented_affine: torch.Tensor | None = None
    orientation_operations: list[dict[str, Any]] = field(default_factory=list)


class Preprocessor:
    """The MONAI transforms of one model geometry: :meth:`forward` and its exact :meth:`inverse`."""

    def __init__(self, geometry: ModelGeometry) -> None:
        self.geometry = geometry
        self.orientation = Orientation(axcodes=geometry.axcodes.upper(), labels=(("L", "R"), ("P", "A"), ("I", "S")))
        self.resample = SpatialResample(mode="bilinear", padding_mode="border", align_corners=False,
                                        dtype=torch.float32)
        self.scale = None
        if geometry.intensity_window is not None:
            low, high = geometry.intensity_window
            b_min, b_max = geometry.intensity_range
            self.scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=b_min, b_max=b_max, clip=geometry.clip)

    def forward(self, volume: Volume, device: torch.device | str = "cpu") -> Prepared:
        """Orient, resample and scale ``volume`` into the network input.

        Returns:
            The input with the record of the spatial transforms (see :class:`Prepared`).
        """
        array = torch.as_tensor(np.ascontiguousarray(volume.array, dtype=np.float32), device=device)
        return self.forward_array(array, volume_affine(volume))

    def forward_array(self, array: torch.Tensor, affine: np.ndarray) -> Prepared:
        """:meth:`forward` for a ``(slices, rows, cols)`` tensor with its RAS ``affine``."""
        image = MetaTensor(array[None], affine=torch.as_tensor(affine, dtype=torch.float64))
        oriented = self.orientation(image)
        oriented_affine = oriented.affine.cpu().numpy()
        target, shape = working_affine(oriented_affine, tuple(oriented.shape[1:]), self.geometry.spacing_mm)
        axis_map = AxisAlignedResample.between(oriented_affine, tuple(oriented.shape[1:]), target, shape)
        orientation_operations = list(oriented.applied_operations)
        if axis_map is not None and axis_map.cheaper_than_grid_sample():
            operations = orientation_operations
            out = axis_map(oriented.as_tensor())
            affine = torch.as_tensor(target, dtype=torch.float64)
        else:
            resampled = self.resample(oriented, dst_affine=torch.as_tensor(target, dtype=torch.float64),
                                      spatial_size=shape)
            operations = list(resampled.applied_operations)
            out = resampled.as_tensor()
            affine = resampled.affine
        if self.scale is not None:
            out = self.scale(out)
            out = out.as_tensor() if isinstance(out, MetaTensor) else out
        return Prepared(image=out[None].to(torch.float32), spacing_mm=tuple(self.geometry.spacing_mm),
                        source_shape=tuple(int(n) for n in array.shape), operations=operations,
                        affine=affine, axis_map=axis_map, oriented_affine=oriented.affine,
                        orientation_operations=orientation_operations)

    def inverse(self, probabilities: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """Map ``(channels, *working_shape)`` maps back onto the source grid (trilinear).

        Returns:
            ``(channels, slices, rows, cols)`` on the source grid, same device as the input.
        """
        if prepared.axis_map is not None:
            on_source = prepared.axis_map.inverse()(probabilities)
            oriented = MetaTensor(on_source, affine=prepared.oriented_affine,
                                  applied_operations=[dict(op) for op in prepared.orientation_operations])
            back = self.orientation.inverse(oriented)
        else:
            image = MetaTensor(probabilities.to(torch.float32), affine=prepared.affine,
                               applied_operations=[dict(op) for op in prepared.operations])
            back = self.orientation.inverse(self.resample.inverse(image))
        out = back.as_tensor()
        if tuple(out.shape[1:]) != prepared.source_shape:  # never expected: MONAI restores the shape
            raise RuntimeError(f"inverse transform gave {tuple(out.shape[1:])}, expected {prepared.source_shape}")
        return out


def identity_volume(array: np.ndarray, spacing: tuple[float, float, float]) -> Volume:
    """An axial LPS volume (identity direction, origin 0) around ``array``; training uses it."""
    return Volume(array=np.asarray(array), spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                  origin=(0.0, 0.0, 0.0), direction=np.eye(3), datasets=[])
