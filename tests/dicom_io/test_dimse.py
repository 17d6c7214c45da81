"""C-STORE responses encoded by hand are what pynetdicom encodes, and reach a real client."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from pacs_sentinel.dicom_io.dimse import encode_c_store_rsp

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _pynetdicom_encoding(message_id: int, status: int, sop_class: str | None, sop_instance: str | None) -> bytes:
    rsp = C_STORE()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = message_id
    rsp.Status = status
    if sop_class is not None:
        rsp.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        rsp.AffectedSOPInstanceUID = sop_instance
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = message.encode_msg(1, 16384)
    (_, fragment), = pdata.presentation_data_value_list
    assert fragment[:1] == b"\x03"  # the last (and only) command fragment
    return fragment[1:]


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC210])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498." + "1" * 37])
def test_c_store_rsp_encoding_is_pynetdicoms(status: int, sop_instance: str) -> None:
    ours = encode_c_store_rsp(65535, status, CT_IMAGE_STORAGE, sop_instance)
    assert ours == _pynetdicom_encoding(65535, status, CT_IMAGE_STORAGE, sop_instance)


def test_c_store_rsp_without_uids_and_bad_numbers() -> None:
    assert encode_c_store_rsp(3, 0, None, None) == _pynetdicom_encoding(3, 0, None, None)
    with pytest.raises(ValueError, match="status"):
        encode_c_store_rsp(1, 0x10000, CT_IMAGE_STORAGE, "1.2.3")


# --------------------------------------------------------------------------- C-STORE-RQ decoding


def _c_store_rq_pdvs(*, priority: int = 0, sop_instance: str = "1.2.3.4", move_originator: str | None = None,
                     move_message_id: int | None = None) -> list:
    """The P-DATA primitives pynetdicom sends for a C-STORE-RQ with a small data set."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ

    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = priority
    if move_originator is not None:
        request.MoveOriginatorApplicationEntityTitle = move_originator
    if move_message_id is not None:
        request.MoveOriginatorMessageID = move_message_id
    request.DataSet = BytesIO(b"\x08\x00\x16\x00\x02\x00\x00\x00\x31\x00" * 3)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(1, 16))  # a small PDU size: the data set in several fragments


def _command_set(pdatas: list) -> bytes:
    return b"".join(bytes(fragment[1:]) for pdata in pdatas for _, fragment in pdata.presentation_data_value_list
                    if fragment[0] & 1)


def _pynetdicom_primitive(pdatas: list) -> C_STORE:
    from pynetdicom.dimse_messages import DIMSEMessage

    message = DIMSEMessage()
    for pdata in pdatas:
        if message.decode_msg(pdata):
            return message.message_to_primitive()
    raise AssertionError("incomplete message")


_FIELDS = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
           "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID")


@pytest.mark.parametrize("kwargs", [
    {},
    {"priority": 2, "sop_instance": "1.2.3.45"},
    {"move_originator": "MOVER", "move_message_id": 3},
    {"sop_instance": "1.2.826.0.1.3680043.8.498." + "1" * 37, "priority": 1},
])
def test_c_store_rq_decoding_gives_pynetdicoms_primitive(kwargs: dict) -> None:
    from pacs_sentinel.dicom_io.dimse import decode_c_store_rq

    pdatas = _c_store_rq_pdvs(**kwargs)
    command = _command_set(pdatas)
    ours, theirs = decode_c_store_rq(command), _pynetdicom_primitive(pdatas)
    assert ours is not None
    assert {f: getattr(ours, f) for f in _FIELDS} == {f: getattr(theirs, f) for f in _FIELDS}


def test_other_commands_and_unusual_c_store_rqs_are_left_to_pynetdicom() -> None:
    import struct

    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO

    from pacs_sentinel.dicom_io.dimse import decode_c_store_rq

    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    (pdata,) = message.encode_msg(1, 0)
    assert decode_c_store_rq(pdata.presentation_data_value_list[0][1][1:]) is None
    command = _command_set(_c_store_rq_pdvs())
    assert decode_c_store_rq(command) is not None
    assert decode_c_store_rq(command + struct.pack("<HHL", 0x0000, 0x0600, 2) + b"\x00\x00") is None  # unknown element
    assert decode_c_store_rq(command[:-3]) is None  # cut short
    no_data_set = command.replace(struct.pack("<HHLH", 0, 0x0800, 2, 0x0001), struct.pack("<HHLH", 0, 0x0800, 2, 0x0101))
    assert no_data_set != command and decode_c_store_rq(no_data_set) is None
    bad_priority = command.replace(struct.pack("<HHLH", 0, 0x0700, 2, 0), struct.pack("<HHLH", 0, 0x0700, 2, 9))
    assert bad_priority != command and decode_c_store_rq(bad_priority) is None


def test_the_scp_decodes_c_store_requests_itself(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real client's C-STORE-RQ takes the fast path, and the instance is stored as usual."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    import pacs_sentinel.dicom_io.dimse as dimse_module
    from pacs_sentinel.dicom_io.index import Database
    from pacs_sentinel.dicom_io.scp import ScpSettings, StorageScp
    from pacs_sentinel.dicom_io.spool import Spool
    from tests.conftest import free_port

    decoded = []
    real = dimse_module.decode_c_store_rq
    monkeypatch.setattr(dimse_module, "decode_c_store_rq", lambda command: decoded.append(real(command)) or decoded[-1])
    spool = Spool(tmp_path, Database(tmp_path / "index.db"))
    scp = StorageScp(ScpSettings("SENTINEL", "127.0.0.1", free_port()), spool)
    scp.start()
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        ae.maximum_pdu_size = 4096  # the data set in many fragments
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SENTINEL", max_pdu=4096)
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    finally:
        scp.stop()
    assert len(decoded) == 1 and decoded[0] is not None
    (path,) = [row[0] for row in spool.database.connection().execute("SELECT path FROM instances")]
    assert pydicom.dcmread(path) == ds
