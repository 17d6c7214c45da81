"""seg-qc pipelines in the daemon: which SEGs are judged, with which model, and what fails."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_sentinel.daemon.config import parse_config
from pacs_sentinel.daemon.jobs import FINISHED_STATES, JobState
from pacs_sentinel.daemon.routing import read_candidates, read_third_party_segs, segs_to_judge
from pacs_sentinel.daemon.seg_qc import judge_segs
from pacs_sentinel.dicom_io.scu import Peer, send_files
from pacs_sentinel.dicom_io.series import load_series_files
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from tests.conftest import make_third_party_seg, received_modalities
from tests.daemon.conftest import make_config

LIVER = ("10200004", "SCT", "Liver")
SEG_QC = {"name": "vendor-qc", "kind": "seg-qc", "match": {"Modality": ["CT"]}}


def config_with_seg_qc(tmp_path: Path, pacs_port: int, **seg_qc: object):  # type: ignore[no-untyped-def]
    base = make_config(tmp_path, pacs_port).model_dump(mode="json", exclude_none=True)
    base["pipelines"].append({**SEG_QC, **seg_qc})
    return parse_config(base)


def write_vendor_seg(ct_files: list[Path], path: Path, *, shift: int = 0) -> Path:
    volume = load_series_files(ct_files)
    seed = int(ct_files[0].parent.name.rsplit("-", 1)[-1])
    liver = make_ct_phantom(seed).liver.astype(bool)
    seg = make_third_party_seg(volume.datasets, [np.roll(liver, shift, axis=2)], [LIVER])
    seg.save_as(path, enforce_file_format=True)
    return path


def wait_finished(sentinel, count: int, timeout: float = 120):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = sentinel.jobs.jobs()
        if len(jobs) >= count and all(j.state in FINISHED_STATES for j in jobs) and not sentinel.outbox.pending_count():
            return jobs
        time.sleep(0.1)
    pytest.fail(f"jobs did not finish: {sentinel.jobs.jobs()}")


def test_judge_segs_with_and_without_agreement(tmp_path: Path) -> None:
    ct = write_ct_series(make_ct_phantom(21), tmp_path / "ct-21", seed=21)
    seg = write_vendor_seg(ct, tmp_path / "seg.dcm", shift=10)
    by_series = {str(pydicom.dcmread(ct[0]).SeriesInstanceUID): ct,
                 str(pydicom.dcmread(seg, stop_before_pixels=True).SeriesInstanceUID): [seg]}
    candidates, segs = read_candidates(by_series), read_third_party_segs(by_series)

    for agreement in (True, False):
        config = config_with_seg_qc(tmp_path, 104, agreement=agreement)
        pipeline = config.pipelines[1]
        (outcome,) = judge_segs(config, pipeline, segs_to_judge(pipeline, candidates, segs))
        signals = outcome.qc.segments[0].signals
        # The organ-seg pipeline's model card judges the volume either way.
        assert "volume_ml_subscore" in signals and "left_share_subscore" in signals
        if agreement:
            assert 0.3 < signals["agreement_dice"] < 0.85
        else:
            assert "agreement_dice" not in signals
        assert outcome.result_set.segmentation is None
        assert [ds.Modality for ds in outcome.result_set.datasets()] == ["SR", "OT"]


def test_correction_of_a_delivered_result_is_feedback_and_a_vendor_seg_is_judged(  # type: ignore[no-untyped-def]
        tmp_path: Path, pacs, sentinel_factory) -> None:
    sentinel = sentinel_factory(config_with_seg_qc(tmp_path, pacs.port))
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)

    # Study A: our result is delivered first; a SEG arriving afterwards corrects it.
    ct_a = write_ct_series(make_ct_phantom(22), tmp_path / "ct-22", seed=22)
    assert all(r.delivered for r in send_files(ct_a, peer, calling_ae="CT1"))
    wait_finished(sentinel, 1)
    correction = write_vendor_seg(ct_a, tmp_path / "correction.dcm")
    assert all(r.delivered for r in send_files([correction], peer, calling_ae="VIEWER"))

    # Study B: the vendor SEG arrives with its images: judged.
    ct_b = write_ct_series(make_ct_phantom(23), tmp_path / "ct-23", seed=23)
    vendor = write_vendor_seg(ct_b, tmp_path / "vendor.dcm")
    assert all(r.delivered for r in send_files([*ct_b, vendor], peer, calling_ae="VENDORAI"))

    jobs = wait_finished(sentinel, 3)
    time.sleep(3)  # study A's correction went quiet long ago: it must not have queued anything
    jobs = sentinel.jobs.jobs()
    study_a, study_b = (str(pydicom.dcmread(files[0]).StudyInstanceUID) for files in (ct_a, ct_b))
    assert sorted((j.study_uid == study_a, j.pipeline, j.state.value) for j in jobs) == [
        (False, "organ-seg", "DONE"), (False, "vendor-qc", "DONE"), (True, "organ-seg", "DONE")]
    # Two organ-seg result sets and the seg-qc SR + overlay; no SEG from seg-qc.
    assert received_modalities(pacs) == ["OT", "OT", "OT", "SEG", "SEG", "SR", "SR", "SR"]
    judged = next(j for j in jobs if j.pipeline == "vendor-qc")
    assert judged.study_uid == study_b and judged.verdict == "Accepted"


def write_unplaceable_seg(ct_files: list[Path], path: Path) -> Path:
    """A vendor SEG whose frames name no source image and lie off the series."""
    seg = pydicom.dcmread(write_vendor_seg(ct_files, path))
    for frame in seg.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
        frame.PlanePositionSequence[0].ImagePositionPatient[2] = 5000.0
    seg.save_as(path, enforce_file_format=True)
    return path


def test_a_seg_that_cannot_be_placed_fails_the_job_and_sends_nothing(  # type: ignore[no-untyped-def]
        tmp_path: Path, pacs, sentinel_factory) -> None:
    base = config_with_seg_qc(tmp_path, pacs.port).model_dump(mode="json", exclude_none=True)
    base["pipelines"] = base["pipelines"][1:]  # seg-qc only
    sentinel = sentinel_factory(parse_config(base))
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)

    # Study A: its only SEG cannot be placed: the job fails with the reason, nothing is sent.
    ct = write_ct_series(make_ct_phantom(24), tmp_path / "ct-24", seed=24)
    seg_path = write_unplaceable_seg(ct, tmp_path / "seg.dcm")
    assert all(r.delivered for r in send_files([*ct, seg_path], peer))
    (job,) = wait_finished(sentinel, 1)
    assert job.pipeline == "vendor-qc" and job.state is JobState.FAILED
    assert "lies on no slice of the series" in (job.error or "")
    assert received_modalities(pacs) == []

    # Study B: one SEG cannot be placed, the other can: that one is judged and sent, and the
    # job, DONE, names the SEG left out and why.
    ct_b = write_ct_series(make_ct_phantom(25), tmp_path / "ct-25", seed=25)
    bad = write_unplaceable_seg(ct_b, tmp_path / "bad.dcm")
    good = write_vendor_seg(ct_b, tmp_path / "good.dcm")
    assert all(r.delivered for r in send_files([*ct_b, bad, good], peer))
    jobs = wait_finished(sentinel, 2)
    (job_b,) = [j for j in jobs if j.id != job.id]
    bad_uid = str(pydicom.dcmread(bad, stop_before_pixels=True).SOPInstanceUID)
    assert job_b.state is JobState.DONE and job_b.verdict == "Accepted"
    assert f"SEG {bad_uid} not judged" in (job_b.error or "") and "lies on no slice" in (job_b.error or "")
    assert received_modalities(pacs) == ["OT", "SR"]
    paths = [row[0] for row in pacs.spool.database.connection().execute("SELECT path FROM instances")]
    (sr,) = [ds for ds in map(pydicom.dcmread, paths) if ds.Modality == "SR"]
    evidence = {str(item.ReferencedSOPInstanceUID) for series in sr.CurrentRequestedProcedureEvidenceSequence
                for s in series.ReferencedSeriesSequence for item in s.ReferencedSOPSequence}
    good_uid = str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)
    assert good_uid in evidence and bad_uid not in evidence


def test_agreement_is_left_out_where_our_own_prediction_fails(tmp_path: Path) -> None:
    """On a metal-artefact series organ-seg fails, so its own mask fails our QC: the vendor's
    (correct) liver is judged without the agreement instead of being called a disagreement."""
    phantom = make_ct_phantom(24, variant="metal-artifact")
    ct = write_ct_series(phantom, tmp_path / "ct-24", seed=24)
    volume = load_series_files(ct)
    seg = make_third_party_seg(volume.datasets, [phantom.liver.astype(bool)], [LIVER])
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    by_series = {str(volume.series_uid): ct,
                 str(pydicom.dcmread(seg_path, stop_before_pixels=True).SeriesInstanceUID): [seg_path]}
    candidates, segs = read_candidates(by_series), read_third_party_segs(by_series)
    config = config_with_seg_qc(tmp_path, 104)
    pipeline = config.pipelines[1]

    (outcome,) = judge_segs(config, pipeline, segs_to_judge(pipeline, candidates, segs))

    segment = outcome.qc.segments[0]
    assert "agreement_dice" not in segment.signals
    assert all(reason.value.value != "QC029" for reason in segment.reasons)
