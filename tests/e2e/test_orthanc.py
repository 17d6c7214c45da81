"""Orthanc (Debian package) as the PACS: the results join the study Orthanc already holds.

The source images go to Orthanc first, as a modality would send them; then the same images go
through the daemon, whose only destination is Orthanc. Orthanc's REST API must then show one
patient with one study (the source StudyInstanceUID) holding the source series and our result
series, each instance of the SOP class we wrote.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from pacs_sentinel.inference.radiographs import make_cxr_phantom, write_dx_image
from tests.conftest import require_program
from tests.e2e.conftest import Daemon, Orthanc, wait_for

pytestmark = pytest.mark.slow


def _storescu(files: list[Path], ae_title: str, port: int, env: dict[str, str]) -> None:
    """Send files with DCMTK's storescu; fail the test with its output when it fails."""
    storescu = require_program("/usr/bin/storescu", "dcmtk")
    sent = subprocess.run([storescu, "-aet", "MODALITY", "-aec", ae_title, "127.0.0.1", str(port), *map(str, files)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _rows(db_path: Path, sql: str) -> list[dict]:  # type: ignore[type-arg]
    """Rows of a query on the daemon's database, opened read-only."""
    if not db_path.exists():
        return []
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(sql)]
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


def _wait_until_done(daemon: Daemon, orthanc: Orthanc, timeout: float) -> list[dict]:  # type: ignore[type-arg]
    """Wait until the daemon has jobs and every one is DONE (all results acknowledged).

    A job that ends FAILED or REJECTED, or a timeout, fails the test with the outbox rows (the
    statuses Orthanc answered), the daemon's log and Orthanc's log: a rejected object is a
    product bug to be read from there.
    """
    db_path = daemon.config.parent / "var" / "sentinel.db"
    deadline = time.monotonic() + timeout
    jobs: list[dict] = []  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        jobs = _rows(db_path, "SELECT id, state, error FROM jobs ORDER BY id")
        if jobs and all(job["state"] == "DONE" for job in jobs):
            return jobs
        if any(job["state"] in {"FAILED", "REJECTED"} for job in jobs):
            break
        time.sleep(0.5)
    outbox = _rows(db_path, "SELECT sop_class_uid, state, attempts, last_error FROM outbox ORDER BY id")
    pytest.fail(f"jobs not DONE: {jobs}\noutbox: {outbox}\n--- daemon log ---\n{daemon.log[-6000:]}\n"
                f"--- Orthanc log ---\n{orthanc.log[-6000:]}")


def _instances_by_series(orthanc: Orthanc, study_id: str) -> dict[str, list[dict]]:  # type: ignore[type-arg]
    """Orthanc series id -> the simplified tags of each of its instances."""
    by_series: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for series in orthanc.get(f"/studies/{study_id}/series"):
        by_series[series["ID"]] = [orthanc.get(f"/instances/{instance}/simplified-tags")
                                   for instance in series["Instances"]]
    return by_series


def _push_source_then_daemon(files: list[Path], orthanc: Orthanc, daemon_factory, dcmtk_env) -> tuple[Daemon, str]:  # type: ignore[no-untyped-def]
    """Store the source images in Orthanc, then send them through a daemon that delivers to Orthanc.

    Returns:
        The daemon and Orthanc's id of the source study.
    """
    _storescu(files, orthanc.ae_title, orthanc.dicom_port, dcmtk_env)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    studies = orthanc.get("/studies?expand")
    assert [s["MainDicomTags"]["StudyInstanceUID"] for s in studies] == [study_uid]

    daemon = daemon_factory(orthanc.dicom_port, destination_ae=orthanc.ae_title)
    daemon.start()
    _storescu(files, "SENTINEL", daemon.port, dcmtk_env)
    _wait_until_done(daemon, orthanc, 300)
    return daemon, studies[0]["ID"]


def _assert_one_patient_one_study(orthanc: Orthanc, study_id: str, study_uid: str, patient_id: str) -> None:
    """Orthanc holds exactly one patient with exactly this one study."""
    studies = orthanc.get("/studies?expand")
    assert [s["ID"] for s in studies] == [study_id], "the results created a new study"
    assert studies[0]["MainDicomTags"]["StudyInstanceUID"] == study_uid
    assert studies[0]["PatientMainDicomTags"]["PatientID"] == patient_id
    patients = orthanc.get("/patients?expand")
    assert [(p["ID"], p["MainDicomTags"]["PatientID"], p["Studies"]) for p in patients] == [
        (studies[0]["ParentPatient"], patient_id, [study_id])
    ]


def test_segmentation_results_join_the_source_study_in_orthanc(phantom_study: list[Path], orthanc: Orthanc,
                                                              daemon_factory, dcmtk_env) -> None:  # type: ignore[no-untyped-def]
    source = pydicom.dcmread(phantom_study[0], stop_before_pixels=True)
    daemon, study_id = _push_source_then_daemon(phantom_study, orthanc, daemon_factory, dcmtk_env)

    _assert_one_patient_one_study(orthanc, study_id, str(source.StudyInstanceUID), str(source.PatientID))
    by_series = _instances_by_series(orthanc, study_id)
    classes = sorted((tags[0]["Modality"], sorted({t["SOPClassUID"] for t in tags}), len(tags))
                     for tags in by_series.values())
    assert classes == [
        ("CT", [CTImageStorage], len(phantom_study)),
        ("OT", [SecondaryCaptureImageStorage], 1),
        ("SEG", [SegmentationStorage], 1),
        ("SR", [Comprehensive3DSRStorage], 1),
    ]
    every_instance = [tags for series in by_series.values() for tags in series]
    for tags in every_instance:
        assert (tags["PatientID"], tags["StudyInstanceUID"]) == (source.PatientID, source.StudyInstanceUID)

    # What Orthanc holds is exactly what the daemon delivered, and it reads back.
    db_path = daemon.config.parent / "var" / "sentinel.db"
    delivered = {row["sop_instance_uid"] for row in _rows(db_path, "SELECT sop_instance_uid FROM outbox")}
    assert delivered == {t["SOPInstanceUID"] for t in every_instance if t["Modality"] != "CT"}
    seg_id = next(series for series, tags in by_series.items() if tags[0]["Modality"] == "SEG")
    instance_id = orthanc.get(f"/series/{seg_id}")["Instances"][0]
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(pydicom.filebase.DicomBytesIO(
        orthanc.get_bytes(f"/instances/{instance_id}/file"))))
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert {ref.SeriesInstanceUID for ref in seg.ReferencedSeriesSequence} == {source.SeriesInstanceUID}


