"""Secondary-capture overlay: one representative slice with the mask outline and the QC verdict.

Every viewer shows a secondary capture, even those that cannot display SEG or SR. The image
is the CT slice with the largest mask area, windowed with that slice's own VOI window (the
top-level one of a classic image, the frame's Frame VOI LUT of an enhanced multi-frame one;
without one, 40/400 HU for CT and the 0.5th-99.5th percentile of the slice for MR and others),
with each segment outlined in a colour: green when accepted; when it needs review, the colour
of its first QC reason (:data:`REASON_COLOURS`: red = volume anomaly, yellow = shape
irregularity, blue = fragmentation, purple = low model confidence, ...), or orange when it has
none. A banner below states the verdict, the quality score, the model and the QC reasons in
words, and a legend line names each reason next to a swatch of its colour (colour is never the
only carrier of the meaning); when policy withholds the SEG, the banner's first line says so
("AI result - QC: Needs review - segmentation withheld"). The annotation is burned in, which
the object declares (Burned In Annotation = YES). The SC references the source image it
shows, and for a multi-frame source the frame (Referenced Frame Number).
"""

from __future__ import annotations

import math
import re
import textwrap

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid
from scipy import ndimage

from pacs_sentinel.dicom_io.series import Volume, functional_group_item
from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.identity import creation_times, equipment_attributes
from pacs_sentinel.reports.seg import VERDICT_COLOURS, verdict_text
from pacs_sentinel.reports.source import character_set, patient_study_source
from pacs_sentinel.results import QCResult, Reason, SegmentationResult, Verdict

#: Default soft-tissue window (centre, width) in HU, used when the dataset has none.
DEFAULT_WINDOW = (40.0, 400.0)
#: Overlays narrower than this are upscaled so that the banner text stays readable.
MIN_WIDTH = 512
#: Outline thickness in output pixels.
OUTLINE_PX = 2
#: Banner background and text colours.
BANNER_BACKGROUND = (16, 16, 16)
BANNER_TEXT = (235, 235, 235)
#: Outline colour of a needs-review segment, by its first QC reason (RGB). The first four are
#: the original error detector's; all differ from each other, from the verdict colours
#: (green accepted, orange needs review without reasons) and from grey (r = g = b) CT pixels.
REASON_COLOURS: dict[Reason, tuple[int, int, int]] = {
    Reason.VOLUME_ANOMALY: (230, 25, 25),  # red
    Reason.SHAPE_IRREGULARITY: (255, 225, 25),  # yellow
    Reason.FRAGMENTATION: (30, 110, 255),  # blue
    Reason.LOW_MODEL_CONFIDENCE: (150, 60, 220),  # purple
    Reason.EMPTY_MASK: (240, 50, 230),  # magenta (legend only: an empty mask has no outline)
    Reason.HIGH_UNCERTAINTY: (0, 215, 215),  # cyan
    Reason.POOR_INPUT_QUALITY: (165, 105, 40),  # brown
    Reason.BORDER_CONTACT: (255, 150, 190),  # pink
    Reason.IMPLAUSIBLE_LOCATION: (140, 140, 0),  # olive
    Reason.DISAGREEMENT: (255, 90, 60),  # coral
    Reason.LOW_PREDICTED_DICE: (0, 128, 128),  # teal
    Reason.LOW_EXPECTED_DICE: (128, 0, 64),  # maroon
    Reason.UNFAMILIAR_INPUT: (190, 160, 255),  # lavender
    Reason.UNCOVERED_STRUCTURE: (70, 70, 200),  # indigo
}
#: Title of the banner's colour legend line.
LEGEND_TITLE = "Outline colour:"
#: The banner's dash. Pillow's built-in font (Aileron) has no em dash glyph, so a hyphen.
DASH = "-"


def _macro(ds: Dataset, frame_number: int | None, keyword: str) -> Dataset | None:
    """Functional group macro ``keyword`` of frame ``frame_number`` (1-based; None: shared only)."""
    return functional_group_item(ds, None if frame_number is None else frame_number - 1, keyword)


