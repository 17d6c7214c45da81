"""Input-image QC on constructed volumes and on the product's phantoms."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.inference.phantoms import make_ct_phantom
from pacs_sentinel.inference.training import phantom_volume
from pacs_sentinel.qc.image import BLOCKINESS_CAP, UNIT_FREE_CHECKS, assess_image
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


# --- Block artefacts of lossy JPEG compression ---------------------------------------------------

def _through_jpeg(hu: np.ndarray, quality: int) -> np.ndarray:
    """Each slice saved as an 8-bit JPEG (Pillow, window -1024..1024 HU) and read back, in HU."""
    import io

    from PIL import Image

    low, high = -1024.0, 1024.0
    out = np.empty(hu.shape, np.float32)
    for index, plane in enumerate(hu):
        stored = np.clip((plane - low) / (high - low) * 255.0, 0, 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(stored).save(buffer, "JPEG", quality=quality)
        out[index] = np.asarray(Image.open(buffer), dtype=np.float32) / 255.0 * (high - low) + low
    return out


def _blockiness(volume: Volume):
    return next(s for s in assess_image(volume).signals if s.name == "blockiness")


def test_jpeg_blocks_fire_the_block_check_and_nothing_else() -> None:
    phantom = make_ct_phantom(6)
    as_drawn = _blockiness(phantom_volume(phantom))
    assert 0.9 < as_drawn.value < 1.15 and as_drawn.subscore == 1.0
    heavy = phantom_volume(phantom)
    heavy.array = _through_jpeg(phantom.hu, 10)
    assert _fired(heavy) == {"blockiness"}
    signal = _blockiness(heavy)
    assert signal.value > 3.0 and signal.reason is Reason.POOR_INPUT_QUALITY
    assert signal.fusion_factor == pytest.approx(0.8)  # lowers the score, cannot veto alone
    # Cropped after compression (blocks no longer at the corner): still found.
    cropped = Volume(np.ascontiguousarray(heavy.array[:, 3:, 5:]), heavy.spacing, heavy.origin, heavy.direction, [])
    assert _blockiness(cropped).value == pytest.approx(signal.value, rel=0.1)
    light = phantom_volume(phantom)
    light.array = _through_jpeg(phantom.hu, 75)  # visible to the measure, not fired
    assert 1.15 < _blockiness(light).value < 2.25 and not _blockiness(light).fired


@pytest.mark.parametrize("corruption", ["noise", "blur", "low-contrast", "ghosting"])
def test_other_image_corruptions_make_no_blocks(corruption: str) -> None:
    from pacs_sentinel.qc.corruptions import corrupt_image

    phantom = make_ct_phantom(7)
    volume = phantom_volume(phantom)
    volume.array = corrupt_image(phantom.hu, corruption, np.random.default_rng(7), phantom.spacing)
    assert _blockiness(volume).value < 1.25


def test_lossy_jpeg_2000_and_real_ct_files_show_no_blocks() -> None:
    """pydicom's CT files: one stored uncompressed, one lossy JPEG 2000 (wavelets, no blocks)."""
    from pydicom.pixels import apply_modality_lut

    from tests.conftest import shipped

    for name in ("CT_small.dcm", "693_J2KI.dcm"):
        ds = shipped(name)
        array = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)[None]
        signal = _blockiness(Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), []))
        assert 0.9 < signal.value < 1.3 and not signal.fired, name


def test_too_little_soft_tissue_skips_the_block_check() -> None:
    air = np.full((4, 64, 64), -1000.0, np.float32)
    signal = _blockiness(_volume(air))
    assert signal.subscore == 1.0 and signal.value == 1.0


def test_a_series_compressed_by_dcmtk_with_lossy_jpeg_is_flagged(tmp_path) -> None:
    """DCMTK's dcmcjpeg as the peer that compressed the study: 8-bit baseline JPEG at quality 10
    is flagged, the same series lossless (process 14 SV1) is not, and the loaded pixels then
    equal the originals."""
    import subprocess

    from pacs_sentinel.dicom_io.series import load_series_files
    from pacs_sentinel.inference.phantoms import write_ct_series
    from tests.conftest import require_program

    program = require_program("/usr/bin/dcmcjpeg", "dcmtk")
    files = write_ct_series(make_ct_phantom(5, shape=(8, 160, 160)), tmp_path / "ct", seed=5)
    original = load_series_files(files)
    assert not _blockiness(original).fired
    for options, fired in ((["+eb", "+q", "10"], True), (["+e1"], False)):
        out = tmp_path / options[0]
        out.mkdir()
        for path in files:
            subprocess.run([program, *options, str(path), str(out / path.name)], check=True, capture_output=True)
        compressed = load_series_files(sorted(out.iterdir()))
        assert _fired(compressed) == ({"blockiness"} if fired else set()), options
        if not fired:
            assert _blockiness(compressed).value == pytest.approx(_blockiness(original).value)


# --- A series of another modality (not in HU) ----------------------------------------------------

