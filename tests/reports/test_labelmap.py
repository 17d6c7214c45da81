"""The SEG writer's LABELMAP option (``[reports] seg_type``, issue 6): BINARY stays the default."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest

from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.resultset import build_result_set
from pacs_sentinel.reports.seg import build_segmentation
from pacs_sentinel.results import SegmentationResult, Verdict

from .conftest import LIVER, SPLEEN, make_qc, make_result

LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
BINARY_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def read_back(seg: hd.seg.Segmentation) -> hd.seg.Segmentation:
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.seg.segread(buffer)


def with_mask(result: SegmentationResult, mask: np.ndarray) -> SegmentationResult:
    return SegmentationResult(
        probabilities=np.where(mask, 0.9, 0.05).astype(np.float32),
        mask=mask,
        labels=result.labels,
        model_name=result.model_name,
        model_version=result.model_version,
    )


def expected_labelmap(mask: np.ndarray) -> np.ndarray:
    """Label map of stacked masks; the later segment wins where masks overlap."""
    labels = np.zeros(mask.shape[1:], dtype=np.uint16)
    for index in range(mask.shape[0]):
        labels[mask[index]] = index + 1
    return labels


@pytest.fixture(scope="module")
def disjoint_result(volume) -> SegmentationResult:
    """Two segments like conftest's (Liver sphere, Spleen box on slices 4-6), not overlapping."""
    mask = make_result(volume, [LIVER, SPLEEN]).mask.copy()
    mask[1] = False
    mask[1, 4:7, 50:60, 48:60] = True
    assert not (mask[0] & mask[1]).any()
    return with_mask(make_result(volume, [LIVER, SPLEEN]), mask)


@pytest.fixture(scope="module")
def disjoint_qc(volume, disjoint_result):
    return make_qc(volume, disjoint_result, Verdict.NEEDS_REVIEW, [], 0.42)


@pytest.fixture(scope="module")
def labelmap_seg(volume, disjoint_result, disjoint_qc):
    return build_segmentation(volume, disjoint_result, disjoint_qc, seg_type="LABELMAP")


def test_labelmap_seg_passes_dciodvfy(labelmap_seg, require_tool):
    from pacs_sentinel.reports.validate import OUTDATED_LABEL_MAP_ERRORS, run_dciodvfy

    # Skips (with the reason) when dciodvfy is missing, unless CI=true, where it fails.
    report = run_dciodvfy(labelmap_seg, executable=require_tool("dciodvfy"))
    assert report is not None
    if report.iod:
        assert report.errors == [], "\n".join(report.errors)
        return
    unexpected = [e for e in report.errors if not any(known in e for known in OUTDATED_LABEL_MAP_ERRORS)]
    assert unexpected == [], "\n".join(unexpected)
    pytest.xfail(
        "installed dciodvfy predates the Label Map Segmentation IOD (Sup 243): it reports only "
        "'Information Object Not found' and the Background segment 0; nothing else"
    )


def test_labelmap_seg_reads_back_as_labelmap(labelmap_seg):
    seg = read_back(labelmap_seg)
    again = hd.seg.Segmentation.from_dataset(read_back(labelmap_seg), copy=False)
    for obj in (seg, again):
        assert obj.SegmentationType == "LABELMAP"
        assert obj.SOPClassUID == LABELMAP_SOP_CLASS
        assert obj.segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP
    # highdicom 0.28 writes segment 0 (Background) first in a label map's Segment Sequence.
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [0, 1, 2]
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["Background", "Liver", "Spleen"]
    assert int(seg.BitsAllocated) == 8
    assert "SegmentIdentificationSequence" not in seg.PerFrameFunctionalGroupsSequence[0]


def test_labelmap_pixels_by_source_instance_equal_the_masks(volume, disjoint_result, labelmap_seg):
    seg = read_back(labelmap_seg)
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    stacked = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True
    )
    assert stacked.shape == (len(uids), *volume.array.shape[1:], 2)
    np.testing.assert_array_equal(np.moveaxis(stacked, -1, 0).astype(bool), disjoint_result.mask)
    combined = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(combined, expected_labelmap(disjoint_result.mask))


