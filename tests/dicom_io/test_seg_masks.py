"""Placing a third-party SEG's frames on the slices of the series it references."""

from __future__ import annotations

import numpy as np
import pytest

from pacs_sentinel.dicom_io.seg_masks import map_segments, referenced_series_uids
from pacs_sentinel.dicom_io.series import load_volume
from pacs_sentinel.errors import SeriesError
from tests.conftest import make_third_party_seg
from tests.reports.conftest import make_ct_series

LIVER = ("10200004", "SCT", "Liver")
SPLEEN = ("78961009", "SCT", "Spleen")


@pytest.fixture(scope="module")
def series():
    datasets = make_ct_series(seed=3)
    return datasets, load_volume(datasets)


def distinct_masks(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Two masks whose every slice differs from every other (slice i has i + 1 rows set)."""
    first = np.zeros(shape, dtype=bool)
    second = np.zeros(shape, dtype=bool)
    for i in range(shape[0]):
        first[i, 5:6 + i, 10:20] = True
        second[i, 40:45, 30:31 + i] = True
    return first, second


def test_frames_land_on_their_slices_in_volume_order(series) -> None:
    datasets, volume = series
    first, second = distinct_masks(volume.array.shape)
    seg = make_third_party_seg(volume.datasets, [first, second], [LIVER, SPLEEN])

    mapped = map_segments(seg, volume)

    assert [s.number for s in mapped.segments] == [1, 2]
    np.testing.assert_array_equal(mapped.segments[0].mask, first)
    np.testing.assert_array_equal(mapped.segments[1].mask, second)
    assert mapped.frames_placed_by_position == 0
    assert referenced_series_uids(seg) == [volume.series_uid]


def test_reversed_slice_order_in_the_seg(series) -> None:
    """A SEG whose frames run from the last slice to the first is placed by its references."""
    datasets, volume = series
    first, second = distinct_masks(volume.array.shape)
    reversed_sources = list(reversed(volume.datasets))
    seg = make_third_party_seg(reversed_sources, [first[::-1], second[::-1]], [LIVER, SPLEEN])

    mapped = map_segments(seg, volume)

    np.testing.assert_array_equal(mapped.segments[0].mask, first)
    np.testing.assert_array_equal(mapped.segments[1].mask, second)


def test_frames_without_source_references_are_placed_by_position(series) -> None:
    datasets, volume = series
    first, second = distinct_masks(volume.array.shape)
    seg = make_third_party_seg(list(reversed(volume.datasets)), [first[::-1], second[::-1]], [LIVER, SPLEEN])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence

    mapped = map_segments(seg, volume)

    assert mapped.frames_placed_by_position == int(seg.NumberOfFrames)
    np.testing.assert_array_equal(mapped.segments[0].mask, first)
    np.testing.assert_array_equal(mapped.segments[1].mask, second)


def test_positions_on_another_frame_of_reference_are_refused(series) -> None:
    """Positions mean something only in their frame of reference: a SEG on another one whose
    frames name no source image cannot be placed (it would land on the wrong slices)."""
    _, volume = series
    first, second = distinct_masks(volume.array.shape)
    seg = make_third_party_seg(volume.datasets, [first, second], [LIVER, SPLEEN])
    seg.FrameOfReferenceUID = "1.2.3.4.5"
    mapped = map_segments(seg, volume)  # placed by its source references: unambiguous
    np.testing.assert_array_equal(mapped.segments[0].mask, first)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence

    with pytest.raises(SeriesError, match=rf"frame 1 of SEG {seg.SOPInstanceUID} references no instance of the "
                                          rf"series and its frame of reference 1\.2\.3\.4\.5 is not the series' "
                                          rf"{volume.datasets[0].FrameOfReferenceUID}"):
        map_segments(seg, volume)


def test_label_map_seg(series) -> None:
    datasets, volume = series
    first, second = distinct_masks(volume.array.shape)
    seg = make_third_party_seg(volume.datasets, [first, second], [LIVER, SPLEEN], seg_type="LABELMAP")

    mapped = map_segments(seg, volume)

    np.testing.assert_array_equal(mapped.segments[0].mask, first)
    np.testing.assert_array_equal(mapped.segments[1].mask, second)


def test_fractional_seg_is_thresholded_at_half_the_maximum(series) -> None:
    datasets, volume = series
    first, second = distinct_masks(volume.array.shape)
    seg = make_third_party_seg(volume.datasets, [first, second], [LIVER, SPLEEN], seg_type="FRACTIONAL")
    assert seg.SegmentationType == "FRACTIONAL"

    mapped = map_segments(seg, volume)

    np.testing.assert_array_equal(mapped.segments[0].mask, first)
    np.testing.assert_array_equal(mapped.segments[1].mask, second)


def test_labels_and_missing_tracking_ids_are_read(series) -> None:
    datasets, volume = series
    first, _ = distinct_masks(volume.array.shape)
    seg = make_third_party_seg(volume.datasets, [first], [LIVER], tracking=False)

    segment = map_segments(seg, volume).segments[0]

    assert segment.label.property_type.value == "10200004"
    assert segment.label.name == "Liver 1"
    assert segment.label.tracking_id == "segment 1"
    assert segment.algorithm_name == "VendorSeg"


def test_a_seg_of_another_series_is_refused(series) -> None:
    _, volume = series
    other = load_volume(make_ct_series(seed=4))
    first, _ = distinct_masks(other.array.shape)
    seg = make_third_party_seg(other.datasets, [first], [LIVER])
    seg.FrameOfReferenceUID = volume.datasets[0].FrameOfReferenceUID  # positions comparable, not on a slice
    for frame in seg.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
        # Move the frames off the judged volume's slices.
        position = frame.PlanePositionSequence[0]
        position.ImagePositionPatient = [float(v) for v in position.ImagePositionPatient[:2]] + [500.0]

    with pytest.raises(SeriesError, match="lies on no slice"):
        map_segments(seg, volume)


def test_a_seg_on_another_matrix_is_refused(series) -> None:
    _, volume = series
    small = load_volume(make_ct_series(rows=32, cols=32, seed=5))
    seg = make_third_party_seg(small.datasets, [np.ones(small.array.shape, dtype=bool)], [LIVER])

    with pytest.raises(SeriesError, match="32x32 frames"):
        map_segments(seg, volume)


def test_frames_of_a_multi_frame_source_are_placed_by_referenced_frame_number(series, tmp_path) -> None:
    """A SEG on a Legacy Converted Enhanced CT whose frames run in reverse slice order."""
    import highdicom as hd
    import pydicom

    datasets, volume = series
    sources = list(reversed(volume.datasets))
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        sources, series_instance_uid=str(sources[0].SeriesInstanceUID), series_number=10,
        sop_instance_uid=hd.UID(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    multi = load_volume([pydicom.dcmread(tmp_path / "enhanced.dcm")])
    assert multi.frame_numbers == list(range(len(sources), 0, -1))
    first, second = distinct_masks(multi.array.shape)
    in_frame_order = np.argsort(multi.frame_numbers)
    seg = make_third_party_seg(multi.source_instances, [first[in_frame_order], second[in_frame_order]],
                               [LIVER, SPLEEN])

    mapped = map_segments(seg, multi)

    assert mapped.frames_placed_by_position == 0
    np.testing.assert_array_equal(mapped.segments[0].mask, first)
    np.testing.assert_array_equal(mapped.segments[1].mask, second)
