"""The Storage SCP's C-STORE messages, decoded and encoded without building pydicom data sets.

pynetdicom encodes every DIMSE message through pydicom: a ``Dataset`` for the command set,
one validated element per field, then ``encode`` twice (once to measure the group length).
For the C-STORE-RSP that the SCP sends once per received instance that costs about as much
as the rest of answering. A C-STORE-RSP's command set is seven fixed elements (PS3.7
9.3.1.2), so :func:`encode_c_store_rsp` writes them directly, implicit VR little endian as
PS3.7 6.3.1 requires; tests compare it with pynetdicom's encoding byte for byte.

:class:`StoreResponseDIMSE` uses it for C-STORE responses that carry only those elements
(no *Error Comment*, no *Offending Element*) when no handler listens to ``EVT_DIMSE_SENT``
(which wants pynetdicom's message object); every other message goes pynetdicom's way.
The C-STORE-RQ that brings each instance costs the same the other way: pynetdicom decodes
its command set into a pydicom ``Dataset`` and copies it element by element into the
primitive (~0.1 ms per instance). :func:`decode_c_store_rq` reads the command's few fixed
elements directly (PS3.7 9.3.1.1) and :class:`StoreDIMSE` collects the data set fragments
that follow; any other command, an element it does not know, a value it cannot read, or
a handler listening to ``EVT_DIMSE_RECV`` (which wants pynetdicom's message object) goes
pynetdicom's way. Tests compare the primitives both make.

Written against pynetdicom 3.0.x (``DIMSEServiceProvider.send_msg`` and
``receive_primitive``, ``DIMSEMessage.decode_msg`` and ``message_to_primitive``).
"""

from __future__ import annotations

import struct
from io import BytesIO

import structlog
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

log = structlog.get_logger(__name__)

#: (0000,0100) Command Field of a C-STORE-RQ and of a C-STORE-RSP; (0000,0800) "no data set".
C_STORE_RQ_COMMAND_FIELD = 0x0001
C_STORE_RSP_COMMAND_FIELD = 0x8001
NO_DATA_SET = 0x0101

#: The elements a C-STORE-RQ command set may hold (PS3.7 table 9.3-1), by element number:
#: the primitive's attribute each sets, and its kind ("US", "UI", "AE"; None: checked only).
_C_STORE_RQ_ELEMENTS: dict[int, tuple[str | None, str]] = {
    0x0000: (None, "UL"),  # Command Group Length
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0100: (None, "US"),  # Command Field
    0x0110: ("MessageID", "US"),
    0x0700: ("Priority", "US"),
    0x0800: (None, "US"),  # Command Data Set Type
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
_C_STORE_RQ_REQUIRED = frozenset({0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})
_ELEMENT_HEADER = struct.Struct("<HHL")
_US_VALUE = struct.Struct("<H")

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


def decode_c_store_rq(command: bytes | memoryview) -> C_STORE | None:
    """The C-STORE primitive of a C-STORE-RQ command set that announces a data set.

    ``command`` is the command set, implicit VR little endian. The primitive carries what
    pynetdicom's ``message_to_primitive`` would set (its ``DataSet`` is left to the caller).

    Returns:
        The primitive, or ``None`` when the command is anything else or holds anything this
        reader leaves to pynetdicom (an unknown or repeated element, a value of the wrong
        length or not ASCII, a UID or AE title pynetdicom's setters refuse).
    """
    values: dict[int, memoryview] = {}
    view = memoryview(command)
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(view, offset)
        offset += 8
        if group != 0 or element not in _C_STORE_RQ_ELEMENTS or element in values or offset + length > end:
            return None
        values[element] = view[offset:offset + length]
        offset += length
    if not _C_STORE_RQ_REQUIRED.issubset(values):
        return None
    primitive = C_STORE()
    try:
        for element, value in values.items():
            attribute, kind = _C_STORE_RQ_ELEMENTS[element]
            if kind == "US" or kind == "UL":
                if len(value) != (2 if kind == "US" else 4):
                    return None
                if kind == "UL":
                    continue
                number = _US_VALUE.unpack(value)[0]
                if element == 0x0100 and number != C_STORE_RQ_COMMAND_FIELD:
                    return None
                if element == 0x0800 and number == NO_DATA_SET:
                    return None
                if attribute is not None:
                    setattr(primitive, attribute, number)
                continue
            raw = bytes(value)
            if not raw.isascii() or b"\\" in raw:
                return None  # several values or another character set: pydicom decides
            text = raw.decode("ascii").rstrip("\0 ") if kind == "UI" else raw.decode("ascii").strip()
            setattr(primitive, attribute, text)  # type: ignore[arg-type]
    except (ValueError, TypeError):  # pynetdicom's setters refuse the value: let pynetdicom report it
        return None
    return primitive


class StoreDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with C-STORE requests decoded by :func:`decode_c_store_rq`
    and C-STORE responses encoded by :func:`encode_c_store_rsp`."""

    _store_request: C_STORE | None = None
    _store_data_set: BytesIO | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Collect a C-STORE-RQ without pydicom; every other message goes pynetdicom's way.

        Mirrors pynetdicom's ``receive_primitive`` for a C-STORE-RQ: the data set fragments
        are appended in order, and the complete request goes to the DIMSE message queue
        (where the SCP serves it). A command fragment arriving inside a data set breaks
        PS3.8 E.2 and aborts the association.
        """
        items = primitive.presentation_data_value_list
        request = self._store_request
        if request is None:
            if (
                self.message is not None
                or not items
                or items[0][1][0] & 0x03 != 0x03  # not a whole command set in the first PDV
                or self.assoc.get_handlers(evt.EVT_DIMSE_RECV)
            ):
                super().receive_primitive(primitive)
                return
            context_id, fragment = items[0]
            request = decode_c_store_rq(memoryview(fragment)[1:])
            if request is None:
                super().receive_primitive(primitive)
                return
            request._context_id = context_id
            self._store_request, self._store_data_set = request, BytesIO()
            items = items[1:]
        data_set = self._store_data_set
        assert data_set is not None
        for _, fragment in items:
            control = fragment[0]
            if control & 0x01:
                log.error("command fragment inside a C-STORE data set; aborting the association")
                self._store_request = self._store_data_set = None
                self.dul.event_queue.put("Evt19")
                return
            data_set.write(memoryview(fragment)[1:])
            if control & 0x02:  # the last fragment; pynetdicom ignores PDVs after it as well
                self._store_request = self._store_data_set = None
                request.DataSet = data_set
                self.msg_queue.put((request._context_id, request))
                return

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


def make_store_fast(dimse: DIMSEServiceProvider) -> None:
    """Give an acceptor association's DIMSE provider the C-STORE-RQ decoding and C-STORE-RSP encoding above."""
    if type(dimse) is DIMSEServiceProvider:
        dimse.__class__ = StoreDIMSE
