"""Result objects of a classification model: a TID 1500 findings report and heat-map overlays.

The SR implements "The QC contract in the Structured Report" (DESIGN.md) for
classification: one Measurement and Qualitative Evaluation group (TID 1501) per finding of
the model, whether positive or not, each holding

- Finding (DCM 121071) = the finding's code: what the group is about;
- Presence of property (DCM 121052) = Present (SCT 52101004) or Absent (SCT 272519000),
  CID 240 "Present-Absent": the model's decision at its threshold;
- Finding probability (QC005), NUM, unit (1, UCUM, "no units"): the calibrated probability;
- Quality score (QC001), NUM, unit (1, UCUM, "no units");
- QC verdict (QC002) = Accepted (QC010) or Needs review (QC011);
- one QC finding (QC003) per raised reason;
- QC version (QC004), TEXT.

The finding code always goes into the Finding row, for a negative finding too: the QC
judgement of a confident "absent" is as much part of the contract as that of a positive
one, and a reader needs to know which finding it concerns. Presence is therefore stated
separately, with the standard Present/Absent value set, rather than by leaving the Finding
row out.

The overlays are RGB secondary captures, one per positive finding: the image windowed with
its own VOI window, the finding's Grad-CAM heat map blended in the "hot" colour map (see
:func:`hot_colour_map`), and a banner stating the finding, its probability, the QC verdict
in words, the quality score, the model and the reasons. When no finding is positive one
overlay still shows the image and says so, so the radiologist sees that the AI looked.
"""

from __future__ import annotations

import math

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ContainerContentItem,
    ContentItem,
    ContentSequence,
    ImageContentItem,
    ImageLibraryEntryDescriptors,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.enum import RelationshipTypeValues
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pacs_sentinel.errors import ReportError
# Helpers of the segmentation overlay, shared so both overlays look the same.
from pacs_sentinel.reports.overlay import (
    AUTO_WINDOW_PERCENTILES,
    DASH,
    DEFAULT_WINDOW,
    MIN_WIDTH,
    render_banner,
    patient_orientation,
    rgb_secondary_capture,
    window_of,
)
from pacs_sentinel.reports.seg import VERDICT_COLOURS, coded, verdict_text
from pacs_sentinel.reports.sr import (
    COMMENT,
    NO_UNITS,
    build_document,
    device_observer,
    procedure_reported,
    qc_evaluations,
    text_item,
)
from pacs_sentinel.results import (
    FINDING_PROBABILITY,
    QC_VERSION,
    QUALITY_SCORE,
    ClassificationResult,
    FindingQC,
    QCResult,
    Verdict,
)

#: Concept name of the finding's presence (DCM 121052 "Presence of property").
PRESENCE = CodedConcept(value="121052", scheme_designator="DCM", meaning="Presence of property")
#: Values of :data:`PRESENCE`, from CID 240 "Present-Absent".
PRESENT = CodedConcept(value="52101004", scheme_designator="SCT", meaning="Present")
ABSENT = CodedConcept(value="272519000", scheme_designator="SCT", meaning="Absent")

#: Heat-map values below this are not drawn (Grad-CAM's low tail is mostly background).
HEATMAP_FLOOR = 0.2
#: Opacity of the heat map where it is 1; elsewhere opacity = value x this (the grey image
#: always shows through).
HEATMAP_MAX_ALPHA = 0.6
#: What the writers accept as a source, for error messages.
_SINGLE_FRAME_HINT = "a single-frame 2D grayscale image (DX/CR, or one CT/MR slice)"


