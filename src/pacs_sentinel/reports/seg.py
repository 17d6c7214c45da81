"""DICOM Segmentation (SEG) of an AI result, aligned frame by frame with the source series.

One binary segment per label of the model. Every frame references the source instance of
its slice (Derivation Image Sequence), so viewers place it without resampling; slices whose
mask is empty are left out (highdicom's default) unless a whole segment is empty, in which
case every frame is kept so the segment still exists and can be referenced from the SR.

An enhanced multi-frame source (one instance holding every slice) is referenced frame by
frame instead: each SEG frame names the source instance and its Referenced Frame Number,
and copies that frame's plane position. A series split over several multi-frame instances
is refused; highdicom 0.28 can reference frames of one multi-frame source only.

Segmentation type (``[reports] seg_type``): ``"BINARY"`` (default; Segmentation Storage,
1-bit frames, one frame per segment and slice) or ``"LABELMAP"`` (Label Map Segmentation
Storage, 1.2.840.10008.5.1.4.1.1.66.7; one 8/16-bit frame per slice whose pixel values are
segment numbers, 0 = background). A label map cannot hold overlapping segments: where masks
overlap, the later segment (higher segment number) wins and the earlier one loses those
pixels. Label-map frames carry no Segment Identification Sequence.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    SegmentationTypeValues,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.identity import creation_times, equipment_attributes
from pacs_sentinel.reports.source import character_set, patient_study_source, text_values
from pacs_sentinel.results import Code, QCResult, SegmentationResult, Verdict

#: Content Label (0070,0080) of our SEG objects (CS: upper case, digits, underscore).
CONTENT_LABEL = "AI_SEG"
#: Accepted values of ``seg_type`` (``[reports] seg_type``).
SEG_TYPES: tuple[str, ...] = ("BINARY", "LABELMAP")
#: Transfer syntaxes a SEG can be written in: uncompressed first (the default), then JPEG 2000
#: lossless (BINARY and LABELMAP), then RLE lossless (LABELMAP only: highdicom cannot RLE a
#: 1-bit frame).
SEG_TRANSFER_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless)
#: Display colours (sRGB) of segments by QC verdict; the overlay uses the same ones.
VERDICT_COLOURS: dict[Verdict, tuple[int, int, int]] = {
    Verdict.ACCEPTED: (40, 200, 80),
    Verdict.NEEDS_REVIEW: (255, 140, 0),
}


def coded(code: Code) -> hd.sr.CodedConcept:
    """Convert one of our :class:`~pacs_sentinel.results.Code` values to a highdicom concept."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def verdict_text(verdict: Verdict) -> str:
    """Return the verdict as used in series descriptions, e.g. ``"needs review"``."""
    return verdict.label.lower()


