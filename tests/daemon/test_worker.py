"""Bad studies end as a job state with a clear reason; the daemon keeps working."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pacs_sentinel.daemon.jobs import FINISHED_STATES, JobState
from pacs_sentinel.dicom_io.scu import Peer, send_files
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from tests.conftest import free_port, received_modalities, require_program
from tests.daemon.conftest import make_config


def _finished(sentinel, count: int, timeout: float = 120):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = sentinel.jobs.jobs()
        if len(jobs) >= count and all(j.state in FINISHED_STATES for j in jobs) and not sentinel.outbox.pending_count():
            return {j.study_uid: j for j in jobs}
        time.sleep(0.1)
    pytest.fail(f"jobs did not finish: {sentinel.jobs.jobs()}")


def test_bad_studies_fail_or_are_rejected_and_good_ones_still_run(tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    sentinel = sentinel_factory(make_config(tmp_path, pacs.port))
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)
    single_slice = Path(get_testdata_file("CT_small.dcm"))
    mr_only = Path(get_testdata_file("MR_small.dcm"))
    gappy = write_ct_series(make_ct_phantom(5), tmp_path / "gappy", seed=5)
    del gappy[20]  # a missing slice
    good = write_ct_series(make_ct_phantom(6), tmp_path / "good", seed=6)
    for files in ([single_slice], [mr_only], gappy, good):
        assert all(r.delivered for r in send_files(files, peer, calling_ae="CT1"))

    jobs = _finished(sentinel, 4)
    uid = {name: str(pydicom.dcmread(files[0]).StudyInstanceUID)
           for name, files in {"single": [single_slice], "mr": [mr_only], "gappy": gappy, "good": good}.items()}
    assert jobs[uid["single"]].state is JobState.FAILED
    assert jobs[uid["single"]].error == "series has 1 slice; this pipeline needs at least 8"
    assert jobs[uid["mr"]].state is JobState.REJECTED
    # The reason says why, as `check-config --explain` would: which series, which rule failed.
    assert (jobs[uid["mr"]].error or "").startswith("no pipeline matches any series of the study: ")
    assert "series 1.3.6.1.4.1.5962.1.3.4.1.20040826185059.5457 (MR): organ-seg: Modality is 'MR', not one of ['CT']" \
        in (jobs[uid["mr"]].error or "")
    assert jobs[uid["gappy"]].state is JobState.FAILED
    assert "missing 1 slice" in (jobs[uid["gappy"]].error or "")
    assert jobs[uid["good"]].state is JobState.DONE
    assert received_modalities(pacs) == ["OT", "SEG", "SR"]


def test_withhold_seg_policy_sends_sr_and_overlay_but_keeps_the_seg(tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    from pacs_sentinel.daemon.config import parse_config

    base = make_config(tmp_path, pacs.port).model_dump(mode="json")
    base["pipelines"][0]["reports"] = {"on_review": "withhold-seg"}
    sentinel = sentinel_factory(parse_config(base))
    flagged = write_ct_series(make_ct_phantom(8, variant="metal-artifact"), tmp_path / "metal", seed=8)
    clean = write_ct_series(make_ct_phantom(9), tmp_path / "clean", seed=9)
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)
    for files in (flagged, clean):
        assert all(r.delivered for r in send_files(files, peer, calling_ae="CT1"))
    jobs = _finished(sentinel, 2)
    flagged_job = jobs[str(pydicom.dcmread(flagged[0]).StudyInstanceUID)]
    clean_job = jobs[str(pydicom.dcmread(clean[0]).StudyInstanceUID)]
    assert flagged_job.verdict == "Needs review" and clean_job.verdict == "Accepted"
    # The flagged study: SR + overlay at the PACS, the SEG kept here; the clean one: all three.
    assert received_modalities(pacs) == ["OT", "OT", "SEG", "SR", "SR"]
    assert (Path(flagged_job.output_dir or "") / "SEG_withheld.dcm").is_file()
    outbox = sentinel.database.connection().execute(
        "SELECT path FROM outbox WHERE job_id = ?", [flagged_job.id]).fetchall()
    assert not any("SEG" in Path(p).name for (p,) in outbox)


def test_labelmap_seg_type_is_sent_as_a_label_map_segmentation(tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    from pacs_sentinel.daemon.config import parse_config

    base = make_config(tmp_path, pacs.port).model_dump(mode="json")
    base["reports"] = {"seg_type": "LABELMAP"}
    sentinel = sentinel_factory(parse_config(base))
    files = write_ct_series(make_ct_phantom(10), tmp_path / "ct", seed=10)
    assert all(r.delivered for r in send_files(files, Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)))
    _finished(sentinel, 1)
    classes = [row[0] for row in pacs.spool.database.connection().execute(
        "SELECT sop_class_uid FROM instances WHERE modality = 'SEG'")]
    assert classes == ["1.2.840.10008.5.1.4.1.1.66.7"]  # Label Map Segmentation Storage


def test_an_object_that_fails_validation_fails_the_job_and_nothing_is_sent(
    tmp_path: Path, pacs, sentinel_factory, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    from pacs_sentinel.daemon import worker

    def broken_report(*args, **kwargs):  # type: ignore[no-untyped-def]
        result_set = build_result_set(*args, **kwargs)
        result_set.report.CompletionFlag = "BOGUS"  # reads back fine; dciodvfy knows it is wrong
        return result_set

    build_result_set = worker.build_result_set
    monkeypatch.setattr(worker, "build_result_set", broken_report)
    require_program("/usr/bin/dciodvfy", "dicom3tools")
    config = make_config(tmp_path, pacs.port)
    sentinel = sentinel_factory(config)
    files = write_ct_series(make_ct_phantom(11), tmp_path / "ct", seed=11)
    assert all(r.delivered for r in send_files(files, Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)))
    (job,) = _finished(sentinel, 1).values()
    assert job.state is JobState.FAILED
    assert "SR" in (job.error or "") and "fails dciodvfy" in (job.error or "")
    assert "Completion Flag" in (job.error or "")
    assert received_modalities(pacs) == []
    outbox = sentinel.database.connection().execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    assert outbox == 0
    # The written objects stay in the job folder for whoever looks into it.
    assert (config.node.data_dir / "results" / f"job-{job.id}" / "SR.dcm").is_file()


def test_send_kos_adds_a_quality_issue_kos_to_flagged_results_only(tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    from pacs_sentinel.daemon.config import parse_config

    base = make_config(tmp_path, pacs.port).model_dump(mode="json")
    base["review"] = {"send_kos": True}
    sentinel = sentinel_factory(parse_config(base))
    flagged = write_ct_series(make_ct_phantom(8, variant="metal-artifact"), tmp_path / "metal", seed=8)
    clean = write_ct_series(make_ct_phantom(9), tmp_path / "clean", seed=9)
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)
    for files in (flagged, clean):
        assert all(r.delivered for r in send_files(files, peer, calling_ae="CT1"))
    jobs = _finished(sentinel, 2)
    flagged_uid = str(pydicom.dcmread(flagged[0]).StudyInstanceUID)
    assert jobs[flagged_uid].verdict == "Needs review"
    assert received_modalities(pacs) == ["KO", "OT", "OT", "SEG", "SEG", "SR", "SR"]
    (path,) = [row[0] for row in pacs.spool.database.connection().execute(
        "SELECT path FROM instances WHERE modality = 'KO'")]
    kos = pydicom.dcmread(path)
    assert kos.StudyInstanceUID == flagged_uid and kos.SeriesNumber == 904
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113010"
    referenced = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                  for item in kos.ContentSequence if item.ValueType == "IMAGE"}
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in flagged}


def _raw_ds(ds: pydicom.Dataset, keyword: str, value: bytes) -> None:
    """Put ``value`` into ``ds`` as the undecoded bytes of a DS element, as a sender's file
    would carry them (pydicom refuses to build such values)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    value = value if len(value) % 2 == 0 else value + b" "
    tag = Tag(tag_for_keyword(keyword))
    ds[tag] = RawDataElement(tag, "DS", len(value), value, 0, False, True)


