"""Map the segments of a DICOM Segmentation (SEG) onto the volume of the series it references.

A SEG written by another system (a vendor's AI, a viewer) stores each segment as 2D frames;
a frame says where it lies by the source image it was derived from (Derivation Image Sequence
-> Source Image Sequence, with a Referenced Frame Number for a multi-frame source) and by its
Plane Position (Patient). :func:`map_segments` places every frame on the slice of the
:class:`~pacs_sentinel.dicom_io.series.Volume` it belongs to, whatever order the frames are in,
and returns one boolean mask per segment on the volume's grid, so that the QC checks work on a
third-party SEG exactly as on our own model's masks.

Frames are placed by their source reference first; a frame without one is placed by its
position along the volume's slice normal (and must lie on a slice, in the same plane). SEG
frames must share the series' matrix: a SEG on a resampled grid is refused, not resampled.
Binary, fractional (a voxel is in the segment at half the maximum fractional value or more)
and label-map SEGs are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array as decode_pixel_array

from pacs_sentinel.dicom_io.series import Volume, functional_group_item
from pacs_sentinel.errors import SeriesError
from pacs_sentinel.results import Code, SegmentLabel

#: SOP classes of segmentations (Segmentation, Label Map Segmentation).
SEGMENTATION_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
#: Largest distance (as a share of the slice spacing) between a frame placed by its position
#: and the slice it is put on.
POSITION_TOLERANCE = 0.1
#: Largest in-plane offset of a frame placed by its position from the volume's grid, in pixels.
IN_PLANE_TOLERANCE_PIXELS = 0.25


@dataclass
class MappedSegment:
    """One segment of a SEG on the volume's grid.

    Attributes:
        number: Its Segment Number in the SEG.
        label: Its name, segmented property category and type (coded as in the SEG), and
            Tracking ID (or ``"segment <n>"`` when the SEG gives none).
        mask: Boolean ``(slices, rows, cols)``, slice ``i`` = ``volume.datasets[i]``.
        algorithm_name: Segment Algorithm Name, when the SEG gives one.
    """

    number: int
    label: SegmentLabel
    mask: np.ndarray
    algorithm_name: str | None = None


@dataclass
class MappedSegmentation:
    """A SEG whose segments were placed on a volume.

    Attributes:
        dataset: The SEG as highdicom reads it (the SR references its segments).
        segments: Every segment in Segment Number order.
        frames_placed_by_position: How many frames had no usable source reference and were
            placed by their Plane Position.
    """

    dataset: hd.seg.Segmentation
    segments: list[MappedSegment]
    frames_placed_by_position: int = 0

    @property
    def sop_instance_uid(self) -> str:
        """SOP Instance UID of the SEG."""
        return str(self.dataset.SOPInstanceUID)


def is_segmentation(ds: Dataset) -> bool:
    """True when ``ds`` is a Segmentation or Label Map Segmentation instance."""
    return str(ds.get("SOPClassUID", "")) in SEGMENTATION_SOP_CLASSES or str(ds.get("Modality", "")) == "SEG"


def referenced_series_uids(ds: Dataset) -> list[str]:
    """The image series a SEG says it was derived from (Referenced Series Sequence), in order.

    A SEG without a Referenced Series Sequence (not valid, but seen) gives an empty list.
    """
    uids = [str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in item]
    return list(dict.fromkeys(uids))


def _code(item: Dataset) -> Code:
    return Code(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def segment_labels(ds: Dataset) -> dict[int, tuple[SegmentLabel, str | None]]:
    """Segment number -> (label, algorithm name) from the SEG's Segment Sequence.

    Segment 0 (the background a label map may describe) is left out.

    Raises:
        SeriesError: The SEG has no segments, or a segment lacks its property codes.
    """
    labels: dict[int, tuple[SegmentLabel, str | None]] = {}
    for item in ds.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        if number == 0:
            continue  # a label map's background, described but not a segment to judge
        try:
            category = _code(item.SegmentedPropertyCategoryCodeSequence[0])
            property_type = _code(item.SegmentedPropertyTypeCodeSequence[0])
        except (AttributeError, IndexError) as exc:
            raise SeriesError(f"segment {number} of SEG {ds.get('SOPInstanceUID', '?')} has no segmented "
                              f"property category/type code: {exc}") from exc
        name = str(item.get("SegmentLabel", "") or "") or property_type.meaning
        tracking_id = str(item.get("TrackingID", "") or "") or f"segment {number}"
        algorithm = str(item.get("SegmentAlgorithmName", "") or "") or None
        labels[number] = (SegmentLabel(name, category, property_type, tracking_id), algorithm)
    if not labels:
        raise SeriesError(f"SEG {ds.get('SOPInstanceUID', '?')} has no segments")
    return labels


def _source_refs(ds: Dataset, frame_index: int) -> list[tuple[str, int]]:
    """(SOP Instance UID, frame number) of every source image a frame names (frame 1 if none)."""
    groups = ds.get("PerFrameFunctionalGroupsSequence")
    if not groups or frame_index >= len(groups):
        return []
    refs = []
    for derivation in groups[frame_index].get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            numbers = source.get("ReferencedFrameNumber")
            frames = [1] if numbers in (None, "") else [int(n) for n in np.atleast_1d(numbers)]
            refs += [(str(source.ReferencedSOPInstanceUID), frame) for frame in frames]
    return refs


class _Placer:
    """Finds the volume slice of a SEG frame, by source reference or by position."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        frames = volume.frame_numbers or [1] * len(volume.datasets)
        self.by_source = {(str(ds.SOPInstanceUID), frame): i
                          for i, (ds, frame) in enumerate(zip(volume.datasets, frames, strict=True))}
        self.origin = np.asarray(volume.origin, dtype=float)
        self.direction = np.asarray(volume.direction, dtype=float)

    def by_reference(self, refs: list[tuple[str, int]]) -> int | None:
        slices = {self.by_source[ref] for ref in refs if ref in self.by_source}
        if len(slices) > 1:
            raise SeriesError(f"a SEG frame is derived from several slices of the series ({sorted(slices)})")
        return slices.pop() if slices else None

    def by_position(self, position: np.ndarray, what: str) -> int:
        row_spacing, col_spacing = self.volume.spacing[1], self.volume.spacing[2]
        offset = np.linalg.inv(self.direction) @ (position - self.origin)  # (col, row, slice) in mm
        index = offset[2] / self.volume.spacing[0]
        nearest = int(round(index))
        if not 0 <= nearest < self.volume.array.shape[0] or abs(index - nearest) > POSITION_TOLERANCE:
            raise SeriesError(f"{what} at {np.round(position, 2).tolist()} mm lies on no slice of the series")
        if abs(offset[0]) > IN_PLANE_TOLERANCE_PIXELS * col_spacing or abs(offset[1]) > IN_PLANE_TOLERANCE_PIXELS * row_spacing:
            raise SeriesError(f"{what} is shifted in-plane from the series' grid; a resampled SEG is not supported")
        return nearest


