"""Input-image QC on constructed volumes and on the product's phantoms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.inference.phantoms import make_ct_phantom
from pacs_sentinel.inference.training import phantom_volume
from pacs_sentinel.qc.image import assess_image
from pacs_sentinel.results import Reason

SHAPE = (24, 128, 128)
SPACING = (5.0, 2.5, 2.5)


def _array(noise_hu: float = 12.0, seed: int = 0) -> np.ndarray:
    """Air around an elliptic body of fat and soft tissue with a spine."""
    _, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    yy, xx = (y - 64) * SPACING[1], (x - 64) * SPACING[2]
    array = np.full(np.broadcast_shapes(yy.shape, xx.shape), -1000.0, np.float32)
    array[(yy / 120.0) ** 2 + (xx / 140.0) ** 2 <= 1] = -100.0
    array[(yy / 105.0) ** 2 + (xx / 125.0) ** 2 <= 1] = 40.0
    array[((yy - 60) / 18.0) ** 2 + (xx / 18.0) ** 2 <= 1] = 700.0
    array = ndimage.gaussian_filter(array, 0.7)
    rng = np.random.default_rng(seed)
    return (np.broadcast_to(array, SHAPE) + rng.normal(0.0, noise_hu, SHAPE)).astype(np.float32)


def _volume(array: np.ndarray) -> Volume:
    return Volume(array.astype(np.float32), SPACING, (0.0, 0.0, 0.0), np.eye(3), [])


def _fired(volume: Volume) -> set[str]:
    return {s.name for s in assess_image(volume).signals if s.fired}


def test_a_clean_volume_raises_nothing() -> None:
    qc = assess_image(_volume(_array()))
    assert [s.name for s in qc.signals if s.fired] == []
    assert qc.reasons == []
    values = {s.name: s.value for s in qc.signals}
    assert values["noise_hu"] == pytest.approx(12.0, rel=0.25)


def test_heavy_noise_fires_the_noise_check() -> None:
    qc = assess_image(_volume(_array(noise_hu=110.0)))
    assert _fired(_volume(_array(noise_hu=110.0))) == {"noise_hu"}
    assert qc.reasons == [Reason.POOR_INPUT_QUALITY]
    assert {s.name: s.value for s in qc.signals}["noise_hu"] == pytest.approx(110.0, rel=0.25)


def test_a_blurred_volume_fires_the_blur_check() -> None:
    blurred = ndimage.gaussian_filter(_array(), sigma=(0, 4, 4))
    assert "edge_width_px" in _fired(_volume(blurred))


def test_metal_streaks_fire_the_artefact_check() -> None:
    array = _array()
    array[:, 84:88, 56:60] = 3071.0  # two rods
    array[:, 84:88, 68:72] = 3071.0
    array[:, 60:64, 20:108] += 800.0  # a bright streak across the body
    assert "metal_ml" in _fired(_volume(array))


@pytest.mark.parametrize(
    ("transform", "expected"),
    [
        (lambda a: a + 1024.0, "air_level_hu"),  # raw stored values (intercept not applied)
        (lambda a: (a + 1024.0) / 4095.0, "air_level_hu"),  # normalised to [0, 1]
        (lambda a: a * 10.0, "out_of_range_share"),  # wrong rescale slope
        (lambda a: np.clip(a, -160.0, 240.0), "air_level_hu"),  # windowed and clipped
    ],
)
def test_a_volume_not_in_hu_is_flagged(transform, expected: str) -> None:
    assert expected in _fired(_volume(transform(_array())))


def test_a_flat_image_fires_the_contrast_check() -> None:
    assert "contrast_range_hu" in _fired(_volume(np.full(SHAPE, 40.0, np.float32)))


def test_a_truncated_field_of_view_is_flagged() -> None:
    truncated = _array()[:, 24:104, 24:104]  # the body runs off every side
    assert "truncated_slice_share" in _fired(_volume(np.ascontiguousarray(truncated)))


def _stored(axial: np.ndarray, spacing: tuple[float, float, float], plane: str) -> Volume:
    """The axial ``(z, y, x)`` array stored as a sagittal (slices along x, rows head to feet,
    columns front to back) or coronal (slices along y, rows head to feet, columns along x) series."""
    if plane == "sagittal":
        array, order = np.transpose(axial, (2, 0, 1))[:, ::-1, :], (2, 0, 1)
        direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)  # columns: col, row, slice vectors
    else:
        array, order = np.transpose(axial, (1, 0, 2))[:, ::-1, :], (1, 0, 2)
        direction = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float)
    return Volume(np.ascontiguousarray(array, dtype=np.float32), tuple(spacing[i] for i in order), (0.0, 0.0, 0.0),
                  direction, [])


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_a_reformatted_series_is_judged_like_the_axial_one(plane: str) -> None:
    """A sagittal or coronal slice always ends at the scan range (head, feet): that is no
    truncated field of view; a body cut by the field of view still is, stored in any plane."""
    phantom = make_ct_phantom(3)
    assert _fired(_stored(phantom.hu, phantom.spacing, plane)) == set()
    cut = np.ascontiguousarray(_array()[:, 24:104, 24:104])
    assert "truncated_slice_share" in _fired(_stored(cut, SPACING, plane))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_normal_phantoms_raise_nothing(seed: int) -> None:
    qc = assess_image(phantom_volume(make_ct_phantom(seed)))
    assert [s.name for s in qc.signals if s.fired] == []


def test_phantom_variants_fire_their_checks() -> None:
    assert "noise_hu" in _fired(phantom_volume(make_ct_phantom(4, variant="low-dose")))
    assert "metal_ml" in _fired(phantom_volume(make_ct_phantom(4, variant="metal-artifact")))


def test_the_body_midline_is_in_patient_coordinates() -> None:
    volume = phantom_volume(make_ct_phantom(5))
    qc = assess_image(volume)
    # The phantom's body is centred on the field of view: column 79.5 of 160.
    assert qc.midline_x_mm(volume) == pytest.approx(79.5 * volume.spacing[2], abs=5.0)
    assert assess_image(_volume(np.full(SHAPE, -1000.0, np.float32))).midline_x_mm(volume) is None


def test_in_plane_erosion_is_ndimage_s() -> None:
    """The edge detector's shifted-AND erosion gives binary_erosion's voxels (a perf-only change)."""
    from pacs_sentinel.qc.image import _erode_in_plane

    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    rng = np.random.default_rng(3)
    for shape in ((1, 1, 1), (2, 3, 4), (5, 17, 13)):
        for share in (0.2, 0.7, 1.0):
            mask = rng.random(shape) < share
            assert np.array_equal(_erode_in_plane(mask), ndimage.binary_erosion(mask, structure))
