"""The classification result objects: findings SR (TID 1500 with QC) and heat-map overlays.

Sources are built here: a DX "For Presentation" chest-like radiograph made with pydicom, and
pydicom's ``CT_small.dcm`` as a single CT slice. Nothing depends on the product's phantoms.
"""

from __future__ import annotations

import datetime
import io
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.classification import (
    ABSENT,
    PRESENCE,
    PRESENT,
    banner_lines,
    build_classification_report,
    build_heatmap_overlays,
    display_image,
    hot_colour_map,
    render_classification_overlay,
)
from pacs_sentinel.reports.identity import MANUFACTURER, MODEL_NAME, is_own_object
from pacs_sentinel.reports.overlay import MIN_WIDTH
from pacs_sentinel.reports.resultset import build_classification_result_set
from pacs_sentinel.reports.seg import VERDICT_COLOURS
from pacs_sentinel.reports.validate import check_before_sending
from pacs_sentinel.results import (
    FINDING_PROBABILITY,
    QC_FINDING,
    QC_SCHEME,
    QC_SCHEME_UID,
    QC_VERDICT,
    QC_VERSION,
    QUALITY_SCORE,
    ClassificationResult,
    Code,
    FindingLabel,
    FindingQC,
    QCResult,
    Reason,
    Verdict,
)

from .test_sr import ACCEPTED_SR_WARNINGS

DX_ROWS = DX_COLS = 128

NODULE = FindingLabel("Nodule", Code("27925004", "SCT", "Nodule"), "cxr-cls Nodule")
EFFUSION = FindingLabel("Pleural effusion", Code("60046008", "SCT", "Pleural effusion"), "cxr-cls Effusion")
CARDIOMEGALY = FindingLabel("Cardiomegaly", Code("8186001", "SCT", "Cardiomegaly"), "cxr-cls Cardiomegaly")
LABELS = [NODULE, EFFUSION, CARDIOMEGALY]

REVIEW_REASONS = [Reason.LOW_MODEL_CONFIDENCE, Reason.HIGH_UNCERTAINTY]


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_dx(rows: int = DX_ROWS, cols: int = DX_COLS, *, seed: int = 0) -> Dataset:
    """A PA chest-like DX image (For Presentation), MONOCHROME2, 12 bits, with a window."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    body = ((yy - rows / 2) / (rows * 0.48)) ** 2 + ((xx - cols / 2) / (cols * 0.45)) ** 2 <= 1
    lung_x = (np.abs(xx - cols / 2) - cols * 0.2) / (cols * 0.12)
    lungs = ((yy - rows * 0.45) / (rows * 0.3)) ** 2 + lung_x**2 <= 1
    image = np.where(body, 2200.0, 300.0) - np.where(lungs, 1200.0, 0.0) + rng.normal(0, 20, (rows, cols))
    stored = np.clip(image, 0, 4095).astype(np.uint16)
    now = datetime.datetime(2024, 5, 17, 9, 15, 0)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "ACC-DX-1"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Chest PA (synthetic)"
    ds.SeriesDescription = "Chest PA"
    ds.PatientName = "Phantom^Chest"
    ds.PatientID = "PS-CXR-001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.BodyPartExamined = "CHEST"
    ds.ImageLaterality = "U"
    ds.ViewPosition = "PA"
    ds.ViewCodeSequence = [code_item("399348003", "SCT", "postero-anterior")]
    ds.AnatomicRegionSequence = [code_item("51185008", "SCT", "Chest")]
    ds.PositionerType = ""
    ds.ImagerPixelSpacing = [0.8, 0.8]
    ds.DetectorType = "SCINTILLATOR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.WindowCenter = 1500
    ds.WindowWidth = 2800
    ds.AcquisitionContextSequence = []
    ds.PixelData = stored.tobytes()
    return ds


def ct_slice() -> Dataset:
    """pydicom's CT_small.dcm: one 128 x 128 CT slice without a VOI window."""
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def gaussian_heatmap(rows: int, cols: int, centre: tuple[float, float]) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * (rows / 10) ** 2)).astype(np.float32)


