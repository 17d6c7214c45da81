"""SEG frames land on the right source slices whatever the series geometry.

The mask is drawn in patient space twice, independently: once on the volume's voxel grid
(origin, direction, spacing — what a model's output lives on) and once on every source file
from that file's own header (ImagePositionPatient, ImageOrientationPatient, PixelSpacing).
The SEG read back from bytes must give, for each source instance, exactly the mask drawn on
that instance.
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pacs_sentinel.dicom_io.series import load_volume
from pacs_sentinel.reports.seg import build_segmentation
from pacs_sentinel.results import SegmentationResult, Verdict

from .conftest import LIVER, make_ct_series, make_qc

ROWS, COLS, SLICES = 40, 48, 14

#: name -> (row direction, column direction, pixel spacing (row, col), slice step along the normal)
GEOMETRIES = {
    "anisotropic": ((1, 0, 0), (0, 1, 0), (0.6, 0.9), 5.0),
    "reversed-slice-order": ((1, 0, 0), (0, 1, 0), (0.8, 0.8), -2.5),
    "coronal": ((1, 0, 0), (0, 0, -1), (0.8, 0.7), 3.0),
    "sagittal": ((0, 1, 0), (0, 0, -1), (0.7, 0.8), -2.0),
}


def _series(name: str) -> list[Dataset]:
    row_dir, col_dir, spacing, step = GEOMETRIES[name]
    normal = np.cross(row_dir, col_dir)
    datasets = make_ct_series(SLICES, ROWS, COLS, seed=7)  # shuffled file order
    corner = np.array([-20.0, -15.0, 30.0])
    for ds in datasets:
        k = int(ds.InstanceNumber) - 1  # positions follow InstanceNumber; reversed when step < 0
        ds.ImageOrientationPatient = [*map(float, row_dir), *map(float, col_dir)]
        ds.ImagePositionPatient = [float(v) for v in corner + normal * step * k]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = abs(step)
        del ds.SliceLocation
    return datasets


def _pixel_points(ds: Dataset) -> np.ndarray:
    """Patient coordinates (rows, cols, 3) of every pixel centre of one file, from its header."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    r, c = np.mgrid[0:int(ds.Rows), 0:int(ds.Columns)]
    return (np.array(ds.ImagePositionPatient, dtype=float)
            + c[..., None] * col_spacing * iop[:3] + r[..., None] * row_spacing * iop[3:])


def _inside(points: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (((points - centre) / radii) ** 2).sum(axis=-1) <= 1


def _ellipsoid(datasets: list[Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """An off-centre ellipsoid within the field of view (so that any flip or shift shows)."""
    points = np.concatenate([_pixel_points(ds).reshape(-1, 3) for ds in datasets])
    low, high = points.min(axis=0), points.max(axis=0)
    extent = high - low
    centre = low + extent * np.array([0.38, 0.6, 0.55])
    radii = np.maximum(extent * 0.22, 3.0)
    return centre, radii


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_seg_frames_land_on_the_source_slices(geometry: str, seg_type: str) -> None:
    datasets = _series(geometry)
    volume = load_volume(datasets)
    centre, radii = _ellipsoid(datasets)

    # The model-side mask: on the volume's voxel grid, from the volume's own geometry.
    k, r, c = np.mgrid[0:volume.array.shape[0], 0:volume.array.shape[1], 0:volume.array.shape[2]]
    steps = np.stack([c * volume.spacing[2], r * volume.spacing[1], k * volume.spacing[0]], axis=-1)
    points = np.asarray(volume.origin) + steps @ np.asarray(volume.direction).T
    mask = _inside(points, centre, radii)
    assert 0 < mask.sum() < mask.size
    assert mask.any(axis=(1, 2)).sum() < mask.shape[0], "some slices must be empty"
    result = SegmentationResult(
        probabilities=np.where(mask, 0.9, 0.05)[None].astype(np.float32), mask=mask[None],
        labels=[LIVER], model_name="organ-seg", model_version="test",
    )
    seg = build_segmentation(volume, result, make_qc(volume, result, Verdict.ACCEPTED, [], 0.9), seg_type=seg_type)
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    again = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(buffer.getvalue())), copy=False)

    positions = {}
    for item in again.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        positions[str(source)] = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
    for ds in datasets:  # the files in their (shuffled) arrival order
        expected = _inside(_pixel_points(ds), centre, radii)
        uid = str(ds.SOPInstanceUID)
        pixels = again.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid], segment_numbers=[1], assert_missing_frames_are_empty=True
        )
        got = pixels[0, ..., 0] != 0
        assert np.array_equal(got, expected), f"{geometry}: slice {ds.InstanceNumber} differs"
        if uid in positions:  # frames exist for the slices with mask; they sit where the source is
            assert np.allclose(positions[uid], [float(v) for v in ds.ImagePositionPatient], atol=1e-3)
    assert positions, "the SEG has no frames"
