"""Fixtures for the report writers: a small synthetic CT series, a mask and QC results.

The series is built here with pydicom (not with the product's phantom generator) so that the
report tests depend on nothing but the contracts in :mod:`pacs_sentinel.results` and
:mod:`pacs_sentinel.dicom_io.series`.
"""

from __future__ import annotations

import datetime
import io
import os
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pacs_sentinel.dicom_io.series import Volume, load_volume
from pacs_sentinel.results import (
    Code,
    QCResult,
    Reason,
    SegmentationResult,
    SegmentLabel,
    SegmentQC,
    Verdict,
)

SLICES, ROWS, COLS = 12, 64, 64
PIXEL_SPACING = (0.8, 0.8)
SLICE_THICKNESS = 2.5
#: Slices 0-1 and 10-11 have an empty mask.
EMPTY_SLICES = (0, 1, 10, 11)

LIVER = SegmentLabel(
    name="Liver",
    property_category=Code("123037004", "SCT", "Anatomical Structure"),
    property_type=Code("10200004", "SCT", "Liver"),
    tracking_id="organ-seg Liver",
)
SPLEEN = SegmentLabel(
    name="Spleen",
    property_category=Code("123037004", "SCT", "Anatomical Structure"),
    property_type=Code("78961009", "SCT", "Spleen"),
    tracking_id="organ-seg Spleen",
)

NEEDS_REVIEW_REASONS = [Reason.FRAGMENTATION, Reason.LOW_MODEL_CONFIDENCE, Reason.BORDER_CONTACT]


