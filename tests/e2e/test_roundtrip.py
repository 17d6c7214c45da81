"""A study pushed with DCMTK's storescu comes back to DCMTK's storescp as SEG + SR + SC."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pacs_sentinel.reports.validate import run_dciodvfy
from tests.conftest import require_program
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.slow

ACCEPT_THRESHOLD = 0.5  # the default [qc] accept_threshold the test daemon runs with


def _content_items(sr: pydicom.Dataset):  # type: ignore[no-untyped-def]
    """Every content item of an SR, depth first."""
    stack = list(sr.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        yield item
        stack.extend(item.get("ContentSequence", []))


def sqlite_jobs(db_path: Path) -> list[dict]:  # type: ignore[type-arg]
    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute("SELECT * FROM jobs ORDER BY id")]
    finally:
        conn.close()


def _received(out: Path) -> dict[str, list[pydicom.Dataset]]:
    by_modality: dict[str, list[pydicom.Dataset]] = {}
    for path in sorted(out.glob("*")):
        if path.is_file():
            ds = pydicom.dcmread(path)
            by_modality.setdefault(str(ds.Modality), []).append(ds)
    return by_modality


def test_storescu_to_daemon_to_storescp(phantom_study: list[Path], storescp, daemon_factory, dcmtk_env) -> None:  # type: ignore[no-untyped-def]
    storescu = require_program("/usr/bin/storescu", "dcmtk")
    pacs_port, pacs_out = storescp
    daemon = daemon_factory(pacs_port)
    daemon.start()

    sent = subprocess.run(
        [storescu, "-aet", "MODALITY", "-aec", "SENTINEL", "127.0.0.1", str(daemon.port), *map(str, phantom_study)],
        env=dcmtk_env, capture_output=True, text=True, timeout=120,
    )
    assert sent.returncode == 0, sent.stderr

    def three_objects() -> dict[str, list[pydicom.Dataset]] | None:
        got = _received(pacs_out)
        return got if sum(len(v) for v in got.values()) >= 3 else None

    received = wait_for(three_objects, 300, 0.5, "SEG, SR and SC at storescp")
    assert {m: len(v) for m, v in received.items()} == {"SEG": 1, "SR": 1, "OT": 1}, daemon.log

    sources = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, phantom_study)}
    study_uid = next(iter(sources.values())).StudyInstanceUID
    seg_ds, sr_ds, sc_ds = received["SEG"][0], received["SR"][0], received["OT"][0]
    for ds in (seg_ds, sr_ds, sc_ds):
        assert ds.StudyInstanceUID == study_uid
        assert ds.PatientID == "E2E001"

    # The SEG's frames reference the source instances, at their positions.
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert int(seg.NumberOfFrames) > 0
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert source_uid in sources
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[source_uid].ImagePositionPatient])

    # The SR carries the QC contract and references the SEG.
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    items = list(_content_items(sr_ds))
    scores = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
              if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "QC001"
              and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99PSQC"]
    verdicts = [i.ConceptCodeSequence[0].CodeValue for i in items
                if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "QC002"]
    assert len(scores) == 1 and 0.0 <= scores[0] <= 1.0
    assert verdicts == ["QC010" if scores[0] >= ACCEPT_THRESHOLD else "QC011"]
    references = [ref.ReferencedSOPInstanceUID for ev in sr_ds.CurrentRequestedProcedureEvidenceSequence
                  for series in ev.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
    assert seg_ds.SOPInstanceUID in references
    assert sr_ds.VerificationFlag == "UNVERIFIED"

    # Every object passes the IOD validator and loads back with highdicom.
    require_program("/usr/bin/dciodvfy", "dicom3tools")
    for ds in (seg_ds, sr_ds, sc_ds):
        report = run_dciodvfy(ds)
        assert report is not None
        assert report.errors == [], (ds.Modality, report.errors)
    sc = hd.Image.from_dataset(sc_ds)
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.pixel_array.ndim == 3 and sc.pixel_array.shape[-1] == 3

    # The job records the verdict; a flagged one is marked for review.
    jobs = sqlite_jobs(daemon.config.parent / "var" / "sentinel.db")
    assert [(j["state"], j["verdict"], bool(j["needs_review"])) for j in jobs] == [
        ("DONE", "Accepted" if scores[0] >= ACCEPT_THRESHOLD else "Needs review", scores[0] < ACCEPT_THRESHOLD)
    ]

    assert daemon.stop() == 0
    # Every log line about the job carries the study and the job (JSON logs).
    lines = [json.loads(line) for line in daemon.log.splitlines() if line.startswith("{")]
    about_job = [line for line in lines if line.get("event") in {"job started", "qc evaluated", "job processed"}]
    assert len(about_job) == 3
    for line in about_job:
        assert line["study_uid"] == study_uid and line["job_id"] == jobs[0]["id"]
