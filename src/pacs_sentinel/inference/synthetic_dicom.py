"""What the CT and radiograph phantom writers share: derived UIDs, dates and the common header.

Both writers make reproducible files: with a seed, UIDs and dates derive from it, so the same
seed writes byte-identical files; without one, UIDs are random and the date is now.
"""

from __future__ import annotations

import datetime as dt

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid


def synthetic_uid(namespace: str, seed: int | None, *parts: object) -> str:
    """A UID derived from ``namespace``, the seed and ``parts`` when a seed is given, else random."""
    if seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=[namespace, str(seed), *(str(p) for p in parts)])


def acquisition_date_time(seed: int | None) -> tuple[str, str]:
    """(DA, TM) strings: derived from the seed (a day of 2024, a time of day), else now."""
    if seed is None:
        when = dt.datetime.now()
    else:
        when = dt.datetime(2024, 1, 1, 8, 0, 0) + dt.timedelta(days=seed % 365, minutes=(seed * 7) % 600)
    return when.strftime("%Y%m%d"), when.strftime("%H%M%S")


def phantom_dataset(
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    patient_name: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    accession_number: str,
    study_description: str,
    date: str,
    time: str,
) -> Dataset:
    """A dataset with file meta (Explicit VR Little Endian) and the attributes every phantom
    file shares: SOP common, patient, study, series identity and the phantom "equipment".

    The caller adds its modality's series, image and pixel attributes.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PACS_SENTINEL"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "054Y"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.StudyDescription = study_description
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.Manufacturer = "PACS Sentinel phantom"
    ds.InstitutionName = "PACS Sentinel"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "pacs-sentinel"
    return ds
