"""Tests of the synthetic CT phantoms and their DICOM series writer."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_sentinel.dicom_io.series import load_series_files
from pacs_sentinel.inference.phantoms import PHANTOM_VARIANTS, CTPhantom, make_ct_phantom, write_ct_series

SMALL = {"shape": (12, 64, 64), "spacing": (10.0, 6.25, 6.25)}


def test_same_seed_same_phantom() -> None:
    a = make_ct_phantom(7, **SMALL)
    b = make_ct_phantom(7, **SMALL)
    c = make_ct_phantom(8, **SMALL)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.liver, b.liver)
    assert not np.array_equal(a.hu, c.hu)


def test_default_phantom_anatomy() -> None:
    phantom = make_ct_phantom(3)
    assert phantom.hu.dtype == np.int16 and phantom.hu.shape == (48, 160, 160)
    assert phantom.liver.dtype == bool and phantom.liver.shape == phantom.hu.shape
    assert phantom.spacing == (5.0, 2.5, 2.5)
    assert phantom.hu[0, 0, 0] < -900  # air in the corner
    liver_hu = float(np.median(phantom.hu[phantom.liver]))
    assert 60 <= liver_hu <= 95
    assert 700 < phantom.liver_volume_ml < 2500
    # Patient right is -x, i.e. low column indices: the liver's centre of mass is there.
    cols = np.nonzero(phantom.liver)[2]
    assert cols.mean() < phantom.hu.shape[2] / 2


@pytest.mark.parametrize("variant", PHANTOM_VARIANTS)
def test_every_variant_is_drawn(variant: str) -> None:
    phantom = make_ct_phantom(11, variant=variant, **SMALL)
    assert isinstance(phantom, CTPhantom) and phantom.variant == variant
    assert phantom.liver.any()


def test_variants_differ_as_documented() -> None:
    normal = make_ct_phantom(5)
    assert make_ct_phantom(5, variant="unusual-anatomy").liver_volume_ml > 1.7 * normal.liver_volume_ml
    metal = make_ct_phantom(5, variant="metal-artifact")
    assert metal.hu.max() > 2000  # metal
    assert np.array_equal(metal.liver, normal.liver)  # same anatomy, corrupted image
    situs = make_ct_phantom(5, variant="situs-inversus")
    assert np.nonzero(situs.liver)[2].mean() > situs.hu.shape[2] / 2
    low_dose = make_ct_phantom(5, variant="low-dose")
    soft = ~normal.liver & (normal.hu > 0) & (normal.hu < 100)
    assert np.std(low_dose.hu[soft].astype(float)) > 3 * np.std(normal.hu[soft].astype(float))


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="banana"):
        make_ct_phantom(1, variant="banana")


def test_series_round_trip(tmp_path: Path) -> None:
    phantom = make_ct_phantom(4, **SMALL)
    paths = write_ct_series(phantom, tmp_path, seed=4, patient_id="P4")
    assert [p.name for p in paths[:2]] == ["CT000001.dcm", "CT000002.dcm"]
    volume = load_series_files(reversed(paths))
    assert np.array_equal(volume.array, phantom.hu.astype(np.float32))
    assert volume.spacing == pytest.approx(phantom.spacing)
    assert volume.origin == pytest.approx(phantom.origin)
    ds = pydicom.dcmread(paths[0])
    assert ds.Modality == "CT" and ds.PatientID == "P4" and ds.RescaleType == "HU"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_uids_follow_the_seed(tmp_path: Path) -> None:
    phantom = make_ct_phantom(4, shape=(3, 32, 32), spacing=(5.0, 12.5, 12.5))
    first = [pydicom.dcmread(p) for p in write_ct_series(phantom, tmp_path / "a", seed=9)]
    again = [pydicom.dcmread(p) for p in write_ct_series(phantom, tmp_path / "b", seed=9)]
    other = [pydicom.dcmread(p) for p in write_ct_series(phantom, tmp_path / "c")]
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
    assert len({d.SOPInstanceUID for d in first}) == 3
    assert first[0].StudyInstanceUID != other[0].StudyInstanceUID
    given = write_ct_series(phantom, tmp_path / "d", study_uid="1.2.3.4", series_uid="1.2.3.5")
    assert pydicom.dcmread(given[0]).StudyInstanceUID == "1.2.3.4"


def test_written_instances_pass_dciodvfy(tmp_path: Path) -> None:
    dciodvfy = shutil.which("dciodvfy") or ("/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists() else None)
    if dciodvfy is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy (dicom3tools) is required in CI")
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    phantom = make_ct_phantom(2, variant="metal-artifact", **SMALL)
    paths = write_ct_series(phantom, tmp_path, seed=2)
    for path in (paths[0], paths[-1]):
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
        assert errors == [], errors
