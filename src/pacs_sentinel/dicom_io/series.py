"""Turn the instances of one image series into a 3D volume with its geometry.

The volume keeps the source datasets in slice order, so that every later stage (the mask,
the SEG frames, the overlays) maps slice ``i`` back to the instance it came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from pacs_sentinel.errors import SeriesError

#: Relative deviation of one slice gap from the median gap that counts as a missing slice.
GAP_TOLERANCE = 0.2
#: Largest cosine difference between two orientations that still counts as "the same".
ORIENTATION_TOLERANCE = 1e-3


@dataclass
class Volume:
    """One image series as a 3D array with its patient-space geometry.

    Attributes:
        array: float32 array ``(slices, rows, cols)`` after the modality LUT (HU for CT).
        spacing: ``(slice, row, col)`` spacing in mm; ``row`` is the distance between rows.
        origin: Patient coordinates (mm) of the centre of the first voxel.
        direction: 3x3 matrix whose columns are the unit vectors of the column index
            (along a row), the row index (down a column) and the slice index, in patient space.
        datasets: The source instances, ``datasets[i]`` is slice ``array[i]``.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    datasets: list[Dataset]

    @property
    def study_uid(self) -> str:
        """StudyInstanceUID of the series."""
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        """SeriesInstanceUID of the series."""
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm3."""
        return float(np.prod(self.spacing))

    def to_sitk(self) -> sitk.Image:
        """Return the volume as a SimpleITK image (x = column, y = row, z = slice)."""
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing((self.spacing[2], self.spacing[1], self.spacing[0]))
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(float(v) for v in self.direction.flatten()))
        return image


def read_datasets(paths: Iterable[Path | str]) -> list[Dataset]:
    """Read DICOM files, raising :class:`SeriesError` naming the first unreadable one."""
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:  # pydicom raises many types for a bad file
            raise SeriesError(f"cannot read DICOM file {path}: {exc}") from exc
    return datasets


def load_volume(datasets: Sequence[Dataset], *, min_slices: int = 2) -> Volume:
    """Sort the instances of one series along its normal and stack them into a volume.

    Args:
        datasets: The instances of exactly one single-frame image series, in any order.
        min_slices: Fewest slices accepted (3D models need several).

    Returns:
        The volume, slices sorted by position along the slice normal.

    Raises:
        SeriesError: Mixed series, too few slices, missing geometry, mixed orientation or
            matrix size, duplicated positions, or missing slices (gaps).
    """
    if not datasets:
        raise SeriesError("no instances in series")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise SeriesError(f"instances of {len(series_uids)} series given, expected one")
    if len(datasets) < min_slices:
        raise SeriesError(f"series has {len(datasets)} slice(s), at least {min_slices} needed")
    for ds in datasets:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise SeriesError(f"instance {ds.get('SOPInstanceUID', '?')} has no {keyword}")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise SeriesError("multi-frame instances are not supported yet")

    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    for ds in datasets[1:]:
        if np.abs(np.asarray(ds.ImageOrientationPatient, dtype=float) - orientation).max() > ORIENTATION_TOLERANCE:
            raise SeriesError("series mixes slice orientations")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) != 1:
        raise SeriesError(f"series mixes matrix sizes {sorted(shapes)}")
    pixel_spacings = {tuple(round(float(v), 4) for v in ds.PixelSpacing) for ds in datasets}
    if len(pixel_spacings) != 1:
        raise SeriesError("series mixes pixel spacings")

    row_dir = orientation[:3] / np.linalg.norm(orientation[:3])
    col_dir = orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    positions = np.array([np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal) for ds in datasets])
    order = np.argsort(positions, kind="stable")
    sorted_ds = [datasets[i] for i in order]
    sorted_pos = positions[order]
    gaps = np.diff(sorted_pos)
    if np.any(gaps < 1e-3):
        raise SeriesError("series has two or more slices at the same position")
    median_gap = float(np.median(gaps))
    if np.any(np.abs(gaps - median_gap) > GAP_TOLERANCE * median_gap):
        worst = float(gaps[np.argmax(np.abs(gaps - median_gap))])
        raise SeriesError(
            f"series has missing slices or uneven spacing (gap of {worst:.2f} mm, expected {median_gap:.2f} mm)"
        )
    first = np.asarray(sorted_ds[0].ImagePositionPatient, dtype=float)
    last = np.asarray(sorted_ds[-1].ImagePositionPatient, dtype=float)
    if len(sorted_ds) > 1:
        stack_dir = (last - first) / np.linalg.norm(last - first)
        if abs(float(np.dot(stack_dir, normal))) < 1 - ORIENTATION_TOLERANCE:
            raise SeriesError("series has gantry tilt or sheared slices; not supported")

    slices = []
    for ds in sorted_ds:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:
            raise SeriesError(f"cannot decode pixel data of {ds.get('SOPInstanceUID', '?')}: {exc}") from exc
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(pixels * slope + intercept)
    array = np.stack(slices).astype(np.float32, copy=False)
    row_spacing, col_spacing = (float(v) for v in sorted_ds[0].PixelSpacing)
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    return Volume(
        array=array,
        spacing=(median_gap, row_spacing, col_spacing),
        origin=tuple(float(v) for v in first),
        direction=direction,
        datasets=sorted_ds,
    )


def load_series_files(paths: Iterable[Path | str], *, min_slices: int = 2) -> Volume:
    """Read the files of one series and return its volume (see :func:`load_volume`)."""
    return load_volume(read_datasets(paths), min_slices=min_slices)
