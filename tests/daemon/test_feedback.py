"""Feedback from the viewer: a corrected SEG sent back is recognised, measured and resolves the item;
our own objects sent back, and third-party SEGs of other series, are not feedback."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pacs_sentinel.daemon.feedback import agreement, corrected_job
from pacs_sentinel.daemon.jobs import FINISHED_STATES, Job, JobState
from pacs_sentinel.daemon.review import Decision, ReviewStatus
from pacs_sentinel.dicom_io.scu import Peer, send_files
from pacs_sentinel.dicom_io.series import load_series_files
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from pacs_sentinel.inference.preprocess import volume_affine
from tests.daemon.conftest import make_config


def _correction(sources: list[pydicom.Dataset], mask: np.ndarray, out: Path, *, label: str = "Liver") -> Path:
    """A SEG as a viewer writes it (another manufacturer), one segment, on the given sources."""
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label=label,
            segmented_property_category=codes.SCT.Organ, segmented_property_type=codes.SCT.Liver,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=generate_uid(), series_number=77, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="Slicer Community", manufacturer_model_name="3D Slicer", software_versions="5.6.2",
        device_serial_number="WS-7", content_creator_name="Review^Dr",
    )
    seg.save_as(out)
    return out


def _wait(condition, timeout: float = 180, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _feedback_rows(sentinel) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    return [dict(r) for r in sentinel.database.connection()["feedback"].rows]


def test_a_corrected_seg_resolves_the_item_with_its_dice(tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    from pacs_sentinel.daemon.config import parse_config

    base = make_config(tmp_path, pacs.port).model_dump(mode="json", exclude_defaults=True)
    # A seg-qc pipeline too: a correction of our result is feedback, never seg-qc input.
    base["pipelines"].append({"name": "vendor-qc", "kind": "seg-qc", "match": {"Modality": ["CT"]}})
    sentinel = sentinel_factory(parse_config(base))
    files = write_ct_series(make_ct_phantom(8, variant="metal-artifact"), tmp_path / "ct", seed=8)
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)
    assert all(r.delivered for r in send_files(files, peer, calling_ae="CT1"))
    _wait(lambda: sentinel.jobs.jobs() and all(j.state in FINISHED_STATES for j in sentinel.jobs.jobs()), what="the job")
    (job,) = sentinel.jobs.jobs()
    assert job.state is JobState.DONE and job.needs_review
    item = sentinel.review.find(job.study_uid, "organ-seg")
    assert item is not None and item.status is ReviewStatus.OPEN

    # Our own SEG and SR sent back to us: stored, not feedback.
    own = [Path(job.output_dir or "") / name for name in ("SEG.dcm", "SR.dcm")]
    assert all(r.delivered for r in send_files(own, peer, calling_ae="PACS"))
    # A third-party SEG of another series of the study (no result of ours): not feedback either.
    other_files = write_ct_series(make_ct_phantom(3), tmp_path / "other", seed=3, study_uid=job.study_uid,
                                  series_uid=generate_uid())
    # (sent only as a SEG: its source series is not sent, so no job runs on it)
    other_volume = load_series_files(other_files)
    stray = _correction(other_volume.datasets, other_volume.array > 100, tmp_path / "stray.dcm")

    # The reviewer's correction: our mask without its upper half of slices.
    volume = load_series_files(files)
    ours = hd.seg.segread(Path(job.output_dir or "") / "SEG.dcm").get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in volume.datasets], segment_numbers=[1],
        assert_missing_frames_are_empty=True)[..., 0] > 0
    slices = np.flatnonzero(ours.any(axis=(1, 2)))
    corrected = ours.copy()
    corrected[slices[len(slices) // 2]:] = False
    assert corrected.any() and corrected.sum() < ours.sum()
    correction = _correction(volume.datasets, corrected, tmp_path / "correction.dcm")
    assert all(r.delivered for r in send_files([stray, correction], peer, calling_ae="VIEWER"))

    _wait(lambda: sentinel.review.get(item.id).status is ReviewStatus.RESOLVED, what="the item to be resolved")
    rows = _feedback_rows(sentinel)
    assert len(rows) == 1, rows
    row = rows[0]
    expected_dice = 2 * corrected.sum() / (ours.sum() + corrected.sum())  # corrected is a subset of ours
    assert row["dice"] == pytest.approx(expected_dice, abs=1e-6)
    assert row["hd95_mm"] > 0 and row["error"] is None
    assert row["sop_instance_uid"] == str(pydicom.dcmread(correction).SOPInstanceUID)
    assert (row["job_id"], row["review_item_id"], row["segment_label"]) == (job.id, item.id, "Liver")
    resolved = sentinel.review.get(item.id)
    assert resolved.decision is Decision.AI_CORRECTED and resolved.reviewer == "Review^Dr"
    assert f"Dice {expected_dice:.3f}" in (resolved.comments or "")
    # Nothing re-ran and seg-qc judged nothing: a correction is neither pipeline's input.
    time.sleep(2 * sentinel.config.study.quiet_seconds)
    assert [j.pipeline for j in sentinel.jobs.jobs()] == ["organ-seg"]

    # The data set: `sentinel feedback export` writes the case as NIfTI + a CSV row.
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[node]\ndata_dir = "{sentinel.config.node.data_dir}"\n')
    export = subprocess.run([sys.executable, "-m", "pacs_sentinel", "feedback", "export", "--out",
                             str(tmp_path / "export"), "-c", str(config_file)], capture_output=True, text=True,
                            timeout=120)
    assert export.returncode == 0, export.stderr
    assert "exported 1 case(s), 1 with NIfTI images and masks" in export.stdout
    with (tmp_path / "export" / "cases.csv").open(encoding="utf-8") as handle:
        (case,) = list(csv.DictReader(handle))
    assert (case["study_uid"], case["decision"], case["reviewer"]) == (job.study_uid, "ai-corrected", "Review^Dr")
    assert float(case["dice"]) == pytest.approx(expected_dice, abs=1e-5) and case["note"] == ""
    folder = tmp_path / "export"
    image = nib.load(folder / case["image"])
    ai_mask = np.asarray(nib.load(folder / case["ai_mask"]).dataobj)
    corrected_mask = np.asarray(nib.load(folder / case["corrected_mask"]).dataobj)
    assert image.shape == volume.array.shape == ai_mask.shape == corrected_mask.shape
    assert np.allclose(image.affine, volume_affine(volume))
    assert np.array_equal(ai_mask > 0, ours) and np.array_equal(corrected_mask > 0, corrected)
    assert set(np.unique(corrected_mask)) == {0, 1}


def test_export_keeps_a_case_without_a_segmentation_with_a_note(tmp_path: Path) -> None:
    from pacs_sentinel.daemon.jobs import MIGRATIONS, JobStore
    from pacs_sentinel.daemon.review import ReviewStore
    from pacs_sentinel.dicom_io.index import Database

    database = Database(tmp_path / "var" / "sentinel.db", migrations=MIGRATIONS)
    jobs = JobStore(database)
    jobs.queue_study("1.2.3", {"cxr-cls": 0.0})
    job = jobs.claim_next()
    assert job is not None
    (tmp_path / "out").mkdir()
    jobs.record_results(job.id, outbox_items=[], result={
        "series_uid": "1.2.3.4", "model": "cxr-cls", "model_version": "1.0.0", "qc_version": "1.2.0",
        "verdict": "Needs review", "quality_score": 0.2, "reasons": ["Low model confidence"], "needs_review": True,
        "output_dir": str(tmp_path / "out")})
    ReviewStore(database).resolve(1, "ai-rejected", "dr-a", "no effusion")
    config_file = tmp_path / "config.toml"
    config_file.write_text('[node]\ndata_dir = "var"\n')
    export = subprocess.run([sys.executable, "-m", "pacs_sentinel", "feedback", "export", "--out",
                             str(tmp_path / "export"), "-c", str(config_file)], capture_output=True, text=True,
                            timeout=120)
    assert export.returncode == 0, export.stderr
    assert "exported 1 case(s), 0 with NIfTI images and masks" in export.stdout
    with (tmp_path / "export" / "cases.csv").open(encoding="utf-8") as handle:
        (case,) = list(csv.DictReader(handle))
    assert (case["decision"], case["reviewer"], case["comments"], case["reasons"]) == \
        ("ai-rejected", "dr-a", "no effusion", "Low model confidence")
    assert case["image"] == "" and "no segmentation of ours" in case["note"]


def test_export_to_an_existing_file_is_a_one_line_error(tmp_path: Path) -> None:
    """``--out /etc/passwd`` was a FileExistsError traceback."""
    from pacs_sentinel.daemon.jobs import MIGRATIONS
    from pacs_sentinel.dicom_io.index import Database

    Database(tmp_path / "var" / "sentinel.db", migrations=MIGRATIONS)
    config_file = tmp_path / "config.toml"
    config_file.write_text('[node]\ndata_dir = "var"\n')
    a_file = tmp_path / "cases.csv"
    a_file.write_text("not a folder")
    for out, error in ((a_file, f"{a_file}: exists and is not a folder"),
                       (a_file / "export", f"{a_file / 'export'}: cannot create the export folder: Not a directory")):
        export = subprocess.run([sys.executable, "-m", "pacs_sentinel", "feedback", "export", "--out", str(out),
                                 "-c", str(config_file)], capture_output=True, text=True, timeout=120)
        assert export.returncode == 2
        assert export.stderr.strip() == f"sentinel: {error}", export.stderr
    assert a_file.read_text() == "not a folder"


def _job(tmp_path: Path, *, series_uid: str, with_seg: bool = True, state: JobState = JobState.DONE) -> Job:
    out = tmp_path / f"job-{series_uid}"
    out.mkdir()
    if with_seg:
        (out / "SEG.dcm").write_bytes(b"")
    return Job(id=1, study_uid="1.2", pipeline="organ-seg", state=state, created_at=0.0, runs=1, error=None,
               verdict="Needs review", quality_score=0.1, reasons=[], needs_review=True, output_dir=str(out),
               series_uid=series_uid)


def _seg_header(*, series: str, manufacturer: str = "Slicer Community", model: str = "3D Slicer") -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.Modality = "SEG"
    ds.StudyInstanceUID = "1.2"
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ref = pydicom.Dataset()
    ref.SeriesInstanceUID = series
    ds.ReferencedSeriesSequence = [ref]
    return ds


def test_corrected_job_recognises_only_third_party_segs_of_our_delivered_series(tmp_path: Path) -> None:
    ours = _job(tmp_path, series_uid="1.2.3")
    delivered = {"1.2.3": 100.0, "1.2.4": 100.0, "1.2.5": 100.0}
    assert corrected_job(_seg_header(series="1.2.3"), [ours], delivered, 200.0) == ours
    assert corrected_job(_seg_header(series="1.2.3"), [ours], delivered, 50.0) is None  # there before our result
    assert corrected_job(_seg_header(series="1.2.3"), [ours], {}, 200.0) is None  # nothing delivered yet
    assert corrected_job(_seg_header(series="1.2.9"), [ours], delivered, 200.0) is None  # another series: seg-qc's
    assert corrected_job(_seg_header(series="1.2.3", manufacturer="PACS Sentinel", model="PACS Sentinel AI node"),
                         [ours], delivered, 200.0) is None  # our own SEG sent back
    classified = _job(tmp_path, series_uid="1.2.4", with_seg=False)
    assert corrected_job(_seg_header(series="1.2.4"), [classified], delivered, 200.0) is None  # no SEG of ours
    failed = _job(tmp_path, series_uid="1.2.5", state=JobState.FAILED)
    assert corrected_job(_seg_header(series="1.2.5"), [failed], delivered, 200.0) is None


def test_agreement_metrics() -> None:
    a = np.zeros((6, 20, 20), bool)
    a[1:5, 5:15, 5:15] = True
    dice, hd95 = agreement(a, a, (2.0, 1.0, 1.0))
    assert dice == pytest.approx(1.0) and hd95 == pytest.approx(0.0)
    b = np.roll(a, 3, axis=2)  # shifted 3 voxels of 1 mm along x
    dice, hd95 = agreement(a, b, (2.0, 1.0, 1.0))
    assert dice == pytest.approx(2 * 4 * 10 * 7 / (2 * 400))
    assert 0 < hd95 <= 3.0 + 1e-6
    assert agreement(a, np.zeros_like(a), (1.0, 1.0, 1.0)) == (0.0, None)