def make_result(source: Dataset, probabilities: list[float]) -> ClassificationResult:
    """Three-label result with a Grad-CAM-like blob for each positive finding."""
    rows, cols = int(source.Rows), int(source.Columns)
    p = np.asarray(probabilities, dtype=np.float32)
    thresholds = np.full(len(LABELS), 0.5, dtype=np.float32)
    result = ClassificationResult(
        probabilities=p,
        logits=np.log(p / (1 - p)),
        labels=list(LABELS),
        thresholds=thresholds,
        model_name="cxr-cls",
        model_version="0.4.1",
    )
    centres = [(rows * 0.35, cols * 0.3), (rows * 0.75, cols * 0.75), (rows * 0.6, cols * 0.5)]
    result.heatmaps = {i: gaussian_heatmap(rows, cols, centres[i]) for i in range(len(LABELS)) if result.positive(i)}
    return result


def make_qc(result: ClassificationResult, review: set[int]) -> QCResult:
    """QC of ``result``: findings whose index is in ``review`` need review (two reasons)."""
    findings = []
    for index, label in enumerate(result.labels):
        needs_review = index in review
        findings.append(
            FindingQC(
                finding_number=index + 1,
                label=label,
                probability=float(result.probabilities[index]),
                positive=result.positive(index),
                quality_score=0.31 if needs_review else 0.88,
                verdict=Verdict.NEEDS_REVIEW if needs_review else Verdict.ACCEPTED,
                reasons=list(REVIEW_REASONS) if needs_review else [],
            )
        )
    return QCResult(qc_version="1.0.0-cls", segments=[], findings=findings)


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_sr(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(to_bytes(ds))))


def read_sc(ds: Dataset) -> hd.Image:
    return hd.Image.from_dataset(pydicom.dcmread(io.BytesIO(to_bytes(ds))))


def items(group, concept) -> list[Dataset]:
    """Direct children of a measurement group whose concept name is ``concept``."""
    value = (concept.value, getattr(concept, "scheme", None) or concept.scheme_designator)
    return [
        item
        for item in group[0].ContentSequence
        if (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptNameCodeSequence[0].CodingSchemeDesignator)
        == value
    ]


SOURCES = {"dx": make_dx, "ct": ct_slice}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def case(request):
    """(source, result, qc): Nodule positive and needs review, Effusion negative, Cardiomegaly positive."""
    source = SOURCES[request.param]()
    result = make_result(source, [0.83, 0.12, 0.64])
    return source, result, make_qc(result, review={0})


def test_the_dx_source_is_a_valid_dx_image(dciodvfy_clean):
    assert dciodvfy_clean(make_dx(), "DXImageForPresentation") == []


# --- the SR ------------------------------------------------------------------------------


def test_sr_carries_the_qc_contract_per_finding(case):
    source, result, qc = case
    sr = read_sr(build_classification_report(source, result, qc))
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == len(result.labels) == len(qc.findings)
    for group, finding in zip(groups, qc.findings, strict=True):
        label = result.labels[finding.finding_number - 1]
        assert group.finding_type.value == label.code.value
        assert group.tracking_identifier == label.tracking_id

        (probability,) = items(group, FINDING_PROBABILITY)
        assert probability.ValueType == "NUM"
        value = float(probability.MeasuredValueSequence[0].NumericValue)
        assert round(value, 4) == round(float(result.probabilities[finding.finding_number - 1]), 4)
        unit = probability.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning) == ("1", "UCUM", "no units")

        (score,) = items(group, QUALITY_SCORE)
        score_value = float(score.MeasuredValueSequence[0].NumericValue)
        assert 0.0 <= score_value <= 1.0
        assert score_value == pytest.approx(finding.quality_score)

        (verdict,) = items(group, QC_VERDICT)
        assert verdict.ConceptCodeSequence[0].CodeValue == finding.verdict.value.value
        assert verdict.ConceptCodeSequence[0].CodingSchemeDesignator == QC_SCHEME

        reasons = items(group, QC_FINDING)
        assert [r.ConceptCodeSequence[0].CodeValue for r in reasons] == [r.value.value for r in finding.reasons]

        (presence,) = items(group, PRESENCE)
        expected = PRESENT if finding.positive else ABSENT
        assert presence.ConceptCodeSequence[0].CodeValue == expected.value

        (version,) = items(group, QC_VERSION)
        assert version.TextValue == qc.qc_version

        reference = group.source_images[0]
        assert reference.referenced_sop_instance_uid == source.SOPInstanceUID
        assert reference.referenced_sop_class_uid == source.SOPClassUID
    assert [len(items(g, QC_FINDING)) for g in groups] == [2, 0, 0]


