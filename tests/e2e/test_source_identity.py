"""A study whose patient and study attributes are awkward — a Japanese name in ISO 2022, type 2
attributes left out, a Study Description with a backslash, a name longer than PN allows — pushed
with DCMTK's storescu: SEG, SR and overlay still reach DCMTK's storescp, valid, in the patient's
name and a character set that holds it (docs/conformance.md §6)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from pacs_sentinel.reports.validate import run_dciodvfy
from tests.conftest import require_program
from tests.e2e.conftest import sqlite_job_states, wait_for

pytestmark = pytest.mark.slow

NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"
LEFT_OUT = ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName",
            "StudyDate", "StudyTime")


def awkward_study(out: Path) -> list[Path]:
    files = write_ct_series(make_ct_phantom(7), out, patient_id="E2E-JP", seed=7)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]  # the usual Japanese declaration
        ds.PatientName = NAME
        ds.StudyDescription = "CT\\abdomen"  # a backslash: two values where one is allowed
        ds.InstitutionName = "Klinik " + "X" * 70  # longer than LO allows (and copied into the SEG)
        for keyword in LEFT_OUT:
            delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)
    return files


def test_awkward_identity_gets_valid_results(storescp, daemon_factory, dcmtk_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    storescu = require_program("/usr/bin/storescu", "dcmtk")
    require_program("/usr/bin/dciodvfy", "dicom3tools")
    pacs_port, pacs_out = storescp
    files = awkward_study(tmp_path / "study")
    daemon = daemon_factory(pacs_port)
    daemon.start()
    sent = subprocess.run([storescu, "-aet", "MODALITY", "-aec", "SENTINEL", "127.0.0.1", str(daemon.port),
                           *map(str, files)], env=dcmtk_env, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr

    def received() -> list[pydicom.Dataset] | None:
        states = sqlite_job_states(tmp_path / "var" / "sentinel.db")
        assert not [s for s in states if s[1] == "FAILED"], daemon.log
        objects = [pydicom.dcmread(p) for p in sorted(pacs_out.glob("*")) if p.is_file()]
        return objects if len(objects) >= 3 else None

    objects = wait_for(received, 180, 0.5, "SEG, SR and overlay at storescp")
    assert sorted(str(ds.Modality) for ds in objects) == ["OT", "SEG", "SR"]
    for ds in objects:
        report = run_dciodvfy(ds)
        assert report is not None and report.errors == [], (ds.Modality, report.errors)
        assert list(ds.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
        assert str(ds.PatientName) == NAME and ds.PatientID == "E2E-JP"
        assert ds.StudyDescription == "CT/abdomen"
        assert all(keyword in ds and not ds[keyword].value for keyword in LEFT_OUT), ds.Modality
