"""The SEG writer: frames aligned with their source instances, segments described fully."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest

from pacs_sentinel import __version__
from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports import validate
from pacs_sentinel.reports.identity import MANUFACTURER, MODEL_NAME, is_own_object
from pacs_sentinel.reports.seg import CONTENT_LABEL, build_segmentation
from pacs_sentinel.results import Reason, SegmentationResult, Verdict

from .conftest import EMPTY_SLICES, make_qc


@pytest.fixture(scope="module")
def seg_two(volume, seg_result_two, qc_review_two):
    return build_segmentation(volume, seg_result_two, qc_review_two)


def read_back(seg: hd.seg.Segmentation) -> hd.seg.Segmentation:
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.seg.segread(buffer)


def test_every_frame_references_the_source_instance_of_its_slice(volume, seg_result_two, seg_two):
    seg = read_back(seg_two)
    index_of = {str(ds.SOPInstanceUID): i for i, ds in enumerate(volume.datasets)}
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[np.newaxis]
    slices_by_segment: dict[int, set[int]] = {1: set(), 2: set()}
    for number, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        sources = item.DerivationImageSequence[0].SourceImageSequence
        assert len(sources) == 1
        slice_index = index_of[str(sources[0].ReferencedSOPInstanceUID)]
        assert sources[0].ReferencedSOPClassUID == volume.datasets[slice_index].SOPClassUID
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in volume.datasets[slice_index].ImagePositionPatient])
        np.testing.assert_array_equal(frames[number].astype(bool), seg_result_two.mask[segment - 1, slice_index])
        slices_by_segment[segment].add(slice_index)
    # Empty frames are left out, and only those: nothing shifts.
    for segment, slices in slices_by_segment.items():
        expected = {i for i in range(volume.array.shape[0]) if seg_result_two.mask[segment - 1, i].any()}
        assert slices == expected
    assert not slices_by_segment[1] & set(EMPTY_SLICES)


def test_highdicom_reconstructs_the_mask_by_source_instance(volume, seg_result_two, seg_two):
    seg = read_back(seg_two)
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(pixels.astype(bool), np.moveaxis(seg_result_two.mask, 0, -1))


def test_segment_descriptions(seg_two, seg_result_two):
    seg = read_back(seg_two)
    assert seg.SegmentationType == "BINARY"
    assert len(seg.SegmentSequence) == 2
    tracking_uids = set()
    for item, label in zip(seg.SegmentSequence, seg_result_two.labels, strict=True):
        assert item.SegmentLabel == label.name
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == (
            label.property_category.value,
            label.property_category.scheme,
        )
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == (
            label.property_type.value,
            label.property_type.scheme,
            label.property_type.meaning,
        )
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "organ-seg"
        assert algorithm.AlgorithmVersion == "1.2.0"
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        assert item.TrackingID == label.tracking_id
        tracking_uids.add(str(item.TrackingUID))
    assert len(tracking_uids) == 2


def test_series_equipment_and_identity(volume, seg_result, qc_accepted, qc_review):
    source = volume.datasets[0]
    accepted = read_back(build_segmentation(volume, seg_result, qc_accepted))
    review = read_back(build_segmentation(volume, seg_result, qc_review, series_number=42))
    assert accepted.SeriesDescription == "AI organ segmentation (QC: accepted)"
    assert review.SeriesDescription == "AI organ segmentation (QC: needs review)"
    assert (accepted.SeriesNumber, review.SeriesNumber) == (901, 42)
    for seg in (accepted, review):
        assert seg.InstanceNumber == 1
        assert seg.Modality == "SEG"
        assert seg.ContentLabel == CONTENT_LABEL
        assert seg.Manufacturer == MANUFACTURER
        assert seg.ManufacturerModelName == MODEL_NAME
        assert __version__ in list(np.atleast_1d(seg.SoftwareVersions))
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert seg.PatientID == source.PatientID
        assert seg.PatientName == source.PatientName
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert seg.SeriesInstanceUID != source.SeriesInstanceUID
        assert seg.ContentDate and seg.ContentTime and seg.SeriesDate
        assert is_own_object(seg)
    assert accepted.SOPInstanceUID != review.SOPInstanceUID
    assert accepted.SeriesInstanceUID != review.SeriesInstanceUID
    assert not is_own_object(source)


def test_segment_with_empty_mask_is_kept(volume, seg_result_two, qc_review_two):
    mask = seg_result_two.mask.copy()
    mask[1] = False
    result = SegmentationResult(
        probabilities=seg_result_two.probabilities,
        mask=mask,
        labels=seg_result_two.labels,
        model_name="organ-seg",
        model_version="1.2.0",
    )
    seg = read_back(build_segmentation(volume, result, qc_review_two))
    assert [int(item.SegmentNumber) for item in seg.SegmentSequence] == [1, 2]
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    np.testing.assert_array_equal(pixels.astype(bool), np.moveaxis(mask, 0, -1))


def test_mask_that_does_not_match_the_volume_is_refused(volume, seg_result, qc_review):
    wrong = SegmentationResult(
        probabilities=seg_result.probabilities[:, :-1],
        mask=seg_result.mask[:, :-1],
        labels=seg_result.labels,
        model_name="organ-seg",
        model_version="1.2.0",
    )
    with pytest.raises(ReportError, match="does not match"):
        build_segmentation(volume, wrong, qc_review)


@pytest.mark.parametrize("verdict", [Verdict.ACCEPTED, Verdict.NEEDS_REVIEW])
def test_seg_passes_dciodvfy(volume, seg_result_two, verdict, dciodvfy_clean):
    reasons = [Reason.VOLUME_ANOMALY] if verdict is Verdict.NEEDS_REVIEW else []
    qc = make_qc(volume, seg_result_two, verdict, reasons, 0.5)
    warnings = dciodvfy_clean(build_segmentation(volume, seg_result_two, qc), "Segmentation")
    assert warnings == []


def test_strict_validation_raises_on_errors(seg_two, require_tool):
    require_tool("dciodvfy")
    broken = read_back(seg_two)
    del broken.SegmentSequence[0].SegmentLabel  # Type 1
    errors = validate.validate(broken)
    assert errors and all("Error" in line for line in errors)
    with pytest.raises(ReportError, match="fails dciodvfy"):
        validate.validate(broken, strict=True)


def test_validation_is_skipped_without_dciodvfy(seg_two, monkeypatch):
    monkeypatch.setattr(validate.shutil, "which", lambda name: None)
    assert validate.run_dciodvfy(seg_two) is None
    assert validate.validate(seg_two, strict=True) is None


def test_a_source_of_a_multi_frame_iod_without_its_modules_is_a_clear_error(seg_result, qc_review) -> None:
    """pydicom's single-frame RT Dose instances load as a stack of slices (as a `match = {}`
    pipeline may send them), but an RT Dose is a multi-frame IOD without the functional groups a
    SEG references: the job fails with a reason, not an internal error."""
    from pydicom.data import get_testdata_file

    from pacs_sentinel.dicom_io.series import load_series_files

    volume = load_series_files([get_testdata_file("rtdose_1frame.dcm")], min_slices=1)
    result = SegmentationResult(probabilities=None, mask=np.ones((1, *volume.array.shape), dtype=np.uint8),
                                labels=seg_result.labels, model_name="m", model_version="1")
    with pytest.raises(ReportError, match="cannot build a SEG on RT Dose Storage source images"):
        build_segmentation(volume, result, make_qc(volume, result, Verdict.NEEDS_REVIEW, [], 0.1))
