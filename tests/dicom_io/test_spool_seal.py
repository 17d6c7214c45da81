"""Sealed spool files: one flush per new instance, torn files found at reconciliation."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

from pacs_sentinel.dicom_io import spool as spool_module
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.spool import (
    SEAL_MAGIC,
    TORN_SUFFIX,
    InstanceInfo,
    Spool,
    filesystem_type,
    read_instance_info,
    seal_state,
)
from tests.conftest import shipped_path


def _encoded(ds: pydicom.Dataset) -> io.BytesIO:
    """A data set encoded as a C-STORE carries it (explicit VR little endian)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return io.BytesIO(buffer.getvalue())


def _received(sop_suffix: str = "") -> tuple[io.BytesIO, InstanceInfo]:
    """CT_small's data set as a C-STORE carries it (its SOP Instance UID + ``sop_suffix``)."""
    ds = pydicom.dcmread(shipped_path("CT_small.dcm"))
    ds.SOPInstanceUID += sop_suffix
    encoded = _encoded(ds)
    return encoded, read_instance_info(encoded, str(ds.file_meta.TransferSyntaxUID))


def _store(spool: Spool, encoded: io.BytesIO, info: InstanceInfo):  # type: ignore[no-untyped-def]
    return spool.store_dataset(encoded.getbuffer(), info, calling_ae="CT1",
                               implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID)


class _Flushes:
    """Counts the flushes a store makes: file fsyncs, fdatasyncs and folder fsyncs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, calls: list[str] | None = None) -> None:
        self.calls: list[str] = [] if calls is None else calls
        real_fsync, real_datasync, real_dir = os.fsync, spool_module._datasync, spool_module.fsync_path

        def fsync(fd: int) -> None:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):  # a folder's flush is counted as "dir"
                self.calls.append("fsync")
            real_fsync(fd)

        monkeypatch.setattr(spool_module.os, "fsync", fsync)
        monkeypatch.setattr(spool_module, "_datasync", lambda fd: (self.calls.append("datasync"), real_datasync(fd))[1])
        monkeypatch.setattr(spool_module, "fsync_path", lambda p: (self.calls.append("dir"), real_dir(p))[1])


def test_a_stored_instance_is_sealed_and_reads_as_before(tmp_path: Path) -> None:
    encoded, info = _received()
    outcome = _store(Spool(tmp_path, Database(tmp_path / "i.db")), encoded, info)
    raw = outcome.path.read_bytes()
    assert raw.startswith(SEAL_MAGIC) and raw[128:132] == b"DICM"
    assert seal_state(outcome.path) is True
    assert pydicom.dcmread(outcome.path).PixelData == pydicom.dcmread(shipped_path("CT_small.dcm")).PixelData
    assert not [p for p in outcome.path.parent.iterdir() if p != outcome.path]  # no temporary name left


@pytest.mark.parametrize("name_durable, expected", [(True, ["fsync"]), (False, ["fsync", "dir"])])
def test_a_new_instance_costs_one_file_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              name_durable: bool, expected: list[str]) -> None:
    encoded, info = _received()
    spool = Spool(tmp_path, Database(tmp_path / "i.db"), name_durable_with_file=name_durable)
    _store(spool, encoded, info)  # makes the study and series folders
    flushes = _Flushes(monkeypatch)
    other = InstanceInfo(**{**info.__dict__, "sop_instance_uid": info.sop_instance_uid + ".2"})
    _store(spool, encoded, other)
    assert flushes.calls == expected


def test_a_replacement_is_flushed_before_it_takes_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed instance under a stored UID: the stored copy is never replaced by an unflushed one."""
    encoded, info = _received()
    spool = Spool(tmp_path, Database(tmp_path / "i.db"), name_durable_with_file=True)
    first = _store(spool, encoded, info)
    ds = pydicom.dcmread(first.path)
    ds.SeriesDescription = "corrected"
    changed = _encoded(ds)
    order: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(spool_module.os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    _Flushes(monkeypatch, calls=order)  # flushes and the rename in one list, in order
    second = _store(spool, changed, info)
    assert not second.duplicate and second.path == first.path
    assert order == ["datasync", "replace", "dir"]
    assert pydicom.dcmread(second.path).SeriesDescription == "corrected"
    assert seal_state(second.path) is True


@pytest.mark.parametrize("errno_name", ["EPERM", "ENOTSUP"])
def test_a_filesystem_without_hard_links_gets_the_careful_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                errno_name: str) -> None:
    import errno

    def no_links(src: str, dst: str) -> None:
        raise OSError(getattr(errno, errno_name), "no hard links here")

    monkeypatch.setattr(spool_module.os, "link", no_links)
    encoded, info = _received()
    spool = Spool(tmp_path, Database(tmp_path / "i.db"), name_durable_with_file=True)
    flushes = _Flushes(monkeypatch)
    outcome = _store(spool, encoded, info)
    assert seal_state(outcome.path) is True
    assert flushes.calls[-2:] == ["datasync", "dir"]  # after the folders' own first flushes
    assert [p.name for p in outcome.path.parent.iterdir()] == [outcome.path.name]


