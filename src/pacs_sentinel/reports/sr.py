"""Comprehensive 3D SR (TID 1500 Measurement Report) carrying the QC verdict of an AI result.

This module implements "The QC contract in the Structured Report" (DESIGN.md): for each
segment of the SEG, one Volumetric ROI Measurements group (TID 1411) that references the
segment and holds the quality score (QC001), the volume (SCT 118565006, mm3), the verdict
(QC002 -> QC010/QC011) and one QC finding (QC003) per raised reason. Codes of the private
scheme 99PSQC are declared in the Coding Scheme Identification Sequence.

When policy withholds the SEG (``withheld_seg=True``, on_review = "withhold-seg"), the SR must
not reference an object that is never sent: the SEG is left out of the evidence and each
segment gets a Measurements and Qualitative Evaluations group (TID 1501) instead, with the
same tracking identifier and UID, the segment's finding type/category/site, the source images
the segment lies on, the same QC items, and a Comment (DCM 121106) that says the segmentation
is held for review, why, and that it was not sent to the PACS.
"""

from __future__ import annotations

import math

import highdicom as hd
import highdicom.coding_schemes
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    ReferencedSegment,
    SourceImageForMeasurementGroup,
    SourceImageForSegmentation,
    SourceSeriesForSegmentation,
    TextContentItem,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from highdicom.sr.enum import RelationshipTypeValues
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array as decode_pixel_array
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pacs_sentinel.dicom_io.seg_masks import frames_holding_their_segment
from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.errors import ReportError, SeriesError
from pacs_sentinel.reports.highdicom_speedups import content_not_copied
from pacs_sentinel.reports.identity import (
    MANUFACTURER,
    creation_times,
    device_serial_number,
    device_uid,
    equipment_attributes,
)
from pacs_sentinel.reports.seg import coded, verdict_text
from pacs_sentinel.reports.source import character_set, patient_study_source, text_values
from pacs_sentinel.results import (
    QC_FINDING,
    QC_SCHEME,
    QC_SCHEME_NAME,
    QC_SCHEME_UID,
    QC_VERDICT,
    QC_VERSION,
    QUALITY_SCORE,
    VOLUME,
    ClassificationResult,
    QCResult,
    Reason,
    SegmentationResult,
    SegmentQC,
    Verdict,
)

#: Name of the device observer (TID 1004 "Device Observer Name").
DEVICE_OBSERVER_NAME = "PACS Sentinel"
#: Unit of the quality score.
NO_UNITS = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
#: Unit of volumes.
CUBIC_MILLIMETER = CodedConcept(value="mm3", scheme_designator="UCUM", meaning="cubic millimeter")
#: Concept name of free-text comments (DCM 121106 "Comment").
COMMENT = CodedConcept(value="121106", scheme_designator="DCM", meaning="Comment")
#: Start of the comment added to each segment's group when the segmentation is withheld by
#: policy; :func:`withheld_seg_text` completes it with the reasons.
WITHHELD_SEG_TEXT = "AI segmentation held for review"
#: SNOMED CT "Anatomical Structure": a segment of this category names a finding site.
ANATOMICAL_STRUCTURE = "123037004"


def withheld_seg_text(segment_qc: SegmentQC, qc: QCResult) -> str:
    """Return the comment of a withheld segment, e.g.
    ``"AI segmentation held for review: Fragmentation, Low model confidence; not sent to PACS"``.

    The reasons are the segment's own; a segment without any (the SEG is withheld because of
    another segment) gives the result's reasons, or the verdict when QC raised none.
    """
    reasons = segment_qc.reasons or qc.reasons
    why = ", ".join(reason.label for reason in reasons) if reasons else f"QC verdict {qc.verdict.label}"
    return f"{WITHHELD_SEG_TEXT}: {why}; not sent to PACS"


