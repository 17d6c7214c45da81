"""A radiograph pushed with DCMTK's storescu comes back as a findings SR and Grad-CAM overlays."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from pacs_sentinel.inference.radiographs import make_cxr_phantom, write_dx_image
from pacs_sentinel.reports.validate import run_dciodvfy
from tests.conftest import require_program
from tests.e2e.conftest import wait_for
from tests.e2e.test_roundtrip import _content_items, _received

pytestmark = pytest.mark.slow


def test_dx_phantom_through_the_daemon(tmp_path: Path, storescp, daemon_factory, dcmtk_env) -> None:  # type: ignore[no-untyped-def]
    storescu = require_program("/usr/bin/storescu", "dcmtk")
    phantom = make_cxr_phantom(77, findings={"nodule": False, "effusion": True, "cardiomegaly": True})
    source = write_dx_image(phantom, tmp_path / "dx", patient_id="E2ECXR", seed=77)
    pacs_port, pacs_out = storescp
    daemon = daemon_factory(pacs_port)
    daemon.start()
    sent = subprocess.run([storescu, "-aet", "MODALITY", "-aec", "SENTINEL", "127.0.0.1", str(daemon.port), str(source)],
                          env=dcmtk_env, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr

    def results() -> dict[str, list[pydicom.Dataset]] | None:
        got = _received(pacs_out)
        return got if "SR" in got and "OT" in got else None

    received = wait_for(results, 180, 0.5, "SR and overlays at storescp")
    wait_for(lambda: len(_received(pacs_out).get("OT", [])) >= 2, 30, 0.2, "both overlays")
    received = _received(pacs_out)
    assert "SEG" not in received
    sr_ds = received["SR"][0]
    assert sr_ds.StudyInstanceUID == pydicom.dcmread(source).StudyInstanceUID
    hd.sr.Comprehensive3DSR.from_dataset(sr_ds)

    items = list(_content_items(sr_ds))
    probabilities = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
                     if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "QC005"]
    verdicts = [i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "QC002"]
    assert len(probabilities) == 3 and all(0 <= p <= 1 for p in probabilities)  # nodule, effusion, cardiomegaly
    assert len(verdicts) == 3
    positives = sum(p >= 0.5 for p in probabilities)
    assert positives >= 1
    assert len(received["OT"]) == positives  # one Grad-CAM overlay per positive finding

    require_program("/usr/bin/dciodvfy", "dicom3tools")
    for ds in [sr_ds, *received["OT"]]:
        report = run_dciodvfy(ds)
        assert report is not None and report.errors == [], report.errors
