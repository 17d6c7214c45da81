"""Comprehensive 3D SR (TID 1500 Measurement Report) carrying the QC verdict of an AI result.

This module implements "The QC contract in the Structured Report" (DESIGN.md): for each
segment of the SEG, one Volumetric ROI Measurements group (TID 1411) that references the
segment and holds the quality score (QC001), the volume (SCT 118565006, mm3), the verdict
(QC002 -> QC010/QC011) and one QC finding (QC003) per raised reason. Codes of the private
scheme 99PSQC are declared in the Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import math

import highdicom as hd
import highdicom.coding_schemes
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Measurement,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    ReferencedSegment,
    SourceImageForSegmentation,
    SourceSeriesForSegmentation,
    TextContentItem,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from highdicom.sr.enum import RelationshipTypeValues
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.identity import (
    MANUFACTURER,
    creation_times,
    device_serial_number,
    device_uid,
    equipment_attributes,
)
from pacs_sentinel.reports.seg import coded, verdict_text
from pacs_sentinel.results import (
    QC_FINDING,
    QC_SCHEME,
    QC_SCHEME_NAME,
    QC_SCHEME_UID,
    QC_VERDICT,
    QC_VERSION,
    QUALITY_SCORE,
    VOLUME,
    QCResult,
    SegmentationResult,
)

#: Name of the device observer (TID 1004 "Device Observer Name").
DEVICE_OBSERVER_NAME = "PACS Sentinel"
#: Unit of the quality score.
NO_UNITS = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
#: Unit of volumes.
CUBIC_MILLIMETER = CodedConcept(value="mm3", scheme_designator="UCUM", meaning="cubic millimeter")
#: Concept name of free-text comments (DCM 121106 "Comment").
COMMENT = CodedConcept(value="121106", scheme_designator="DCM", meaning="Comment")
#: Text of the comment added when the segmentation is withheld by policy.
WITHHELD_SEG_TEXT = (
    "The AI segmentation is held for review and was not sent to the PACS: "
    "its QC verdict requires a human check before it is used."
)


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


def provenance_text(result: SegmentationResult, qc: QCResult) -> str:
    """Return ``"model <name> <version>; QC <qc_version>"`` for the equipment and observer."""
    return f"model {result.model_name} {result.model_version}; QC {qc.qc_version}"


def procedure_reported(volume: Volume) -> CodedConcept:
    """Return the CID 100 code of the imaging procedure the report is about."""
    modality = str(volume.datasets[0].get("Modality", ""))
    code = codes.cid100.CTUnspecifiedBodyRegion if modality == "CT" else codes.cid100.ImagingProcedure
    return CodedConcept(value=code.value, scheme_designator=code.scheme_designator, meaning=code.meaning)


def referenced_segment(segmentation: hd.seg.Segmentation, segment_number: int) -> ReferencedSegment:
    """Return the SR reference to one segment of ``segmentation`` and to its source images.

    ``ReferencedSegment.from_segmentation`` (highdicom 0.28) only looks for the segment
    number in the per-frame functional groups; a single-segment SEG keeps it in the shared
    ones. This reads both.

    Each source instance is listed once. When the SEG frames reference frames of a
    multi-frame source, its item names those frames (Referenced Frame Number), ascending.
    """
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    shared_segment = shared.get("SegmentIdentificationSequence")
    sources: dict[str, str] = {}
    frames_of: dict[str, set[int]] = {}
    for frame in segmentation.PerFrameFunctionalGroupsSequence:
        identification = frame.get("SegmentIdentificationSequence") or shared_segment
        if identification is None or int(identification[0].ReferencedSegmentNumber) != segment_number:
            continue
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uid = str(source.ReferencedSOPInstanceUID)
                sources.setdefault(uid, str(source.ReferencedSOPClassUID))
                numbers = source.get("ReferencedFrameNumber")
                if numbers not in (None, ""):
                    frames_of.setdefault(uid, set()).update(int(n) for n in np.atleast_1d(numbers))
    common = {
        "sop_class_uid": segmentation.SOPClassUID,
        "sop_instance_uid": segmentation.SOPInstanceUID,
        "segment_number": segment_number,
    }
    if sources:
        return ReferencedSegment(
            **common,
            source_images=[
                SourceImageForSegmentation(
                    referenced_sop_class_uid=cls,
                    referenced_sop_instance_uid=uid,
                    referenced_frame_numbers=sorted(frames_of[uid]) if uid in frames_of else None,
                )
                for uid, cls in sources.items()
            ],
        )
    series_uid = str(segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return ReferencedSegment(**common, source_series=SourceSeriesForSegmentation(series_uid))


def build_qc_report(
    volume: Volume,
    segmentation: hd.seg.Segmentation,
    result: SegmentationResult,
    qc: QCResult,
    *,
    series_number: int = 902,
    withheld_seg: bool = False,
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
        withheld_seg: True when policy keeps the SEG from the PACS; a comment says so.

    Returns:
        The SR document: complete, unverified.

    Raises:
        ReportError: A QC segment names a segment the SEG does not have, a score is outside
            [0, 1], or highdicom refuses the content.
    """
    seg_segments = {int(item.SegmentNumber): item for item in segmentation.SegmentSequence}
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(),
            name=DEVICE_OBSERVER_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=result.model_name,
            serial_number=device_serial_number(),
        ),
    )
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
        try:
            group = VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=str(seg_item.TrackingUID),
                    identifier=str(seg_item.TrackingID),
                ),
                referenced_segment=referenced_segment(segmentation, number),
                finding_type=coded(segment_qc.label.property_type),
                finding_category=coded(segment_qc.label.property_category),
                algorithm_id=algorithm,
                measurements=[
                    Measurement(name=coded(QUALITY_SCORE), value=score, unit=NO_UNITS),
                    Measurement(name=coded(VOLUME), value=volume_mm3, unit=CUBIC_MILLIMETER),
                ],
                qualitative_evaluations=[
                    QualitativeEvaluation(name=coded(QC_VERDICT), value=coded(segment_qc.verdict.value)),
                    *(
                        QualitativeEvaluation(name=coded(QC_FINDING), value=coded(reason.value))
                        for reason in segment_qc.reasons
                    ),
                ],
            )
        except (ValueError, TypeError) as exc:
            raise ReportError(f"cannot build SR group of segment {number}: {exc}") from exc
        # TID 1411 allows TEXT qualitative evaluations: record which QC produced the verdict.
        group[0].ContentSequence.append(
            TextContentItem(
                name=coded(QC_VERSION),
                value=qc.qc_version,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
        if withheld_seg:
            group[0].ContentSequence.append(
                TextContentItem(
                    name=COMMENT,
                    value=WITHHELD_SEG_TEXT,
                    relationship_type=RelationshipTypeValues.CONTAINS,
                )
            )
        groups.append(group)

    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_reported(volume),
        imaging_measurements=groups,
    )
    equipment: dict = equipment_attributes()
    # Software Versions: the product's, then which model and QC produced the content.
    equipment["software_versions"] = [equipment["software_versions"], provenance_text(result, qc)[:64]]
    try:
        return hd.sr.Comprehensive3DSR(
            # Each source instance once: a multi-frame source stands for all of its slices.
            evidence=[*volume.source_instances, segmentation],
            content=report,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=f"AI QC report (QC: {verdict_text(qc.verdict)})",
            coding_schemes=[coding_scheme_item()],
            **equipment,
            **creation_times(),
        )
    except (ValueError, TypeError) as exc:
        raise ReportError(f"cannot build SR: {exc}") from exc