def sr_series_description(qc: QCResult, *, withheld_seg: bool = False) -> str:
    """Return e.g. ``"AI QC report (QC: needs review; segmentation withheld)"``."""
    withheld = "; segmentation withheld" if withheld_seg else ""
    return f"AI QC report (QC: {verdict_text(qc.verdict)}{withheld})"


def coding_scheme_item() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    """Return the Coding Scheme Identification item declaring our private scheme 99PSQC."""
    item = hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=QC_SCHEME,
        name=QC_SCHEME_NAME,
        responsible_organization=MANUFACTURER,
    )
    # Coding Scheme UID is required when the scheme has an OID (it does), registered or not;
    # highdicom only writes it together with a registry, which a private scheme has not.
    item.CodingSchemeUID = QC_SCHEME_UID
    return item


def provenance_text(result: SegmentationResult | ClassificationResult, qc: QCResult) -> str:
    """Return ``"model <name> <version>; QC <qc_version>"`` for the equipment and observer."""
    return f"model {result.model_name} {result.model_version}; QC {qc.qc_version}"


def procedure_reported(source: Dataset) -> CodedConcept:
    """Return the CID 100 code of the imaging procedure: CT, radiography, or unspecified."""
    modality = str(source.get("Modality", ""))
    if modality == "CT":
        code = codes.cid100.CTUnspecifiedBodyRegion
    elif modality in ("DX", "CR", "RG", "DR"):
        code = codes.cid100.XRUnspecifiedBodyRegion
    else:
        code = codes.cid100.ImagingProcedure
    return CodedConcept(value=code.value, scheme_designator=code.scheme_designator, meaning=code.meaning)


def device_observer(model_name: str) -> ObserverContext:
    """The observer context of every report we write: this device, running ``model_name``."""
    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(),
            name=DEVICE_OBSERVER_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=model_name,
            serial_number=device_serial_number(),
        ),
    )


def qc_evaluations(verdict: Verdict, reasons: list[Reason]) -> list[QualitativeEvaluation]:
    """The QC contract's coded items of one segment or finding: the verdict, one item per reason."""
    return [
        QualitativeEvaluation(name=coded(QC_VERDICT), value=coded(verdict.value)),
        *(QualitativeEvaluation(name=coded(QC_FINDING), value=coded(reason.value)) for reason in reasons),
    ]


def text_item(name: CodedConcept, value: str) -> TextContentItem:
    """A TEXT item CONTAINed in a measurement group (QC version, comments)."""
    return TextContentItem(name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS)


def build_document(
    *,
    report: MeasurementReport,
    evidence: list[Dataset],
    series_number: int,
    series_description: str,
    result: SegmentationResult | ClassificationResult,
    qc: QCResult,
) -> hd.sr.Comprehensive3DSR:
    """Wrap a TID 1500 report into our Comprehensive 3D SR: identity, provenance, 99PSQC, flags.

    ``report`` must have been built for this document alone: the SR takes its content tree
    over instead of deep-copying it (:func:`~pacs_sentinel.reports.highdicom_speedups.content_not_copied`;
    the same bytes, ~10 ms less per document with 64 source references), so the caller must
    not use or change ``report`` afterwards.

    Raises:
        ReportError: highdicom refuses the content.
    """
    equipment: dict = equipment_attributes()
    # Software Versions: the product's, then which model and QC produced the content.
    equipment["software_versions"] = [equipment["software_versions"], provenance_text(result, qc)[:64]]
    # Tracking IDs, labels, code meanings and algorithm names (a third-party SEG's, a model
    # card's) may hold text the source's character set has not.
    charset = character_set(evidence[0], [*text_values(*report), series_description, *equipment["software_versions"]])
    try:
        with content_not_copied(report[0]):
            return hd.sr.Comprehensive3DSR(
                # highdicom takes patient and study from the first item (reports/source.py)
                evidence=[patient_study_source(evidence[0], written_in=charset), *evidence[1:]],
                specific_character_set=charset,
                content=report,
                series_instance_uid=generate_uid(),
                series_number=series_number,
                sop_instance_uid=generate_uid(),
                instance_number=1,
                is_complete=True,
                is_final=False,
                is_verified=False,
                series_description=series_description,
                coding_schemes=[coding_scheme_item()],
                **equipment,
                **creation_times(),
            )
    except (ValueError, TypeError) as exc:
        raise ReportError(f"cannot build SR: {exc}") from exc


