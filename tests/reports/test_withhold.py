"""Policy on_review = "withhold-seg": the SEG stays local, the SR and overlay say why.

A radiologist must never mistake a flagged result for a clean one, and the PACS must never get
an SR that references an object it will never receive.
"""

from __future__ import annotations

import io
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pacs_sentinel.reports.overlay import banner_lines
from pacs_sentinel.reports.resultset import build_result_set
from pacs_sentinel.reports.sr import WITHHELD_SEG_TEXT
from pacs_sentinel.results import QC_FINDING, QC_VERDICT, QC_VERSION, QUALITY_SCORE, VOLUME, Reason, Verdict
from tests.reports.test_sr import ACCEPTED_SR_WARNINGS

COMMENT = ("121106", "DCM")


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def all_values(ds: Dataset):
    """Every element value in ``ds``, recursively through sequences (and file meta)."""
    for element in ds.iterall():
        if element.VR != "SQ":
            yield element.value


def concept(item: Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return name.CodeValue, name.CodingSchemeDesignator


def children(group, code) -> list[Dataset]:
    return [item for item in group[0].ContentSequence if concept(item) == (code.value, code.scheme)]


@pytest.fixture(scope="module")
def withheld(volume, seg_result_two, qc_review_two):
    return build_result_set(volume, seg_result_two, qc_review_two, series_number_base=800, withheld_seg=True)


@pytest.fixture(scope="module")
def withheld_sr(withheld) -> hd.sr.Comprehensive3DSR:
    return hd.sr.srread(io.BytesIO(to_bytes(withheld.report)))


def test_datasets_are_sr_and_sc_only(withheld):
    datasets = withheld.datasets()
    assert [ds.Modality for ds in datasets] == ["SR", "OT"]
    assert [int(ds.SeriesNumber) for ds in datasets] == [802, 803]
    assert withheld.segmentation is None
    (seg,) = withheld.withheld
    assert seg.Modality == "SEG"
    assert int(seg.SeriesNumber) == 801
    assert seg.SOPInstanceUID not in {ds.SOPInstanceUID for ds in datasets}


def test_write_keeps_the_seg_locally_but_does_not_send_it(withheld, tmp_path):
    paths = withheld.write(tmp_path)
    # The daemon sends every returned .dcm: the withheld SEG is written but not returned.
    assert [path.name for path in paths] == ["SR.dcm", "SC_1.dcm", "overlay_1.png"]
    assert withheld.withheld_paths(tmp_path) == [tmp_path / "SEG_withheld.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SC_1.dcm", "SEG_withheld.dcm", "SR.dcm", "overlay_1.png"]
    assert not (tmp_path / "SEG.dcm").exists()
    kept = pydicom.dcmread(tmp_path / "SEG_withheld.dcm")
    assert kept.SOPInstanceUID == withheld.withheld[0].SOPInstanceUID
    assert kept.Modality == "SEG"
    sent = {ds.SOPInstanceUID for ds in withheld.datasets()}
    assert kept.SOPInstanceUID not in sent
    assert not list(tmp_path.glob(".*.tmp"))


def test_nothing_sent_references_the_seg(withheld):
    seg = withheld.withheld[0]
    seg_uids = {str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID)}
    for ds in withheld.datasets():
        reread = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
        values = {str(value) for value in all_values(reread)}
        assert not values & seg_uids, f"{ds.Modality} references the withheld SEG"
        assert str(seg.SOPInstanceUID).encode() not in to_bytes(ds)
    sr = withheld.report
    evidence_classes = {
        str(item.ReferencedSOPClassUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert hd.UID("1.2.840.10008.5.1.4.1.1.66.4") not in evidence_classes  # Segmentation Storage


def test_sr_carries_the_qc_contract_per_segment(withheld_sr, qc_review_two):
    assert withheld_sr.content.get_volumetric_roi_measurement_groups() == []
    groups = withheld_sr.content.get_image_measurement_groups()
    assert len(groups) == len(qc_review_two.segments) == 2
    for group, segment in zip(groups, qc_review_two.segments, strict=True):
        assert group.tracking_identifier == segment.label.tracking_id
        assert group.finding_type.value == segment.label.property_type.value
        (site,) = group.finding_sites
        assert site.value.value == segment.label.property_type.value
        (score,) = children(group, QUALITY_SCORE)
        assert float(score.MeasuredValueSequence[0].NumericValue) == pytest.approx(segment.quality_score)
        (volume_item,) = children(group, VOLUME)
        assert float(volume_item.MeasuredValueSequence[0].NumericValue) == pytest.approx(segment.volume_mm3)
        (verdict,) = children(group, QC_VERDICT)
        assert verdict.ConceptCodeSequence[0].CodeValue == segment.verdict.value.value
        findings = [item.ConceptCodeSequence[0].CodeValue for item in children(group, QC_FINDING)]
        assert findings == [reason.value.value for reason in segment.reasons]
        (version,) = children(group, QC_VERSION)
        assert version.TextValue == qc_review_two.qc_version
        (comment,) = [item for item in group[0].ContentSequence if concept(item) == COMMENT]
        assert comment.TextValue.startswith(f"{WITHHELD_SEG_TEXT}: ")
        assert comment.TextValue.endswith("; not sent to PACS")
        # The segment's own reasons, or the result's when the segment has none.
        for reason in segment.reasons or qc_review_two.reasons:
            assert reason.label in comment.TextValue
        # The group points at the source images the segment lies on, not at the SEG.
        assert group.source_images


def test_liver_group_needs_review_with_its_reasons(withheld_sr):
    liver = withheld_sr.content.get_image_measurement_groups()[0]
    (verdict,) = children(liver, QC_VERDICT)
    assert verdict.ConceptCodeSequence[0].CodeValue == Verdict.NEEDS_REVIEW.value.value == "QC011"
    assert {item.ConceptCodeSequence[0].CodeValue for item in children(liver, QC_FINDING)} == {
        Reason.FRAGMENTATION.value.value,
        Reason.LOW_MODEL_CONFIDENCE.value.value,
        Reason.BORDER_CONTACT.value.value,
    }
    (comment,) = [item for item in liver[0].ContentSequence if concept(item) == COMMENT]
    assert comment.TextValue == (
        "AI segmentation held for review: Fragmentation, Low model confidence, "
        "Mask touches image border; not sent to PACS"
    )


def test_tracking_uids_match_the_withheld_seg(withheld, withheld_sr):
    seg = withheld.withheld[0]
    seg_tracking = {str(item.TrackingUID) for item in seg.SegmentSequence}
    assert {group.tracking_uid for group in withheld_sr.content.get_image_measurement_groups()} == seg_tracking


def test_descriptions_and_banner_say_withheld(withheld, seg_result_two, qc_review_two):
    sr, sc = withheld.datasets()
    assert sr.SeriesDescription == "AI QC report (QC: needs review; segmentation withheld)"
    assert sc.SeriesDescription == "AI QC overlay (QC: needs review; segmentation withheld)"
    lines = banner_lines(seg_result_two, qc_review_two, withheld_seg=True)
    assert lines[0] == "AI result - QC: Needs review - segmentation withheld"
    assert "Segmentation held for review, not sent to PACS" in lines
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"


def test_banner_pixels_differ_from_the_sent_variant(volume, seg_result_two, qc_review_two, withheld):
    sent = build_result_set(volume, seg_result_two, qc_review_two)
    (plain,), (held,) = sent.overlay_images, withheld.overlay_images
    assert held.shape[1] == plain.shape[1]
    assert held.shape[0] > plain.shape[0]  # the extra "held for review" line
    assert not np.array_equal(held[-plain.shape[0] // 4 :], plain[-plain.shape[0] // 4 :])


def test_send_policy_is_unchanged(volume, seg_result_two, qc_review_two, tmp_path):
    sent = build_result_set(volume, seg_result_two, qc_review_two)
    assert sent.withheld == []
    assert [ds.Modality for ds in sent.datasets()] == ["SEG", "SR", "OT"]
    assert sent.report.SeriesDescription == "AI QC report (QC: needs review)"
    assert sent.overlays[0].SeriesDescription == "AI QC overlay (QC: needs review)"
    sr = hd.sr.srread(io.BytesIO(to_bytes(sent.report)))
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == 2
    assert sr.content.get_image_measurement_groups() == []
    assert str(sent.segmentation.SOPInstanceUID).encode() in to_bytes(sent.report)
    names = [path.name for path in sent.write(tmp_path)]
    assert names == ["SEG.dcm", "SR.dcm", "SC_1.dcm", "overlay_1.png"]
    assert sent.withheld_paths(tmp_path) == []
    assert not (tmp_path / "SEG_withheld.dcm").exists()


@pytest.mark.parametrize("which", ["SR", "OT"])
def test_withheld_objects_pass_dciodvfy(which, withheld, dciodvfy_clean):
    ds = {d.Modality: d for d in withheld.datasets()}[which]
    warnings = dciodvfy_clean(ds, "Comprehensive3DSR" if which == "SR" else "SCImage")
    if which == "SR":
        assert set(warnings) <= ACCEPTED_SR_WARNINGS, warnings


def test_dsrdump_reads_the_withheld_report(withheld, require_tool, tmp_path):
    dsrdump = require_tool("dsrdump")
    path = tmp_path / "SR.dcm"
    withheld.report.save_as(path, enforce_file_format=True)
    completed = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "error" not in completed.stderr.lower(), completed.stderr
    assert '(QC011,99PSQC,"Needs review")' in completed.stdout
    assert "\"AI segmentation held for re" in completed.stdout  # dsrdump shortens long text


@pytest.mark.parametrize("blocked", ["SR.dcm", "overlay_1.png"])
def test_a_file_that_cannot_be_written_fails_the_write(withheld, tmp_path, blocked):
    """A DICOM file or an overlay PNG (encoded on a helper thread) that cannot be written
    raises ReportError naming it, and leaves no temporary file behind."""
    from pacs_sentinel.errors import ReportError

    (tmp_path / blocked).mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(ReportError, match=f"cannot write .*{blocked}"):
        withheld.write(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))