def test_an_unindexed_file_under_the_name_is_replaced_not_kept(tmp_path: Path) -> None:
    """A leftover file under the final name (no row): the received instance replaces it."""
    encoded, info = _received()
    spool = Spool(tmp_path, Database(tmp_path / "i.db"))
    target = spool.path_for(info)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"left over")
    outcome = _store(spool, encoded, info)
    assert outcome.path == target and seal_state(target) is True
    assert spool.database.rows("SELECT path FROM instances") == [{"path": str(target)}]


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "zeroed tail"])
def test_reconcile_sets_a_torn_file_aside(tmp_path: Path, damage: str) -> None:
    encoded, info = _received()
    spool = Spool(tmp_path, Database(tmp_path / "i.db"))
    torn = _store(spool, encoded, info)
    whole = _store(spool, *_received(".2"))
    raw = bytearray(torn.path.read_bytes())
    if damage == "truncated":
        raw = raw[:len(raw) - 4096]
    elif damage == "bit flip":
        raw[len(raw) // 2] ^= 0x01
    else:
        raw[-8192:] = bytes(8192)  # size written, last blocks never were
    torn.path.write_bytes(bytes(raw))
    spool.database.connection().execute("DELETE FROM instances")  # rows lost to the power cut
    assert seal_state(torn.path) is False
    assert spool.reconcile() == (0, 1)
    assert spool.database.rows("SELECT path FROM instances") == [{"path": str(whole.path)}]
    assert not torn.path.exists()
    assert torn.path.with_name(torn.path.name + TORN_SUFFIX).is_file()  # kept for inspection
    assert spool.reconcile() == (0, 0)
    # The sender sends it again: stored whole under its name.
    again = _store(spool, encoded, info)
    assert again.path == torn.path and seal_state(again.path) is True


def test_reconcile_still_indexes_files_written_without_a_seal(tmp_path: Path) -> None:
    """Files spooled before sealing (zero preamble) are re-indexed as before."""
    spool = Spool(tmp_path, Database(tmp_path / "i.db"))
    _, info = _received()
    target = spool.path_for(info)
    target.parent.mkdir(parents=True)
    shutil.copyfile(shipped_path("CT_small.dcm"), target)
    assert seal_state(target) is None
    assert spool.reconcile() == (0, 1)


def test_filesystem_type_matches_findmnt(tmp_path: Path) -> None:
    findmnt = shutil.which("findmnt")
    if findmnt is None:
        if os.environ.get("CI") == "true":
            pytest.fail("findmnt (util-linux) is missing on CI")
        pytest.skip("findmnt (util-linux) is not installed")
    expected = subprocess.run([findmnt, "-n", "-o", "FSTYPE", "--target", str(tmp_path)],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert filesystem_type(tmp_path) == expected
    assert filesystem_type("/proc/self") == "proc"


def test_the_spool_decides_from_its_filesystem(tmp_path: Path) -> None:
    spool = Spool(tmp_path, Database(tmp_path / "i.db"))
    kind = filesystem_type(tmp_path)
    assert spool.name_durable_with_file == (kind in spool_module.NAME_DURABLE_FILESYSTEMS)