def test_findings_results_join_the_source_study_in_orthanc(tmp_path: Path, orthanc: Orthanc, daemon_factory,
                                                          dcmtk_env) -> None:  # type: ignore[no-untyped-def]
    phantom = make_cxr_phantom(77, findings={"nodule": False, "effusion": True, "cardiomegaly": True})
    image = write_dx_image(phantom, tmp_path / "dx", patient_id="E2EORTHANC", seed=77)
    source = pydicom.dcmread(image, stop_before_pixels=True)
    _, study_id = _push_source_then_daemon([image], orthanc, daemon_factory, dcmtk_env)

    _assert_one_patient_one_study(orthanc, study_id, str(source.StudyInstanceUID), "E2EORTHANC")
    by_series = _instances_by_series(orthanc, study_id)
    by_modality = {tags[0]["Modality"]: tags for tags in by_series.values()}
    assert sorted(by_modality) == ["DX", "OT", "SR"]
    assert {t["SOPClassUID"] for t in by_modality["DX"]} == {DigitalXRayImageStorageForPresentation}
    assert {t["SOPClassUID"] for t in by_modality["SR"]} == {Comprehensive3DSRStorage}
    assert len(by_modality["SR"]) == 1
    assert {t["SOPClassUID"] for t in by_modality["OT"]} == {SecondaryCaptureImageStorage}
    assert len(by_modality["OT"]) >= 1  # one overlay per positive finding, or one saying there is none
    for tags in (t for series in by_series.values() for t in series):
        assert (tags["PatientID"], tags["StudyInstanceUID"]) == ("E2EORTHANC", source.StudyInstanceUID)


LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"


def _labelmap_daemon(orthanc: Orthanc, daemon_factory) -> Daemon:  # type: ignore[no-untyped-def]
    """A daemon delivering to Orthanc that writes Label Map Segmentations (``[reports] seg_type``)."""
    daemon = daemon_factory(orthanc.dicom_port, destination_ae=orthanc.ae_title)
    daemon.config.write_text(daemon.config.read_text() + '\n[reports]\nseg_type = "LABELMAP"\n', encoding="utf-8")
    return daemon