#: The source images of one segment: SOP Instance UID -> SOP Class UID (in frame order, each
#: once) and, for multi-frame sources, SOP Instance UID -> referenced frame numbers.
SegmentSources = tuple[dict[str, str], dict[str, set[int]]]


def all_segment_sources(segmentation: hd.seg.Segmentation) -> dict[int, SegmentSources]:
    """Return the source instances of every segment's frames, by segment number.

    A BINARY or FRACTIONAL SEG names the segment of each frame in its per-frame functional
    groups, or in the shared ones (a single-segment SEG). A label map's frames name no
    segment: a segment lies on the frames whose pixels hold its number, so those are decoded.

    Raises:
        ReportError: The frames of a label map cannot be decoded.
    """
    numbers = [int(item.SegmentNumber) for item in segmentation.SegmentSequence]
    found: dict[int, SegmentSources] = {number: ({}, {}) for number in numbers}
    frames = segmentation.PerFrameFunctionalGroupsSequence
    if str(segmentation.get("SegmentationType", "")) == "LABELMAP":
        try:
            pixels = np.asarray(decode_pixel_array(segmentation)).reshape(len(frames), -1)
        except Exception as exc:  # decoder plugins raise many types; all mean "cannot decode"
            raise ReportError(f"cannot decode the frames of label map SEG {segmentation.SOPInstanceUID}: {exc}") from exc
        holds = {number: (pixels == number).any(axis=1) for number in numbers if number != 0}
        segments_of = [[number for number, on in holds.items() if on[index]] for index in range(len(frames))]
    else:
        shared = segmentation.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
        segments_of = []
        for frame in frames:
            identification = frame.get("SegmentIdentificationSequence") or shared
            segments_of.append([] if identification is None else [int(identification[0].ReferencedSegmentNumber)])
        # A frame may be present and hold nothing of its segment: a SEG written with its empty
        # frames, or a FRACTIONAL one whose frame holds only values below half the maximum (not in
        # the mask QC judged, seg_masks.map_segments): the segment does not lie on that image.
        try:
            held = frames_holding_their_segment(segmentation)
        except SeriesError:  # undecodable frames: every present frame counts, as before
            held = np.ones(len(frames), dtype=bool)
        segments_of = [segments if on else [] for segments, on in zip(segments_of, held, strict=True)]
    for frame, segments in zip(frames, segments_of, strict=True):
        for derivation in frame.get("DerivationImageSequence", []) if segments else []:
            for source in derivation.get("SourceImageSequence", []):
                uid = str(source.ReferencedSOPInstanceUID)
                numbers_of_frame = source.get("ReferencedFrameNumber")
                for number in segments:
                    sources, frames_of = found.setdefault(number, ({}, {}))
                    sources.setdefault(uid, str(source.ReferencedSOPClassUID))
                    if numbers_of_frame not in (None, ""):
                        frames_of.setdefault(uid, set()).update(int(n) for n in np.atleast_1d(numbers_of_frame))
    return found


def segment_sources(segmentation: hd.seg.Segmentation, segment_number: int) -> SegmentSources:
    """The source instances of one segment's frames (see :func:`all_segment_sources`)."""
    return all_segment_sources(segmentation).get(segment_number, ({}, {}))