def _mr_like(phantom) -> np.ndarray:
    """A phantom's tissues mapped to MR-like (T1) signal: air dark, fat brightest, the liver
    brighter than the other soft tissue, bone dark; Rician-like noise floor."""
    hu = phantom.hu.astype(np.float32)
    signal = np.interp(hu, [-1024, -500, -100, 0, 60, 200, 1000, 3071], [0, 20, 900, 350, 450, 300, 150, 100])
    return (signal + np.random.default_rng(0).normal(0.0, 15.0, hu.shape)).astype(np.float32)


def _of_modality(volume: Volume, modality: str) -> Volume:
    ds = pydicom.Dataset()
    ds.Modality = modality
    return Volume(volume.array, volume.spacing, volume.origin, volume.direction, [ds] * volume.array.shape[0])


def test_a_series_of_another_modality_is_not_called_not_in_hu() -> None:
    phantom = make_ct_phantom(6)
    mr = _of_modality(phantom_volume(dataclasses.replace(phantom, hu=_mr_like(phantom))), "MR")
    as_ct = _of_modality(mr, "CT")
    assert {"air_level_hu", "truncated_slice_share"} <= _fired(as_ct)  # read as HU it would be
    qc = assess_image(mr)
    assert [s.name for s in qc.signals] == list(UNIT_FREE_CHECKS)  # the HU thresholds are not measured
    assert qc.reasons == []
    # The body is found (Otsu), so the location check has its midline: the CT phantom's.
    ct = phantom_volume(phantom)
    assert qc.midline_x_mm(mr) == pytest.approx(assess_image(ct).midline_x_mm(ct), abs=5.0)
    assert ct.modality is None and assess_image(ct).signals[0].name == "noise_hu"  # no datasets: CT


def test_the_unit_free_checks_still_fire_on_another_modality() -> None:
    phantom = make_ct_phantom(6)
    mr = _mr_like(phantom)
    truncated = _of_modality(_volume(np.ascontiguousarray(mr[:, 30:130, 20:140])), "MR")
    assert _fired(truncated) == {"truncated_slice_share"}
    blurred = _of_modality(_volume(ndimage.gaussian_filter(mr, (0, 6.0, 6.0))), "MR")
    assert "edge_width_px" in _fired(blurred)
    assert _fired(_of_modality(_volume(mr), "MR")) == set()


def test_flat_jpeg_blocks_read_as_the_cap() -> None:
    """At very heavy compression a block is one flat value: steps only at its boundaries."""
    rng = np.random.default_rng(4)
    levels = rng.uniform(0.0, 120.0, (SHAPE[0], SHAPE[1] // 8, SHAPE[2] // 8)).astype(np.float32)
    blocks = np.repeat(np.repeat(levels, 8, axis=1), 8, axis=2)
    assert _blockiness(_volume(blocks)).value == BLOCKINESS_CAP and _blockiness(_volume(blocks)).fired
    assert _blockiness(_volume(np.full(SHAPE, 40.0, np.float32))).value == 1.0  # nothing to compare: skipped


def test_the_body_area_is_the_patients_cross_section_whatever_the_grid() -> None:
    """The ellipse of ``_array`` (semi-axes 120 x 140 mm); lungs (air inside the body) count as
    body; padding the field of view with air, reformatting the series and thicker slices change
    nothing; the same voxels at 80 % of the spacing are a smaller patient (0.64 of the area)."""
    expected = np.pi * 12.0 * 14.0
    array = _array()
    area = assess_image(_volume(array)).body_area_cm2(_volume(array))
    assert area == pytest.approx(expected, rel=0.03)
    lungs = array.copy()
    y, x = np.ogrid[: SHAPE[1], : SHAPE[2]]
    lungs[:, ((y - 50) * 2.5 / 40.0) ** 2 + ((np.abs(x - 64) - 20) * 2.5 / 30.0) ** 2 <= 1] = -850.0
    assert assess_image(_volume(lungs)).body_area_cm2(_volume(lungs)) == pytest.approx(area, rel=0.01)
    padded = _volume(np.pad(array, ((0, 0), (64, 64), (64, 64)), constant_values=-1000.0))
    assert assess_image(padded).body_area_cm2(padded) == pytest.approx(area, rel=0.02)
    for plane in ("sagittal", "coronal"):
        stored = _stored(array, SPACING, plane)
        assert assess_image(stored).body_area_cm2(stored) == pytest.approx(area, rel=0.03), plane
    thick = Volume(array[::2], (10.0, 2.5, 2.5), (0.0, 0.0, 0.0), np.eye(3), [])
    assert assess_image(thick).body_area_cm2(thick) == pytest.approx(area, rel=0.01)
    small = Volume(array, (4.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3), [])
    assert assess_image(small).body_area_cm2(small) == pytest.approx(0.64 * area, rel=0.01)
    empty = _volume(np.full(SHAPE, -1000.0, np.float32))
    assert assess_image(empty).body_area_cm2(empty) is None