@pytest.mark.parametrize("orthanc_options", [{"UnknownSopClassAccepted": True}])
def test_labelmap_seg_joins_the_study_when_orthanc_accepts_unknown_sop_classes(
        phantom_study: list[Path], orthanc: Orthanc, daemon_factory, dcmtk_env) -> None:  # type: ignore[no-untyped-def]
    source = pydicom.dcmread(phantom_study[0], stop_before_pixels=True)
    _storescu(phantom_study, orthanc.ae_title, orthanc.dicom_port, dcmtk_env)
    daemon = _labelmap_daemon(orthanc, daemon_factory)
    daemon.start()
    _storescu(phantom_study, "SENTINEL", daemon.port, dcmtk_env)
    _wait_until_done(daemon, orthanc, 300)
    studies = orthanc.get("/studies")
    assert len(studies) == 1
    _assert_one_patient_one_study(orthanc, studies[0], str(source.StudyInstanceUID), str(source.PatientID))
    by_modality = {tags[0]["Modality"]: {t["SOPClassUID"] for t in tags}
                   for tags in _instances_by_series(orthanc, studies[0]).values()}
    assert by_modality == {"CT": {CTImageStorage}, "SEG": {LABEL_MAP_SEGMENTATION_STORAGE},
                           "SR": {Comprehensive3DSRStorage}, "OT": {SecondaryCaptureImageStorage}}



def test_labelmap_seg_refused_by_default_orthanc_is_a_dead_letter_at_once(
        phantom_study: list[Path], orthanc: Orthanc, daemon_factory, dcmtk_env) -> None:  # type: ignore[no-untyped-def]
    """Orthanc 1.10.1 (Debian 12) knows no Label Map Segmentation Storage: with its default
    ``UnknownSopClassAccepted: false`` it rejects that presentation context. The SR and the
    overlay still join the study; the SEG is given up on the first attempt (retrying cannot
    teach Orthanc a SOP class) with an error that names the refused class, the job is FAILED
    with that reason, and ``sentinel outbox retry`` requeues it (refused again here: Orthanc
    was not reconfigured).
    """
    source = pydicom.dcmread(phantom_study[0], stop_before_pixels=True)
    _storescu(phantom_study, orthanc.ae_title, orthanc.dicom_port, dcmtk_env)
    daemon = _labelmap_daemon(orthanc, daemon_factory)
    daemon.start()
    _storescu(phantom_study, "SENTINEL", daemon.port, dcmtk_env)
    db_path = daemon.config.parent / "var" / "sentinel.db"

    def job_finished() -> list[dict] | None:  # type: ignore[type-arg]
        jobs = _rows(db_path, "SELECT state, error FROM jobs")
        return jobs if jobs and jobs[0]["state"] not in ("QUEUED", "RUNNING", "DELIVERING") else None

    jobs = wait_for(job_finished, 300, 0.5, "the job to finish")
    rows = _rows(db_path, "SELECT * FROM outbox ORDER BY id")
    by_class = {row["sop_class_uid"]: row for row in rows}
    assert {uid: row["state"] for uid, row in by_class.items()} == {
        LABEL_MAP_SEGMENTATION_STORAGE: "dead-letter", Comprehensive3DSRStorage: "sent",
        SecondaryCaptureImageStorage: "sent"}
    seg_row = by_class[LABEL_MAP_SEGMENTATION_STORAGE]
    assert seg_row["attempts"] == 1
    assert f"{LABEL_MAP_SEGMENTATION_STORAGE}: abstract syntax not supported" in seg_row["last_error"], seg_row
    assert Path(seg_row["path"]).is_file()
    assert jobs[0]["state"] == "FAILED" and LABEL_MAP_SEGMENTATION_STORAGE in jobs[0]["error"], jobs

    retried = subprocess.run([sys.executable, "-m", "pacs_sentinel", "outbox", "retry", "-c", str(daemon.config)],
                             capture_output=True, text=True, timeout=120)
    assert retried.returncode == 0 and "1 dead letter(s) requeued" in retried.stdout, retried
    wait_for(lambda: _rows(db_path, "SELECT state FROM jobs")[0]["state"] == "FAILED"
             and _rows(db_path, f"SELECT state FROM outbox WHERE id = {seg_row['id']}")[0]["state"] == "dead-letter",
             120, 0.5, "the requeued SEG to be refused again")

    studies = orthanc.get("/studies")
    _assert_one_patient_one_study(orthanc, studies[0], str(source.StudyInstanceUID), str(source.PatientID))
    by_modality = {tags[0]["Modality"]: {t["SOPClassUID"] for t in tags}
                   for tags in _instances_by_series(orthanc, studies[0]).values()}
    assert by_modality == {"CT": {CTImageStorage}, "SR": {Comprehensive3DSRStorage}, "OT": {SecondaryCaptureImageStorage}}