def build_segmentation(
    volume: Volume,
    result: SegmentationResult,
    qc: QCResult,
    *,
    series_number: int = 901,
    series_description: str | None = None,
    seg_type: str = "BINARY",
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    workers: int = 0,
) -> hd.seg.Segmentation:
    """Build the SEG (binary or label map) of ``result`` on the source series of ``volume``.

    Args:
        volume: The source series; ``volume.datasets[i]`` is the instance (and, for a
            multi-frame source, ``volume.frame_numbers[i]`` the frame) of mask slice ``i``.
        result: The model output; ``result.mask`` is ``(labels, slices, rows, cols)`` bool.
        qc: The QC judgement; its verdict goes into the series description and the segment
            display colours.
        series_number: Series Number of the new series (deterministic, from configuration).
        series_description: Overrides the default ``"AI organ segmentation (QC: ...)"``.
        seg_type: ``"BINARY"`` (default) or ``"LABELMAP"``. In a label map overlapping
            masks cannot be represented: the later segment (higher number) wins.
        transfer_syntax_uid: Explicit VR Little Endian (default: every peer accepts it) or
            one of :data:`SEG_TRANSFER_SYNTAXES`; a BINARY SEG can only be compressed with
            JPEG 2000 lossless.
        workers: highdicom's frame-compression worker processes (0 = compress in this
            process). Has no effect on an uncompressed transfer syntax.

    Returns:
        The Segmentation instance (one instance, new series, same study and patient).

    Raises:
        ReportError: ``seg_type`` is not one of :data:`SEG_TYPES`, the transfer syntax does
            not suit it, the mask does not match
            the volume or the labels, the series is split
            over several multi-frame instances, or highdicom refuses the object.
    """
    if seg_type not in SEG_TYPES:
        raise ReportError(f"unknown SEG type {seg_type!r} ([reports] seg_type); expected one of {', '.join(SEG_TYPES)}")
    allowed = SEG_TRANSFER_SYNTAXES if seg_type == "LABELMAP" else SEG_TRANSFER_SYNTAXES[:2]
    if transfer_syntax_uid not in allowed:
        raise ReportError(
            f"transfer syntax {transfer_syntax_uid} is not available for a {seg_type} SEG; "
            f"expected one of {', '.join(allowed)}"
        )
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ReportError(f"workers must be an integer >= 0, not {workers!r}")
    mask = np.asarray(result.mask)
    n_labels = len(result.labels)
    if mask.ndim != 4 or mask.shape[0] != n_labels or mask.shape[1:] != volume.array.shape:
        raise ReportError(
            f"mask shape {mask.shape} does not match {n_labels} label(s) on volume {volume.array.shape}"
        )
    if n_labels == 0:
        raise ReportError("segmentation result has no labels")
    if series_description is None:
        series_description = f"AI organ segmentation (QC: {verdict_text(qc.verdict)})"

    verdict_by_segment = {s.segment_number: s.verdict for s in qc.segments}
    algorithm = hd.AlgorithmIdentificationSequence(
        name=result.model_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=result.model_version,
    )
    descriptions = []
    for index, label in enumerate(result.labels):
        number = index + 1
        colour = VERDICT_COLOURS[verdict_by_segment.get(number, qc.verdict)]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label.name,
                segmented_property_category=coded(label.property_category),
                segmented_property_type=coded(label.property_type),
                algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=generate_uid(),
                tracking_id=label.tracking_id,
                display_color=hd.color.CIELabColor.from_rgb(*colour),
            )
        )

    # highdicom wants (frames, rows, cols, segments): axis 0 must be the source instance index,
    # or, for one multi-frame source, the source frame index.
    # A 512x512x300 mask is 75 MiB: no copy of it unless the frames must be reordered (one
    # multi-frame source) or the mask is not boolean.
    source_images, slice_order = _source_frames(volume)
    reorder = not np.array_equal(slice_order, np.arange(len(slice_order)))
    binary = mask if mask.dtype == np.bool_ else mask != 0
    if seg_type == "LABELMAP":
        # One integer frame per slice, pixel value = segment number; later segments win.
        labels = np.zeros(mask.shape[1:], dtype=np.uint8 if n_labels < 256 else np.uint16)
        for index in range(n_labels):
            labels[binary[index]] = index + 1
        pixels = labels[slice_order] if reorder else labels
        segmentation_type = SegmentationTypeValues.LABELMAP
    else:
        # bool and uint8 have the same size: the 0/1 bytes are viewed as uint8, not converted.
        pixels = np.moveaxis(binary, 0, -1).view(np.uint8)
        pixels = pixels[slice_order] if reorder else pixels
        segmentation_type = SegmentationTypeValues.BINARY
    every_segment_present = bool(binary.reshape(n_labels, -1).any(axis=1).all())
    content_description = f"{result.model_name} {result.model_version}"[:64]
    # Labels, codes and names from the model card may hold text the source's character set has not.
    charset = character_set(source_images[0], [*text_values(*descriptions), content_description, series_description])
    try:
        return hd.seg.Segmentation(
            # highdicom takes patient and study from the first source (reports/source.py)
            source_images=[patient_study_source(source_images[0], written_in=charset), *source_images[1:]],
            specific_character_set=charset,
            pixel_array=pixels,
            segmentation_type=segmentation_type,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            **equipment_attributes(),
            **creation_times(),
            omit_empty_frames=every_segment_present,
            transfer_syntax_uid=transfer_syntax_uid,
            workers=workers,
            content_label=CONTENT_LABEL,
            content_description=content_description,
            series_description=series_description[:64],
        )
    except (ValueError, TypeError) as exc:
        raise ReportError(f"cannot build SEG: {exc}") from exc
    except AttributeError as exc:  # highdicom expects a module the source's IOD lacks
        sop_class = pydicom.uid.UID(str(source_images[0].get("SOPClassUID", "")))
        raise ReportError(f"cannot build a SEG on {sop_class.name or sop_class} source images "
                          f"({exc}); segment an image series (CT, MR) instead") from exc


def _source_frames(volume: Volume) -> tuple[list[Dataset], np.ndarray]:
    """Return the ``source_images`` highdicom expects and the slice index of each of its frames.

    Single-frame sources: every instance in slice order, identity order. One multi-frame
    source: that instance alone, and the slices sorted by source frame number, so that frame
    ``k`` of the pixel array is frame ``k + 1`` of the source.

    Raises:
        ReportError: The series is split over several instances of which one is
            multi-frame, or the frame numbers do not cover the source's frames exactly once.
    """
    n_slices = len(volume.datasets)
    if volume.frame_numbers is None:
        return list(volume.datasets), np.arange(n_slices)
    sources = volume.source_instances
    if len(sources) != 1:
        uids = ", ".join(str(ds.get("SOPInstanceUID", "?")) for ds in sources[:3])
        uids += ", ..." if len(sources) > 3 else ""
        raise ReportError(
            f"cannot build SEG: series {volume.series_uid} is split over {len(sources)} multi-frame instances "
            f"({uids}); a SEG can reference the frames of one multi-frame source only"
        )
    source = sources[0]
    frame_numbers = np.asarray(volume.frame_numbers)
    frames = int(source.get("NumberOfFrames", 1) or 1)
    if frames != n_slices or sorted(frame_numbers.tolist()) != list(range(1, frames + 1)):
        raise ReportError(
            f"cannot build SEG: the {n_slices} slices do not map one to one onto the {frames} frames "
            f"of multi-frame source {source.get('SOPInstanceUID', '?')}"
        )
    return [source], np.argsort(frame_numbers, kind="stable")
