"""seg-qc end to end: a CT series plus a vendor's SEG pushed with DCMTK's storescu; the QC SR
(referencing that SEG's segments) and overlay come back to DCMTK's storescp."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pacs_sentinel.dicom_io.series import load_series_files
from pacs_sentinel.inference.phantoms import make_ct_phantom
from pacs_sentinel.reports.identity import is_own_object
from pacs_sentinel.reports.validate import run_dciodvfy
from tests.conftest import free_port, make_third_party_seg, require_program
from tests.e2e.conftest import Daemon, wait_for, write_config

pytestmark = pytest.mark.slow

LIVER = ("10200004", "SCT", "Liver")
SPLEEN = ("78961009", "SCT", "Spleen")
SEG_QC_PIPELINE = """
[[pipelines]]
name = "vendor-seg-qc"
kind = "seg-qc"
match = { Modality = ["CT"] }
"""


def content_items(sr: pydicom.Dataset):  # type: ignore[no-untyped-def]
    """Every content item of an SR, depth first."""
    stack = list(sr.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        yield item
        stack.extend(item.get("ContentSequence", []))


def measurement_groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The measurement groups (126010 "Imaging Measurements" -> 125007 groups) of a TID 1500 SR."""
    return [item for item in content_items(sr)
            if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "125007"]


def group_items(group: pydicom.Dataset, concept: str) -> list[pydicom.Dataset]:
    return [item for item in group.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == concept]