def test_labelmap_volume_equals_the_masks(volume, disjoint_result, labelmap_seg):
    seg = read_back(labelmap_seg)
    if not hasattr(seg, "get_volume"):
        pytest.skip("this highdicom has no Segmentation.get_volume")
    seg_volume = seg.get_volume(combine_segments=True)
    # The SEG omits empty slices; the volume then covers the slices that have a label.
    positions = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    present = [i for i in range(len(positions)) if disjoint_result.mask[:, i].any()]
    array = seg_volume.array
    assert array.shape[0] == len(present)
    expected = expected_labelmap(disjoint_result.mask)[present]
    if not np.array_equal(array, expected):  # volume axis 0 may run the other way
        array = array[::-1]
    np.testing.assert_array_equal(array, expected)


def test_overlapping_masks_later_segment_wins(volume, seg_result_two, qc_review_two):
    mask = seg_result_two.mask.copy()
    mask[1, 5, 25:35, 20:30] = True  # inside the Liver sphere on slice 5
    assert (mask[0] & mask[1]).any()
    seg = read_back(build_segmentation(volume, with_mask(seg_result_two, mask), qc_review_two, seg_type="LABELMAP"))
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    combined = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(combined, expected_labelmap(mask))
    assert (combined[5, 25:35, 20:30] == 2).all()
    assert seg.SegmentsOverlap == "NO"


def test_binary_is_the_default_and_unchanged(volume, seg_result_two, qc_review_two):
    default = build_segmentation(volume, seg_result_two, qc_review_two)
    explicit = build_segmentation(volume, seg_result_two, qc_review_two, seg_type="BINARY")
    for seg in (default, explicit):
        assert seg.SegmentationType == "BINARY"
        assert seg.SOPClassUID == BINARY_SOP_CLASS
        assert int(seg.BitsAllocated) == 1
    assert default.NumberOfFrames == explicit.NumberOfFrames
    assert default.PixelData == explicit.PixelData


@pytest.mark.parametrize("value", ["labelmap", "FRACTIONAL", "", "BINARY "])
def test_unknown_seg_type_is_refused_by_name(volume, seg_result_two, qc_review_two, value):
    with pytest.raises(ReportError, match=repr(value).replace("\\", "\\\\").replace(" ", " ")):
        build_segmentation(volume, seg_result_two, qc_review_two, seg_type=value)


def test_result_set_passes_seg_type_through(volume, disjoint_result, disjoint_qc):
    labelmap = build_result_set(volume, disjoint_result, disjoint_qc, seg_type="LABELMAP")
    assert labelmap.segmentation.SegmentationType == "LABELMAP"
    binary = build_result_set(volume, disjoint_result, disjoint_qc)
    assert binary.segmentation.SegmentationType == "BINARY"
    with pytest.raises(ReportError, match="'OTHER'"):
        build_result_set(volume, disjoint_result, disjoint_qc, seg_type="OTHER")


@pytest.mark.parametrize("withheld", [False, True], ids=["sent", "withheld"])
def test_sr_of_a_labelmap_names_the_source_images_each_segment_lies_on(volume, disjoint_result, disjoint_qc,
                                                                        withheld):
    """As for a BINARY SEG (docs/conformance.md §6.2): one Source Image item per slice the
    segment lies on. Label-map frames name no segment; their pixels do."""
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    expected = {number: {uids[k] for k in np.flatnonzero(disjoint_result.mask[number - 1].any(axis=(1, 2)))}
                for number in (1, 2)}
    for seg_type in ("BINARY", "LABELMAP"):
        result_set = build_result_set(volume, disjoint_result, disjoint_qc, seg_type=seg_type, withheld_seg=withheld)
        sr = hd.sr.Comprehensive3DSR.from_dataset(result_set.report)
        groups = [group for container in sr.ContentSequence if container.ConceptNameCodeSequence[0].CodeValue == "126010"
                  for group in container.ContentSequence]
        assert len(groups) == 2
        for number, group in enumerate(groups, start=1):
            images = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for item in group.ContentSequence
                      if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue in ("121233", "121112")}
            assert images == expected[number], (seg_type, number)