def make_ct_series(
    slices: int = SLICES, rows: int = ROWS, cols: int = COLS, *, seed: int = 0
) -> list[Dataset]:
    """Return an axial CT series of ``slices`` single-frame instances, shuffled order.

    A bright sphere (organ-like, ~ +60 HU) sits in a soft-tissue ellipse inside air.
    """
    rng = np.random.default_rng(seed)
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    now = datetime.datetime(2024, 5, 17, 10, 30, 0)
    zz, yy, xx = np.mgrid[0:slices, 0:rows, 0:cols].astype(np.float32)
    body = ((yy - rows / 2) / (rows * 0.45)) ** 2 + ((xx - cols / 2) / (cols * 0.45)) ** 2 <= 1
    organ = sphere_mask(slices, rows, cols)
    hu = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0.0)
    hu += rng.normal(0, 5, hu.shape)
    stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)

    datasets = []
    for i in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.Manufacturer = "Synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT abdomen (synthetic)"
        ds.SeriesDescription = "Axial 2.5 mm"
        ds.PatientName = "Phantom^Reports"
        ds.PatientID = "PS-REPORTS-001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = SLICE_THICKNESS
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [
            -cols * PIXEL_SPACING[1] / 2,
            -rows * PIXEL_SPACING[0] / 2,
            -100.0 + i * SLICE_THICKNESS,
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = stored[i].tobytes()
        datasets.append(ds)
    order = rng.permutation(slices)
    return [datasets[i] for i in order]


def sphere_mask(slices: int = SLICES, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """A sphere-ish blob centred in the volume, empty on the first and last two slices.

    For the default 12 slices those are :data:`EMPTY_SLICES`.
    """
    zz, yy, xx = np.mgrid[0:slices, 0:rows, 0:cols].astype(np.float32)
    cz, cy, cx = (slices - 1) / 2, rows * 0.45, cols * 0.4
    mask = ((zz - cz) / (slices * 0.33)) ** 2 + ((yy - cy) / (rows * 0.25)) ** 2 + ((xx - cx) / (cols * 0.25)) ** 2 <= 1
    mask[:2] = False
    mask[-2:] = False
    return mask


@pytest.fixture(scope="session")
def volume() -> Volume:
    """The synthetic CT series loaded as a volume (slices sorted by position)."""
    return load_volume(make_ct_series())


def make_result(volume: Volume, labels: list[SegmentLabel]) -> SegmentationResult:
    """Segmentation result: label 1 the sphere; label 2 (if given) a small box on slices 4-6."""
    shape = volume.array.shape
    masks = [sphere_mask(*shape)]
    if len(labels) > 1:
        second = np.zeros(shape, dtype=bool)
        second[4:7, 10:20, 40:55] = True  # a small box on slices 4-6 only
        masks.append(second)
    mask = np.stack(masks)
    probabilities = np.where(mask, 0.9, 0.05).astype(np.float32)
    return SegmentationResult(
        probabilities=probabilities,
        mask=mask,
        labels=labels,
        model_name="organ-seg",
        model_version="1.2.0",
    )


@pytest.fixture(scope="session")
def seg_result(volume: Volume) -> SegmentationResult:
    """One-label (Liver) segmentation result on the synthetic volume."""
    return make_result(volume, [LIVER])


@pytest.fixture(scope="session")
def seg_result_two(volume: Volume) -> SegmentationResult:
    """Two-label segmentation result (Liver sphere and a small Spleen box)."""
    return make_result(volume, [LIVER, SPLEEN])


def make_qc(
    volume: Volume, result: SegmentationResult, verdict: Verdict, reasons: list[Reason], score: float
) -> QCResult:
    """QC of ``result``: segment 1 gets ``verdict``, ``reasons``, ``score``; others are accepted."""
    segments = []
    for index, label in enumerate(result.labels):
        first = index == 0
        segments.append(
            SegmentQC(
                segment_number=index + 1,
                label=label,
                quality_score=score if first else 0.93,
                verdict=verdict if first else Verdict.ACCEPTED,
                reasons=list(reasons) if first else [],
                volume_mm3=float(result.mask[index].sum()) * volume.voxel_volume_mm3,
            )
        )
    return QCResult(qc_version="qc-0.3.1", segments=segments)


@pytest.fixture(scope="session")
def qc_accepted(volume: Volume, seg_result: SegmentationResult) -> QCResult:
    """An accepted QC result (score 0.91, no reasons)."""
    return make_qc(volume, seg_result, Verdict.ACCEPTED, [], 0.91)


@pytest.fixture(scope="session")
def qc_review(volume: Volume, seg_result: SegmentationResult) -> QCResult:
    """A needs-review QC result (score 0.42, three reasons)."""
    return make_qc(volume, seg_result, Verdict.NEEDS_REVIEW, NEEDS_REVIEW_REASONS, 0.42)


@pytest.fixture(scope="session")
def qc_review_two(volume: Volume, seg_result_two: SegmentationResult) -> QCResult:
    """QC of the two-label result: Liver needs review, Spleen accepted."""
    return make_qc(volume, seg_result_two, Verdict.NEEDS_REVIEW, NEEDS_REVIEW_REASONS, 0.42)


@pytest.fixture
def require_tool():
    """Return a function that gives the path of a command-line tool or skips.

    Never skips when the environment variable ``CI`` is ``"true"``: there the tool must exist.
    """

    def _require(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"{name} is required in CI but not installed")
            pytest.skip(f"{name} is not installed (Debian package dicom3tools / dcmtk); set CI=true to require it")
        return path

    return _require


def roundtrip(ds: Dataset) -> Dataset:
    """Write ``ds`` as a Part 10 file into memory and read it back with pydicom."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.fixture
def roundtrip_bytes():
    """Return a function writing a dataset to bytes (Part 10) and reading it back."""
    return roundtrip


@pytest.fixture
def dciodvfy_clean(require_tool):
    """Return a function asserting that dciodvfy reports no errors; it returns the warnings.

    Skips when dciodvfy is missing locally, fails when it is missing and ``CI=true``.
    """
    from pacs_sentinel.reports.validate import run_dciodvfy

    executable = require_tool("dciodvfy")

    def _check(ds: Dataset, iod: str) -> list[str]:
        report = run_dciodvfy(ds, executable=executable)
        assert report is not None
        assert report.iod == iod
        assert report.errors == [], "\n".join(report.errors)
        return report.warnings

    return _check
