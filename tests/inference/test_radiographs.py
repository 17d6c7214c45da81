"""Tests of the synthetic chest radiographs and their DICOM DX writer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_sentinel.inference.classification import image_from_dataset
from pacs_sentinel.inference.radiographs import (
    DX_IMAGE_STORAGE_FOR_PRESENTATION,
    FINDINGS,
    RADIOGRAPH_VARIANTS,
    RadiographPhantom,
    make_cxr_phantom,
    write_dx_image,
)
from tests.conftest import require_program

NONE = {name: False for name in FINDINGS}


def _noise(image: np.ndarray) -> float:
    """Robust noise estimate: median absolute second difference along rows."""
    return float(np.median(np.abs(np.diff(image.astype(np.float64), n=2, axis=1))))


def test_same_seed_same_phantom() -> None:
    a, b, c = make_cxr_phantom(7), make_cxr_phantom(7), make_cxr_phantom(8)
    assert isinstance(a, RadiographPhantom)
    assert a.image.dtype == np.float32 and a.image.shape == (256, 256)
    assert np.array_equal(a.image, b.image) and a.findings == b.findings
    assert not np.array_equal(a.image, c.image)
    assert a.pixel_spacing == pytest.approx((430 / 256, 430 / 256))
    assert 0.0 <= a.image.min() and a.image.max() < 1.0


def test_chest_anatomy() -> None:
    phantom = make_cxr_phantom(3, findings=NONE)
    image, lungs = phantom.image, phantom.lungs
    assert phantom.findings == NONE and phantom.finding_masks == {}
    assert image[:, :8].mean() < 0.05  # air beside the body
    # Dark lungs on both sides of a bright mediastinum/spine; the abdomen is dense.
    assert lungs[:, :128].any() and lungs[:, 128:].any()
    spine = image[60:150, 124:132].mean()
    assert image[lungs].mean() < spine - 0.15
    assert image[230:245, 60:200].mean() > image[lungs].mean() + 0.1
    assert 0.38 <= phantom.cardiothoracic_ratio <= 0.48


def test_findings_are_visible_on_the_same_anatomy() -> None:
    base = make_cxr_phantom(5, findings=NONE)
    effusion = make_cxr_phantom(5, findings={"effusion": True})
    fluid = effusion.finding_masks["effusion"]
    assert fluid.any() and effusion.findings["effusion"]
    # Fluid at the lung base: brighter than the air-filled base it replaces.
    assert effusion.image[fluid].mean() > base.image[fluid].mean() + 0.08
    rows = np.nonzero(base.lungs.any(axis=1))[0]
    base_rows = slice(rows.max() - 20, rows.max() + 1)
    assert effusion.image[base_rows].mean() > base.image[base_rows].mean()
    # Elsewhere the image is unchanged.
    far = ~np.isin(np.arange(256), np.arange(rows.max() - 60, 256))
    assert np.allclose(effusion.image[far], base.image[far], atol=1e-6)

    nodule = make_cxr_phantom(5, findings={"nodule": True})
    spot = nodule.finding_masks["nodule"]
    assert 3 <= spot.sum() < 600 and (spot & base.lungs).sum() >= 0.9 * spot.sum()
    assert nodule.image[spot].mean() > base.image[spot].mean() + 0.03

    big = make_cxr_phantom(5, findings={"cardiomegaly": True})
    assert big.cardiothoracic_ratio > 0.55 > 0.48 >= base.cardiothoracic_ratio
    heart = big.finding_masks["cardiomegaly"]
    width = np.ptp(np.nonzero(heart.any(axis=0))[0]) + 1
    thorax = np.ptp(np.nonzero(base.lungs.any(axis=0))[0]) + 1
    assert width / thorax > 0.5
    assert big.lungs.sum() < base.lungs.sum()


def test_random_findings_follow_the_prevalence() -> None:
    drawn = np.array([[make_cxr_phantom(s, shape=(48, 48)).findings[n] for n in FINDINGS] for s in range(200)])
    assert np.all((drawn.mean(axis=0) > 0.15) & (drawn.mean(axis=0) < 0.35))


@pytest.mark.parametrize("variant", RADIOGRAPH_VARIANTS)
def test_every_variant_is_drawn(variant: str) -> None:
    phantom = make_cxr_phantom(11, variant=variant, shape=(128, 96))
    assert phantom.variant == variant and phantom.image.shape == (128, 96)
    assert phantom.pixel_spacing == pytest.approx((430 / 128, 430 / 96))


def test_variants_differ_as_documented() -> None:
    normal = make_cxr_phantom(4, findings=NONE)
    for noisy in ("underexposed", "noisy"):
        assert _noise(make_cxr_phantom(4, findings=NONE, variant=noisy).image) > 4 * _noise(normal.image)
    rotated = make_cxr_phantom(4, findings=NONE, variant="rotated")
    # The spine no longer runs down the middle column.
    assert rotated.image[20:60, 120:136].mean() < normal.image[20:60, 120:136].mean() - 0.05 or \
        rotated.image[200:240, 120:136].mean() < normal.image[200:240, 120:136].mean() - 0.05


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="variant"):
        make_cxr_phantom(1, variant="lateral")
    with pytest.raises(ValueError, match="pneumothorax"):
        make_cxr_phantom(1, findings={"pneumothorax": True})


def test_dx_round_trip(tmp_path: Path) -> None:
    phantom = make_cxr_phantom(2, findings={"nodule": True}, shape=(200, 160))
    path = write_dx_image(phantom, tmp_path / "a", seed=2, patient_id="CXR042")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == DX_IMAGE_STORAGE_FOR_PRESENTATION == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "DX" and ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
    assert ds.PresentationIntentType == "FOR PRESENTATION" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.PatientID == "CXR042" and (ds.Rows, ds.Columns) == (200, 160)
    assert 12 <= ds.BitsStored <= 16 and ds.WindowWidth > 0
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx(phantom.pixel_spacing, rel=1e-5)
    assert [float(v) for v in ds.ImagerPixelSpacing] == pytest.approx(phantom.pixel_spacing, rel=1e-5)
    expected = np.rint(phantom.image.astype(np.float64) * 4095)
    assert np.array_equal(ds.pixel_array, expected.astype(np.uint16))
    image = image_from_dataset(ds)
    assert image.dtype == np.float32 and np.array_equal(image, expected.astype(np.float32))
    # Same seed, same bytes; a given study UID is kept.
    again = write_dx_image(phantom, tmp_path / "b", seed=2, patient_id="CXR042")
    assert again.read_bytes() == path.read_bytes()
    other = pydicom.dcmread(write_dx_image(phantom, tmp_path / "c", study_uid="1.2.3.4"))
    assert other.StudyInstanceUID == "1.2.3.4" and other.SOPInstanceUID != ds.SOPInstanceUID


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_dx_image(make_cxr_phantom(3, shape=(64, 64)), tmp_path, seed=3))
    stored = ds.pixel_array.astype(np.float32)
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert np.array_equal(image_from_dataset(ds), 4095 - stored)


@pytest.mark.parametrize("variant", ["normal", "underexposed"])
def test_dx_passes_dciodvfy(tmp_path: Path, variant: str) -> None:
    dciodvfy = require_program("/usr/bin/dciodvfy", "dicom3tools")
    path = write_dx_image(make_cxr_phantom(9, variant=variant, findings={n: True for n in FINDINGS}), tmp_path, seed=9)
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False, timeout=60)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
    assert errors == [], errors
