"""The secondary-capture overlay: the right slice, verdict colours, a readable banner."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pacs_sentinel.dicom_io.series import load_volume
from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.identity import MANUFACTURER, is_own_object
from pacs_sentinel.reports.overlay import (
    MIN_WIDTH,
    REASON_COLOURS,
    banner_lines,
    build_overlay,
    patient_orientation,
    render_overlay,
    representative_slice,
)
from pacs_sentinel.reports.seg import VERDICT_COLOURS
from pacs_sentinel.results import Verdict

from .conftest import LIVER, make_ct_series, make_result


def read_back(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def count_colour(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(image == np.asarray(colour, dtype=np.uint8), axis=-1).sum())


def test_representative_slice_has_the_largest_mask_area(seg_result):
    areas = seg_result.mask[0].reshape(seg_result.mask.shape[1], -1).sum(axis=1)
    assert representative_slice(seg_result) == int(np.argmax(areas))


@pytest.mark.parametrize("verdict", [Verdict.ACCEPTED, Verdict.NEEDS_REVIEW])
def test_outline_colour_follows_the_verdict(volume, seg_result, qc_accepted, qc_review, verdict):
    qc = qc_accepted if verdict is Verdict.ACCEPTED else qc_review
    image = render_overlay(volume, seg_result, qc)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] >= MIN_WIDTH
    # Needs review: the colour of the segment's first QC reason (qc_review: Fragmentation).
    expected = VERDICT_COLOURS[verdict] if verdict is Verdict.ACCEPTED else REASON_COLOURS[qc.segments[0].reasons[0]]
    others = [VERDICT_COLOURS[Verdict.ACCEPTED], VERDICT_COLOURS[Verdict.NEEDS_REVIEW], *REASON_COLOURS.values()]
    rows = volume.array.shape[1] * image.shape[1] // volume.array.shape[2]
    slice_part = image[:rows]
    assert count_colour(slice_part, expected) > 100
    assert all(count_colour(slice_part, other) == 0 for other in others if other != expected)
    # A thin outline, not a filled mask.
    scale = image.shape[1] / volume.array.shape[2]
    big_mask_area = seg_result.mask[0, representative_slice(seg_result)].sum() * scale**2
    assert count_colour(slice_part, expected) < 0.3 * big_mask_area


def test_banner_states_verdict_score_model_and_reasons(seg_result, qc_review, qc_accepted):
    review = "\n".join(banner_lines(seg_result, qc_review))
    assert review.startswith("AI result - QC: Needs review")
    assert "score 0.42" in review
    assert "organ-seg 1.2.0" in review
    for words in ("Fragmentation", "Low model confidence", "Mask touches image border"):
        assert words in review
    accepted = "\n".join(banner_lines(seg_result, qc_accepted))
    assert accepted.startswith("AI result - QC: Accepted")
    assert "score 0.91" in accepted


def test_banner_is_drawn_below_the_slice(volume, seg_result, qc_review):
    image = render_overlay(volume, seg_result, qc_review, slice_index=5)
    rows = round(volume.array.shape[1] * image.shape[1] / volume.array.shape[2])
    banner = image[rows:]
    assert banner.shape[0] >= 60  # title, score line, reasons
    assert count_colour(banner, VERDICT_COLOURS[Verdict.NEEDS_REVIEW]) > 200  # accent bar and title
    assert count_colour(banner, (235, 235, 235)) > 50  # body text


@pytest.mark.parametrize("cols", [160, 512, 600])
def test_small_images_are_upscaled_large_ones_kept(cols, qc_review):
    volume = load_volume(make_ct_series(slices=3, rows=cols // 2, cols=cols))
    result = make_result(volume, [LIVER])
    result.mask[:, 1, 10:20, 10:20] = True
    image = render_overlay(volume, result, qc_review, slice_index=1)
    assert image.shape[1] == max(cols, MIN_WIDTH)


def test_slice_outside_the_volume_is_refused(volume, seg_result, qc_review):
    with pytest.raises(ReportError, match="slice index"):
        render_overlay(volume, seg_result, qc_review, slice_index=volume.array.shape[0])


def test_patient_orientation_of_axial_slices(volume):
    assert patient_orientation(volume.datasets[0]) == ("L", "P")


def test_secondary_capture(volume, seg_result, qc_review):
    sc, pixels = build_overlay(volume, seg_result, qc_review)
    ds = read_back(sc)
    source = volume.datasets[representative_slice(seg_result)]
    assert isinstance(sc, hd.sc.SCImage)
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3 and ds.BitsAllocated == 8
    np.testing.assert_array_equal(ds.pixel_array, pixels)
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "YES"
    assert ds.ConversionType == "WSD"
    assert ds.SeriesNumber == 903 and ds.InstanceNumber == 1
    assert ds.SeriesDescription == "AI QC overlay (QC: needs review)"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.Manufacturer == MANUFACTURER and is_own_object(ds)
    assert ds.ContentDate and ds.SeriesDate


@pytest.mark.parametrize("body_part", ["ABDOMEN", None])
def test_secondary_capture_passes_dciodvfy(body_part, seg_result, qc_review, dciodvfy_clean):
    datasets = make_ct_series()
    for ds in datasets:
        if body_part is None:
            del ds.BodyPartExamined
    volume = load_volume(datasets)
    sc, _ = build_overlay(volume, make_result(volume, seg_result.labels), qc_review)
    warnings = dciodvfy_clean(sc, "SCImage")
    if body_part is None:
        # Laterality (2C) is sent empty: the source does not say which body part it shows.
        assert len(warnings) == 1 and "<Laterality>" in warnings[0]
    else:
        assert warnings == []


def test_an_image_without_window_that_is_not_ct_gets_a_window_from_its_values(seg_result, qc_review):
    """MR intensities are no HU: the soft-tissue CT window would show the whole body white.
    Without a window of its own, a non-CT slice is shown between its 0.5th and 99.5th
    percentile (like the radiograph overlays); CT keeps 40/400 HU."""
    from .conftest import sphere_mask

    datasets = make_ct_series(seed=6)
    for ds in datasets:
        del ds.WindowCenter, ds.WindowWidth, ds.RescaleType
        ds.Modality = "MR"
        ds.RescaleSlope = 0.6  # body about 640, the organ about 675: arbitrary MR units
        ds.RescaleIntercept = 0
    volume = load_volume(datasets)
    image = render_overlay(volume, seg_result, qc_review)[: volume.array.shape[1] * 8]
    organ = np.kron(sphere_mask(*volume.array.shape)[representative_slice(seg_result)], np.ones((8, 8), dtype=bool))
    rows, cols = np.mgrid[0:organ.shape[0], 0:organ.shape[1]]
    body = ((rows / 8 - 32) / 28.8) ** 2 + ((cols / 8 - 32) / 28.8) ** 2 <= 0.5
    inner = ndimage.binary_erosion(organ, iterations=6)  # the organ, its outline aside
    gray = image[..., 0].astype(float)
    assert gray[body & ~organ].mean() < 250, "the body is not saturated"
    assert gray[inner].mean() - gray[body & ~organ].mean() > 8, "the organ stands out from the body"


# (Body Part Examined of the source, what the SC carries, its Laterality: absent (None) or empty)
BODY_PARTS = {
    "unpaired": ("ABDOMEN", "ABDOMEN", None),
    "lower-case": ("head", "HEAD", None),
    "paired": ("KIDNEY", "KIDNEY", ""),
    # terms the standard does not define: their side is unknown, so Laterality is sent empty
    "vendor-term": ("CTABDOMEN", "CTABDOMEN", ""),
    "phantom": ("PHANTOM", "PHANTOM", ""),
    # values that are no CS at all are not copied (Body Part Examined is type 3)
    "slash": ("CHEST/ABDOMEN", None, ""),
    "too-long": ("ABDOMEN PELVIS AREA", None, ""),
}


@pytest.mark.parametrize("case", sorted(BODY_PARTS))
def test_body_part_and_laterality_of_the_overlay(case, seg_result, qc_review, dciodvfy_clean):
    """Whatever Body Part Examined the source gives, the SC is valid: a value that breaks the
    CS rules is not copied, and Laterality is left out only for an unpaired structure."""
    source_value, copied, laterality = BODY_PARTS[case]
    datasets = make_ct_series(seed=7)
    for ds in datasets:
        ds.BodyPartExamined = source_value
    sc, _ = build_overlay(load_volume(datasets), seg_result, qc_review)
    assert sc.get("BodyPartExamined") == copied
    assert (sc.Laterality if "Laterality" in sc else None) == laterality
    dciodvfy_clean(sc, "SCImage")


@pytest.mark.parametrize(("source_says", "syntax", "expected"), [
    ({"LossyImageCompression": "01", "LossyImageCompressionRatio": "5.1948",
      "LossyImageCompressionMethod": "ISO_10918_1"}, "1.2.840.10008.1.2.1", ("01", "5.1948", "ISO_10918_1")),
    ({}, "1.2.840.10008.1.2.4.51", ("01", None, None)),  # JPEG extended: lossy by its syntax alone
    ({"LossyImageCompression": "00"}, "1.2.840.10008.1.2.4.70", (None, None, None)),  # lossless JPEG
    ({}, "1.2.840.10008.1.2.1", (None, None, None)),  # the attribute is optional (type 3): left out
])
def test_an_overlay_of_a_lossy_compressed_slice_says_so(source_says, syntax, expected, seg_result, qc_review,
                                                        dciodvfy_clean):
    """PS3.3 C.7.6.1.1.5: an image derived from lossy compressed pixels is Lossy Image Compression "01"."""
    volume = load_volume(make_ct_series())
    for ds in volume.datasets:  # as if stored so (the pixels are decoded already)
        ds.update(_dataset(source_says))
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    sc, _ = build_overlay(volume, make_result(volume, seg_result.labels), qc_review)
    ds = read_back(sc)
    assert (ds.get("LossyImageCompression"), ds.get("LossyImageCompressionRatio"),
            ds.get("LossyImageCompressionMethod")) == expected
    assert dciodvfy_clean(sc, "SCImage") == []


def _dataset(values: dict) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds
