"""The storage SCP on a real socket, talked to by a real pynetdicom client."""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import pydicom
import pynetdicom
import pytest
import structlog.testing
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scp import ScpSettings, StorageScp
from pacs_sentinel.dicom_io.spool import TEMP_SUFFIX, Spool
from tests.conftest import free_port


@pytest.fixture
def scp(tmp_path: Path):
    database = Database(tmp_path / "index.db")
    spool = Spool(tmp_path, database)
    stored = []
    server = StorageScp(ScpSettings("SENTINEL", "127.0.0.1", free_port()), spool,
                        on_stored=lambda outcome, ae: stored.append((outcome, ae)))
    server.start()
    server.stored = stored
    yield server
    server.stop()


def _associate(scp: StorageScp):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SENTINEL")
    assert assoc.is_established
    return assoc


def _ct() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _indexed(scp: StorageScp) -> list[dict]:
    return list(scp.spool.database.connection()["instances"].rows)


def test_store_is_on_disk_and_indexed_before_success(scp: StorageScp) -> None:
    ds = _ct()
    assoc = _associate(scp)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    rows = _indexed(scp)
    assert [r["sop_instance_uid"] for r in rows] == [ds.SOPInstanceUID]
    stored = pydicom.dcmread(rows[0]["path"])
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.PixelData == ds.PixelData
    assert rows[0]["calling_ae"] == "MODALITY"
    assert [ae for _, ae in scp.stored] == ["MODALITY"]


def test_duplicate_instance_is_stored_once(scp: StorageScp) -> None:
    ds = _ct()
    assoc = _associate(scp)
    first = assoc.send_c_store(ds)
    second = assoc.send_c_store(ds)
    assoc.release()
    assert (first.Status, second.Status) == (0x0000, 0x0000)
    assert len(_indexed(scp)) == 1
    files = [p for p in scp.spool.root.rglob("*") if p.is_file()]
    assert len(files) == 1
    assert [outcome.duplicate for outcome, _ in scp.stored] == [False, True]


def test_failed_write_answers_out_of_resources_and_is_not_indexed(scp: StorageScp) -> None:
    ds = _ct()
    # A plain file where the study's folder must go makes the write fail for real.
    (scp.spool.root / ds.StudyInstanceUID).write_bytes(b"in the way")
    assoc = _associate(scp)
    status = assoc.send_c_store(ds)
    assert status.Status == 0xA700
    assert _indexed(scp) == []
    assert not list(scp.spool.root.rglob(f"*{TEMP_SUFFIX}"))
    # The SCP keeps serving: once the obstacle is gone the same instance is accepted.
    (scp.spool.root / ds.StudyInstanceUID).unlink()
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert len(_indexed(scp)) == 1


def test_non_dicom_payload_gets_failure_status_and_scp_keeps_serving(
    scp: StorageScp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file whose meta says "CT image" but whose data set is garbage, sent byte for byte
    # (pynetdicom's chunked mode sends the file's data set without decoding it).
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    buffer.write(b"this is not a DICOM data set at all" * 10)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(buffer.getvalue())
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)

    assoc = _associate(scp)
    assert assoc.send_c_store(garbage).Status == 0xC210
    assert _indexed(scp) == []
    assert assoc.send_c_echo().Status == 0x0000
    assert assoc.send_c_store(_ct()).Status == 0x0000
    assoc.release()
    assert len(_indexed(scp)) == 1


