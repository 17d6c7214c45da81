"""Access control and association limits of the SCP, checked from a real client."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification

from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scp import ScpSettings, StorageScp
from pacs_sentinel.dicom_io.spool import Spool
from tests.conftest import free_port


def _start(tmp_path: Path, **settings: object) -> StorageScp:
    spool = Spool(tmp_path, Database(tmp_path / "index.db"))
    scp = StorageScp(ScpSettings("SENTINEL", "127.0.0.1", free_port(), **settings), spool)  # type: ignore[arg-type]
    scp.start()
    return scp


@pytest.fixture
def start_scp(tmp_path: Path):
    started: list[StorageScp] = []

    def start(**settings: object) -> StorageScp:
        scp = _start(tmp_path, **settings)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def _associate(scp: StorageScp, calling_ae: str, called_ae: str = "SENTINEL"):
    """Associate and return (association, the A-ASSOCIATE response primitive the client got)."""
    responses: list[A_ASSOCIATE] = []

    def keep(event: evt.Event) -> None:
        if isinstance(event.primitive, A_ASSOCIATE) and event.primitive.result is not None:
            responses.append(event.primitive)

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=called_ae, evt_handlers=[(evt.EVT_ACSE_RECV, keep)])
    return assoc, (responses[0] if responses else None)


def _assert_rejected_calling_ae(assoc, response) -> None:
    assert assoc.is_rejected
    # rejected-permanent, by the service user, "calling AE title not recognized"
    assert (response.result, response.result_source, response.diagnostic) == (0x01, 0x01, 0x03)


def test_listed_calling_ae_is_served_and_others_are_rejected(start_scp) -> None:
    scp = start_scp(allowed_peers=(("MODALITY", None), ("PACS", None)))
    for calling_ae in ("MODALITY", "PACS"):
        assoc, _ = _associate(scp, calling_ae)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    assoc, response = _associate(scp, "INTRUDER")
    _assert_rejected_calling_ae(assoc, response)
    # The SCP keeps serving after a rejection.
    assoc, _ = _associate(scp, "MODALITY")
    assert assoc.is_established
    assoc.release()


def test_peer_entry_with_a_host_admits_only_that_host(start_scp) -> None:
    scp = start_scp(allowed_peers=(("MODALITY", "192.0.2.7"), ("LOCALMOD", "localhost"), ("LOOPBACK", "127.0.0.1")))
    assoc, response = _associate(scp, "MODALITY")  # right title, wrong address
    _assert_rejected_calling_ae(assoc, response)
    for calling_ae in ("LOCALMOD", "LOOPBACK"):  # a host name is resolved; an address matches as is
        assoc, _ = _associate(scp, calling_ae)
        assert assoc.is_established, calling_ae
        assoc.release()


def test_empty_allowed_peers_admits_every_caller_of_our_title(start_scp) -> None:
    scp = start_scp()
    assoc, _ = _associate(scp, "ANYONE")
    assert assoc.is_established
    assoc.release()
    assoc, response = _associate(scp, "ANYONE", called_ae="NOTSENTINEL")
    assert assoc.is_rejected
    assert (response.result, response.result_source, response.diagnostic) == (0x01, 0x01, 0x07)


def test_max_pdu_and_association_limit_are_applied(start_scp) -> None:
    scp = start_scp(max_pdu_size=65536, max_associations=1)
    first, _ = _associate(scp, "MODALITY")
    assert first.is_established
    assert first.acceptor.maximum_length == 65536
    second, response = _associate(scp, "MODALITY")
    assert second.is_rejected  # local limit exceeded (transient, presentation related)
    assert (response.result, response.result_source, response.diagnostic) == (0x02, 0x03, 0x02)
    first.release()
