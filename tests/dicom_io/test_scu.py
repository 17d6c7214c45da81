"""The storage SCU against a real SCP."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from pacs_sentinel.dicom_io.scp import StorageScp
from pacs_sentinel.dicom_io.scu import Peer, send_files
from pacs_sentinel.errors import DeliveryError


def test_peer_parse() -> None:
    assert Peer.parse("PACS@pacs.example.org:104") == Peer("PACS", "pacs.example.org", 104)
    for bad in ("PACS", "PACS@host", "@host:104", "PACS@host:0", "PACS@host:x"):
        with pytest.raises(ValueError, match="AE@host:port"):
            Peer.parse(bad)


def test_compressed_and_uncompressed_objects_arrive_as_encoded(pacs: StorageScp) -> None:
    files = [Path(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small_RLE.dcm")]
    results = send_files(files, Peer("PACS", "127.0.0.1", pacs.port))
    assert [r.delivered for r in results] == [True, True]
    stored = {pydicom.dcmread(row["path"]).file_meta.TransferSyntaxUID
              for row in pacs.spool.database.connection()["instances"].rows}
    assert stored == {pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in files}


def test_unreadable_file_is_a_failed_item_not_a_crash(pacs: StorageScp, tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom")
    good = Path(get_testdata_file("CT_small.dcm"))
    results = send_files([broken, good], Peer("PACS", "127.0.0.1", pacs.port))
    assert [r.path for r in results] == [broken, good]
    assert [r.delivered for r in results] == [False, True]
    assert "cannot read" in results[0].error


def test_refused_association_raises_delivery_error(pacs: StorageScp) -> None:
    with pytest.raises(DeliveryError, match="rejected"):
        send_files([Path(get_testdata_file("CT_small.dcm"))], Peer("WRONGAE", "127.0.0.1", pacs.port))
