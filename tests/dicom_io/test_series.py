"""Series to volume: sorting, every geometry rejection with its message, enhanced multi-frame."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

from pacs_sentinel.dicom_io.series import Volume, load_series_files, load_volume
from pacs_sentinel.errors import SeriesError
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series

ROWS, COLS = 6, 8
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_slices(
    z_positions: list[float],
    *,
    orientation: tuple[float, ...] = AXIAL,
    xy: tuple[float, float] = (-10.0, -20.0),
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
) -> list[Dataset]:
    """Single-frame CT instances of one series; slice ``k`` has stored value ``k`` + 100 everywhere.

    Positions are ``xy`` plus ``z`` along the slice normal of ``orientation``.
    """
    series_uid, for_uid = generate_uid(), generate_uid()
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    datasets = []
    for k, z in enumerate(z_positions):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = "1.2.3"
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.Modality = "CT"
        ds.InstanceNumber = k + 1
        position = xy[0] * row_dir + xy[1] * col_dir + z * normal
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = 2.5
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ROWS, COLS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.PixelData = np.full((ROWS, COLS), 100 + k, dtype=np.uint16).tobytes()
        datasets.append(ds)
    return datasets


def refused(datasets: list[Dataset], pattern: str, **kwargs: int) -> str:
    """Assert ``load_volume`` refuses with a one-line message matching ``pattern``; return it."""
    with pytest.raises(SeriesError) as info:
        load_volume(datasets, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(pattern, message), message
    return message


# --- good series -----------------------------------------------------------------------------


def test_shuffled_series_comes_back_sorted_along_the_normal() -> None:
    datasets = make_slices([0.0, 2.5, 5.0, 7.5, 10.0, 12.5])
    shuffled = [datasets[i] for i in (3, 0, 5, 1, 4, 2)]
    volume = load_volume(shuffled)
    assert [int(ds.InstanceNumber) for ds in volume.datasets] == [1, 2, 3, 4, 5, 6]
    assert volume.array.dtype == np.float32 and volume.array.shape == (6, ROWS, COLS)
    # Modality LUT applied: stored (100 + k) * 2 - 1024.
    assert [float(v) for v in volume.array[:, 0, 0]] == [(100 + k) * 2 - 1024 for k in range(6)]
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert volume.origin == pytest.approx((-10.0, -20.0, 0.0))
    assert np.allclose(volume.direction, np.eye(3))
    assert volume.frame_numbers is None
    assert volume.source_instances == volume.datasets


def test_sagittal_series_sorts_along_its_own_normal() -> None:
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal = row x column = -x (towards patient right)
    datasets = make_slices([-4.0, -2.0, 0.0, 2.0], orientation=sagittal)
    volume = load_volume(list(reversed(datasets)))
    assert [int(ds.InstanceNumber) for ds in volume.datasets] == [1, 2, 3, 4]
    assert volume.direction[:, 2] == pytest.approx([-1.0, 0.0, 0.0])
    assert volume.origin[0] == pytest.approx(4.0)
    assert volume.spacing[0] == pytest.approx(2.0)


def test_small_jitter_in_positions_is_accepted() -> None:
    volume = load_volume(make_slices([0.0, 0.63, 1.25, 1.88, 2.5]))  # 0.625 mm rounded to 2 decimals
    assert volume.spacing[0] == pytest.approx(0.625)


def test_one_slice_is_accepted_when_the_pipeline_allows_it() -> None:
    volume = load_volume(make_slices([3.0]), min_slices=1)
    assert volume.array.shape == (1, ROWS, COLS)
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.7))  # SliceThickness for the slice axis


def test_phantom_series_files_round_trip(tmp_path: Path) -> None:
    phantom = make_ct_phantom(3, shape=(5, 24, 32))
    paths = write_ct_series(phantom, tmp_path, seed=3)
    volume = load_series_files(reversed(paths))
    assert np.array_equal(volume.array, phantom.hu.astype(np.float32))
    assert volume.spacing == pytest.approx(phantom.spacing)
    assert volume.origin == pytest.approx(phantom.origin)


# --- rejections ------------------------------------------------------------------------------


def _lost(datasets: list[Dataset], *indices: int) -> list[Dataset]:
    """The series without the instances at ``indices`` (as when files are lost on the way)."""
    return [ds for i, ds in enumerate(datasets) if i not in indices]


def test_missing_slice_is_a_gap() -> None:
    datasets = _lost(make_slices([0.0, 2.5, 5.0, 7.5, 10.0, 12.5]), 3)
    message = refused(datasets, r"^series is missing 1 slice: gap of 5\.00 mm after 5\.00 mm along the normal")
    assert "expected 2.50 mm" in message and str(datasets[2].SOPInstanceUID) in message


def test_several_missing_slices_are_counted() -> None:
    refused(_lost(make_slices([0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 17.5, 20.0, 22.5]), 2, 7, 8),
            r"^series is missing 3 slices in 2 places, first: gap of 5\.00 mm after 2\.50 mm")


def test_a_gap_without_missing_instance_numbers_is_a_spacing_change() -> None:
    # 2.5 mm, then 5 mm: the wider gaps are multiples of the median, but every instance is there.
    datasets = make_slices([0.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0])
    refused(datasets, r"^series has inconsistent slice spacing: gaps between slices range from 2\.50 to 5\.00 mm "
                      r"\(median 2\.50 mm\); no slice is missing \(the instances around the wider gaps are numbered "
                      r"consecutively\); a volume needs one constant spacing$")
    # Without instance numbers the gap cannot be told from a lost slice.
    for ds in datasets:
        del ds.InstanceNumber
    refused(datasets, r"^series is missing 2 slices in 2 places, first: gap of 5\.00 mm after 10\.00 mm")


def test_uneven_spacing_is_not_a_missing_slice() -> None:
    refused(make_slices([0.0, 2.5, 5.0, 8.5, 11.0, 13.5]),
            r"^series has inconsistent slice spacing: gaps between slices range from 2\.50 to 3\.50 mm "
            r"\(median 2\.50 mm\); a volume needs one constant spacing$")


def test_mixed_orientations() -> None:
    datasets = make_slices([0.0, 2.5, 5.0])
    datasets[1].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal localizer
    refused(datasets, r"^series mixes slice orientations \(\[1, 0, 0, 0, 1, 0\] in .*, \[1, 0, 0, 0, 0, -1\] in "
                      + re.escape(str(datasets[1].SOPInstanceUID)) + r"\); a localizer or a reformat")


def test_invalid_orientation() -> None:
    refused(make_slices([0.0, 2.5], orientation=(1, 0, 0, 1, 0, 0)),
            r"^ImageOrientationPatient \[1, 0, 0, 1, 0, 0\] of .* is not two orthogonal unit vectors$")


def test_duplicated_positions() -> None:
    datasets = make_slices([0.0, 2.5, 2.5, 5.0])
    refused(datasets, r"^series has duplicated slice positions \(2 slices share a position with another; "
                      r"first at 2\.50 mm along the normal: .* and .*\); several acquisitions, phases or echoes")


def test_gantry_tilt_is_refused_with_its_angle() -> None:
    tilt = math.radians(15.0)
    # Tilted gantry: slice planes rotated about x, table (positions) moving straight along z.
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), math.sin(tilt))
    datasets = make_slices([0.0] * 5, orientation=orientation)
    for k, ds in enumerate(datasets):
        ds.ImagePositionPatient = [-10.0, -20.0, 3.0 * k]
    refused(datasets, r"^gantry tilt of 15° is not supported; reconstruct without tilt$")


def test_sheared_stack_is_refused() -> None:
    datasets = make_slices([0.0, 2.5, 5.0, 7.5, 10.0])
    for ds, dx in zip(datasets, [0.0, 3.0, 0.0, 3.0, 0.0], strict=True):
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + dx, *ds.ImagePositionPatient[1:]]
    refused(datasets, r"^slices are not stacked along their normal \(in-plane shift of up to 3\.00 mm\); "
                      r"reconstruct the series as a regular stack$")


def test_mixed_matrix_sizes() -> None:
    datasets = make_slices([0.0, 2.5, 5.0])
    datasets[2].Rows, datasets[2].Columns = 4, 4
    datasets[2].PixelData = np.zeros((4, 4), np.uint16).tobytes()
    refused(datasets, r"^series mixes matrix sizes 4x4 and 6x8 \(rows x columns\)$")


def test_mixed_pixel_spacings() -> None:
    datasets = make_slices([0.0, 2.5, 5.0])
    datasets[1].PixelSpacing = [0.9, 0.9]
    refused(datasets, r"^series mixes pixel spacings 0\.8x0\.7 mm and 0\.9x0\.9 mm \(row x column\)$")


def _raw(ds: Dataset, keyword: str, value: bytes) -> None:
    """Put ``value`` into ``ds`` as the undecoded bytes of a DS element, as a sender's file
    would carry them (pydicom refuses to build such values)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import tag_for_keyword

    value = value if len(value) % 2 == 0 else value + b" "
    tag = pydicom.tag.Tag(tag_for_keyword(keyword))
    ds[tag] = RawDataElement(tag, "DS", len(value), value, 0, False, True)