def bad_liver_mask(liver: np.ndarray) -> np.ndarray:
    """The liver shifted by 12 voxels to the patient's left and cut in two by a 6-slice gap."""
    bad = np.roll(liver, 12, axis=2)
    slices = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
    middle = int(slices[len(slices) // 2])
    bad[middle - 3:middle + 3] = False
    return bad


def test_third_party_seg_is_judged_and_the_sr_comes_back(  # type: ignore[no-untyped-def]
        phantom_study: list[Path], storescp, tmp_path: Path, dcmtk_env) -> None:
    storescu = require_program("/usr/bin/storescu", "dcmtk")
    pacs_port, pacs_out = storescp
    port = free_port()
    config = write_config(tmp_path / "config.toml", port=port, data_dir=tmp_path / "var", destination_port=pacs_port)
    config.write_text(config.read_text(encoding="utf-8") + SEG_QC_PIPELINE, encoding="utf-8")
    daemon = Daemon(config, port, tmp_path / "daemon.log")

    # The vendor's SEG: segment 1 is the phantom's true liver, segment 2 a shifted, broken one,
    # segment 3 the true spleen (a structure no model of the node knows).
    volume = load_series_files(phantom_study)
    phantom = make_ct_phantom(7)  # phantom_study is this phantom, slices in position order
    liver = phantom.liver.astype(bool)
    assert liver.shape == volume.array.shape
    seg_ds = make_third_party_seg(volume.datasets, [liver, bad_liver_mask(liver), phantom.organ("spleen")],
                                  [LIVER, LIVER, SPLEEN])
    seg_path = tmp_path / "vendor-seg.dcm"
    seg_ds.save_as(seg_path, enforce_file_format=True)
    seg_uid = str(seg_ds.SOPInstanceUID)

    daemon.start()
    try:
        sent = subprocess.run(
            [storescu, "-R", "-aet", "VENDORAI", "-aec", "SENTINEL", "127.0.0.1", str(daemon.port),
             *map(str, phantom_study), str(seg_path)],
            env=dcmtk_env, capture_output=True, text=True, timeout=120,
        )
        assert sent.returncode == 0, sent.stderr

        def received() -> dict[str, list[pydicom.Dataset]] | None:
            by_modality: dict[str, list[pydicom.Dataset]] = {}
            for path in sorted(pacs_out.glob("*")):
                if path.is_file():
                    ds = pydicom.dcmread(path)
                    by_modality.setdefault(str(ds.Modality), []).append(ds)
            # organ-seg: SEG + SR + SC; vendor-seg-qc: SR + SC (no new SEG).
            return by_modality if sum(len(v) for v in by_modality.values()) >= 5 else None

        objects = wait_for(received, 300, 0.5, "organ-seg and seg-qc results at storescp")
    finally:
        assert daemon.stop() == 0
    assert {m: len(v) for m, v in objects.items()} == {"SEG": 1, "SR": 2, "OT": 2}, daemon.log
    # The only SEG sent is our own organ-seg result: seg-qc writes none, and the vendor SEG
    # is not echoed back.
    assert is_own_object(objects["SEG"][0]) and objects["SEG"][0].SOPInstanceUID != seg_uid

    qc_reports = [sr for sr in objects["SR"] if sr.SeriesDescription.startswith("QC of third-party SEG")]
    assert len(qc_reports) == 1, [sr.SeriesDescription for sr in objects["SR"]]
    sr_ds = qc_reports[0]
    assert sr_ds.SeriesDescription == "QC of third-party SEG (QC: needs review)"
    assert sr_ds.StudyInstanceUID == volume.study_uid and sr_ds.PatientID == "E2E001"
    assert is_own_object(sr_ds)

    # Evidence: the vendor SEG and the source series.
    evidence = {str(ref.ReferencedSOPInstanceUID)
                for study in sr_ds.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert seg_uid in evidence
    assert {str(ds.SOPInstanceUID) for ds in volume.datasets} <= evidence

    # One group per vendor segment, referencing that SEG's segment and the source images.
    groups = measurement_groups(sr_ds)
    assert len(groups) == 3
    by_segment = {}
    for group in groups:
        (ref_item,) = [i for i in group.ContentSequence if i.ValueType == "IMAGE"
                       and i.ConceptNameCodeSequence[0].CodeValue == "121191"]  # Referenced Segment
        ref = ref_item.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg_uid
        assert ref.ReferencedSOPClassUID == pydicom.uid.SegmentationStorage
        by_segment[int(ref.ReferencedSegmentNumber)] = group
        sources = [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121233"]
        assert sources and all(str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) in evidence for i in sources)
    assert sorted(by_segment) == [1, 2, 3]

    def verdict(group: pydicom.Dataset) -> str:
        return group_items(group, "QC002")[0].ConceptCodeSequence[0].CodeValue

    def reasons(group: pydicom.Dataset) -> set[str]:
        return {i.ConceptCodeSequence[0].CodeValue for i in group_items(group, "QC003")}

    def score(group: pydicom.Dataset) -> float:
        return float(group_items(group, "QC001")[0].MeasuredValueSequence[0].NumericValue)

    assert verdict(by_segment[1]) == "QC010", reasons(by_segment[1])  # the true liver: accepted
    assert verdict(by_segment[2]) == "QC011"  # shifted and broken: needs review
    assert {"QC029", "QC023"} <= reasons(by_segment[2])  # disagreement with organ-seg, fragmentation
    assert score(by_segment[2]) < 0.5 <= score(by_segment[1])
    # The spleen: no model of ours covers it, the liver estimator does not judge it (no QC030);
    # to review, saying why.
    assert verdict(by_segment[3]) == "QC011" and reasons(by_segment[3]) == {"QC033"}

    # The overlay of the seg-qc result says what it judged; every object is valid DICOM.
    overlays = [sc for sc in objects["OT"] if sc.SeriesDescription.startswith("Third-party SEG QC overlay")]
    assert len(overlays) == 1
    require_program("/usr/bin/dciodvfy", "dicom3tools")
    for ds in (sr_ds, overlays[0]):
        report = run_dciodvfy(ds)
        assert report is not None and report.errors == [], (ds.Modality, report.errors)
    hd.sr.Comprehensive3DSR.from_dataset(sr_ds)

    # The seg-qc job records the verdict of its worst segment and is marked for review.
    conn = sqlite3.connect(tmp_path / "var" / "sentinel.db")
    try:
        jobs = conn.execute("SELECT pipeline, state, verdict, needs_review, series_uid FROM jobs ORDER BY id").fetchall()
    finally:
        conn.close()
    assert [job[:2] for job in jobs] == [("organ-seg", "DONE"), ("vendor-seg-qc", "DONE")]
    assert jobs[1][2:] == ("Needs review", 1, volume.series_uid)

    lines = [json.loads(line) for line in daemon.log.splitlines() if line.startswith("{")]
    judged = [line for line in lines if line.get("event") == "third-party SEG judged"]
    assert len(judged) == 1 and judged[0]["seg_uid"] == seg_uid
    assert [s["matched"] for s in judged[0]["segments"]] == ["Liver", "Liver", None]
    assert judged[0]["segments"][0]["agreement_dice"] > 0.85 > judged[0]["segments"][1]["agreement_dice"]
    # organ-seg's own liver passed its own QC, so its agreement was used (QC 2.7.0).
    for segment in judged[0]["segments"][:2]:
        assert segment["agreement_used"] is True and segment["reference_score"] >= 0.5