def _segment_frames(ds: Dataset) -> np.ndarray:
    """Decode the SEG's frames as ``(frames, rows, cols)`` stored values."""
    try:
        pixels = decode_pixel_array(ds)
    except Exception as exc:  # decoder plugins raise many types; all mean "cannot decode"
        raise SeriesError(f"cannot decode the frames of SEG {ds.get('SOPInstanceUID', '?')}: {exc}") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.shape[0] != frames:
        raise SeriesError(f"SEG {ds.get('SOPInstanceUID', '?')}: decoded {pixels.shape[0]} frames, "
                          f"NumberOfFrames says {frames}")
    return pixels


def in_segment(frames: np.ndarray, segmentation_type: str, maximum: float) -> np.ndarray:
    """Which stored values of a BINARY or FRACTIONAL SEG's frames belong to the frame's segment:
    non-zero, or (FRACTIONAL) at least half of ``maximum``, the Maximum Fractional Value."""
    return frames >= maximum / 2 if segmentation_type == "FRACTIONAL" else frames > 0


def frames_holding_their_segment(ds: Dataset) -> np.ndarray:
    """For each frame of a BINARY or FRACTIONAL SEG, whether any of its pixels is in its segment
    (:func:`in_segment`); a frame may be present and hold nothing of it.

    Raises:
        SeriesError: The frames cannot be decoded.
    """
    frames = _segment_frames(ds)
    on = in_segment(frames, str(ds.get("SegmentationType", "BINARY")), float(ds.get("MaximumFractionalValue", 1) or 1))
    return on.reshape(len(frames), -1).any(axis=1)


