"""DICOM Segmentation (SEG) of an AI result, aligned frame by frame with the source series.

One binary segment per label of the model. Every frame references the source instance of
its slice (Derivation Image Sequence), so viewers place it without resampling; slices whose
mask is empty are left out (highdicom's default) unless a whole segment is empty, in which
case every frame is kept so the segment still exists and can be referenced from the SR.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    SegmentationTypeValues,
)
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.identity import creation_times, equipment_attributes
from pacs_sentinel.results import Code, QCResult, SegmentationResult, Verdict

#: Content Label (0070,0080) of our SEG objects (CS: upper case, digits, underscore).
CONTENT_LABEL = "AI_SEG"
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
) -> hd.seg.Segmentation:
    """Build the binary SEG of ``result`` on the source series of ``volume``.

    Args:
        volume: The source series; ``volume.datasets[i]`` is the instance of mask slice ``i``.
        result: The model output; ``result.mask`` is ``(labels, slices, rows, cols)`` bool.
        qc: The QC judgement; its verdict goes into the series description and the segment
            display colours.
        series_number: Series Number of the new series (deterministic, from configuration).
        series_description: Overrides the default ``"AI organ segmentation (QC: ...)"``.

    Returns:
        The Segmentation instance (one instance, new series, same study and patient).

    Raises:
        ReportError: The mask does not match the volume or the labels, or highdicom refuses
            the object.
    """
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

    # highdicom wants (frames, rows, cols, segments): axis 0 must be the source instance index.
    pixels = np.moveaxis(mask, 0, -1).astype(np.uint8)
    every_segment_present = bool(mask.reshape(n_labels, -1).any(axis=1).all())
    try:
        return hd.seg.Segmentation(
            source_images=volume.datasets,
            pixel_array=pixels,
            segmentation_type=SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            **equipment_attributes(),
            **creation_times(),
            omit_empty_frames=every_segment_present,
            content_label=CONTENT_LABEL,
            content_description=f"{result.model_name} {result.model_version}"[:64],
            series_description=series_description[:64],
        )
    except (ValueError, TypeError) as exc:
        raise ReportError(f"cannot build SEG: {exc}") from exc