def test_implicit_vr_bytes_on_an_explicit_vr_context_get_c210_and_are_not_stored(
    scp: StorageScp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydicom's reader would read on in implicit VR (with a warning); stored behind file meta
    that says explicit VR, no other program could read the file."""
    ds = _ct()
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    buffer.write(body.getvalue())
    misencoded = tmp_path / "misencoded.dcm"
    misencoded.write_bytes(buffer.getvalue())
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)  # byte for byte

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SENTINEL")
    assert assoc.is_established
    assert assoc.send_c_store(misencoded).Status == 0xC210
    assert _indexed(scp) == [] and not list(scp.spool.root.rglob("*.dcm"))
    assoc.release()


def test_a_truncated_instance_gets_c210_and_is_not_stored(scp: StorageScp, monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom's MR_truncated.dcm (its pixel data 62 bytes short of their declared length), sent
    byte for byte: the sender learns it was not stored, and may send it again."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SENTINEL")
    assert assoc.is_established
    assert assoc.send_c_store(get_testdata_file("MR_truncated.dcm")).Status == 0xC210
    assert _indexed(scp) == [] and not list(scp.spool.root.rglob("*.dcm"))
    assoc.release()


def _logged(logs: list[dict], event: str, timeout: float = 5.0) -> list[dict]:
    """The captured entries of ``event``, once there is one (the server logs in its own thread)."""
    deadline = time.monotonic() + timeout
    while not any(entry["event"] == event for entry in logs) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [entry for entry in logs if entry["event"] == event]


def test_wrong_called_ae_title_is_rejected(scp: StorageScp) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    with structlog.testing.capture_logs() as logs:
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SOMEONEELSE")
        assert assoc.is_rejected
        refused = _logged(logs, "association refused")
    # IT can find the misconfigured modality in the log.
    assert len(refused) == 1 and refused[0]["calling_ae"] == "MODALITY", logs
    assert refused[0]["reason"] == "called AE title 'SOMEONEELSE' is not ours ('SENTINEL')"


def test_an_aborted_association_is_logged_and_nothing_half_sent_is_stored(scp: StorageScp) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    with structlog.testing.capture_logs() as logs:
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SENTINEL")
        assert assoc.is_established
        assoc.abort()
        aborted = _logged(logs, "association aborted")
    assert len(aborted) == 1 and aborted[0]["calling_ae"] == "MODALITY"
    assert _indexed(scp) == []


def test_reconcile_removes_temp_files_and_reindexes_unindexed_files(tmp_path: Path) -> None:
    database = Database(tmp_path / "index.db")
    spool = Spool(tmp_path, database)
    ds = _ct()
    target = spool.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    target.parent.mkdir(parents=True)
    ds.save_as(target, enforce_file_format=True)
    orphan = target.with_name(f"{target.name}.123.456{TEMP_SUFFIX}")
    orphan.write_bytes(b"half a file")
    assert spool.reconcile() == (1, 1)
    assert not orphan.exists()
    rows = list(database.connection()["instances"].rows)
    assert [r["path"] for r in rows] == [str(target)]
    assert spool.reconcile() == (0, 0)


def test_changed_instance_under_the_same_uid_replaces_the_stored_one(scp: StorageScp) -> None:
    ds = _ct()
    assoc = _associate(scp)
    assert assoc.send_c_store(ds).Status == 0x0000
    ds.SeriesDescription = "corrected by the technologist"
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    rows = _indexed(scp)
    assert len(rows) == 1
    assert pydicom.dcmread(rows[0]["path"]).SeriesDescription == "corrected by the technologist"
    assert [outcome.duplicate for outcome, _ in scp.stored] == [False, False]


def _send_file_as_is(scp: StorageScp, path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Send a file byte for byte (pynetdicom's chunked mode reads the context from its meta)."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = _associate(scp)
    status = assoc.send_c_store(path).Status
    assoc.release()
    return int(status)


def test_dataset_of_another_sop_class_than_the_context_gets_a900(
    scp: StorageScp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An MR data set in a file whose meta says CT: it travels over the CT context.
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    mislabelled = tmp_path / "mr-as-ct.dcm"
    ds.save_as(mislabelled)  # as is: enforce_file_format would rewrite the meta from the data set
    assert _send_file_as_is(scp, mislabelled, monkeypatch) == 0xA900
    assert _indexed(scp) == []
    assert not [p for p in scp.spool.root.rglob("*") if p.is_file()]


def test_free_disk_below_threshold_gets_a700_and_nothing_is_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path, Database(tmp_path / "index.db"))
    absurd = 1 << 40  # a threshold of 1 EiB, in MB: no disk has that much free
    scp = StorageScp(ScpSettings("SENTINEL", "127.0.0.1", free_port(), min_free_disk_mb=absurd), spool)
    scp.start()
    try:
        assoc = _associate(scp)
        assert assoc.send_c_store(_ct()).Status == 0xA700
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        scp.stop()
    assert _indexed(scp) == []
    assert not [p for p in spool.root.rglob("*") if p.is_file()]


@pytest.mark.parametrize("policy, name_durable", [("always", True), ("always", False), ("never", True)])
def test_fsync_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, name_durable: bool) -> None:
    import os

    import pacs_sentinel.dicom_io.spool as spool_module

    synced: list[str] = []  # what each flushed descriptor is (Linux: /proc/self/fd)

    def recording(real):  # type: ignore[no-untyped-def]
        def sync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)
        return sync

    monkeypatch.setattr(spool_module.os, "fsync", recording(os.fsync))
    monkeypatch.setattr(spool_module, "_datasync", recording(spool_module._datasync))
    spool = Spool(tmp_path, Database(tmp_path / "index.db"), name_durable_with_file=name_durable)
    scp = StorageScp(ScpSettings("SENTINEL", "127.0.0.1", free_port(), fsync=policy), spool)  # type: ignore[arg-type]
    scp.start()
    per_instance = []
    try:
        assoc = _associate(scp)
        for k in range(2):  # two instances of one series
            ds = _ct()
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{k + 1}"
            before = len(synced)
            assert assoc.send_c_store(ds).Status == 0x0000
            per_instance.append(synced[before:])
        assoc.release()
    finally:
        scp.stop()
    assert len(_indexed(scp)) == 2
    if policy == "never":
        assert per_instance == [[], []]
        return
    series = spool.path_for(spool_module.instance_info(_ct(), "1.2.840.10008.1.2.1")).parent
    study = series.parent
    first, second = per_instance
    # The file is flushed through the descriptor opened on its temporary name (which /proc
    # shows as deleted once the file has its final name), after it got that name; the
    # series folder is flushed too only where the file's flush does not commit its name.
    name = [] if name_durable else [str(series)]
    # The first instance: the new study folder's entry in the spool, the new series
    # folder's entry in the study, the file (data, size, name), the name where needed.
    assert [p for p in first if TEMP_SUFFIX not in p] == [str(spool.root), str(study), *name]
    assert [p.endswith(f"{TEMP_SUFFIX} (deleted)") for p in first if TEMP_SUFFIX in p] == [True]
    # The second: the file, and its name where needed.
    assert len(second) == 1 + len(name) and second[0].endswith(f"{TEMP_SUFFIX} (deleted)") and second[1:] == name


def test_receiver_with_two_listener_processes_shares_the_port(tmp_path: Path) -> None:
    from pacs_sentinel.dicom_io.scp import Receiver

    receiver = Receiver(ScpSettings("SENTINEL", "127.0.0.1", 0), tmp_path, tmp_path / "index.db", processes=2)
    receiver.start()
    try:
        uids = []
        for k in range(6):  # six associations: the kernel spreads them over the listeners
            ds = _ct()
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{k + 1}"
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title="SENTINEL")
            assert assoc.is_established
            assert assoc.send_c_store(ds).Status == 0x0000
            assoc.release()
            uids.append(ds.SOPInstanceUID)
    finally:
        receiver.stop()
    rows = list(Database(tmp_path / "index.db").connection()["instances"].rows)
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(uids)
    assert all(pydicom.dcmread(r["path"]).SOPInstanceUID == r["sop_instance_uid"] for r in rows)


def test_two_listener_processes_take_parallel_associations_in_turn(tmp_path: Path) -> None:
    """Four associations held open at once land two and two on two listeners, whatever their ports."""
    from pacs_sentinel.dicom_io.scp import Receiver

    receiver = Receiver(ScpSettings("SENTINEL", "127.0.0.1", 0), tmp_path, tmp_path / "index.db", processes=2)
    receiver.start()
    associations = []
    try:
        assert receiver.associations_per_listener() == [0, 0]
        for k in range(4):
            ae = AE(ae_title=f"MODALITY{k}")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title="SENTINEL")
            assert assoc.is_established
            associations.append(assoc)
        assert receiver.associations_per_listener() == [2, 2]
        for k, assoc in enumerate(associations):
            ds = _ct()
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.55.{k + 1}"
            assert assoc.send_c_store(ds).Status == 0x0000
        for assoc in associations:
            assoc.release()
        associations = []
        deadline = time.monotonic() + 10
        while receiver.associations_per_listener() != [0, 0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.associations_per_listener() == [0, 0]
    finally:
        for assoc in associations:
            assoc.abort()
        receiver.stop()
    assert len(list(Database(tmp_path / "index.db").connection()["instances"].rows)) == 4


def test_a_listener_serving_more_leaves_a_caller_to_the_others_but_not_forever() -> None:
    """Balancing is a preference: a caller nobody else accepts is taken after the grace period."""
    import socket as socketlib
    from multiprocessing import RawArray

    from pacs_sentinel.dicom_io.scp import AcceptBalance

    counts = RawArray("l", 2)
    counts[0] = 1  # this listener serves one association, the other (stuck, or gone) none
    balance = AcceptBalance(counts, 0)
    assert not balance.my_turn() and AcceptBalance(counts, 1).my_turn()
    with socketlib.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(4)
        with pytest.raises(BlockingIOError):  # no caller waits (another listener took it)
            balance.wait_for_turn(listening)
        with socketlib.create_connection(listening.getsockname()):
            balance.wait_for_turn(listening)  # returns: nobody else accepted it in time
            client, _ = listening.accept()
            client.close()
    balance.request_done()  # a request thread that made no association: its caller is uncounted
    assert balance.my_turn()


def test_whole_pdu_socket_returns_what_arrived_when_the_peer_closes() -> None:
    """A peer that hangs up mid-PDU: the bytes that came, no exception in the DUL thread."""
    import socket as socketlib

    from pacs_sentinel.dicom_io.scp import _WholePduSocket

    ours, peer = socketlib.socketpair()
    try:
        wrapper = _WholePduSocket.__new__(_WholePduSocket)  # the socket only; no association needed
        wrapper.socket = ours
        peer.sendall(b"\x04\x00\x00")
        peer.close()
        assert wrapper.recv(6) == bytearray(b"\x04\x00\x00")
        assert wrapper.recv(6) == bytearray()
    finally:
        ours.close()


def test_each_association_negotiates_on_its_own_copy_of_the_contexts(scp: StorageScp) -> None:
    from copy import deepcopy

    server_contexts = scp._server.contexts  # type: ignore[union-attr]
    before = [(cx.abstract_syntax, list(cx.transfer_syntax)) for cx in server_contexts]
    copies = deepcopy(server_contexts)
    assert [(cx.abstract_syntax, list(cx.transfer_syntax)) for cx in copies] == before
    assert all(a is not b and a.transfer_syntax is not b.transfer_syntax for a, b in zip(copies, server_contexts))
    copies[0].transfer_syntax.clear()
    copies[0].context_id = 1
    assoc = _associate(scp)
    assert assoc.send_c_store(_ct()).Status == 0x0000
    assoc.release()
    assert [(cx.abstract_syntax, list(cx.transfer_syntax)) for cx in server_contexts] == before
    assert all(cx.context_id is None for cx in server_contexts)


def test_a_request_naming_another_instance_than_its_data_set_gets_a900(
    scp: StorageScp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-STORE-RQ whose Affected SOP Instance UID is not the data set's: success would confirm
    an instance that was not the one stored."""
    ds = _ct()
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"  # chunked sending takes the request's UID from here
    mislabelled = tmp_path / "other-uid.dcm"
    ds.save_as(mislabelled)
    assert _send_file_as_is(scp, mislabelled, monkeypatch) == 0xA900
    assert _indexed(scp) == []
