"""The QC report (TID 1500) and the result set: the QC contract as a reader sees it."""

from __future__ import annotations

import io
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.identity import MANUFACTURER, MODEL_NAME, is_own_object
from pacs_sentinel.reports.resultset import build_result_set
from pacs_sentinel.reports.seg import build_segmentation
from pacs_sentinel.reports.sr import WITHHELD_SEG_TEXT, build_qc_report
from pacs_sentinel.results import (
    QC_FINDING,
    QC_SCHEME,
    QC_SCHEME_UID,
    QC_VERDICT,
    QC_VERSION,
    QUALITY_SCORE,
    VOLUME,
    QCResult,
    SegmentQC,
    Verdict,
)

#: The only warnings dciodvfy gives on our SR: it does not know our private coding scheme's
#: designator and UID (both declared in the Coding Scheme Identification Sequence, which it
#: does not consult).
ACCEPTED_SR_WARNINGS = {
    f"Warning - Unrecognized defined term <{QC_SCHEME}> for value 1 of attribute <Coding Scheme Designator>",
    f"Warning - Unrecognized defined term <{QC_SCHEME_UID}> for value 1 of attribute <Coding Scheme UID>",
}


def to_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_sr(ds: pydicom.Dataset) -> hd.sr.Comprehensive3DSR:
    return hd.sr.srread(io.BytesIO(to_bytes(ds)))


def items(group, concept) -> list[pydicom.Dataset]:
    """Direct children of a measurement group whose concept name is ``concept``."""
    return [
        item
        for item in group[0].ContentSequence
        if (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptNameCodeSequence[0].CodingSchemeDesignator)
        == (concept.value, concept.scheme)
    ]


@pytest.fixture(scope="module")
def seg_review(volume, seg_result, qc_review):
    return build_segmentation(volume, seg_result, qc_review)


@pytest.fixture(scope="module")
def sr_review(volume, seg_review, seg_result, qc_review):
    return read_sr(build_qc_report(volume, seg_review, seg_result, qc_review))


@pytest.fixture(scope="module")
def sr_accepted(volume, seg_result, qc_accepted):
    seg = build_segmentation(volume, seg_result, qc_accepted)
    return read_sr(build_qc_report(volume, seg, seg_result, qc_accepted))


@pytest.mark.parametrize("case", ["review", "accepted"])
def test_qc_items_per_segment(case, sr_review, sr_accepted, qc_review, qc_accepted):
    sr, qc = (sr_review, qc_review) if case == "review" else (sr_accepted, qc_accepted)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(qc.segments) == 1
    group, segment_qc = groups[0], qc.segments[0]

    (score,) = items(group, QUALITY_SCORE)
    assert score.ValueType == "NUM"
    value = float(score.MeasuredValueSequence[0].NumericValue)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(segment_qc.quality_score)
    unit = score.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning) == ("1", "UCUM", "no units")

    (verdict,) = items(group, QC_VERDICT)
    assert verdict.ValueType == "CODE"
    code = verdict.ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == (segment_qc.verdict.value.value, QC_SCHEME)
    assert code.CodeValue == ("QC011" if case == "review" else "QC010")

    findings = items(group, QC_FINDING)
    assert [f.ConceptCodeSequence[0].CodeValue for f in findings] == [r.value.value for r in segment_qc.reasons]
    assert len(findings) == (3 if case == "review" else 0)

    (volume_item,) = items(group, VOLUME)
    assert volume_item.ValueType == "NUM"
    volume_unit = volume_item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
    assert (volume_unit.CodeValue, volume_unit.CodingSchemeDesignator) == ("mm3", "UCUM")
    assert float(volume_item.MeasuredValueSequence[0].NumericValue) == pytest.approx(segment_qc.volume_mm3, rel=1e-6)

    (version,) = items(group, QC_VERSION)
    assert version.TextValue == "qc-0.3.1"


def test_highdicom_reads_the_measurements(sr_review, qc_review):
    (group,) = sr_review.content.get_volumetric_roi_measurement_groups()
    names = {m.name.value: m for m in group.get_measurements()}
    assert names[QUALITY_SCORE.value].value == pytest.approx(0.42)
    assert names[VOLUME.value].unit.value == "mm3"
    evaluations = group.get_qualitative_evaluations()
    assert [e.name.value for e in evaluations].count(QC_FINDING.value) == len(qc_review.segments[0].reasons)


def test_groups_reference_the_seg_segments(volume, seg_result_two, qc_review_two):
    seg = build_segmentation(volume, seg_result_two, qc_review_two)
    sr = read_sr(build_qc_report(volume, seg, seg_result_two, qc_review_two))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for group, segment in zip(groups, seg.SegmentSequence, strict=True):
        reference = group.referenced_segment
        item = reference[0]
        assert item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert item.ReferencedSOPSequence[0].ReferencedSOPClassUID == seg.SOPClassUID
        assert item.ReferencedSOPSequence[0].ReferencedSegmentNumber == segment.SegmentNumber
        assert group.tracking_uid == segment.TrackingUID
        assert group.tracking_identifier == segment.TrackingID
        # The source images listed are exactly the slices the segment covers.
        sources = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in reference[1:]}
        covered = {
            str(ds.SOPInstanceUID)
            for i, ds in enumerate(volume.datasets)
            if seg_result_two.mask[int(segment.SegmentNumber) - 1, i].any()
        }
        assert sources == covered
    # Evidence lists the SEG and the source images.
    evidence = {
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert {str(ds.SOPInstanceUID) for ds in volume.datasets} <= evidence


def test_document_header(sr_review, sr_accepted, volume):
    source = volume.datasets[0]
    for sr, words in ((sr_review, "needs review"), (sr_accepted, "accepted")):
        assert sr.SeriesDescription == f"AI QC report (QC: {words})"
        assert sr.CompletionFlag == "COMPLETE"
        assert sr.VerificationFlag == "UNVERIFIED"
        assert sr.SeriesNumber == 902 and sr.InstanceNumber == 1
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.PatientID == source.PatientID
        assert sr.Manufacturer == MANUFACTURER and sr.ManufacturerModelName == MODEL_NAME
        assert "model organ-seg 1.2.0; QC qc-0.3.1" in list(sr.SoftwareVersions)
        assert sr.ContentDate and sr.ContentTime and sr.SeriesDate
        assert is_own_object(sr)
        schemes = {item.CodingSchemeDesignator: item for item in sr.CodingSchemeIdentificationSequence}
        assert schemes[QC_SCHEME].CodingSchemeUID == QC_SCHEME_UID
        assert schemes[QC_SCHEME].CodingSchemeResponsibleOrganization == MANUFACTURER
    assert sr_review.SOPInstanceUID != sr_accepted.SOPInstanceUID


def test_device_observer(sr_review):
    context = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr_review.ContentSequence
    }
    assert context["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    assert context["Device Observer Name"].TextValue == "PACS Sentinel"
    assert context["Device Observer Model Name"].TextValue == "organ-seg"
    assert context["Procedure reported"].ConceptCodeSequence[0].CodeValue == "25045-6"


def test_withheld_seg_is_said(volume, seg_review, seg_result, qc_review, sr_review):
    sr = read_sr(build_qc_report(volume, seg_review, seg_result, qc_review, withheld_seg=True))
    # A withheld SEG is not referenced: TID 1501 groups instead of TID 1411 (tests/reports/test_withhold.py).
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    (group,) = sr.content.get_image_measurement_groups()
    texts = [item.TextValue for item in group[0].ContentSequence if item.ValueType == "TEXT"]
    assert any(text.startswith(WITHHELD_SEG_TEXT) for text in texts)
    (plain,) = sr_review.content.get_volumetric_roi_measurement_groups()
    assert not any(str(i.get("TextValue", "")).startswith(WITHHELD_SEG_TEXT) for i in plain[0].ContentSequence)


def test_score_outside_unit_interval_is_refused(volume, seg_review, seg_result, qc_review):
    segment = qc_review.segments[0]
    bad = QCResult(
        qc_version="x",
        segments=[SegmentQC(1, segment.label, 1.5, Verdict.ACCEPTED, [], segment.volume_mm3)],
    )
    with pytest.raises(ReportError, match="outside"):
        build_qc_report(volume, seg_review, seg_result, bad)


def test_unknown_segment_is_refused(volume, seg_review, seg_result, qc_review):
    segment = qc_review.segments[0]
    bad = QCResult(qc_version="x", segments=[SegmentQC(7, segment.label, 0.5, Verdict.ACCEPTED, [], 1.0)])
    with pytest.raises(ReportError, match="segment 7"):
        build_qc_report(volume, seg_review, seg_result, bad)


def test_dsrdump_reads_the_report(volume, seg_review, seg_result, qc_review, require_tool, tmp_path):
    dsrdump = require_tool("dsrdump")
    path = tmp_path / "SR.dcm"
    report = build_qc_report(volume, seg_review, seg_result, qc_review, withheld_seg=True)
    report.save_as(path, enforce_file_format=True)
    completed = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "error" not in completed.stderr.lower(), completed.stderr
    assert '(QC011,99PSQC,"Needs review")' in completed.stdout
    assert completed.stdout.count('"QC finding"') == 3


@pytest.mark.parametrize("withheld_seg", [False, True], ids=["send", "withhold-seg"])
@pytest.mark.parametrize("case", ["review", "accepted"])
def test_sr_passes_dciodvfy(case, withheld_seg, volume, seg_result, qc_review, qc_accepted, dciodvfy_clean):
    qc = qc_review if case == "review" else qc_accepted
    seg = build_segmentation(volume, seg_result, qc)
    report = build_qc_report(volume, seg, seg_result, qc, withheld_seg=withheld_seg)
    warnings = dciodvfy_clean(report, "Comprehensive3DSR")
    assert set(warnings) <= ACCEPTED_SR_WARNINGS


# --- the result set ----------------------------------------------------------------------


def test_result_set_series_numbers_and_files(volume, seg_result_two, qc_review_two, tmp_path):
    result_set = build_result_set(volume, seg_result_two, qc_review_two, series_number_base=700)
    datasets = result_set.datasets()
    assert [ds.Modality for ds in datasets] == ["SEG", "SR", "OT"]
    assert [int(ds.SeriesNumber) for ds in datasets] == [701, 702, 703]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 3
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    assert all(is_own_object(ds) for ds in datasets)
    assert {ds.StudyInstanceUID for ds in datasets} == {volume.study_uid}

    paths = result_set.write(tmp_path / "out")
    assert [p.name for p in paths] == ["SEG.dcm", "SR.dcm", "SC_1.dcm", "overlay_1.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    assert isinstance(hd.seg.segread(paths[0]), hd.seg.Segmentation)
    assert isinstance(hd.sr.srread(paths[1]), hd.sr.Comprehensive3DSR)
    sc = pydicom.dcmread(paths[2])
    np.testing.assert_array_equal(sc.pixel_array, result_set.overlay_images[0])
    np.testing.assert_array_equal(np.asarray(Image.open(paths[3])), result_set.overlay_images[0])
    sr = hd.sr.srread(paths[1])
    (group, _) = sr.content.get_volumetric_roi_measurement_groups()
    referenced = group.referenced_segment[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == result_set.segmentation.SOPInstanceUID


def test_result_files_are_on_the_disk_before_write_returns(volume, seg_result_two, qc_review_two, tmp_path,
                                                           fsync_log):
    """The job queues the returned files for sending in a committed database row right after:
    a power cut must not leave that row pointing at an empty file, nor lose the folder."""
    result_set = build_result_set(volume, seg_result_two, qc_review_two)
    out_dir = tmp_path / "results" / "job-7"
    paths = result_set.write(out_dir)
    for path in paths:  # content flushed under the temporary name, before the rename
        assert str(path.with_name(f".{path.name}.tmp")) in fsync_log
    assert str(out_dir) in fsync_log[-1:]  # the last rename's folder entry is flushed last
    assert fsync_log.index(str(tmp_path)) < fsync_log.index(str(tmp_path / "results"))  # new folders too
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in paths)


def test_a_result_file_that_cannot_be_written_is_a_report_error(volume, seg_result_two, qc_review_two, tmp_path,
                                                                 monkeypatch):
    result_set = build_result_set(volume, seg_result_two, qc_review_two)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", full)
    with pytest.raises(ReportError, match="cannot write .*SEG.dcm: .*No space left"):
        result_set.write(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir() if p.suffix != ".png"] == []  # no temporary file left


def test_result_set_default_series_numbers(volume, seg_result, qc_accepted, dciodvfy_clean):
    result_set = build_result_set(volume, seg_result, qc_accepted)
    assert [int(ds.SeriesNumber) for ds in result_set.datasets()] == [901, 902, 903]
    for ds, iod in zip(result_set.datasets(), ["Segmentation", "Comprehensive3DSR", "SCImage"], strict=True):
        assert set(dciodvfy_clean(ds, iod)) <= ACCEPTED_SR_WARNINGS
