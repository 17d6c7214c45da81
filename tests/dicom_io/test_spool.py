"""The spool's own encoding work: identifying attributes, file meta, duplicates, folders."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.spool import (
    InstanceInfo,
    Spool,
    file_meta,
    instance_info,
    read_instance_info,
)
from pacs_sentinel.errors import DecodeError
from tests.conftest import PYDICOM_TEST_FILES, shipped_path



def _encoded_dataset(name: str) -> tuple[io.BytesIO, str, pydicom.Dataset]:
    """A shipped file's data set bytes as a C-STORE carries them, its transfer syntax, the file."""
    path = shipped_path(name)
    raw = path.read_bytes()
    ds = pydicom.dcmread(path)
    with pydicom.dcmread(path, stop_before_pixels=True) as head:  # where the file meta ends
        meta_end = 132 + 12 + int(head.file_meta.FileMetaInformationGroupLength)
    return io.BytesIO(raw[meta_end:]), str(ds.file_meta.TransferSyntaxUID), ds


@pytest.mark.parametrize("name", [
    "CT_small.dcm",            # explicit VR little endian
    "MR_small_implicit.dcm",   # implicit VR
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "image_dfl.dcm",           # deflated
    "MR_small_RLE.dcm",        # encapsulated pixel data (undefined length)
    "JPEG2000.dcm",
])
def test_read_instance_info_reads_what_a_full_decode_reads(name: str) -> None:
    encoded, transfer_syntax, ds = _encoded_dataset(name)
    assert read_instance_info(encoded, transfer_syntax) == instance_info(ds, transfer_syntax)


def test_read_instance_info_refuses_garbage_and_missing_uids() -> None:
    with pytest.raises(DecodeError):
        read_instance_info(io.BytesIO(b"this is not a DICOM data set at all" * 10), "1.2.840.10008.1.2.1")
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    del ds.SOPInstanceUID
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    with pytest.raises(DecodeError, match="SOPInstanceUID"):
        read_instance_info(io.BytesIO(encoded.getvalue()), "1.2.840.10008.1.2.1")


@pytest.mark.parametrize("sop_instance_uid, source_ae", [
    ("1.2.826.0.1.3680043.8.498.1", "MODALITY"),   # even length, even AE title
    ("1.2.826.0.1.3680043.8.498.12", "CT1"),       # odd length UID and AE title: padded
    ("1.2.826.0.1.3680043.8.498.123", ""),         # no source AE title
])
def test_file_meta_is_what_pydicom_writes(sop_instance_uid: str, source_ae: str) -> None:
    info = InstanceInfo(sop_instance_uid=sop_instance_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        study_uid="1.2.3", series_uid="1.2.3.4", modality="CT", patient_id="P",
                        transfer_syntax="1.2.840.10008.1.2")
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = info.sop_class_uid
    meta.MediaStorageSOPInstanceUID = info.sop_instance_uid
    meta.TransferSyntaxUID = info.transfer_syntax
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    expected = io.BytesIO()
    expected.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(expected, meta)
    ours = file_meta(info, implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID,
                     implementation_version_name=PYNETDICOM_IMPLEMENTATION_VERSION, source_ae=source_ae)
    assert ours == expected.getvalue()


