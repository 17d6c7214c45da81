"""The writers on an enhanced multi-frame source: one instance holds every slice.

The source is the product's own CT phantom written as a single-frame series and converted
with highdicom's Legacy Converted Enhanced CT writer (frames in reverse slice order, so that
frame order and slice order differ). Everything written on it must reference the frames,
validate, and show the same thing as when written on the equivalent single-frame series.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pacs_sentinel.dicom_io.series import Volume, load_series_files, load_volume
from pacs_sentinel.errors import ReportError
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from pacs_sentinel.reports.overlay import (
    DEFAULT_WINDOW,
    build_overlay,
    patient_orientation,
    render_overlay,
    representative_slice,
    window_of,
)
from pacs_sentinel.reports.resultset import build_result_set
from pacs_sentinel.reports.seg import build_segmentation
from pacs_sentinel.reports.sr import build_qc_report
from pacs_sentinel.results import QC_SCHEME, QC_SCHEME_UID, QCResult, SegmentationResult, Verdict

from .conftest import LIVER, NEEDS_REVIEW_REASONS, SPLEEN, make_qc, make_result

SHAPE = (12, 64, 64)
#: A window unlike the soft-tissue default, so that reading the wrong one shows.
SOURCE_WINDOW = (90.0, 250.0)
#: dciodvfy does not know our private coding scheme (see test_sr.py).
ACCEPTED_SR_WARNINGS = {
    f"Warning - Unrecognized defined term <{QC_SCHEME}> for value 1 of attribute <Coding Scheme Designator>",
    f"Warning - Unrecognized defined term <{QC_SCHEME_UID}> for value 1 of attribute <Coding Scheme UID>",
}


def to_file_and_back(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def read_seg(seg: hd.seg.Segmentation) -> hd.seg.Segmentation:
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.seg.segread(buffer)


def legacy_enhanced(sources: list[pydicom.Dataset], series_uid: str) -> hd.legacy.LegacyConvertedEnhancedCTImage:
    return hd.legacy.LegacyConvertedEnhancedCTImage(
        sources, series_instance_uid=series_uid, series_number=10, sop_instance_uid=hd.UID(), instance_number=1
    )


@pytest.fixture(scope="module")
def phantom_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("ct-single")
    paths = write_ct_series(make_ct_phantom(3, shape=SHAPE), folder, seed=3)
    for path in paths:  # give the series a window of its own
        ds = pydicom.dcmread(path)
        ds.WindowCenter, ds.WindowWidth = SOURCE_WINDOW
        ds.save_as(path, enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def single(phantom_paths: list[Path]) -> Volume:
    return load_series_files(phantom_paths)


@pytest.fixture(scope="module")
def multi(phantom_paths: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """The same series as one Legacy Converted Enhanced CT file, frames in reverse slice order."""
    sources = [pydicom.dcmread(p) for p in reversed(phantom_paths)]
    enhanced = legacy_enhanced(sources, str(sources[0].SeriesInstanceUID))
    ds = to_file_and_back(enhanced, tmp_path_factory.mktemp("ct-multi") / "enhanced.dcm")
    volume = load_volume([ds])
    assert volume.frame_numbers == list(range(SHAPE[0], 0, -1))
    return volume


@pytest.fixture(scope="module")
def source(multi: Volume) -> pydicom.Dataset:
    (ds,) = multi.source_instances
    return ds


@pytest.fixture(scope="module")
def result(multi: Volume) -> SegmentationResult:
    return make_result(multi, [LIVER, SPLEEN])


@pytest.fixture(scope="module")
def qc(multi: Volume, result: SegmentationResult) -> QCResult:
    return make_qc(multi, result, Verdict.NEEDS_REVIEW, NEEDS_REVIEW_REASONS, 0.42)


@pytest.fixture(scope="module")
def seg(multi: Volume, result: SegmentationResult, qc: QCResult) -> hd.seg.Segmentation:
    return build_segmentation(multi, result, qc)


def frame_position(ds: pydicom.Dataset, frame_number: int) -> list[float]:
    item = ds.PerFrameFunctionalGroupsSequence[frame_number - 1].PlanePositionSequence[0]
    return [float(v) for v in item.ImagePositionPatient]


# --- SEG ---------------------------------------------------------------------------------------


def test_seg_passes_dciodvfy(seg, dciodvfy_clean):
    assert dciodvfy_clean(seg, "Segmentation") == []


def test_every_seg_frame_references_its_source_frame(multi, source, result, seg):
    seg = read_seg(seg)
    slice_of_frame = {frame: i for i, frame in enumerate(multi.frame_numbers)}
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[np.newaxis]
    covered: dict[int, set[int]] = {1: set(), 2: set()}
    for number, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        (reference,) = item.DerivationImageSequence[0].SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        frame_number = int(reference.ReferencedFrameNumber)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx(frame_position(source, frame_number))
        slice_index = slice_of_frame[frame_number]
        np.testing.assert_array_equal(frames[number].astype(bool), result.mask[segment - 1, slice_index])
        covered[segment].add(slice_index)
    for segment, slices in covered.items():
        assert slices == {i for i in range(SHAPE[0]) if result.mask[segment - 1, i].any()}
    (series,) = seg.ReferencedSeriesSequence
    assert [str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence] == [source.SOPInstanceUID]


def test_highdicom_reads_back_the_mask_in_slice_order(multi, source, result, seg):
    pixels = read_seg(seg).get_pixels_by_source_frame(
        source_sop_instance_uid=str(source.SOPInstanceUID),
        source_frame_numbers=multi.frame_numbers,
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels.astype(bool), np.moveaxis(result.mask, 0, -1))


def test_seg_shows_the_same_as_on_the_single_frame_series(single, multi, result, qc, seg):
    assert np.array_equal(single.array, multi.array)
    single_seg = build_segmentation(single, make_result(single, result.labels), qc)

    def by_position(seg: hd.seg.Segmentation) -> dict[tuple[int, tuple[float, ...]], np.ndarray]:
        seg = read_seg(seg)
        frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[np.newaxis]
        out = {}
        for number, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
            segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            position = tuple(round(float(v), 3) for v in item.PlanePositionSequence[0].ImagePositionPatient)
            out[segment, position] = frames[number]
        return out

    multi_frames, single_frames = by_position(seg), by_position(single_seg)
    assert multi_frames.keys() == single_frames.keys()
    for key, pixels in multi_frames.items():
        np.testing.assert_array_equal(pixels, single_frames[key], err_msg=f"segment {key[0]} at {key[1]}")


def test_empty_segment_keeps_every_source_frame(multi, source, result, qc):
    mask = result.mask.copy()
    mask[1] = False
    empty_second = SegmentationResult(
        probabilities=result.probabilities,
        mask=mask,
        labels=result.labels,
        model_name="organ-seg",
        model_version="1.2.0",
    )
    seg = read_seg(build_segmentation(multi, empty_second, qc))
    pixels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=str(source.SOPInstanceUID),
        source_frame_numbers=multi.frame_numbers,
        segment_numbers=[1, 2],
    )
    np.testing.assert_array_equal(pixels.astype(bool), np.moveaxis(mask, 0, -1))


def test_series_split_over_several_multi_frame_files_is_refused(phantom_paths, qc):
    sources = [pydicom.dcmread(p) for p in phantom_paths]
    series_uid = str(sources[0].SeriesInstanceUID)
    half = len(sources) // 2
    volume = load_volume([legacy_enhanced(sources[:half], series_uid), legacy_enhanced(sources[half:], series_uid)])
    assert len(volume.source_instances) == 2
    result = make_result(volume, [LIVER])
    with pytest.raises(ReportError, match=r"split over 2 multi-frame instances"):
        build_segmentation(volume, result, qc)
    with pytest.raises(ReportError, match=r"split over 2 multi-frame instances"):
        build_result_set(volume, result, make_qc(volume, result, Verdict.ACCEPTED, [], 0.9))


# --- SR ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sr(multi, seg, result, qc) -> hd.sr.Comprehensive3DSR:
    report = build_qc_report(multi, seg, result, qc)
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return hd.sr.srread(io.BytesIO(buffer.getvalue()))


def test_sr_passes_dciodvfy(sr, dciodvfy_clean):
    assert set(dciodvfy_clean(sr, "Comprehensive3DSR")) <= ACCEPTED_SR_WARNINGS


def test_sr_lists_the_source_instance_once(sr, seg, source):
    evidence = [
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    ]
    assert sorted(evidence) == sorted([str(source.SOPInstanceUID), str(seg.SOPInstanceUID)])


def test_sr_segment_references_name_the_source_frames(sr, multi, source, result):
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for number, group in enumerate(groups, start=1):
        (image,) = group.referenced_segment[1:]  # one source instance, once
        reference = image.ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        frames = sorted(int(f) for f in np.atleast_1d(reference.ReferencedFrameNumber))
        expected = sorted(multi.frame_numbers[i] for i in range(SHAPE[0]) if result.mask[number - 1, i].any())
        assert frames == expected


# --- SC overlay --------------------------------------------------------------------------------


def test_window_and_orientation_come_from_the_functional_groups(source):
    assert "WindowCenter" not in source and "ImageOrientationPatient" not in source
    assert window_of(source, 1) == SOURCE_WINDOW != DEFAULT_WINDOW
    assert window_of(source) == SOURCE_WINDOW
    assert patient_orientation(source, 1) == ("L", "P")


def test_overlay_looks_as_on_the_single_frame_series(single, multi, result, qc):
    single_result = make_result(single, result.labels)
    np.testing.assert_array_equal(render_overlay(multi, result, qc), render_overlay(single, single_result, qc))


def test_secondary_capture_references_the_frame_shown(multi, source, result, qc, dciodvfy_clean):
    sc, _ = build_overlay(multi, result, qc)
    warnings = dciodvfy_clean(sc, "SCImage")
    # Enhanced images code the body part as Anatomic Region, not Body Part Examined, so the
    # SC's Laterality (2C) is sent empty, as for a classic source without a body part.
    assert all("<Laterality>" in line for line in warnings)
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert int(reference.ReferencedFrameNumber) == multi.frame_numbers[representative_slice(result)]
