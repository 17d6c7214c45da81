"""The Storage SCP's C-STORE responses, encoded without building a pydicom data set.

pynetdicom encodes every DIMSE message through pydicom: a ``Dataset`` for the command set,
one validated element per field, then ``encode`` twice (once to measure the group length).
For the C-STORE-RSP that the SCP sends once per received instance that costs about as much
as the rest of answering. A C-STORE-RSP's command set is seven fixed elements (PS3.7
9.3.1.2), so :func:`encode_c_store_rsp` writes them directly, implicit VR little endian as
PS3.7 6.3.1 requires; tests compare it with pynetdicom's encoding byte for byte.

:class:`StoreResponseDIMSE` uses it for C-STORE responses that carry only those elements
(no *Error Comment*, no *Offending Element*) when no handler listens to ``EVT_DIMSE_SENT``
(which wants pynetdicom's message object); every other message goes pynetdicom's way.
Written against pynetdicom 3.0.x (``DIMSEServiceProvider.send_msg``).
"""

from __future__ import annotations

import struct

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

#: (0000,0100) Command Field of a C-STORE-RSP; (0000,0800) "no data set".
C_STORE_RSP_COMMAND_FIELD = 0x8001
NO_DATA_SET = 0x0101

#: Message control header of the last (and only) command fragment (PS3.8 E.2).
_LAST_COMMAND_FRAGMENT = b"\x03"
_US = struct.Struct("<HHLH")  # tag group, tag element, length 2, value
_UL = struct.Struct("<HHLL")


def _uid_element(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def encode_c_store_rsp(message_id_being_responded_to: int, status: int, affected_sop_class_uid: str | None,
                       affected_sop_instance_uid: str | None) -> bytes:
    """The command set of a C-STORE-RSP, implicit VR little endian, group length first.

    Raises:
        ValueError: A UID is not plain ASCII, or a number does not fit an unsigned short.
    """
    for name, number in (("message ID", message_id_being_responded_to), ("status", status)):
        if not 0 <= number <= 0xFFFF:
            raise ValueError(f"{name} {number} does not fit an unsigned short")
    elements = b"".join((
        _uid_element(0x0002, affected_sop_class_uid) if affected_sop_class_uid else b"",
        _US.pack(0x0000, 0x0100, 2, C_STORE_RSP_COMMAND_FIELD),
        _US.pack(0x0000, 0x0120, 2, message_id_being_responded_to),
        _US.pack(0x0000, 0x0800, 2, NO_DATA_SET),
        _US.pack(0x0000, 0x0900, 2, status),
        _uid_element(0x1000, affected_sop_instance_uid) if affected_sop_instance_uid else b"",
    ))
    return _UL.pack(0x0000, 0x0000, 4, len(elements)) + elements


class StoreResponseDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with C-STORE responses encoded by :func:`encode_c_store_rsp`."""

    def send_msg(self, primitive, context_id: int) -> None:  # type: ignore[no-untyped-def]
        """Send a DIMSE message; a plain C-STORE-RSP without pydicom (see the module docstring)."""
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode_c_store_rsp(primitive.MessageIDBeingRespondedTo, primitive.Status,
                                         primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID)
            max_pdu = self.maximum_pdu_size
            if not max_pdu or len(command) + 6 <= max_pdu:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


def make_store_response_fast(dimse: DIMSEServiceProvider) -> None:
    """Give an acceptor association's DIMSE provider the fast C-STORE-RSP encoding."""
    if type(dimse) is DIMSEServiceProvider:
        dimse.__class__ = StoreResponseDIMSE
