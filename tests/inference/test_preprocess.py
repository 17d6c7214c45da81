"""The MONAI preprocessing and its exact inverse: masks come back on the source voxels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pacs_sentinel.inference.preprocess import ModelGeometry, Preprocessor, volume_affine, working_affine

from .fakes import sphere_volume, threshold_model

AXIAL = np.eye(3)
ROWS_FLIPPED = np.diag([-1.0, -1.0, 1.0])  # rows run right->left, columns bottom->top
CORONAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # cols +x, rows -z, slices +y
_c, _s = np.cos(np.radians(20)), np.sin(np.radians(20))
OBLIQUE = np.array([[_c, -_s, 0.0], [_s, _c, 0.0], [0.0, 0.0, 1.0]])  # axial, rotated 20 degrees in-plane


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize(
    ("shape", "spacing", "direction"),
    [
        pytest.param((40, 48, 48), (1.5, 1.5, 1.5), AXIAL, id="axial-isotropic"),
        pytest.param((24, 100, 100), (3.0, 0.7, 0.7), AXIAL, id="axial-anisotropic"),
        pytest.param((24, 100, 100), (3.0, 0.7, 0.7), ROWS_FLIPPED, id="flipped-rows-and-columns"),
        pytest.param((24, 100, 90), (3.0, 0.8, 0.7), CORONAL, id="coronal"),
        pytest.param((24, 100, 100), (3.0, 0.7, 0.7), OBLIQUE, id="oblique-in-plane"),
    ],
)
@pytest.mark.parametrize("axcodes", ["RAS", "SPL"])
def test_mask_comes_back_on_the_source_voxels(shape, spacing, direction, axcodes) -> None:
    volume, truth = sphere_volume(shape, spacing, direction)
    result = threshold_model(axcodes=axcodes).predict(volume)
    mask = result.mask[0]
    assert mask.shape == truth.shape == volume.array.shape
    assert dice(mask, truth) >= 0.97
    centroid_error = np.abs(np.argwhere(mask).mean(axis=0) - np.argwhere(truth).mean(axis=0))
    assert np.all(centroid_error < 0.5), centroid_error
    assert set(result.timing) == {"preprocess", "forward", "samples", "inverse"}


def test_off_centre_object_per_slice() -> None:
    """Slice i of the mask holds the object exactly where source slice i does."""
    volume, truth = sphere_volume((30, 64, 64), (3.0, 1.0, 1.0), AXIAL, centre_mm=(10.0, -8.0, -20.0), radius_mm=12.0)
    mask = threshold_model(spacing_mm=(1.0, 1.0, 1.0)).predict(volume).mask[0]
    per_slice_truth = truth.sum(axis=(1, 2))
    per_slice_mask = mask.sum(axis=(1, 2))
    assert np.array_equal(per_slice_mask > 0, per_slice_truth > 0)
    assert np.abs(per_slice_mask - per_slice_truth).max() <= 0.1 * per_slice_truth.max()


def test_working_grid_keeps_centre_and_extent() -> None:
    volume, _ = sphere_volume((48, 160, 160), (5.0, 2.5, 2.5), AXIAL)
    source = volume_affine(volume)
    affine, shape = working_affine(source, volume.array.shape, (5.0, 5.0, 5.0))
    assert shape == (48, 80, 80)
    centre = lambda a, n: (a @ np.r_[(np.asarray(n) - 1) / 2, 1.0])[:3]  # noqa: E731
    assert np.allclose(centre(affine, shape), centre(source, volume.array.shape))


def test_lps_to_ras() -> None:
    """Column index along +x in DICOM (towards the patient's left) is -x in RAS."""
    volume, _ = sphere_volume((4, 4, 4), (2.0, 1.0, 1.0), AXIAL)
    affine = volume_affine(volume)
    assert np.allclose(affine[:3, 2], [-1.0, 0.0, 0.0]) and np.allclose(affine[:3, 0], [0.0, 0.0, 2.0])


def test_factor_two_is_a_box_average() -> None:
    """What the demo model was trained on: 2x2 in-plane downsampling averages voxel pairs."""
    geometry = ModelGeometry(axcodes="SPL", spacing_mm=(5.0, 5.0, 5.0), roi_size=(8, 8, 8))
    volume, _ = sphere_volume((6, 16, 16), (5.0, 2.5, 2.5), AXIAL)
    volume.array = np.random.default_rng(0).normal(size=volume.array.shape).astype(np.float32)
    image = Preprocessor(geometry).forward(volume).image[0, 0]
    expected = torch.nn.functional.avg_pool3d(torch.as_tensor(volume.array)[None, None], (1, 2, 2))[0, 0]
    assert torch.allclose(image, expected, atol=1e-5)


def test_invalid_geometry_is_refused() -> None:
    with pytest.raises(ValueError, match="orientation"):
        ModelGeometry(axcodes="RRS")
    with pytest.raises(ValueError, match="spacing"):
        ModelGeometry(spacing_mm=(1.0, 0.0, 1.0))


@pytest.mark.parametrize(
    ("shape", "spacing", "direction"),
    [
        pytest.param((64, 128, 128), (3.75, 3.125, 3.125), AXIAL, id="bench-128"),
        pytest.param((24, 100, 90), (3.0, 0.8, 0.7), CORONAL, id="coronal"),
        pytest.param((37, 101, 93), (2.7, 0.77, 0.91), OBLIQUE, id="oblique-odd-sizes"),
        pytest.param((24, 100, 100), (3.0, 0.7, 0.7), ROWS_FLIPPED, id="flipped"),
    ],
)
@pytest.mark.parametrize(("axcodes", "model_spacing"), [("SPL", (5.0, 5.0, 5.0)), ("RAS", (1.3, 2.2, 0.9))])
def test_separable_resampling_equals_monai(shape, spacing, direction, axcodes, model_spacing) -> None:
    """The per-axis resampling gives MONAI's SpatialResample values, both ways (float32 rounding)."""
    from monai.data import MetaTensor

    volume, _ = sphere_volume(shape, spacing, direction)
    volume.array = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    preprocessor = Preprocessor(ModelGeometry(axcodes=axcodes, spacing_mm=model_spacing))
    prepared = preprocessor.forward(volume)
    assert prepared.axis_map is not None  # working grids are always axis-aligned

    image = MetaTensor(torch.as_tensor(volume.array)[None],
                       affine=torch.as_tensor(volume_affine(volume), dtype=torch.float64))
    oriented = preprocessor.orientation(image)
    target, grid = working_affine(oriented.affine.numpy(), tuple(oriented.shape[1:]), model_spacing)
    monai_resampled = preprocessor.resample(oriented, dst_affine=torch.as_tensor(target), spatial_size=grid)
    assert torch.allclose(prepared.image[0], monai_resampled.as_tensor(), atol=5e-4)
    assert torch.allclose(prepared.affine, monai_resampled.affine)

    probabilities = torch.rand((2, *grid), generator=torch.Generator().manual_seed(0))
    back = preprocessor.inverse(probabilities, prepared)
    monai_back = preprocessor.orientation.inverse(preprocessor.resample.inverse(
        MetaTensor(probabilities, affine=monai_resampled.affine,
                   applied_operations=[dict(op) for op in monai_resampled.applied_operations]))).as_tensor()
    assert back.shape == monai_back.shape == (2, *shape)
    assert torch.allclose(back, monai_back, atol=1e-4)


def test_rotated_grids_are_not_resampled_separably() -> None:
    from pacs_sentinel.inference.preprocess import AxisAlignedResample

    rotated = np.eye(4)
    rotated[:3, :3] = OBLIQUE
    assert AxisAlignedResample.between(np.eye(4), (4, 4, 4), rotated, (4, 4, 4)) is None
    assert AxisAlignedResample.between(np.eye(4), (4, 4, 4), np.diag([2.0, 1.0, 0.5, 1.0]), (2, 4, 8)) is not None


def test_a_large_series_is_downsampled_by_monai_and_upsampled_separably() -> None:
    """The forward matrix products of a big series cost more than grid_sample: MONAI does it
    (its record is kept), and the inverse still comes back on the source voxels."""
    geometry = ModelGeometry(axcodes="SPL", spacing_mm=(5.0, 5.0, 5.0), intensity_window=(-200.0, 300.0))
    volume, truth = sphere_volume((160, 256, 256), (1.0, 0.7, 0.7), AXIAL, radius_mm=30.0)
    preprocessor = Preprocessor(geometry)
    prepared = preprocessor.forward(volume)
    assert prepared.axis_map is not None and not prepared.axis_map.cheaper_than_grid_sample()
    assert [op["class"] for op in prepared.operations][-1] == "SpatialResample"
    small = preprocessor.forward(sphere_volume((64, 128, 128), (3.75, 3.125, 3.125), AXIAL)[0])
    assert small.axis_map is not None and small.axis_map.cheaper_than_grid_sample()
    assert [op["class"] for op in small.operations] == ["Orientation"]
    back = preprocessor.inverse((prepared.image[0] >= 0.5).to(torch.float32), prepared)[0] >= 0.5
    assert back.shape == truth.shape and dice(back.numpy(), truth) >= 0.95