def test_store_dataset_writes_a_file_pydicom_reads_back(tmp_path: Path) -> None:
    encoded, transfer_syntax, ds = _encoded_dataset("CT_small.dcm")
    spool = Spool(tmp_path, Database(tmp_path / "index.db"))
    info = read_instance_info(encoded, transfer_syntax)
    outcome = spool.store_dataset(encoded.getbuffer(), info, calling_ae="CT1",
                                  implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID)
    stored = pydicom.dcmread(outcome.path)
    assert stored.file_meta.SourceApplicationEntityTitle == "CT1"
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.PixelData == ds.PixelData
    # The same data set again, even with file meta written by someone else, is a duplicate.
    again = spool.store((PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes(), info, calling_ae="CT1")
    assert again.duplicate and again.path == outcome.path


def test_reconcile_keeps_the_senders_ae_title(tmp_path: Path) -> None:
    encoded, transfer_syntax, _ = _encoded_dataset("CT_small.dcm")
    spool = Spool(tmp_path, Database(tmp_path / "index.db"))
    info = read_instance_info(encoded, transfer_syntax)
    outcome = spool.store_dataset(encoded.getbuffer(), info, calling_ae="CT1",
                                  implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID)
    spool.database.connection().execute("DELETE FROM instances")  # the row lost to a power cut
    assert spool.reconcile() == (0, 1)
    rows = spool.database.rows("SELECT path, calling_ae FROM instances")
    assert rows == [{"path": str(outcome.path), "calling_ae": "CT1"}]


def _encoded(ds: pydicom.Dataset) -> io.BytesIO:
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    return io.BytesIO(encoded.getvalue())


def test_an_instance_moved_to_another_study_leaves_no_copy_behind(tmp_path: Path) -> None:
    # A PACS that splits or merges studies re-sends instances under their own SOP Instance UID
    # with a new Study/Series Instance UID. The copy under the old study stayed in the spool;
    # at the next start-up the reconciliation took it for a file that lost its row and indexed
    # it again: the instance jumped back into the old study (and did so at every restart).
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    spool = Spool(tmp_path, Database(tmp_path / "index.db"))
    first = spool.store_dataset(_encoded(ds).getbuffer(), instance_info(ds, "1.2.840.10008.1.2.1"), calling_ae="CT1",
                                implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.5"
    moved = spool.store_dataset(_encoded(ds).getbuffer(), instance_info(ds, "1.2.840.10008.1.2.1"), calling_ae="PACS",
                                implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID)
    assert moved.path != first.path and not moved.duplicate
    assert not first.path.exists()
    assert spool.reconcile() == (0, 0)
    assert spool.database.rows("SELECT study_uid, path FROM instances") == [
        {"study_uid": "1.2.3.4", "path": str(moved.path)}]


def test_reconcile_keeps_the_newer_of_two_copies_of_one_instance(tmp_path: Path) -> None:
    # A crash between indexing the moved instance and removing its old copy leaves both files.
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    spool = Spool(tmp_path, Database(tmp_path / "index.db"))
    first = spool.store_dataset(_encoded(ds).getbuffer(), instance_info(ds, "1.2.840.10008.1.2.1"), calling_ae="CT1",
                                implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID)
    kept = first.path.read_bytes()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.5"
    moved = spool.store_dataset(_encoded(ds).getbuffer(), instance_info(ds, "1.2.840.10008.1.2.1"), calling_ae="PACS",
                                implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID)
    first.path.parent.mkdir(parents=True, exist_ok=True)
    first.path.write_bytes(kept)
    os.utime(first.path, (1, 1))  # the old copy is the older file
    assert spool.reconcile() == (0, 0)
    assert not first.path.exists()
    assert spool.database.rows("SELECT path FROM instances") == [{"path": str(moved.path)}]
    # Both rows lost (a power cut): the newer copy wins whichever file is found first.
    first.path.write_bytes(kept)
    os.utime(first.path, (1, 1))
    spool.database.connection().execute("DELETE FROM instances")
    assert spool.reconcile() == (0, 1)
    assert not first.path.exists()
    assert spool.database.rows("SELECT path FROM instances") == [{"path": str(moved.path)}]


def test_a_series_folder_removed_behind_the_spools_back_is_made_again(tmp_path: Path) -> None:
    encoded, transfer_syntax, _ = _encoded_dataset("CT_small.dcm")
    spool = Spool(tmp_path, Database(tmp_path / "index.db"))
    info = read_instance_info(encoded, transfer_syntax)
    first = spool.store_dataset(encoded.getbuffer(), info, calling_ae="CT1",
                                implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID)
    first.path.unlink()
    first.path.parent.rmdir()  # the spool still remembers the folder as made
    other = InstanceInfo(**{**info.__dict__, "sop_instance_uid": info.sop_instance_uid + ".2"})
    second = spool.store_dataset(encoded.getbuffer(), other, calling_ae="CT1",
                                 implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID)
    assert second.path.parent == first.path.parent and second.path.is_file()


def _shipped_files() -> list[Path]:
    return sorted(p for p in PYDICOM_TEST_FILES.glob("*.dcm") if p.stat().st_size < 5_000_000)


def test_read_instance_info_agrees_with_pydicom_on_every_shipped_file() -> None:
    """The quick walk and pydicom's reader give the same answer, or both refuse (except on the
    truncated files pydicom reads anyway: refused, see below)."""
    compared = 0
    for path in _shipped_files():
        if path.name in TRUNCATED_FILES + MISENCODED_FILES:
            continue
        try:
            ds = pydicom.dcmread(path)
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
            meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
        except Exception:
            continue  # no file meta, or not a file pydicom reads at all
        encoded = io.BytesIO(path.read_bytes()[meta_end:])
        try:
            expected = instance_info(ds, transfer_syntax)
        except DecodeError:
            with pytest.raises(DecodeError):
                read_instance_info(encoded, transfer_syntax)
            continue
        assert read_instance_info(encoded, transfer_syntax) == expected, path.name
        compared += 1
    assert compared >= 20


#: pydicom's test files whose last element runs past the end of the file (pydicom reads them).
TRUNCATED_FILES = ("MR_truncated.dcm", "rtplan_truncated.dcm")


#: pydicom's test files encoded in the other VR than their transfer syntax says (pydicom reads
#: them, guessing; stored behind file meta naming that syntax, nothing else could).
MISENCODED_FILES = ("SC_rgb_jpeg.dcm",)


@pytest.mark.parametrize("name", MISENCODED_FILES)
def test_a_data_set_not_encoded_as_its_transfer_syntax_says_is_refused(name: str) -> None:
    encoded, transfer_syntax, _ = _encoded_dataset(name)
    with pytest.raises(DecodeError, match=r"data set encoded in implicit VR, not as its transfer syntax .* says"):
        read_instance_info(encoded, transfer_syntax)


@pytest.mark.parametrize("name", TRUNCATED_FILES)
def test_a_truncated_data_set_is_refused_not_stored_as_whole(name: str) -> None:
    encoded, transfer_syntax, _ = _encoded_dataset(name)
    with pytest.raises(DecodeError, match=r"truncated data set: element \([0-9A-F]{4},[0-9A-F]{4}\)"):
        read_instance_info(encoded, transfer_syntax)


def _with_sequences(transfer_syntax: str) -> bytes:
    """CT_small with a sequence of undefined length (items of undefined length, a nested
    sequence) before its pixel data, encoded as a C-STORE carries it."""
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    inner = pydicom.Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-62000", "SRT", "Liver"
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    item.PurposeOfReferenceCodeSequence = [inner]
    item["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    defined = pydicom.Dataset()  # an item of defined length among them
    defined.ReferencedSOPClassUID, defined.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.5"
    ds.ReferencedImageSequence = [item, defined]
    ds["ReferencedImageSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = inner.is_undefined_length_sequence_item = True
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, transfer_syntax == "1.2.840.10008.1.2"
    write_dataset(encoded, ds)
    raw = encoded.getvalue()
    assert b"\xfe\xff\xdd\xe0" in raw  # written with undefined lengths and delimiters
    return raw


@pytest.mark.parametrize("transfer_syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_a_data_set_cut_anywhere_is_refused(transfer_syntax: str) -> None:
    """Wherever a data set with sequences is cut (inside an item, a nested sequence, the pixel
    data), it is refused; whole, it is read as pydicom reads it."""
    raw = _with_sequences(transfer_syntax)
    whole = read_instance_info(io.BytesIO(raw), transfer_syntax)
    assert whole.sop_instance_uid == pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm").SOPInstanceUID
    sequence_at = raw.index(b"\x08\x00\x40\x11")  # (0008,1140) Referenced Image Sequence
    sequence_end = raw.index(b"\xfe\xff\xdd\xe0", sequence_at) + 8
    for cut in [*range(sequence_at + 2, sequence_end, 3), len(raw) // 2, len(raw) - 4000, len(raw) - 1]:
        with pytest.raises(DecodeError, match="truncated data set"):
            read_instance_info(io.BytesIO(raw[:cut]), transfer_syntax)


def test_the_quick_walk_reads_plain_little_endian_data_sets_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    import pacs_sentinel.dicom_io.spool as spool_module

    def no_pydicom(*args: object, **kwargs: object) -> None:
        raise AssertionError("pydicom's reader was used")

    monkeypatch.setattr(spool_module, "read_dataset", no_pydicom)
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm"):
        encoded, transfer_syntax, ds = _encoded_dataset(name)
        assert read_instance_info(encoded, transfer_syntax).sop_instance_uid == ds.SOPInstanceUID