@pytest.mark.parametrize("spacing", [b"0\\0", b"-0.8\\-0.7", b"0.8\\0", b"1e-4\\1e-4", b"1e6\\1e6"])
def test_implausible_pixel_spacing_is_refused(spacing: bytes) -> None:
    # Zero or negative spacing gave a baffling reason (a MONAI orientation error, "mixes pixel
    # spacings -0.8x-0.7 mm and -0.8x-0.7 mm"); a wild one made later stages try to allocate
    # terabytes (MemoryError as an "internal error").
    datasets = make_slices([0.0, 2.5, 5.0])
    for ds in datasets:
        _raw(ds, "PixelSpacing", spacing)
    refused(datasets, rf"^PixelSpacing \[.*\] of {re.escape(str(datasets[0].SOPInstanceUID))} is not a plausible pixel "
                      r"spacing \(each value between 0\.01 and 100 mm\)$")


def test_one_slice_with_a_slice_thickness_that_is_no_number_gets_1_mm() -> None:
    # It was an "internal error: ValueError" for a one-slice pipeline (min_slices = 1).
    datasets = make_slices([3.0])
    _raw(datasets[0], "SliceThickness", b"x")
    assert load_volume(datasets, min_slices=1).spacing == pytest.approx((1.0, 0.8, 0.7))