def referenced_segment(segmentation: hd.seg.Segmentation, segment_number: int,
                       sources: SegmentSources | None = None) -> ReferencedSegment:
    """Return the SR reference to one segment of ``segmentation`` and to its source images.

    ``ReferencedSegment.from_segmentation`` (highdicom 0.28) only looks for the segment
    number in the per-frame functional groups; a single-segment SEG keeps it in the shared
    ones. This reads both.

    Each source instance is listed once. When the SEG frames reference frames of a
    multi-frame source, its item names those frames (Referenced Frame Number), ascending.
    """
    sources_by_uid, frames_of = sources if sources is not None else segment_sources(segmentation, segment_number)
    common = {
        "sop_class_uid": segmentation.SOPClassUID,
        "sop_instance_uid": segmentation.SOPInstanceUID,
        "segment_number": segment_number,
    }
    if sources_by_uid:
        return ReferencedSegment(
            **common,
            source_images=[
                SourceImageForSegmentation(
                    referenced_sop_class_uid=cls,
                    referenced_sop_instance_uid=uid,
                    referenced_frame_numbers=sorted(frames_of[uid]) if uid in frames_of else None,
                )
                for uid, cls in sources_by_uid.items()
            ],
        )
    series_uid = str(segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return ReferencedSegment(**common, source_series=SourceSeriesForSegmentation(series_uid))


def segment_tracking_identifier(segmentation: Dataset, seg_item: Dataset) -> TrackingIdentifier:
    """The tracking identifier of a segment: its Tracking UID and ID when the SEG gives them.

    Our SEGs always do; a third-party SEG may not (both are optional there). The fallback is
    stable for the same SEG and segment: a UID derived from the SEG's SOP Instance UID and the
    segment number, and the identifier ``"segment <n>"`` (or its Segment Label).
    """
    number = int(seg_item.SegmentNumber)
    uid = str(seg_item.get("TrackingUID", "") or "") or generate_uid(
        entropy_srcs=["pacs-sentinel-segment", str(segmentation.SOPInstanceUID), str(number)])
    identifier = (str(seg_item.get("TrackingID", "") or "") or str(seg_item.get("SegmentLabel", "") or "")
                  or f"segment {number}")
    return TrackingIdentifier(uid=uid, identifier=identifier[:64])


def withheld_segment_group(
    segmentation: hd.seg.Segmentation,
    segment_qc: SegmentQC,
    *,
    algorithm: AlgorithmIdentification,
    measurements: list[Measurement],
    qualitative_evaluations: list[QualitativeEvaluation],
    sources: SegmentSources | None = None,
) -> MeasurementsAndQualitativeEvaluations:
    """Return the TID 1501 group of a segment whose SEG is withheld: no reference to the SEG.

    It keeps the segment's tracking identifier and UID (so the withheld SEG, kept locally,
    can be matched later), its finding type and category (and finding site when the segment
    is an anatomical structure), the source images the segment lies on, and the QC items.
    """
    number = segment_qc.segment_number
    seg_item = next(item for item in segmentation.SegmentSequence if int(item.SegmentNumber) == number)
    label = segment_qc.label
    sources, frames_of = sources if sources is not None else segment_sources(segmentation, number)
    site = [FindingSite(coded(label.property_type))] if label.property_category.value == ANATOMICAL_STRUCTURE else None
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=str(seg_item.TrackingUID), identifier=str(seg_item.TrackingID)),
        finding_type=coded(label.property_type),
        finding_category=coded(label.property_category),
        finding_sites=site,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=qualitative_evaluations,
        source_images=[
            SourceImageForMeasurementGroup(
                referenced_sop_class_uid=cls,
                referenced_sop_instance_uid=uid,
                referenced_frame_numbers=sorted(frames_of[uid]) if uid in frames_of else None,
            )
            for uid, cls in sources.items()
        ]
        or None,
    )