def map_segments(ds: Dataset, volume: Volume) -> MappedSegmentation:
    """Place every frame of a SEG on the volume and return one mask per segment.

    Args:
        ds: The SEG (Segmentation or Label Map Segmentation), e.g. as read by pydicom.
        volume: The volume of the image series the SEG references.

    Returns:
        The SEG (as a highdicom object) with its segments' masks on the volume's grid; a
        segment none of whose frames holds a pixel has an empty mask.

    Raises:
        SeriesError: The SEG cannot be read as a segmentation, its frames have another
            matrix or orientation than the series, or a frame can be placed on no slice
            (it references no instance of the series, and its position lies on none or is
            in another frame of reference).
    """
    uid = str(ds.get("SOPInstanceUID", "?"))
    try:
        seg = ds if isinstance(ds, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(ds, copy=True)
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        raise SeriesError(f"SEG {uid} cannot be read as a segmentation: {exc}") from exc
    labels = segment_labels(seg)
    slices, rows, cols = volume.array.shape
    if (int(seg.Rows), int(seg.Columns)) != (rows, cols):
        raise SeriesError(f"SEG {uid} has {int(seg.Rows)}x{int(seg.Columns)} frames, the series {rows}x{cols} "
                          "images; a SEG on another grid is not supported")
    orientation = functional_group_item(seg, 0, "PlaneOrientationSequence")
    if orientation is not None and "ImageOrientationPatient" in orientation:
        seg_dirs = np.asarray([float(v) for v in orientation.ImageOrientationPatient])
        vol_dirs = np.concatenate([volume.direction[:, 0], volume.direction[:, 1]])
        if np.abs(seg_dirs - vol_dirs).max() > 1e-3:
            raise SeriesError(f"SEG {uid} frames have orientation {np.round(seg_dirs, 4).tolist()}, the series "
                              f"{np.round(vol_dirs, 4).tolist()}")

    segmentation_type = str(seg.get("SegmentationType", "BINARY"))
    frames = _segment_frames(seg)
    maximum = float(seg.get("MaximumFractionalValue", 1) or 1)
    masks = {number: np.zeros((slices, rows, cols), dtype=bool) for number in labels}
    shared_segment = functional_group_item(seg, 0, "SegmentIdentificationSequence") if segmentation_type != "LABELMAP" else None
    placer = _Placer(volume)
    by_position = 0
    # A position means something only in its frame of reference (source references do not need one).
    seg_frame_of_reference = str(seg.get("FrameOfReferenceUID", "") or "")
    series_frame_of_reference = str(volume.datasets[0].get("FrameOfReferenceUID", "") or "")
    for index in range(frames.shape[0]):
        what = f"frame {index + 1} of SEG {uid}"
        slice_index = placer.by_reference(_source_refs(seg, index))
        if slice_index is None:
            position = functional_group_item(seg, index, "PlanePositionSequence")
            if position is None or "ImagePositionPatient" not in position:
                raise SeriesError(f"{what} references no instance of the series and has no position")
            if seg_frame_of_reference and series_frame_of_reference and seg_frame_of_reference != series_frame_of_reference:
                raise SeriesError(f"{what} references no instance of the series and its frame of reference "
                                  f"{seg_frame_of_reference} is not the series' {series_frame_of_reference}: "
                                  "its position cannot be placed")
            slice_index = placer.by_position(np.asarray([float(v) for v in position.ImagePositionPatient]), what)
            by_position += 1
        frame = frames[index]
        if segmentation_type == "LABELMAP":
            for number, mask in masks.items():
                mask[slice_index] |= frame == number
            continue
        identification = functional_group_item(seg, index, "SegmentIdentificationSequence") or shared_segment
        if identification is None:
            raise SeriesError(f"{what} does not say which segment it belongs to")
        number = int(identification.ReferencedSegmentNumber)
        if number not in masks:
            raise SeriesError(f"{what} belongs to segment {number}, which the SEG does not describe")
        masks[number][slice_index] |= in_segment(frame, segmentation_type, maximum)
    return MappedSegmentation(
        dataset=seg,
        segments=[MappedSegment(number, labels[number][0], masks[number], labels[number][1]) for number in sorted(labels)],
        frames_placed_by_position=by_position,
    )