@pytest.mark.parametrize("keyword", ["Rows", "Columns"])
def test_missing_matrix_size_is_refused(keyword: str) -> None:
    # It was "internal error: AttributeError: 'FileDataset' object has no attribute 'Rows'".
    datasets = make_slices([0.0, 2.5, 5.0])
    del datasets[1][keyword]
    refused(datasets, rf"^instance {re.escape(str(datasets[1].SOPInstanceUID))} has no {keyword}$")


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "Rows", "BitsAllocated", "RescaleSlope", "SliceThickness"])
def test_an_attribute_pydicom_cannot_read_is_named(keyword: str) -> None:
    # A value representation pydicom does not know (a corrupted or non-standard header) made
    # reading the attribute raise NotImplementedError: an "internal error" of the job.
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import tag_for_keyword

    datasets = make_slices([0.0, 2.5, 5.0])
    tag = pydicom.tag.Tag(tag_for_keyword(keyword))
    datasets[2][tag] = RawDataElement(tag, "Dt", 2, b"12", 0, False, True)
    refused(datasets, rf"^{keyword} of instance {re.escape(str(datasets[2].SOPInstanceUID))} cannot be read: ")


@pytest.mark.parametrize("keyword", ["RescaleSlope", "RescaleIntercept"])
def test_rescale_that_is_no_number_is_refused(keyword: str) -> None:
    # It was an "internal error: ValueError: could not convert string to float: 'x'".
    datasets = make_slices([0.0, 2.5, 5.0])
    _raw(datasets[1], keyword, b"x")
    refused(datasets, rf"^{keyword} of {re.escape(str(datasets[1].SOPInstanceUID))} is not a number: 'x'$")


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry(keyword: str) -> None:
    datasets = make_slices([0.0, 2.5, 5.0])
    del datasets[1][keyword]
    refused(datasets, rf"^instance {re.escape(str(datasets[1].SOPInstanceUID))} has no {keyword}$")