def build_qc_report(
    volume: Volume,
    segmentation: hd.seg.Segmentation,
    result: SegmentationResult,
    qc: QCResult,
    *,
    series_number: int = 902,
    withheld_seg: bool = False,
    series_description: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 QC report of one segmentation result.

    Args:
        volume: The source series (evidence, patient and study); each source instance is
            listed once in the evidence, however many slices it holds.
        segmentation: The SEG built by :func:`~pacs_sentinel.reports.seg.build_segmentation`;
            each measurement group references one of its segments.
        result: The model output (model name and version).
        qc: The QC judgement; one measurement group per :class:`~pacs_sentinel.results.SegmentQC`.
        series_number: Series Number of the new series.
        withheld_seg: True when policy keeps the SEG from the PACS: the SR then does not
            reference the SEG at all (not in the evidence; TID 1501 groups instead of
            TID 1411, see the module docstring), and each group says in a comment that the
            segmentation is held for review, why, and that it was not sent.
        series_description: Overrides the default ``"AI QC report (QC: ...)"``.

    Returns:
        The SR document: complete, unverified.

    Raises:
        ReportError: A QC segment names a segment the SEG does not have, a score is outside
            [0, 1], or highdicom refuses the content.
    """
    seg_segments = {int(item.SegmentNumber): item for item in segmentation.SegmentSequence}
    sources_of = all_segment_sources(segmentation)  # one pass over the frames for every segment
    observer = device_observer(result.model_name)
    algorithm = AlgorithmIdentification(name=result.model_name, version=result.model_version)

    groups = []
    for segment_qc in qc.segments:
        number = segment_qc.segment_number
        if number not in seg_segments:
            raise ReportError(f"QC segment {number} is not in the SEG (segments {sorted(seg_segments)})")
        score = float(segment_qc.quality_score)
        if not (0.0 <= score <= 1.0) or math.isnan(score):
            raise ReportError(f"quality score {score!r} of segment {number} is outside [0, 1]")
        volume_mm3 = float(segment_qc.volume_mm3)
        if not math.isfinite(volume_mm3) or volume_mm3 < 0:
            raise ReportError(f"volume {volume_mm3!r} mm3 of segment {number} is not a finite non-negative number")
        seg_item = seg_segments[number]
        measurements = [
            Measurement(name=coded(QUALITY_SCORE), value=score, unit=NO_UNITS),
            Measurement(name=coded(VOLUME), value=volume_mm3, unit=CUBIC_MILLIMETER),
        ]
        evaluations = qc_evaluations(segment_qc.verdict, segment_qc.reasons)
        try:
            if withheld_seg:
                group = withheld_segment_group(
                    segmentation,
                    segment_qc,
                    algorithm=algorithm,
                    measurements=measurements,
                    qualitative_evaluations=evaluations,
                    sources=sources_of.get(number),
                )
            else:
                group = VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=segment_tracking_identifier(segmentation, seg_item),
                    referenced_segment=referenced_segment(segmentation, number, sources_of.get(number)),
                    finding_type=coded(segment_qc.label.property_type),
                    finding_category=coded(segment_qc.label.property_category),
                    algorithm_id=algorithm,
                    measurements=measurements,
                    qualitative_evaluations=evaluations,
                )
        except (ValueError, TypeError) as exc:
            raise ReportError(f"cannot build SR group of segment {number}: {exc}") from exc
        # TID 1411 and TID 1501 allow TEXT qualitative evaluations: record which QC produced
        # the verdict.
        group[0].ContentSequence.append(text_item(coded(QC_VERSION), qc.qc_version))
        if withheld_seg:
            group[0].ContentSequence.append(text_item(COMMENT, withheld_seg_text(segment_qc, qc)))
        groups.append(group)

    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_reported(volume.datasets[0]),
        imaging_measurements=groups,
    )
    return build_document(
        report=report,
        # Each source instance once: a multi-frame source stands for all of its slices.
        # A withheld SEG is never sent, so it must not be in the evidence.
        evidence=[*volume.source_instances, *([] if withheld_seg else [segmentation])],
        series_number=series_number,
        series_description=series_description or sr_series_description(qc, withheld_seg=withheld_seg),
        result=result,
        qc=qc,
    )