def representative_slice(result: SegmentationResult) -> int:
    """Return the index of the slice with the largest mask area over all labels.

    An entirely empty mask gives the middle slice.
    """
    mask = np.asarray(result.mask)
    if mask.shape[0] == 1:
        areas = np.count_nonzero(mask[0].reshape(mask.shape[1], -1), axis=1)
    else:
        # Slice by slice: the union of all labels over the whole volume would be a full copy.
        areas = np.array([np.count_nonzero(mask[:, k].any(axis=0)) for k in range(mask.shape[1])])
    if not areas.any():
        return mask.shape[1] // 2
    return int(np.argmax(areas))


def window_of(ds: Dataset, frame_number: int | None = None) -> tuple[float, float]:
    """Return (centre, width) of the first VOI window of an image, or the soft-tissue default.

    A classic image keeps its window at the top level. An enhanced multi-frame image keeps it
    in the Frame VOI LUT macro of its per-frame or shared functional groups; there the window
    of ``frame_number`` (1-based; default: the shared one) is used.
    """
    return own_window(ds, frame_number) or DEFAULT_WINDOW


def own_window(ds: Dataset, frame_number: int | None = None) -> tuple[float, float] | None:
    """(centre, width) of the first usable VOI window the image states (see :func:`window_of`), or None."""
    source: Dataset = ds
    if "WindowCenter" not in ds:
        source = _macro(ds, frame_number, "FrameVOILUTSequence") or ds
    centre, width = source.get("WindowCenter"), source.get("WindowWidth")
    if centre is None or width is None:
        return None
    try:
        centre = float(centre[0] if isinstance(centre, MultiValue) else centre)
        width = float(width[0] if isinstance(width, MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(centre) and math.isfinite(width)) or width <= 1:
        return None
    return centre, width


#: Percentiles of a slice's values that bound the window of an image that states none and is
#: not CT (whose values are HU: :data:`DEFAULT_WINDOW`); the radiograph overlays use the same.
AUTO_WINDOW_PERCENTILES = (0.5, 99.5)


def slice_window(ds: Dataset, values: np.ndarray, frame_number: int | None = None) -> tuple[float, float]:
    """The window a slice is shown with: its own, else 40/400 HU for CT, else the
    :data:`AUTO_WINDOW_PERCENTILES` of its ``values`` (MR and others: arbitrary units, which a
    HU window would show all white or all black)."""
    window = own_window(ds, frame_number)
    if window is not None:
        return window
    if str(ds.get("Modality", "")).upper() == "CT":
        return DEFAULT_WINDOW
    low, high = (float(v) for v in np.percentile(values, AUTO_WINDOW_PERCENTILES))
    return (low + high) / 2, max(high - low, 2.0)


#: Added to the banner title and series description when the SEG is withheld by policy.
WITHHELD_BANNER = "segmentation withheld"


def banner_lines(result: SegmentationResult, qc: QCResult, *, withheld_seg: bool = False,
                 subject: str = "AI result") -> list[str]:
    """Return the banner text: verdict, score and model, reasons (not yet wrapped).

    With ``withheld_seg`` the title reads ``"AI result - QC: Needs review - segmentation
    withheld"`` and a line says that the segmentation is held for review, not sent to PACS.
    ``subject`` names what was judged (``"Third-party SEG"`` for a seg-qc result).
    """
    title = f"{subject} {DASH} QC: {qc.verdict.label}"
    if withheld_seg:
        title += f" {DASH} {WITHHELD_BANNER}"
    lines = [
        title,
        f"score {qc.quality_score:.2f}   model {result.model_name} {result.model_version}   QC {qc.qc_version}",
    ]
    reasons = qc.reasons
    if reasons:
        lines.append("Reasons: " + ", ".join(reason.label for reason in reasons))
    elif qc.verdict is Verdict.ACCEPTED:
        lines.append("No QC findings")
    if withheld_seg:
        lines.append("Segmentation held for review, not sent to PACS")
    return lines


def outline_colour(verdict: Verdict, reasons: list[Reason]) -> tuple[int, int, int]:
    """The outline colour of a segment: green when accepted, else its first reason's colour.

    A needs-review segment without reasons keeps the needs-review (orange) colour.
    """
    if verdict is Verdict.NEEDS_REVIEW and reasons:
        return REASON_COLOURS[reasons[0]]
    return VERDICT_COLOURS[verdict]


def legend_entries(qc: QCResult) -> list[tuple[tuple[int, int, int], str]]:
    """(colour, words) of each QC reason, in the order of :attr:`QCResult.reasons`."""
    return [(REASON_COLOURS[reason], reason.label) for reason in qc.reasons]


def _windowed(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    low = centre - width / 2
    scaled = (hu.astype(np.float32) - low) * (255.0 / width)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def render_overlay(
    volume: Volume,
    result: SegmentationResult,
    qc: QCResult,
    slice_index: int | None = None,
    *,
    withheld_seg: bool = False,
    subject: str = "AI result",
) -> np.ndarray:
    """Render one slice with mask outlines and a QC banner as an RGB image.

    Args:
        volume: The source series.
        result: The model output; one outline per label.
        qc: The QC judgement; sets outline colours and the banner text.
        slice_index: The slice to show; ``None`` picks the slice of largest mask area.
        withheld_seg: The SEG is withheld by policy; the banner says so.
        subject: What the banner says was judged (see :func:`banner_lines`).

    Returns:
        uint8 array ``(height, width, 3)``: the (upscaled) slice on top, the banner below.
        ``width`` is at least :data:`MIN_WIDTH`.

    Raises:
        ReportError: ``slice_index`` is outside the volume or the mask does not match it.
    """
    mask = np.asarray(result.mask)
    if mask.ndim != 4 or mask.shape[1:] != volume.array.shape:
        raise ReportError(f"mask shape {mask.shape} does not match volume {volume.array.shape}")
    if slice_index is None:
        slice_index = representative_slice(result)
    if not 0 <= slice_index < volume.array.shape[0]:
        raise ReportError(f"slice index {slice_index} outside 0..{volume.array.shape[0] - 1}")

    rows, cols = volume.array.shape[1:]
    row_spacing, col_spacing = volume.spacing[1], volume.spacing[2]
    scale = max(1.0, MIN_WIDTH / cols)
    width = int(round(cols * scale))
    # Square display pixels: stretch rows by the pixel aspect ratio.
    height = int(round(rows * scale * (row_spacing / col_spacing)))

    frame_number = volume.frame_numbers[slice_index] if volume.frame_numbers is not None else None
    values = volume.array[slice_index]
    gray = _windowed(values, *slice_window(volume.datasets[slice_index], values, frame_number))
    image = Image.fromarray(gray, mode="L").resize((width, height), Image.Resampling.BILINEAR).convert("RGB")
    canvas = np.array(image)

    # Channel i of the mask is qc.segments[i] (its segment number is the SEG's, not always i + 1).
    colour_by_channel = [outline_colour(s.verdict, s.reasons) for s in qc.segments]
    structure = ndimage.generate_binary_structure(2, 1)
    for index in range(mask.shape[0]):
        label_slice = mask[index, slice_index]
        if not label_slice.any():
            continue
        label_image = Image.fromarray(label_slice.astype(np.uint8) * 255, mode="L")
        big = np.array(label_image.resize((width, height), Image.Resampling.NEAREST)) > 127
        inner = ndimage.binary_erosion(big, structure=structure, iterations=OUTLINE_PX, border_value=0)
        outline = big & ~inner
        colour = colour_by_channel[index] if index < len(colour_by_channel) else VERDICT_COLOURS[qc.verdict]
        canvas[outline] = colour

    banner = render_banner(
        banner_lines(result, qc, withheld_seg=withheld_seg, subject=subject),
        width,
        VERDICT_COLOURS[qc.verdict],
        legend=legend_entries(qc),
    )
    return np.concatenate([canvas, banner], axis=0)


def render_banner(
    lines: list[str],
    width: int,
    accent: tuple[int, int, int],
    *,
    legend: list[tuple[tuple[int, int, int], str]] | None = None,
) -> np.ndarray:
    """Draw the banner lines (first one in the verdict colour), wrapped to ``width``.

    ``legend`` entries (colour, words) are drawn after the lines as
    ``"Outline colour: [swatch] words  [swatch] words ..."``, flowing onto further lines.
    """
    font_size = max(14, width // 30)
    font = ImageFont.load_default(size=font_size)
    margin = max(6, font_size // 2)
    line_height = int(font_size * 1.3)
    # Wrap on an average glyph width estimate, then check with the real text length.
    average = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz ") / 27)
    wrapped: list[tuple[str, bool]] = []
    for number, line in enumerate(lines):
        chars = max(10, int((width - 2 * margin) / average))
        pieces = textwrap.wrap(line, chars) or [""]
        while any(font.getlength(p) > width - 2 * margin for p in pieces) and chars > 10:
            chars -= 2
            pieces = textwrap.wrap(line, chars)
        wrapped.extend((piece, number == 0) for piece in pieces)
    # Legend layout: (x, row) of the title and of each swatch + words, rows after the text.
    swatch = max(8, int(font_size * 0.8))
    gap = max(4, font_size // 3)
    placed: list[tuple[int, int, tuple[int, int, int] | None, str]] = []
    if legend:
        x, row = margin, len(wrapped)
        placed.append((x, row, None, LEGEND_TITLE))
        x += int(font.getlength(LEGEND_TITLE)) + 2 * gap
        for colour, words in legend:
            needed = swatch + gap + int(font.getlength(words))
            if x > margin and x + needed > width - margin:
                x, row = margin, row + 1
            placed.append((x, row, colour, words))
            x += needed + 2 * gap
    rows = len(wrapped) + (placed[-1][1] - len(wrapped) + 1 if placed else 0)
    height = 2 * margin + line_height * rows
    banner = Image.new("RGB", (width, height), BANNER_BACKGROUND)
    draw = ImageDraw.Draw(banner)
    draw.rectangle([0, 0, width - 1, max(2, font_size // 6)], fill=accent)
    y = margin
    for text, is_title in wrapped:
        draw.text((margin, y), text, font=font, fill=accent if is_title else BANNER_TEXT)
        y += line_height
    for x, row, colour, words in placed:
        y = margin + row * line_height
        if colour is not None:
            top = y + (line_height - swatch) // 2
            draw.rectangle([x, top, x + swatch - 1, top + swatch - 1], fill=colour, outline=BANNER_TEXT)
            x += swatch + gap
        draw.text((x, y), words, font=font, fill=BANNER_TEXT)
    return np.array(banner)


def patient_orientation(ds: Dataset, frame_number: int | None = None) -> tuple[str, str]:
    """Return the Patient Orientation (0020,0020) letters of the row and column directions.

    Only the dominant axis of each direction is named (e.g. ``("L", "P")`` for axial). An
    enhanced multi-frame image keeps its orientation in the Plane Orientation macro of its
    functional groups; there the orientation of ``frame_number`` (1-based) is used.
    """
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # negative, positive direction per axis
    source: Dataset = ds
    if "ImageOrientationPatient" not in ds:
        source = _macro(ds, frame_number, "PlaneOrientationSequence") or ds
    orientation = np.asarray(source.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)

    def letter(vector: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return letters[axis][1 if vector[axis] > 0 else 0]

    return letter(orientation[:3]), letter(orientation[3:])


#: Body Part Examined defined terms of unpaired structures (PS3.16 Annex L, as dciodvfy knows
#: them): the General Series module wants no Laterality for these. Any other value — a paired
#: structure, or a term the standard does not define ("CTABDOMEN", "PHANTOM") — needs one
#: (type 2C), sent empty ("unknown") when the source does not say.
UNPAIRED_BODY_PARTS = frozenset(
    {"ABDOMEN", "ABDOMENPELVIS", "AORTA", "BACK", "BLADDER", "BRAIN", "CEREBELLUM", "CSPINE", "CTSPINE",
     "CERVIX", "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS", "CIRCLEOFWILLIS", "COCCYX", "COLON",
     "CORONARYARTERY", "DUODENUM", "ESOPHAGUS", "FACE", "GALLBLADDER", "HEAD", "HEADNECK", "HEART", "ILEUM",
     "ILIUM", "JAW", "JEJUNUM", "LARYNX", "LIVER", "LSPINE", "LSSPINE", "MAXILLA", "MEDIASTINUM", "MOUTH",
     "NECK", "NECKCHEST", "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "NOSE", "PANCREAS", "PELVIS", "PENIS",
     "PHARYNX", "PROSTATE", "RECTUM", "SSPINE", "SCALP", "SKULL", "SPINE", "SPLEEN", "STERNUM", "STOMACH",
     "TSPINE", "TLSPINE", "THYMUS", "THYROID", "TONGUE", "TRACHEA", "URETER", "URETHRA", "UTERUS", "VAGINA",
     "VULVA", "WHOLEBODY"}
)
#: A Body Part Examined value that is a valid CS: upper case, digits, space, underscore, 16 at most.
_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")


def rgb_secondary_capture(
    source: Dataset,
    pixels: np.ndarray,
    *,
    series_uid: str,
    series_number: int,
    instance_number: int,
    orientation: tuple[str, str] | None,
    series_description: str,
    frame_number: int | None = None,
) -> hd.sc.SCImage:
    """An RGB secondary capture of rendered ``pixels`` in ``source``'s patient and study.

    Workstation conversion of a burned-in overlay, Body Part Examined and laterality copied
    from the source (``frame_number`` of a multi-frame one). An unknown orientation (None) is
    sent empty (type 2C).

    Raises:
        ReportError: highdicom refuses the image.
    """
    charset = character_set(source, [series_description])
    identity = patient_study_source(source, written_in=charset)  # the patient and study as our objects write them
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=identity,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=instance_number,
            # highdicom insists on an orientation; an unknown one is sent empty below.
            patient_orientation=orientation or ("L", "F"),
            transfer_syntax_uid=hd.UID("1.2.840.10008.1.2.1"),
            specific_character_set=charset,
            series_description=series_description,
            **equipment_attributes(),
            **creation_times(),
        )
    except (ValueError, TypeError) as exc:
        raise ReportError(f"cannot build SC overlay: {exc}") from exc
    if orientation is None:
        sc.PatientOrientation = ""
    # from_ref_dataset copies only the type 2 identity; the SEG and SR carry the whole Patient
    # and General Study modules (Study Description, Patient's Age, ...), and so does the SC.
    sc.copy_patient_and_study_information(identity)
    copy_body_part(source, sc, frame_number)
    copy_lossy_compression(source, sc)
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    return sc


#: Transfer syntaxes that are lossy whatever the encoder's settings: JPEG baseline and extended,
#: JPEG-LS near-lossless (a JPEG 2000 stream may be either, so only its header's word counts).
LOSSY_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81"})


def copy_lossy_compression(source: Dataset, sc: Dataset) -> None:
    """Say that the overlay shows lossy compressed pixels when its source slice was (PS3.3
    C.7.6.1.1.5: an image derived from a lossy one is "01"): Lossy Image Compression, with its
    ratio and method when the source gives them; otherwise the optional attribute is left out."""
    meta = getattr(source, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if str(source.get("LossyImageCompression", "")).strip() != "01" and syntax not in LOSSY_TRANSFER_SYNTAXES:
        return
    sc.LossyImageCompression = "01"
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if source.get(keyword) not in (None, ""):
            setattr(sc, keyword, source[keyword].value)


def copy_body_part(source: Dataset, sc: Dataset, frame_number: int | None = None) -> None:
    """Copy Body Part Examined and Laterality from the source image into the SC.

    Body Part Examined is copied in upper case when it is a valid CS value; one that is not
    ("CHEST/ABDOMEN", longer than 16 characters) is left out (type 3) rather than make the SC
    invalid. The General Series module requires Laterality (2C) unless the body part is an
    unpaired structure (:data:`UNPAIRED_BODY_PARTS`); when the source does not say, the value
    is left empty ("unknown"). An enhanced multi-frame source states laterality per frame
    (Frame Anatomy macro, Frame Laterality); ``R`` or ``L`` there is copied. (Its ``U``,
    unpaired, cannot leave Laterality out: without Body Part Examined, which enhanced images
    code as Anatomic Region, validators require it.)
    """
    body_part = str(source.get("BodyPartExamined", "") or "").strip().upper()
    if not _CODE_STRING.fullmatch(body_part):
        body_part = ""
    if body_part:
        sc.BodyPartExamined = body_part
    laterality = str(source.get("Laterality", "") or source.get("ImageLaterality", "") or "").strip().upper()
    if not laterality:
        anatomy = _macro(source, frame_number, "FrameAnatomySequence")
        laterality = str(anatomy.get("FrameLaterality", "") or "").strip().upper() if anatomy else ""
    if laterality in ("R", "L"):
        sc.Laterality = laterality
    elif body_part not in UNPAIRED_BODY_PARTS:
        sc.Laterality = ""


def _subject_word(subject: str) -> str:
    """``"AI"`` for our own results, else the subject itself (``"Third-party SEG"``)."""
    return "AI" if subject == "AI result" else subject


def build_overlay(
    volume: Volume,
    result: SegmentationResult,
    qc: QCResult,
    *,
    series_number: int = 903,
    withheld_seg: bool = False,
    subject: str = "AI result",
) -> tuple[hd.sc.SCImage, np.ndarray]:
    """Build the secondary-capture overlay of the representative slice.

    Args:
        volume: The source series (patient, study and the referenced source image).
        result: The model output.
        qc: The QC judgement.
        series_number: Series Number of the new series.
        withheld_seg: The SEG is withheld by policy; banner and series description say so.
        subject: What was judged, in the banner's title (``"AI result"``; ``"Third-party
            SEG"`` for a seg-qc result, whose series description then says so too).

    Returns:
        The SC image and its RGB pixels (for a PNG copy).

    Raises:
        ReportError: The overlay cannot be rendered or highdicom refuses the object.
    """
    slice_index = representative_slice(result)
    pixels = render_overlay(volume, result, qc, slice_index, withheld_seg=withheld_seg, subject=subject)
    withheld = f"; {WITHHELD_BANNER}" if withheld_seg else ""
    source = volume.datasets[slice_index]
    frame_number = volume.frame_numbers[slice_index] if volume.frame_numbers is not None else None
    sc = rgb_secondary_capture(
        source, pixels, series_uid=generate_uid(), series_number=series_number, instance_number=1,
        orientation=patient_orientation(source, frame_number), frame_number=frame_number,
        series_description=f"{_subject_word(subject)} QC overlay (QC: {verdict_text(qc.verdict)}{withheld})"[:64],
    )
    shown = f"Slice {slice_index + 1}" if frame_number is None else f"Slice {slice_index + 1} (frame {frame_number})"
    sc.DerivationDescription = (
        f"{shown} of series {volume.series_uid} with {_subject_word(subject)} segmentation outline and QC verdict"
    )[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None:
        ref.ReferencedFrameNumber = frame_number  # the slice shown is one frame of a multi-frame source
    sc.SourceImageSequence = [ref]
    return sc, pixels