def test_single_slice_for_a_3d_pipeline() -> None:
    refused(make_slices([0.0]), r"^series has 1 slice; this pipeline needs at least 8$", min_slices=8)
    refused(make_slices([0.0, 2.5]), r"^series has 2 slices; this pipeline needs at least 3$", min_slices=3)


def test_instances_of_several_series() -> None:
    a, b = make_slices([0.0, 2.5]), make_slices([5.0, 7.5])
    refused(a + b, r"^instances of 2 series given \(.*, .*\); expected one series$")


def test_mixed_sop_classes() -> None:
    datasets = make_slices([0.0, 2.5, 5.0])
    datasets[2].SOPClassUID = SecondaryCaptureImageStorage
    refused(datasets, r"^series mixes SOP classes \(CT Image Storage, Secondary Capture Image Storage\)")


def test_no_instances() -> None:
    refused([], r"^no instances in series$")


def test_no_pixel_data() -> None:
    datasets = make_slices([0.0, 2.5])
    del datasets[0].PixelData
    refused(datasets, rf"^instance {re.escape(str(datasets[0].SOPInstanceUID))} has no pixel data$")


def test_empty_pixel_data_is_named_as_such(tmp_path: Path) -> None:
    """Zero-length Pixel Data (read back from a file as None) was "object of type 'NoneType' has no len()"."""
    datasets = make_slices([0.0, 2.5, 5.0])
    datasets[1].PixelData = b""
    paths = []
    for index, ds in enumerate(datasets):
        paths.append(tmp_path / f"{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    expected = (f"cannot decode pixel data of {datasets[1].SOPInstanceUID} (Explicit VR Little Endian): "
                "the pixel data is empty (0 bytes)")
    with pytest.raises(SeriesError) as info:
        load_series_files(paths)
    assert str(info.value) == expected
    refused(datasets, f"^{re.escape(expected)}$")


# --- enhanced multi-frame --------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(make_ct_phantom(3, shape=(6, 32, 40)), tmp_path_factory.mktemp("ct"), seed=3)


def legacy_enhanced(paths: list[Path]) -> hd.legacy.LegacyConvertedEnhancedCTImage:
    return hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=hd.UID(),
        series_number=10,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )


def assert_same_volume(multi: Volume, single: Volume) -> None:
    assert np.array_equal(multi.array, single.array)
    assert multi.spacing == pytest.approx(single.spacing)
    assert multi.origin == pytest.approx(single.origin)
    assert np.allclose(multi.direction, single.direction)


def test_legacy_converted_enhanced_ct_equals_the_single_frame_series(phantom_series: list[Path]) -> None:
    single = load_series_files(phantom_series)
    enhanced = legacy_enhanced(phantom_series)
    volume = load_volume([enhanced])
    assert_same_volume(volume, single)
    assert len(volume.datasets) == 6 and all(ds is enhanced for ds in volume.datasets)
    assert volume.source_instances == [enhanced]
    # Frame i is the plane at slice i's position.
    assert volume.frame_numbers is not None
    for i, frame in enumerate(volume.frame_numbers):
        item = enhanced.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0]
        assert [float(v) for v in item.ImagePositionPatient] == pytest.approx(
            [float(v) for v in single.datasets[i].ImagePositionPatient])