def _cxr_config(tmp_path: Path, pacs_port: int, modalities: list[str]):  # type: ignore[no-untyped-def]
    """A daemon with the cxr-cls pipeline only, for these modalities, sending to the PACS fixture."""
    from pacs_sentinel.daemon.config import parse_config

    return parse_config({
        "node": {"port": free_port(), "data_dir": str(tmp_path / "var"), "min_free_disk_mb": 0},
        "study": {"quiet_seconds": 1.0},
        "outbox": {"retry_initial_seconds": 0.5},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "pipelines": [{"name": "cxr-cls", "kind": "classification", "model": "demo:cxr-cls",
                       "match": {"Modality": modalities}, "min_slices": 1}],
    })


def test_radiographs_with_broken_numbers_fail_with_their_reason(tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    # Both were "internal error: TypeError / UFuncTypeError ..." (highdicom and pydicom choking
    # on the text), which says nothing to IT; a radiograph sent after them is still classified.
    from pacs_sentinel.inference.radiographs import make_cxr_phantom, write_dx_image

    config = _cxr_config(tmp_path, pacs.port, ["DX"])
    sentinel = sentinel_factory(config)
    broken = {"ImagerPixelSpacing": b"x\\y", "RescaleSlope": b"x"}
    files = {}
    for seed, (keyword, value) in enumerate(broken.items(), start=1):
        path = write_dx_image(make_cxr_phantom(seed), tmp_path / keyword, seed=seed, patient_id=f"DX{seed}")
        ds = pydicom.dcmread(path)
        _raw_ds(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
        files[keyword] = path
    files["good"] = write_dx_image(make_cxr_phantom(3), tmp_path / "good", seed=3, patient_id="DX3")
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)
    for path in files.values():
        assert all(r.delivered for r in send_files([path], peer))

    jobs = _finished(sentinel, 3)
    by_name = {name: jobs[str(pydicom.dcmread(path).StudyInstanceUID)] for name, path in files.items()}
    for keyword in broken:
        job = by_name[keyword]
        sop = str(pydicom.dcmread(files[keyword]).SOPInstanceUID)
        assert job.state is JobState.FAILED
        assert (job.error or "").startswith(f"{keyword} of {sop} is not "), job.error
        assert "internal error" not in (job.error or "")
    assert "is not 2 numbers: ['x', 'y']" in (by_name["ImagerPixelSpacing"].error or "")
    assert (by_name["RescaleSlope"].error or "").endswith("is not a number: 'x'")
    assert by_name["good"].state is JobState.DONE


def test_radiographs_without_spacing_or_orientation_are_classified(tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    # Both were "internal error: AttributeError": highdicom's SR image library read Patient
    # Orientation and Imager Pixel Spacing of every CR/DX image. A CR may send neither
    # (Patient Orientation 2C, spacing type 3); a DX sender may forget its spacing.
    from pydicom.uid import ComputedRadiographyImageStorage

    from pacs_sentinel.inference.radiographs import make_cxr_phantom, write_dx_image

    config = _cxr_config(tmp_path, pacs.port, ["DX", "CR"])
    assert config.reports.validate_ == "dciodvfy"  # results are checked before they are sent
    sentinel = sentinel_factory(config)
    files = {}
    for seed, name in enumerate(("dx-no-spacing", "cr-no-orientation"), start=1):
        path = write_dx_image(make_cxr_phantom(seed), tmp_path / name, seed=seed, patient_id=f"DX{seed}")
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing, ds.ImagerPixelSpacing
        if name.startswith("cr"):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
            ds.Modality = "CR"
            del ds.PatientOrientation
        ds.save_as(path, enforce_file_format=True)
        files[name] = path
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)
    for path in files.values():
        assert all(r.delivered for r in send_files([path], peer))

    jobs = _finished(sentinel, 2)
    for name, path in files.items():
        job = jobs[str(pydicom.dcmread(path).StudyInstanceUID)]
        assert job.state is JobState.DONE, (name, job.error)
    received = received_modalities(pacs)
    assert received.count("SR") == 2 and received.count("OT") >= 2


def _as_stored_and_changed(tmp_path: Path, pacs, sentinel_factory, change, prefix: str):  # type: ignore[no-untyped-def]
    """The jobs of the same chest phantom sent twice: as written, and with ``change`` applied to
    its data set (another study)."""
    from pacs_sentinel.inference.radiographs import make_cxr_phantom, write_dx_image

    sentinel = sentinel_factory(_cxr_config(tmp_path, pacs.port, ["DX"]))
    phantom = make_cxr_phantom(3, findings={"effusion": True})
    paths = []
    for seed, name in enumerate(("stored", "changed"), start=1):
        path = write_dx_image(phantom, tmp_path / name, seed=seed, patient_id=f"{prefix}{seed}")
        if name == "changed":
            ds = pydicom.dcmread(path)
            change(ds)
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)
    for path in paths:
        assert all(r.delivered for r in send_files([path], peer))
    jobs = _finished(sentinel, 2)
    stored, changed = (jobs[str(pydicom.dcmread(p).StudyInstanceUID)] for p in paths)
    assert stored.state is JobState.DONE and changed.state is JobState.DONE, (stored.error, changed.error)
    return stored, changed


