"""The storage SCU against a real SCP."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ParametricMapStorage

from pacs_sentinel.dicom_io.scp import StorageScp
from pacs_sentinel.dicom_io.scu import Peer, echo, send_files
from pacs_sentinel.errors import DeliveryError
from tests.conftest import free_port, unencodable_ct


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


def test_a_truncated_file_is_not_sent_as_if_whole(pacs: StorageScp, tmp_path: Path) -> None:
    """pydicom reads MR_truncated.dcm (its pixel data 62 bytes short) and would re-encode the
    shorter value: the peer would store a damaged image as a good one."""
    truncated = Path(get_testdata_file("MR_truncated.dcm"))
    good = Path(get_testdata_file("CT_small.dcm"))
    results = send_files([truncated, good], Peer("PACS", "127.0.0.1", pacs.port))
    assert [r.delivered for r in results] == [False, True]
    assert "truncated data set" in results[0].error and str(truncated) in results[0].error
    assert len(list(pacs.spool.database.connection()["instances"].rows)) == 1


def test_a_data_set_that_cannot_be_encoded_is_a_permanent_failure(pacs: StorageScp, tmp_path: Path) -> None:
    """No retry can encode it, so the outbox gives it up at once; the others still go."""
    bad = unencodable_ct(tmp_path / "bad.dcm")
    good = Path(get_testdata_file("CT_small.dcm"))
    results = send_files([bad, good], Peer("PACS", "127.0.0.1", pacs.port))
    assert [r.delivered for r in results] == [False, True]
    assert results[0].permanent and results[0].error.startswith("cannot encode the data set: ")
    assert "\n" not in results[0].error

def test_refused_association_raises_delivery_error(pacs: StorageScp) -> None:
    with pytest.raises(DeliveryError, match="rejected"):
        send_files([Path(get_testdata_file("CT_small.dcm"))], Peer("WRONGAE", "127.0.0.1", pacs.port))


def test_a_host_that_does_not_resolve_or_a_closed_port_is_a_delivery_error_that_says_so() -> None:
    """Not a socket.gaierror traceback, and not "association ... aborted" for a refused connection."""
    ct = [Path(get_testdata_file("CT_small.dcm"))]
    with pytest.raises(DeliveryError) as raised:
        send_files(ct, Peer("PACS", "no.such.host.invalid", 104))
    assert str(raised.value).startswith("could not connect to no.such.host.invalid:104 (cannot resolve the host name: ")
    assert not raised.value.permanent  # the name server may be back at the next attempt
    port = free_port()
    with pytest.raises(DeliveryError) as raised:
        send_files(ct, Peer("PACS", "127.0.0.1", port))
    assert str(raised.value) == f"could not connect to 127.0.0.1:{port} (connection refused)"
    assert not raised.value.permanent


def test_an_echo_to_a_closed_port_says_the_connection_was_refused() -> None:
    """What `sentinel status` shows for a destination that is down."""
    port = free_port()
    result = echo(Peer("PACS", "127.0.0.1", port), timeout=2.0)
    assert not result.ok and result.error == f"could not connect to 127.0.0.1:{port} (connection refused)"


def _parametric_map_file(tmp_path: Path) -> Path:
    """CT_small relabelled as Parametric Map Storage, a SOP class the SCP does not accept."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ParametricMapStorage
    path = tmp_path / "pmap.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_sop_class_the_peer_refuses_is_named_in_the_error(pacs: StorageScp, tmp_path: Path) -> None:
    refused = _parametric_map_file(tmp_path)
    good = Path(get_testdata_file("CT_small.dcm"))
    results = send_files([refused, good], Peer("PACS", "127.0.0.1", pacs.port))
    assert [r.delivered for r in results] == [False, True]
    assert results[0].error == f"PACS does not accept Parametric Map Storage ({ParametricMapStorage}): abstract syntax not supported"


def test_association_aborted_for_refused_sop_classes_says_which(pacs: StorageScp, tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as raised:
        send_files([_parametric_map_file(tmp_path)], Peer("PACS", "127.0.0.1", pacs.port))
    assert str(raised.value) == (
        f"association with PACS@127.0.0.1:{pacs.port} aborted: it accepted none of the proposed presentation contexts "
        f"(Parametric Map Storage ({ParametricMapStorage}): abstract syntax not supported)"
    )


def _inject_store_response(assoc) -> object:  # type: ignore[no-untyped-def]
    """Put a C-STORE-RSP on the association's DIMSE queue, as the DUL does when one arrives."""
    from pynetdicom.dimse_primitives import C_STORE

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = "1.2.3.4"
    rsp.Status = 0x0000
    assoc.dimse.msg_queue.put((1, rsp))
    return rsp


@pytest.mark.parametrize("response_safe", [True, False])
def test_the_scu_reactor_leaves_a_response_to_the_call_waiting_for_it(pacs: StorageScp, response_safe: bool) -> None:
    """A response that arrives while the reactor runs stays queued for the send_*() call.

    pynetdicom's own requestor reactor takes it (the race behind "Received unexpected C-STORE
    service message" and a DIMSE timeout); the SCU's associations never do.
    """
    import time

    from pynetdicom import AE

    from pacs_sentinel.dicom_io.reactor import ResponseSafeRequestor
    from pacs_sentinel.dicom_io.scu import NODELAY_HANDLERS

    ae = AE(ae_title="SENTINEL")
    ae.add_requested_context("1.2.840.10008.1.1")
    handlers = NODELAY_HANDLERS if response_safe else []
    assoc = ae.associate("127.0.0.1", pacs.port, ae_title="PACS", evt_handlers=handlers)
    assert assoc.is_established
    try:
        assert (type(assoc) is ResponseSafeRequestor) is response_safe
        rsp = _inject_store_response(assoc)
        time.sleep(0.05)  # 50 reactor loops
        _, queued = assoc.dimse.peek_msg()
        if response_safe:
            assert queued is rsp
            assert assoc.dimse.get_msg(block=False)[1] is rsp
        else:
            assert queued is None  # pynetdicom's reactor took it: no send_*() would ever see it
        assert assoc.send_c_echo().Status == 0x0000  # and the association still works
    finally:
        assoc.release()