def test_enhanced_frames_in_any_order_and_per_frame_groups(phantom_series: list[Path]) -> None:
    """Frames stored in reverse order, orientation/measures/rescale per frame instead of shared."""
    single = load_series_files(phantom_series)
    enhanced = legacy_enhanced(list(reversed(phantom_series)))
    shared = enhanced.SharedFunctionalGroupsSequence[0]
    for keyword in ("PlaneOrientationSequence", "PixelMeasuresSequence", "PixelValueTransformationSequence"):
        for group in enhanced.PerFrameFunctionalGroupsSequence:
            setattr(group, keyword, copy.deepcopy(shared[keyword].value))
        del shared[keyword]
    volume = load_volume([enhanced])
    assert_same_volume(volume, single)
    assert volume.frame_numbers is not None and sorted(volume.frame_numbers) == [1, 2, 3, 4, 5, 6]
    assert [ds is enhanced for ds in volume.datasets] == [True] * 6
    positions = [float(enhanced.PerFrameFunctionalGroupsSequence[f - 1].PlanePositionSequence[0].ImagePositionPatient[2])
                 for f in volume.frame_numbers]
    assert positions == sorted(positions)


def test_rle_compressed_enhanced_ct_file(phantom_series: list[Path], tmp_path: Path) -> None:
    single = load_series_files(phantom_series)
    enhanced = legacy_enhanced(phantom_series)
    enhanced.compress(RLELossless)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    volume = load_series_files([path])
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless
    assert_same_volume(volume, single)
    assert volume.frame_numbers is not None and sorted(volume.frame_numbers) == [1, 2, 3, 4, 5, 6]


def test_enhanced_frame_without_position_is_refused(phantom_series: list[Path]) -> None:
    enhanced = legacy_enhanced(phantom_series)
    del enhanced.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    refused([enhanced], rf"^frame 2 of {re.escape(str(enhanced.SOPInstanceUID))} has no ImagePositionPatient "
                        r"\(PlanePositionSequence\)$")


def test_enhanced_frame_count_counts_as_slices(phantom_series: list[Path]) -> None:
    refused([legacy_enhanced(phantom_series)], r"^series has 6 slices; this pipeline needs at least 7$", min_slices=7)


def test_enhanced_with_repeated_positions_is_refused(phantom_series: list[Path]) -> None:
    """Several phases (or echoes) in one enhanced instance: frames share positions."""
    enhanced = legacy_enhanced(phantom_series)
    groups = enhanced.PerFrameFunctionalGroupsSequence
    groups[3].PlanePositionSequence = copy.deepcopy(groups[2].PlanePositionSequence)
    refused([enhanced], r"^series has duplicated slice positions \(2 slices share a position with another; "
                        r"first at .* mm along the normal: frame \d of .* and frame \d of ")


def test_multi_frame_without_functional_groups_is_refused() -> None:
    ds = make_slices([0.0])[0]
    ds.NumberOfFrames = 2
    ds.PixelData = np.zeros((2, ROWS, COLS), np.uint16).tobytes()
    refused([ds], r"^multi-frame instance .* \(CT Image Storage\) has no functional groups; "
                  r"its frames cannot be placed in patient space$")


def test_missing_slice_in_enhanced_instance(phantom_series: list[Path]) -> None:
    enhanced = legacy_enhanced(phantom_series)
    frames = enhanced.PerFrameFunctionalGroupsSequence
    keep = [0, 1, 2, 4, 5]
    pixels = enhanced.pixel_array[keep]
    enhanced.PerFrameFunctionalGroupsSequence = DicomSequence([frames[i] for i in keep])
    enhanced.NumberOfFrames = len(keep)
    enhanced.PixelData = pixels.tobytes()
    refused([enhanced], r"^series is missing 1 slice: gap of 10\.00 mm after -7\.50 mm along the normal \(frame \d of ")
