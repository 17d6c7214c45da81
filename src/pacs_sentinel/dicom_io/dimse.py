"""The Storage SCP's DIMSE provider: C-STORE data sets spooled as they arrive, responses fast.

pynetdicom encodes every DIMSE message through pydicom: a ``Dataset`` for the command set,
one validated element per field, then ``encode`` twice (once to measure the group length).
For the C-STORE-RSP that the SCP sends once per received instance that costs about as much
as the rest of answering. A C-STORE-RSP's command set is seven fixed elements (PS3.7
9.3.1.2), so :func:`encode_c_store_rsp` writes them directly, implicit VR little endian as
PS3.7 6.3.1 requires; tests compare it with pynetdicom's encoding byte for byte.

:class:`StoreResponseDIMSE` uses it for C-STORE responses that carry only those elements
(no *Error Comment*, no *Offending Element*) when no handler listens to ``EVT_DIMSE_SENT``
(which wants pynetdicom's message object); every other message goes pynetdicom's way.

It also hands each fragment of a C-STORE request's data set, as it arrives, to a
:class:`DataSetSink` (the spool's file for it, made by the SCP's ``open_data_set_file``
once the command set is in) besides pynetdicom's in-memory buffer: the file is written
while the rest of the data set is still on the wire. The sink travels with the data set
(:class:`SpooledDataSet`, the request's ``DataSet``) to the C-STORE handler, which uses
or discards it; a data set the association never completes is discarded when the
association's DUL thread ends (:meth:`AcceptorDIMSE.abandon_message`).

Written against pynetdicom 3.0.x (``DIMSEServiceProvider.send_msg``, ``receive_primitive``,
``DIMSEMessage.decode_msg``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from io import BytesIO
from typing import Any, Protocol

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
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


class DataSetSink(Protocol):
    """Where the fragments of a C-STORE request's data set go while they arrive."""

    def write(self, fragment: bytes | memoryview) -> None:
        """Take the next fragment (in order; never raises)."""

    def discard(self) -> None:
        """Drop what was written (nothing happens once the sink was used or dropped)."""


#: Makes the sink of a C-STORE request whose command set is in: (association, presentation
#: context ID, command set) -> sink, or ``None`` to keep the data set in memory only.
OpenDataSetFile = Callable[[Association, int, Dataset], "DataSetSink | None"]


class SpooledDataSet(BytesIO):
    """A C-STORE request's data set buffer that also hands every fragment to :attr:`sink`."""

    sink: DataSetSink

    def write(self, fragment: Any) -> int:
        written = super().write(fragment)
        self.sink.write(fragment)
        return written


class AcceptorDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, spooling C-STORE data sets and answering them fast."""

    open_data_set_file: OpenDataSetFile | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        """pynetdicom's ``receive_primitive``, first giving a C-STORE data set its sink.

        pynetdicom turns the message into a C-STORE-RQ as soon as its command set is
        complete; the data set's fragments follow in later P-DATA primitives. A data set
        whose first fragment came with the command set stays in memory only.
        """
        message = self.message
        if (
            self.open_data_set_file is not None
            and type(message) is C_STORE_RQ
            and type(message.data_set) is BytesIO
            and message._data_set_file is None
            and not message.data_set.tell()
        ):
            sink = self.open_data_set_file(self.assoc, message.context_id, message.command_set)
            if sink is not None:
                spooled = SpooledDataSet()
                spooled.sink = sink
                message.data_set = spooled
        super().receive_primitive(primitive)

    def abandon_message(self) -> None:
        """Discard the sink of a data set that will not be completed (the association ended)."""
        message, self.message = self.message, None
        data_set = getattr(message, "data_set", None)
        if isinstance(data_set, SpooledDataSet):
            data_set.sink.discard()

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


def make_acceptor_dimse(dimse: DIMSEServiceProvider, open_data_set_file: OpenDataSetFile | None = None) -> None:
    """Give an acceptor association's DIMSE provider the fast C-STORE-RSP encoding and,
    with ``open_data_set_file``, C-STORE data sets written while they arrive."""
    if type(dimse) is DIMSEServiceProvider:
        dimse.__class__ = AcceptorDIMSE
        assert isinstance(dimse, AcceptorDIMSE)
        dimse.open_data_set_file = open_data_set_file