def test_a_radiograph_stored_upside_down_is_classified_by_its_patient_orientation(
        tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    # The same chest stored as displayed (L\F) and upside down with the tag that says so (L\H):
    # the worker hands the tag to the model, which turns the image to the way it was trained.
    # Before, the upside-down copy was classified as stored and sent to review as unfamiliar.
    def upside_down(ds: pydicom.Dataset) -> None:
        ds.PixelData = ds.pixel_array[::-1].copy().tobytes()
        ds.PatientOrientation = ["L", "H"]

    upright, turned = _as_stored_and_changed(tmp_path, pacs, sentinel_factory, upside_down, "OR")
    assert (turned.verdict, turned.reasons) == (upright.verdict, upright.reasons)
    assert turned.quality_score == pytest.approx(upright.quality_score, abs=1e-3)


def test_a_radiograph_with_a_padding_border_gets_the_same_answer(tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    # The same chest with a black border of 40 pixels declared as Pixel Padding Value: the model
    # and the image checks read the exposed area only (before, the border changed the findings'
    # probabilities and scores, and the image checks counted it as clipped pixels).
    def padded(ds: pydicom.Dataset) -> None:
        ds.PixelData = np.pad(ds.pixel_array, 40, constant_values=0).tobytes()
        ds.Rows, ds.Columns = ds.Rows + 80, ds.Columns + 80
        ds.add_new(0x00280120, "US", 0)  # Pixel Padding Value

    plain, bordered = _as_stored_and_changed(tmp_path, pacs, sentinel_factory, padded, "PAD")
    assert (bordered.verdict, bordered.reasons) == (plain.verdict, plain.reasons)
    assert bordered.quality_score == pytest.approx(plain.quality_score, abs=1e-3)
