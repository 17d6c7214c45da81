"""The SCP's event-driven DUL thread: it waits instead of polling, and reads P-DATA right."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification

from pacs_sentinel.dicom_io.dul import EventDrivenDUL, ReceivedPData
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scp import ScpSettings, StorageScp
from pacs_sentinel.dicom_io.spool import Spool
from tests.conftest import free_port


@pytest.fixture
def scp(tmp_path: Path):
    server = StorageScp(ScpSettings("SENTINEL", "127.0.0.1", free_port()), Spool(tmp_path, Database(tmp_path / "i.db")))
    server.start()
    yield server
    server.stop()


def _associate(port: int) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
    assert assoc.is_established
    return assoc


def _server_association(scp: StorageScp) -> Association:
    assert scp._server is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        active = scp._server.active_associations
        if active:
            return active[0]
        time.sleep(0.01)
    raise AssertionError("the SCP has no association")


def _pdv(context_id: int, header: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id, header) + data


def test_p_data_items_are_views_of_the_received_bytes() -> None:
    body = bytearray(_pdv(1, 0x03, b"command") + _pdv(3, 0x02, b"data set"))
    primitive = ReceivedPData(body).to_primitive()
    assert [(cid, bytes(value)) for cid, value in primitive.presentation_data_value_list] == [
        (1, b"\x03command"), (3, b"\x02data set")]
    body[5] = 0x01  # a view, not a copy: the DIMSE layer copies it once, into its message
    assert bytes(primitive.presentation_data_value_list[0][1])[:1] == b"\x01"


@pytest.mark.parametrize("body", [
    b"",                                        # no item at all
    b"\x00\x00\x00",                            # truncated item header
    struct.pack(">LB", 1, 1) + b"\x03",         # item length below 2
    struct.pack(">LBB", 20, 1, 3) + b"short",   # item longer than the PDU
])
def test_malformed_p_data_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        ReceivedPData(bytearray(body))


def test_a_malformed_p_data_pdu_aborts_the_association_and_the_scp_keeps_serving(scp: StorageScp) -> None:
    assoc = _associate(scp.port)
    raw = assoc.dul.socket.socket
    assert raw is not None
    body = struct.pack(">LBB", 400, 1, 3) + b"too short for its length"
    raw.sendall(struct.pack(">BBL", 0x04, 0, len(body)) + body)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established  # the SCP aborted: invalid PDU (Evt19)
    again = _associate(scp.port)
    assert again.send_c_echo().Status == 0x0000
    again.release()


def test_an_idle_association_does_not_poll(scp: StorageScp) -> None:
    assoc = _associate(scp.port)
    try:
        server_side = _server_association(scp)
        dul = server_side.dul
        assert isinstance(dul, EventDrivenDUL)
        loops = []
        looks = dul._process_recv_primitive
        dul._process_recv_primitive = lambda: (loops.append(1), looks())[1]  # type: ignore[method-assign]
        time.sleep(0.5)
        # pynetdicom's loop looks every 0.1-1 ms (500-5000 times in 0.5 s); ours wakes for
        # the socket, a primitive to send, or every DUL_WAIT_S (10 ms) to check its timers.
        assert len(loops) < 150
        assert assoc.send_c_echo().Status == 0x0000  # and answers at once when asked
    finally:
        assoc.release()


def test_a_data_received_handler_sees_every_pdu_and_storing_still_works(scp: StorageScp) -> None:
    assoc = _associate(scp.port)
    received: list[bytes] = []
    server_side = _server_association(scp)
    server_side.bind(evt.EVT_DATA_RECV, lambda event: received.append(event.data))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    p_data = [chunk for chunk in received if chunk[:1] == b"\x04"]  # then the A-RELEASE-RQ
    assert len(p_data) >= 2  # the command and the data set, each a whole P-DATA-TF PDU
    assert sum(len(chunk) for chunk in p_data) > len(ds.PixelData)
    rows = scp.spool.database.rows("SELECT path FROM instances")
    assert pydicom.dcmread(rows[0]["path"]).PixelData == ds.PixelData


def test_c_store_is_served_in_the_dul_thread(tmp_path: Path) -> None:
    threads: list[object] = []
    spool = Spool(tmp_path, Database(tmp_path / "i.db"))
    server = StorageScp(ScpSettings("SENTINEL", "127.0.0.1", free_port()), spool,
                        on_stored=lambda outcome, ae: threads.append(threading.current_thread()))
    server.start()
    try:
        assoc = _associate(server.port)
        for k in range(3):
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.91.{k + 1}"
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    finally:
        server.stop()
    assert len(threads) == 3 and all(isinstance(thread, EventDrivenDUL) for thread in threads)


class _AbortingScp(StorageScp):
    """Stores, then aborts the association from inside the handler, blocking as pynetdicom's default."""

    dul_threads: list[threading.Thread] = []

    def handle_store(self, event):  # type: ignore[no-untyped-def]
        status = super().handle_store(event)
        self.dul_threads.append(threading.current_thread())
        event.assoc._abort_blocking(True)  # in the DUL thread: must not wait for itself
        return status


def test_a_blocking_abort_from_the_dul_thread_does_not_hang(tmp_path: Path) -> None:
    server = _AbortingScp(ScpSettings("SENTINEL", "127.0.0.1", free_port()), Spool(tmp_path, Database(tmp_path / "i.db")))
    server.start()
    try:
        assoc = _associate(server.port)
        assoc.send_c_store(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
        (dul,) = server.dul_threads
        dul.join(timeout=10)
        assert not dul.is_alive(), "the DUL thread waits for itself"
        deadline = time.monotonic() + 10
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert assoc.is_aborted  # the A-ABORT went out
        again = _associate(server.port)  # the server still answers
        assert again.send_c_echo().Status == 0x0000
        again.release()
    finally:
        server.stop()
    assert len(server.spool.database.rows("SELECT * FROM instances")) == 1


def test_a_connection_closed_before_an_association_request_frees_its_place_at_once(tmp_path: Path) -> None:
    # A TCP health check or port scan connects and closes without a word. Its association
    # thread waited acse_timeout (30 s) for an A-ASSOCIATE-RQ that could no longer come and
    # counted against max_associations meanwhile: 12 such probes made the node refuse
    # modalities ("local limit exceeded") for half a minute.
    import socket

    settings = ScpSettings("SENTINEL", "127.0.0.1", free_port(), max_associations=2, acse_timeout=30.0)
    server = StorageScp(settings, Spool(tmp_path, Database(tmp_path / "i.db")))
    server.start()
    try:
        for _ in range(5):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        assert server._server is not None
        deadline = time.monotonic() + 5
        while server._server.active_associations and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server._server.active_associations == []
        assoc = _associate(server.port)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.stop()