def test_highdicom_reads_measurements_and_evaluations(case):
    source, result, qc = case
    sr = read_sr(build_classification_report(source, result, qc))
    first = sr.content.get_image_measurement_groups()[0]
    measured = {m.name.value: m.value for m in first.get_measurements()}
    assert measured[FINDING_PROBABILITY.value] == pytest.approx(0.83, abs=1e-4)
    assert measured[QUALITY_SCORE.value] == pytest.approx(0.31)
    evaluations = [(e.name.value, e.value.value) for e in first.get_qualitative_evaluations()]
    assert (QC_VERDICT.value, Verdict.NEEDS_REVIEW.value.value) in evaluations
    assert (PRESENCE.value, PRESENT.value) in evaluations


def test_sr_header_and_evidence(case):
    source, result, qc = case
    sr = read_sr(build_classification_report(source, result, qc))
    assert sr.SeriesDescription == "AI findings report (QC: needs review)"
    assert sr.SeriesNumber == 902 and sr.InstanceNumber == 1
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID and sr.PatientName == source.PatientName
    assert sr.Manufacturer == MANUFACTURER and sr.ManufacturerModelName == MODEL_NAME
    assert is_own_object(sr)
    assert "model cxr-cls 0.4.1; QC 1.0.0-cls" in list(sr.SoftwareVersions)
    schemes = {item.CodingSchemeDesignator: item for item in sr.CodingSchemeIdentificationSequence}
    assert schemes[QC_SCHEME].CodingSchemeUID == QC_SCHEME_UID
    evidence = [
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    ]
    assert evidence == [source.SOPInstanceUID]
    context = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}
    assert context["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    assert context["Device Observer Model Name"].TextValue == "cxr-cls"


def test_accepted_report_says_accepted():
    source = make_dx()
    result = make_result(source, [0.05, 0.9, 0.1])
    sr = read_sr(build_classification_report(source, result, make_qc(result, review=set())))
    assert sr.SeriesDescription == "AI findings report (QC: accepted)"
    for group in sr.content.get_image_measurement_groups():
        (verdict,) = items(group, QC_VERDICT)
        assert verdict.ConceptCodeSequence[0].CodeValue == Verdict.ACCEPTED.value.value
        assert items(group, QC_FINDING) == []


def test_tracking_uids_are_stable_per_image_and_finding():
    source = make_dx()
    result = make_result(source, [0.83, 0.12, 0.64])
    qc = make_qc(result, review=set())
    first, second = (read_sr(build_classification_report(source, result, qc)) for _ in range(2))
    uids = [[g.tracking_uid for g in sr.content.get_image_measurement_groups()] for sr in (first, second)]
    assert uids[0] == uids[1] and len(set(uids[0])) == 3


def test_bad_qc_is_refused():
    source = make_dx()
    result = make_result(source, [0.83, 0.12, 0.64])
    qc = make_qc(result, review=set())
    qc.findings[0].quality_score = 1.5
    with pytest.raises(ReportError, match="outside"):
        build_classification_report(source, result, qc)
    qc = make_qc(result, review=set())
    qc.findings[0].finding_number = 9
    with pytest.raises(ReportError, match="finding 9"):
        build_classification_report(source, result, qc)


def test_multiframe_source_is_refused():
    source = make_dx()
    source.NumberOfFrames = 2
    result = make_result(make_dx(), [0.83, 0.12, 0.64])
    with pytest.raises(ReportError, match="frame"):
        build_classification_report(source, result, make_qc(result, review=set()))


#: CT_small.dcm records Patient's Weight 0; the SR copies the source's patient data unchanged.
INHERITED_CT_WARNINGS = {"Warning - Value is zero for value 1 of attribute <Patient's Weight>"}


def test_sr_passes_dciodvfy(case, dciodvfy_clean):
    source, result, qc = case
    warnings = dciodvfy_clean(build_classification_report(source, result, qc), "Comprehensive3DSR")
    assert set(warnings) <= ACCEPTED_SR_WARNINGS | (INHERITED_CT_WARNINGS if source.Modality == "CT" else set())


def test_dsrdump_reads_the_report(case, require_tool, tmp_path):
    dsrdump = require_tool("dsrdump")
    source, result, qc = case
    path = tmp_path / "SR.dcm"
    build_classification_report(source, result, qc).save_as(path, enforce_file_format=True)
    completed = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "error" not in completed.stderr.lower(), completed.stderr
    assert '(QC011,99PSQC,"Needs review")' in completed.stdout
    assert completed.stdout.count('"QC finding"') == 2
    assert completed.stdout.count('"Finding probability"') == 3
    assert '(27925004,SCT,"Nodule")' in completed.stdout


# --- the overlays ------------------------------------------------------------------------


def test_hot_colour_map_runs_black_to_white():
    colours = hot_colour_map(np.array([0.0, 1 / 3, 2 / 3, 1.0]))
    assert colours.tolist() == [[0, 0, 0], [255, 0, 0], [255, 255, 0], [255, 255, 255]]
    brightness = hot_colour_map(np.linspace(0, 1, 50)).astype(int).sum(axis=1)
    assert np.all(np.diff(brightness) >= 0)


def test_display_image_uses_the_window_or_a_fallback():
    dx = make_dx()
    gray = display_image(dx)
    assert gray.dtype == np.uint8 and gray.shape == (DX_ROWS, DX_COLS)
    assert gray[DX_ROWS // 2, 5] < gray[DX_ROWS // 2, DX_COLS // 2]  # air darker than body
    ct = display_image(ct_slice())  # no window: CT soft-tissue default
    assert ct.min() == 0 and ct.max() == 255
    del dx.WindowCenter, dx.WindowWidth
    assert display_image(dx).max() == 255  # percentile window
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.LUTData = [min(4095, 2 * v) for v in range(4096)]
    dx.VOILUTSequence = [lut]
    with_lut = display_image(dx)  # VOI LUT applied, then its output range shown
    assert with_lut[DX_ROWS // 2, 5] < with_lut[DX_ROWS // 2, DX_COLS // 2]
    del dx.VOILUTSequence
    dx.PhotometricInterpretation = "MONOCHROME1"
    assert display_image(dx)[DX_ROWS // 2, 5] > 200  # inverted: air white


def test_one_overlay_per_positive_finding(case):
    source, result, qc = case
    overlays = build_heatmap_overlays(source, result, qc)
    positives = [i for i in range(len(result.labels)) if result.positive(i)]
    assert len(overlays) == len(positives) == 2
    assert len({sc.SeriesInstanceUID for sc, _ in overlays}) == 1
    assert [int(sc.InstanceNumber) for sc, _ in overlays] == [1, 2]
    for (sc, pixels), index in zip(overlays, positives, strict=True):
        image = read_sc(sc)
        assert isinstance(image, hd.Image)
        ds = pydicom.dcmread(io.BytesIO(to_bytes(sc)))
        np.testing.assert_array_equal(ds.pixel_array, pixels)
        assert pixels.shape[1] >= MIN_WIDTH
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert ds.PhotometricInterpretation == "RGB" and ds.BurnedInAnnotation == "YES"
        assert ds.SeriesNumber == 903
        assert ds.SeriesDescription == "AI findings overlay (QC: needs review)"
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert result.labels[index].name in ds.DerivationDescription
        assert is_own_object(ds)


def test_banner_of_a_positive_finding(case):
    _, result, qc = case
    review = "\n".join(banner_lines(result, qc, qc.findings[0]))
    assert review.startswith("AI result - QC: Needs review")
    assert "Nodule: probability 0.83" in review
    assert "score 0.31" in review and "cxr-cls 0.4.1" in review
    assert "Low model confidence" in review and "High uncertainty" in review
    accepted = "\n".join(banner_lines(result, qc, qc.findings[2]))
    assert accepted.startswith("AI result - QC: Accepted")
    assert "Overall QC of this image: Needs review" in accepted
    assert "Grad-CAM" in accepted


def test_heatmap_is_drawn_where_the_model_looked():
    source = make_dx()
    result = make_result(source, [0.83, 0.12, 0.1])
    qc = make_qc(result, review=set())
    with_heat = render_classification_overlay(source, result, qc, qc.findings[0])
    result.heatmaps = {}
    without = render_classification_overlay(source, result, qc, qc.findings[0])
    scale = with_heat.shape[1] / DX_COLS
    centre = (int(DX_ROWS * 0.35 * scale), int(DX_COLS * 0.3 * scale))
    far = (int(DX_ROWS * 0.9 * scale), int(DX_COLS * 0.9 * scale))
    red_gain = with_heat[centre].astype(int)[0] - without[centre].astype(int)[0]
    assert red_gain > 30 or with_heat[centre][0] == 255
    np.testing.assert_array_equal(with_heat[far], without[far])  # below the floor: untouched


def test_heatmap_on_a_wrong_grid_is_refused():
    source = make_dx()
    result = make_result(source, [0.83, 0.12, 0.1])
    result.heatmaps[0] = np.zeros((10, 10), dtype=np.float32)
    with pytest.raises(ReportError, match="heat map"):
        build_heatmap_overlays(source, result, make_qc(result, review=set()))


def test_no_positive_finding_gives_one_overlay_that_says_so():
    source = make_dx()
    result = make_result(source, [0.2, 0.1, 0.3])
    qc = make_qc(result, review={1})
    overlays = build_heatmap_overlays(source, result, qc)
    assert len(overlays) == 1
    lines = banner_lines(result, qc, None)
    assert lines[0] == "AI result - QC: Needs review"
    assert "No finding above threshold" in lines
    assert any("Cardiomegaly 0.30" in line for line in lines)
    sc, pixels = overlays[0]
    assert "no AI finding above threshold" in sc.DerivationDescription
    banner = pixels[int(round(DX_ROWS * pixels.shape[1] / DX_COLS)):]
    colour = np.asarray(VERDICT_COLOURS[Verdict.NEEDS_REVIEW], dtype=np.uint8)
    assert int(np.all(banner == colour, axis=-1).sum()) > 200


@pytest.mark.parametrize("positives", [[0.83, 0.12, 0.64], [0.2, 0.1, 0.3]], ids=["findings", "none"])
def test_overlays_pass_dciodvfy(case, positives, dciodvfy_clean):
    source, _, _ = case
    result = make_result(source, positives)
    qc = make_qc(result, review={0})
    for sc, _ in build_heatmap_overlays(source, result, qc):
        warnings = dciodvfy_clean(sc, "SCImage")
        if source.Modality == "CT":
            # CT_small.dcm says nothing of the body part: Laterality (2C) is sent empty; its
            # Patient's Weight of 0 is copied with the Patient Study module, as it is.
            own = [w for w in warnings if "<Patient's Weight>" not in w]
            assert len(own) == 1 and "<Laterality>" in own[0]
        else:
            assert warnings == []


# --- the result set ----------------------------------------------------------------------


def test_classification_result_set(case, tmp_path, dciodvfy_clean):
    source, result, qc = case
    result_set = build_classification_result_set(source, result, qc, series_number_base=700)
    assert result_set.segmentation is None
    datasets = result_set.datasets()
    assert [ds.Modality for ds in datasets] == ["SR", "OT", "OT"]
    assert [int(ds.SeriesNumber) for ds in datasets] == [702, 703, 703]
    assert {ds.StudyInstanceUID for ds in datasets} == {source.StudyInstanceUID}
    assert {ds.PatientID for ds in datasets} == {source.PatientID}
    assert all(is_own_object(ds) for ds in datasets)

    paths = result_set.write(tmp_path / "out")
    assert [p.name for p in paths] == ["SR.dcm", "SC_1.dcm", "SC_2.dcm", "overlay_1.png", "overlay_2.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    assert isinstance(hd.sr.srread(paths[0]), hd.sr.Comprehensive3DSR)
    for sc_path, png_path, pixels in zip(paths[1:3], paths[3:], result_set.overlay_images, strict=True):
        np.testing.assert_array_equal(pydicom.dcmread(sc_path).pixel_array, pixels)
        np.testing.assert_array_equal(np.asarray(Image.open(png_path)), pixels)
    for ds, iod in zip(datasets, ["Comprehensive3DSR", "SCImage", "SCImage"], strict=True):
        dciodvfy_clean(ds, iod)


def test_classification_result_set_default_series_numbers():
    source = make_dx()
    result = make_result(source, [0.2, 0.1, 0.3])
    result_set = build_classification_result_set(source, result, make_qc(result, review=set()))
    assert [int(ds.SeriesNumber) for ds in result_set.datasets()] == [902, 903]


# --- radiographs that state no pixel spacing or no patient orientation --------------------


def make_cr(*, seed: int = 0) -> Dataset:
    """A CR chest image as many CR plates send it: Patient Orientation empty (unknown, type
    2C) and no Pixel Spacing nor Imager Pixel Spacing (both type 3 in the CR Image module)."""
    ds = make_dx(seed=seed)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.Modality = "CR"
    ds.PatientOrientation = ""
    for keyword in ("PresentationIntentType", "DetectorType", "ImagerPixelSpacing", "PositionerType",
                    "AcquisitionContextSequence", "PixelIntensityRelationship", "PixelIntensityRelationshipSign",
                    "PresentationLUTShape", "ViewCodeSequence", "AnatomicRegionSequence", "ImageLaterality"):
        delattr(ds, keyword)
    return ds


def dx_without_spacing() -> Dataset:
    ds = make_dx()
    del ds.ImagerPixelSpacing  # type 1 for DX, yet a sender may leave it out
    return ds


def cr_without_orientation() -> Dataset:
    ds = make_cr()
    del ds.PatientOrientation  # type 2C: only an empty value is valid, a sender may leave it out
    return ds


#: Radiographs that leave out what highdicom's TID 1603 descriptors read; name -> (source,
#: whether it states Patient Orientation).
UNDESCRIBED = {
    "dx-no-spacing": (dx_without_spacing, True),
    "cr-empty-orientation": (make_cr, False),
    "cr-no-orientation": (cr_without_orientation, False),
}
#: TID 1603 descriptors of a projection radiograph (concept meaning -> DCM code).
ORIENTATION_DESCRIPTORS = {"Patient Orientation Row": "111044", "Patient Orientation Column": "111043"}
SPACING_DESCRIPTORS = {"Horizontal Pixel Spacing": "111026", "Vertical Pixel Spacing": "111066"}


def library_entry(sr: Dataset) -> dict[str, Dataset]:
    """The descriptors of the one image in the SR's Image Library, by concept meaning."""
    (library,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"]
    (group,) = library.ContentSequence
    (image,) = [item for item in group.ContentSequence if item.ValueType == "IMAGE"]
    return {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in image.ContentSequence}


def test_the_cr_source_is_a_valid_cr_image(dciodvfy_clean):
    assert dciodvfy_clean(make_cr(), "CRImage") == []


@pytest.mark.parametrize("name", sorted(UNDESCRIBED))
def test_radiograph_without_spacing_or_orientation_gets_valid_results(name, tmp_path, dciodvfy_clean):
    # Was "internal error: AttributeError": highdicom's image library entry reads Patient
    # Orientation and Imager Pixel Spacing of every CR/DX image unconditionally.
    make_source, states_orientation = UNDESCRIBED[name]
    source = make_source()
    result = make_result(source, [0.83, 0.12, 0.64])
    result_set = build_classification_result_set(source, result, make_qc(result, review={0}))
    sr, *overlays = result_set.datasets()
    assert [ds.Modality for ds in (sr, *overlays)] == ["SR", "OT", "OT"]
    check_before_sending(result_set.write(tmp_path / "out")[:3], "dciodvfy")
    assert set(dciodvfy_clean(sr, "Comprehensive3DSR")) <= ACCEPTED_SR_WARNINGS

    # The library entry states what the image states, and invents nothing.
    entry = library_entry(read_sr(sr))
    assert entry["Modality"].ConceptCodeSequence[0].CodeValue == source.Modality
    assert int(entry["Pixel Data Rows"].MeasuredValueSequence[0].NumericValue) == DX_ROWS
    assert not set(SPACING_DESCRIPTORS) & set(entry)
    if states_orientation:
        assert [entry[k].TextValue for k in ORIENTATION_DESCRIPTORS] == ["L", "F"]
    else:
        assert not set(ORIENTATION_DESCRIPTORS) & set(entry)

    for sc in overlays:
        assert dciodvfy_clean(sc, "SCImage") == []
        assert list(sc.PatientOrientation) == (["L", "F"] if states_orientation else [])
        assert not {"PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"} & set(sc.dir())


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_image_library_entry_of_a_described_image_is_highdicoms(name):
    # An image that states all its descriptors gets exactly the entry highdicom writes.
    source = SOURCES[name]()
    entry = library_entry(read_sr(build_classification_report(source, *case_of(source))))
    expected = hd.sr.ImageLibrary([source])[0].ContentSequence[0].ContentSequence[-1].ContentSequence
    assert [item.to_json_dict() for item in entry.values()] == [item.to_json_dict() for item in expected]
    # modality, (CT: Frame of Reference UID), rows, columns + the 4 TID 1603 / 12 TID 1604 rows
    assert len(entry) == (7 if name == "dx" else 17)


def test_image_library_entry_of_a_radiograph_states_its_orientation_and_detector_spacing():
    source = make_dx()
    entry = library_entry(read_sr(build_classification_report(source, *case_of(source))))
    assert [entry[k].TextValue for k in ORIENTATION_DESCRIPTORS] == ["L", "F"]
    assert [float(entry[k].MeasuredValueSequence[0].NumericValue) for k in SPACING_DESCRIPTORS] == [0.8, 0.8]
    # ImagerPixelSpacing, not PixelSpacing: TID 1603 spacing is measured at the detector.
    source.ImagerPixelSpacing = [0.2, 0.3]
    source.PixelSpacing = [0.18, 0.27]
    entry = library_entry(read_sr(build_classification_report(source, *case_of(source))))
    assert [float(entry[k].MeasuredValueSequence[0].NumericValue) for k in SPACING_DESCRIPTORS] == [0.3, 0.2]


def case_of(source: Dataset) -> tuple[ClassificationResult, QCResult]:
    result = make_result(source, [0.83, 0.12, 0.64])
    return result, make_qc(result, review={0})


@pytest.mark.parametrize("thickness", ["empty", "absent"])
def test_ct_slice_without_slice_thickness_gets_a_valid_report(thickness, dciodvfy_clean):
    # Slice Thickness is type 2 (empty when unknown); highdicom's TID 1604 part read it
    # unconditionally (AttributeError, or TypeError for the empty value).
    source = ct_slice()
    if thickness == "empty":
        source.SliceThickness = None
    else:
        del source.SliceThickness
    sr = build_classification_report(source, *case_of(source))
    assert set(dciodvfy_clean(sr, "Comprehensive3DSR")) <= ACCEPTED_SR_WARNINGS | INHERITED_CT_WARNINGS
    entry = library_entry(read_sr(sr))
    assert "Slice Thickness" not in entry
    assert [float(entry[k].MeasuredValueSequence[0].NumericValue) for k in SPACING_DESCRIPTORS] == \
        [float(source.PixelSpacing[1]), float(source.PixelSpacing[0])]
    assert float(entry["Image Position (Patient) Z"].MeasuredValueSequence[0].NumericValue) == \
        float(source.ImagePositionPatient[2])


def test_a_descriptor_that_is_no_number_fails_the_report_with_its_name():
    source = make_dx()
    result, qc = case_of(source)
    # as a sender's file carries it, undecoded (pydicom refuses to build such a value)
    tag = Tag(tag_for_keyword("ImagerPixelSpacing"))
    source[tag] = RawDataElement(tag, "DS", 4, b"x\\y ", 0, False, True)
    with pytest.raises(ReportError, match="ImagerPixelSpacing"):
        build_classification_report(source, result, qc)