def hot_colour_map(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB with the "hot" colour map (black - red - yellow - white).

    Red rises over the first third, green over the second, blue over the last; higher values
    are brighter, so the map reads correctly in grey too. Returns uint8 ``(..., 3)``.
    """
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * v - k, 0.0, 1.0) for k in (0, 1, 2)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


# --- the SR ------------------------------------------------------------------------------


def _check_source(source: Dataset) -> tuple[int, int]:
    """Return (rows, cols) of a single-frame grayscale source image, or raise ReportError."""
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Rows", "Columns") if k not in source]
    if missing:
        raise ReportError(f"source image lacks {', '.join(missing)}")
    frames = int(source.get("NumberOfFrames", 1) or 1)
    samples = int(source.get("SamplesPerPixel", 1) or 1)
    if frames != 1 or samples != 1:
        raise ReportError(
            f"source {source.SOPInstanceUID} has {frames} frame(s) of {samples} sample(s) per pixel; "
            f"expected {_SINGLE_FRAME_HINT}"
        )
    return int(source.Rows), int(source.Columns)


def _findings_by_number(result: ClassificationResult, qc: QCResult) -> dict[int, FindingQC]:
    """The QC findings by finding number, checked against the result's labels."""
    by_number: dict[int, FindingQC] = {}
    for finding in qc.findings:
        number = finding.finding_number
        if not 1 <= number <= len(result.labels):
            raise ReportError(f"QC finding {number} is not a label of the result (1..{len(result.labels)})")
        score = float(finding.quality_score)
        if math.isnan(score) or not 0.0 <= score <= 1.0:
            raise ReportError(f"quality score {score!r} of finding {number} is outside [0, 1]")
        probability = float(finding.probability)
        if math.isnan(probability) or not 0.0 <= probability <= 1.0:
            raise ReportError(f"probability {probability!r} of finding {number} is outside [0, 1]")
        by_number[number] = finding
    return by_number


#: Unit of a direction cosine in TID 1604, as highdicom writes it.
_COSINE = CodedConcept(value="{-1:1}", scheme_designator="UCUM", meaning="{-1:1}")


def _stated_numbers(image: Dataset, keyword: str, count: int, *, positive: bool = False) -> list | None:
    """The ``count`` values of a numeric attribute as the image holds them, or None when it is
    absent or empty, or has another number of values or one that is not finite (or, with
    ``positive``, not above 0): nothing a descriptor can state.

    Raises:
        ValueError: A value is no number at all (a broken file; the message names it).
    """
    value = image.get(keyword)
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{keyword} {values!r} is not {count} number(s)") from exc
    if len(numbers) != count or not all(math.isfinite(n) and (n > 0 or not positive) for n in numbers):
        return None
    return values


def _num(name: CodedConcept, value: object, unit: CodedConcept = codes.UCUM.Millimeter) -> NumContentItem:
    return NumContentItem(name=name, value=value, unit=unit, relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT)


def projection_descriptors(image: Dataset) -> list[ContentItem]:
    """TID 1603 descriptors of a projection radiograph: those of its rows the image states.

    Patient Orientation Row and Column come from Patient Orientation when it has its two
    values; Horizontal and Vertical Pixel Spacing (mm at the detector) from Imager Pixel
    Spacing when it has two positive ones. Every row of TID 1603 is optional (U): what the
    image leaves out or sends empty - a CR's unknown Patient Orientation (type 2C), its
    Imager Pixel Spacing (type 3) - is left out here too. Pixel Spacing is never used: it is
    a distance in the patient, not at the detector, and no spacing is guessed.
    """
    descriptors: list[ContentItem] = []
    orientation = image.get("PatientOrientation")
    if orientation is not None and not isinstance(orientation, str) and len(orientation) == 2 \
            and all(str(value).strip() for value in orientation):
        descriptors += [
            TextContentItem(name=name, value=str(value), relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT)
            for name, value in zip((codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn),
                                   orientation, strict=True)
        ]
    spacing = _stated_numbers(image, "ImagerPixelSpacing", 2, positive=True)
    if spacing is not None:
        descriptors += [_num(codes.DCM.HorizontalPixelSpacing, spacing[1]),
                        _num(codes.DCM.VerticalPixelSpacing, spacing[0])]
    return descriptors


def cross_sectional_descriptors(image: Dataset) -> list[ContentItem]:
    """TID 1604 descriptors of a CT/MR/PET image: those of its rows the image states.

    In highdicom's order: Horizontal and Vertical Pixel Spacing, Slice Thickness, Image
    Position (Patient) X/Y/Z, Image Orientation (Patient) row and column X/Y/Z, Spacing
    Between Slices. highdicom reads all but the last unconditionally; Slice Thickness is type
    2 for CT and MR (empty when unknown), and every TID 1604 row is optional (U), so what the
    image does not state is left out.
    """
    descriptors: list[ContentItem] = []
    spacing = _stated_numbers(image, "PixelSpacing", 2, positive=True)
    if spacing is not None:
        descriptors += [_num(codes.DCM.HorizontalPixelSpacing, spacing[1]),
                        _num(codes.DCM.VerticalPixelSpacing, spacing[0])]
    thickness = _stated_numbers(image, "SliceThickness", 1)
    if thickness is not None:
        descriptors.append(_num(codes.DCM.SliceThickness, thickness[0]))
    position = _stated_numbers(image, "ImagePositionPatient", 3)
    if position is not None:
        names = (codes.DCM.ImagePositionPatientX, codes.DCM.ImagePositionPatientY, codes.DCM.ImagePositionPatientZ)
        descriptors += [_num(name, value) for name, value in zip(names, position, strict=True)]
    orientation = _stated_numbers(image, "ImageOrientationPatient", 6)
    if orientation is not None:
        names = (codes.DCM.ImageOrientationPatientRowX, codes.DCM.ImageOrientationPatientRowY,
                 codes.DCM.ImageOrientationPatientRowZ, codes.DCM.ImageOrientationPatientColumnX,
                 codes.DCM.ImageOrientationPatientColumnY, codes.DCM.ImageOrientationPatientColumnZ)
        descriptors += [_num(name, value, _COSINE) for name, value in zip(names, orientation, strict=True)]
    between = _stated_numbers(image, "SpacingBetweenSlices", 1)
    if between is not None:
        descriptors.append(_num(codes.DCM.SpacingBetweenSlices, between[0]))
    return descriptors


class _StatedDescriptors(ImageLibraryEntryDescriptors):
    """TID 1602 entry descriptors as highdicom writes them, with the modality's own rows from
    :func:`projection_descriptors` and :func:`cross_sectional_descriptors`.

    highdicom's own TID 1603 and 1604 parts read Patient Orientation and Imager Pixel Spacing
    of every CR/DX/... image, and Pixel Spacing, Slice Thickness and Image Position and
    Orientation (Patient) of every CT/MR/PET image, unconditionally: AttributeError,
    IndexError or TypeError when one is absent or empty.
    """

    def _generate_projection_radiography_descriptors(self, dataset: Dataset) -> list[ContentItem]:
        return projection_descriptors(dataset)

    def _generate_cross_sectional_descriptors(self, dataset: Dataset) -> list[ContentItem]:
        return cross_sectional_descriptors(dataset)


def image_library(source: Dataset) -> ContainerContentItem:
    """The TID 1600 Image Library of a report on one image (a TID 1500 row).

    The same content as highdicom's ``ImageLibrary`` writes (one group holding the image with
    its TID 1602 entry descriptors: modality, Frame of Reference UID if any, rows, columns,
    and the modality's own descriptors), except that a projection radiograph is described
    by the :func:`projection_descriptors` it states.

    Raises:
        ValueError: highdicom refuses the image (not an image SOP class).
    """
    image_item = ImageContentItem(
        name=CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source"),
        referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    image_item.ContentSequence = _StatedDescriptors(source)
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS)
    group.ContentSequence = ContentSequence([image_item])
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = ContentSequence([group])
    return library


def tracking_uid(source: Dataset, tracking_id: str) -> str:
    """Tracking UID of a finding on one image: the same on every run over that image."""
    return generate_uid(entropy_srcs=[str(source.SOPInstanceUID), tracking_id])


def build_classification_report(
    source: Dataset,
    result: ClassificationResult,
    qc: QCResult,
    *,
    series_number: int = 902,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 findings report of one classification result.

    Args:
        source: The classified image (evidence, patient and study; each group references it).
        result: The model output (decision thresholds, model name and version).
        qc: The QC judgement; one measurement group per :class:`FindingQC`.
        series_number: Series Number of the new series.

    Returns:
        The SR document: complete, unverified.

    Raises:
        ReportError: The source is not a single-frame grayscale image, a QC finding names a
            label the result does not have, a probability or score is outside [0, 1], or
            highdicom refuses the content.
    """
    _check_source(source)
    findings = _findings_by_number(result, qc)
    observer = device_observer(result.model_name)
    algorithm = AlgorithmIdentification(name=result.model_name, version=result.model_version)
    source_image = SourceImageForMeasurementGroup(
        referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID),
    )

    groups = []
    for number in sorted(findings):
        finding = findings[number]
        label = result.labels[number - 1]
        threshold = float(result.thresholds[number - 1])
        try:
            group = MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=tracking_uid(source, label.tracking_id),
                    identifier=label.tracking_id,
                ),
                finding_type=coded(label.code),
                algorithm_id=algorithm,
                source_images=[source_image],
                measurements=[
                    # 6 decimals: a float32 probability's binary noise says nothing.
                    Measurement(
                        name=coded(FINDING_PROBABILITY), value=round(float(finding.probability), 6), unit=NO_UNITS
                    ),
                    Measurement(name=coded(QUALITY_SCORE), value=float(finding.quality_score), unit=NO_UNITS),
                ],
                qualitative_evaluations=[
                    QualitativeEvaluation(name=PRESENCE, value=PRESENT if finding.positive else ABSENT),
                    *qc_evaluations(finding.verdict, finding.reasons),
                ],
            )
        except (ValueError, TypeError) as exc:
            raise ReportError(f"cannot build SR group of finding {number} ({label.name}): {exc}") from exc
        # TID 1501 allows TEXT qualitative evaluations: which QC produced the verdict, and the
        # threshold the presence was decided at.
        group[0].ContentSequence.extend([
            text_item(coded(QC_VERSION), qc.qc_version),
            text_item(COMMENT, f"Present when the finding probability is at or above {threshold:.4g}"),
        ])
        groups.append(group)

    try:
        library = image_library(source)
    except (ValueError, TypeError) as exc:
        raise ReportError(f"cannot describe {source.SOPInstanceUID} in the SR's image library: {exc}") from exc
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_reported(source),
        imaging_measurements=groups,
    )
    # TID 1500 row 5, between Procedure Reported and Imaging Measurements, where highdicom
    # puts the library it builds (it cannot build one for a radiograph that does not state
    # its orientation and spacing: see image_library).
    content = report[0].ContentSequence
    content.insert(len(content) - 1, library)
    return build_document(
        report=report,
        evidence=[source],
        series_number=series_number,
        series_description=f"AI findings report (QC: {verdict_text(qc.verdict)})",
        result=result,
        qc=qc,
    )


# --- the overlays ------------------------------------------------------------------------


def display_image(source: Dataset) -> np.ndarray:
    """Return the source image as a viewer would show it by default: uint8, white = bright.

    The modality LUT (rescale) is applied, then the first VOI window of the image, else its
    VOI LUT, else for CT the soft-tissue window, else the :data:`AUTO_WINDOW_PERCENTILES` of
    its values. MONOCHROME1 images are inverted.

    Raises:
        ReportError: The pixel data cannot be decoded or is not a single 2D frame.
    """
    _check_source(source)
    try:
        values = apply_modality_lut(source.pixel_array, source).astype(np.float64)
    except Exception as exc:  # pydicom raises many types for undecodable pixel data
        raise ReportError(f"cannot decode the pixels of {source.SOPInstanceUID}: {exc}") from exc
    if values.ndim != 2:
        raise ReportError(f"source pixels have shape {values.shape}; expected {_SINGLE_FRAME_HINT}")
    if "WindowCenter" in source and "WindowWidth" in source:
        low_high = _window_bounds(*window_of(source))
    elif "VOILUTSequence" in source:
        # A VOI LUT is indexed by (integer) modality values.
        values = apply_voi_lut(np.rint(values).astype(np.int64), source).astype(np.float64)
        low_high = tuple(float(v) for v in np.percentile(values, (0, 100)))
    elif str(source.get("Modality", "")) == "CT":
        low_high = _window_bounds(*DEFAULT_WINDOW)
    else:
        low_high = tuple(float(v) for v in np.percentile(values, AUTO_WINDOW_PERCENTILES))
    low, high = low_high
    if high <= low:
        high = low + 1.0
    gray = np.clip((values - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    if str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        gray = 255 - gray
    return gray


def _window_bounds(centre: float, width: float) -> tuple[float, float]:
    return centre - width / 2, centre + width / 2


def _pixel_aspect(source: Dataset) -> float:
    """Row spacing / column spacing (1 when the image does not say)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = source.get(keyword)
        if spacing is not None and len(spacing) == 2 and float(spacing[0]) > 0 and float(spacing[1]) > 0:
            return float(spacing[0]) / float(spacing[1])
    ratio = source.get("PixelAspectRatio")
    if ratio is not None and len(ratio) == 2 and int(ratio[0]) > 0 and int(ratio[1]) > 0:
        return int(ratio[0]) / int(ratio[1])
    return 1.0


def _qc_lines(item: FindingQC | QCResult, result: ClassificationResult, qc: QCResult) -> list[str]:
    """Score, model and reasons lines of a banner."""
    lines = [
        f"score {item.quality_score:.2f}   model {result.model_name} {result.model_version}   QC {qc.qc_version}",
    ]
    if item.reasons:
        lines.append("Reasons: " + ", ".join(reason.label for reason in item.reasons))
    elif item.verdict is Verdict.ACCEPTED:
        lines.append("No QC findings")
    return lines


def banner_lines(result: ClassificationResult, qc: QCResult, finding: FindingQC | None) -> list[str]:
    """Return the banner text of one overlay (not yet wrapped).

    Args:
        result: The model output.
        qc: The QC judgement.
        finding: The positive finding the overlay shows, or None for the overlay that says
            no finding is above its threshold.
    """
    if finding is None:
        lines = [f"AI result {DASH} QC: {qc.verdict.label}", "No finding above threshold"]
        if len(result.labels):
            top = int(np.argmax(np.nan_to_num(np.asarray(result.probabilities, dtype=float), nan=-1.0)))
            lines.append(
                f"Highest: {result.labels[top].name} {float(result.probabilities[top]):.2f} "
                f"(threshold {float(result.thresholds[top]):.2f})"
            )
        return lines + _qc_lines(qc, result, qc)
    index = finding.finding_number - 1
    threshold = float(result.thresholds[index])
    lines = [
        f"AI result {DASH} QC: {finding.verdict.label}",
        f"{finding.label.name}: probability {finding.probability:.2f} (threshold {threshold:.2f})",
        *_qc_lines(finding, result, qc),
    ]
    if qc.verdict is not finding.verdict:
        lines.append(f"Overall QC of this image: {qc.verdict.label}")
    if index in result.heatmaps:
        lines.append("Heat map: Grad-CAM, where the model looked (not an outline of the finding)")
    else:
        lines.append("No heat map available for this finding")
    return lines


def render_classification_overlay(
    source: Dataset,
    result: ClassificationResult,
    qc: QCResult,
    finding: FindingQC | None,
) -> np.ndarray:
    """Render the image, one finding's heat map and a QC banner as an RGB image.

    Args:
        source: The classified image.
        result: The model output (heat maps, thresholds, model).
        qc: The QC judgement.
        finding: The positive finding to show, or None for the "no finding" overlay.

    Returns:
        uint8 ``(height, width, 3)``: the (upscaled) image on top, the banner below; the width
        is at least :data:`MIN_WIDTH`.

    Raises:
        ReportError: The source cannot be shown or the heat map does not match its grid.
    """
    rows, cols = _check_source(source)
    gray = display_image(source)
    scale = max(1.0, MIN_WIDTH / cols)
    width = int(round(cols * scale))
    height = int(round(rows * scale * _pixel_aspect(source)))
    canvas = np.asarray(
        Image.fromarray(gray, mode="L").resize((width, height), Image.Resampling.BILINEAR).convert("RGB"),
        dtype=np.float32,
    )
    accent = VERDICT_COLOURS[qc.verdict if finding is None else finding.verdict]
    if finding is not None and (finding.finding_number - 1) in result.heatmaps:
        heat = np.asarray(result.heatmaps[finding.finding_number - 1], dtype=np.float32)
        if heat.shape != (rows, cols):
            raise ReportError(
                f"heat map of {finding.label.name} has shape {heat.shape}, the image ({rows}, {cols})"
            )
        heat = np.clip(np.nan_to_num(heat), 0.0, 1.0)
        big = np.asarray(Image.fromarray(heat, mode="F").resize((width, height), Image.Resampling.BILINEAR))
        big = np.clip(big, 0.0, 1.0)
        alpha = np.where(big >= HEATMAP_FLOOR, HEATMAP_MAX_ALPHA * big, 0.0)[..., None]
        canvas = canvas * (1.0 - alpha) + hot_colour_map(big).astype(np.float32) * alpha
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    banner = render_banner(banner_lines(result, qc, finding), width, accent)
    return np.concatenate([image, banner], axis=0)


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation reduced to one letter per direction, or None.

    A radiograph states it (e.g. ``L\\F``; compound values such as ``FL`` keep their first,
    dominant letter); a CT or MR slice has Image Orientation (Patient) instead.
    """
    value = source.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2:
        letters = tuple(str(v).strip()[:1].upper() for v in value)
        if all(letter and letter in "ARLPHF" for letter in letters):
            return letters[0], letters[1]
    if "ImageOrientationPatient" in source:
        return patient_orientation(source)
    return None


def build_heatmap_overlays(
    source: Dataset,
    result: ClassificationResult,
    qc: QCResult,
    *,
    series_number: int = 903,
) -> list[tuple[hd.sc.SCImage, np.ndarray]]:
    """Build one secondary-capture overlay per positive finding (or one saying there is none).

    Args:
        source: The classified image (patient, study and the referenced source image).
        result: The model output.
        qc: The QC judgement; it must judge every positive finding.
        series_number: Series Number of the new series; instances are numbered from 1.

    Returns:
        The SC images and their RGB pixels (for PNG copies), in finding order.

    Raises:
        ReportError: A positive finding has no QC judgement, the overlay cannot be rendered,
            or highdicom refuses the object.
    """
    findings = _findings_by_number(result, qc)
    shown: list[FindingQC | None] = []
    for index in range(len(result.labels)):
        if result.positive(index):
            if index + 1 not in findings:
                raise ReportError(f"positive finding {index + 1} ({result.labels[index].name}) has no QC judgement")
            shown.append(findings[index + 1])
    if not shown:
        shown = [None]
    orientation = _patient_orientation(source)
    series_uid = generate_uid()
    overlays = []
    for instance_number, finding in enumerate(shown, start=1):
        pixels = render_classification_overlay(source, result, qc, finding)
        sc = rgb_secondary_capture(
            source, pixels, series_uid=series_uid, series_number=series_number, instance_number=instance_number,
            orientation=orientation, series_description=f"AI findings overlay (QC: {verdict_text(qc.verdict)})",
        )
        if finding is None:
            what = "no AI finding above threshold"
        else:
            what = f"AI finding {finding.label.name} (probability {finding.probability:.2f}) with Grad-CAM heat map"
        sc.DerivationDescription = f"Image {source.SOPInstanceUID} with {what} and QC verdict"[:1024]
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = [ref]
        overlays.append((sc, pixels))
    return overlays
