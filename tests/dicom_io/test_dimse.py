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
