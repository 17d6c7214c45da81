"""The "Quality Issue" Key Object Selection document: valid (dciodvfy), references the sources."""

from __future__ import annotations

import copy

import highdicom as hd
import pytest
from pydicom.uid import generate_uid

from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.identity import is_own_object
from pacs_sentinel.reports.kos import build_quality_issue_kos


def test_kos_is_titled_quality_issue_and_references_every_source(volume, qc_review, roundtrip_bytes, dciodvfy_clean) -> None:  # type: ignore[no-untyped-def]
    kos = build_quality_issue_kos(volume.datasets, qc_review, model_name="organ-seg", series_number=904)
    dciodvfy_clean(kos, "KeyObjectSelectionDocument")
    back = roundtrip_bytes(kos)
    assert back.Modality == "KO" and back.SeriesNumber == 904
    assert back.StudyInstanceUID == volume.study_uid and back.PatientID == volume.datasets[0].PatientID
    assert is_own_object(back)  # our own KOS sent back to us is recognised as ours
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113010", "DCM", "Quality Issue")
    referenced = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                  for item in back.ContentSequence if item.ValueType == "IMAGE"}
    assert referenced == {str(ds.SOPInstanceUID) for ds in volume.datasets}
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == volume.series_uid
    description = next(item.TextValue for item in back.ContentSequence
                       if item.ConceptNameCodeSequence[0].CodeValue == "113012")  # Key Object Description
    assert "needs review (quality score 0.42" in description
    for reason in qc_review.reasons:
        assert reason.label in description
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(back)
    first = volume.datasets[0]
    assert document.resolve_reference(str(first.SOPInstanceUID)) == (
        volume.study_uid, volume.series_uid, str(first.SOPInstanceUID))


def test_kos_refuses_sources_from_several_studies_and_no_sources(volume, qc_review) -> None:  # type: ignore[no-untyped-def]
    other = copy.deepcopy(volume.datasets[0])
    other.SOPInstanceUID = generate_uid()
    other.StudyInstanceUID = generate_uid()
    with pytest.raises(ReportError, match="sources belong to 2 studies"):
        build_quality_issue_kos([volume.datasets[0], other], qc_review, model_name="organ-seg", series_number=904)
    with pytest.raises(ReportError, match="no source instance"):
        build_quality_issue_kos([], qc_review, model_name="organ-seg", series_number=904)


def test_kos_passes_the_check_before_sending(volume, qc_review, require_tool) -> None:  # type: ignore[no-untyped-def]
    from pacs_sentinel.reports.validate import check_before_sending, read_back

    require_tool("dciodvfy")
    kos = build_quality_issue_kos(volume.datasets, qc_review, model_name="organ-seg", series_number=904)
    assert isinstance(read_back(kos), hd.ko.KeyObjectSelectionDocument)
    check_before_sending([kos], "dciodvfy")  # the worker's check: read back + dciodvfy, raises on failure


def test_kos_of_a_radiograph_finding_that_needs_review(dciodvfy_clean, roundtrip_bytes) -> None:  # type: ignore[no-untyped-def]
    from tests.reports.test_classification import make_dx, make_qc, make_result

    source = make_dx()
    result = make_result(source, [0.9, 0.2, 0.7])
    qc = make_qc(result, review={0})
    kos = build_quality_issue_kos([source], qc, model_name="cxr-cls", series_number=904)
    dciodvfy_clean(kos, "KeyObjectSelectionDocument")
    back = roundtrip_bytes(kos)
    (image,) = [item for item in back.ContentSequence if item.ValueType == "IMAGE"]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    description = next(item.TextValue for item in back.ContentSequence
                       if item.ConceptNameCodeSequence[0].CodeValue == "113012")
    assert description.startswith("PACS Sentinel QC: the cxr-cls result needs review (quality score 0.31")
