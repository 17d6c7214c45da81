"""The Storage SCP's upper layer (DUL) thread: wait for work instead of polling, copy less.

pynetdicom 3 runs one DUL thread per association (``DULServiceProvider.run_reactor``). It
polls: every loop sleeps ``_run_loop_delay``, then looks at its queues and at the socket
(``select`` with timeout 0). Two costs land on every instance the SCP receives:

- **polling.** While the C-STORE handler works (the sender waits for our answer, there is
  nothing to read) the DUL thread wakes thousands of times a second, and each wake takes
  the GIL from the handler at the next point where the handler lets go of it (every file
  and SQLite call): the two threads hand the GIL back and forth instead of storing.
- **copies.** pynetdicom copies each P-DATA-TF PDU five times before its data reach the
  DIMSE message (``bytestream +=``, ``bytes()`` for ``EVT_DATA_RECV``, the PDV items,
  ``data[1:]``, the message buffer): about 2.5 MB of copying per 512x512 CT image.

:class:`EventDrivenDUL`, for the SCP's acceptor associations only:

- blocks in ``select`` on the association's socket and on a wake-up socket pair, which
  :meth:`~EventDrivenDUL.send_pdu`, :meth:`~EventDrivenDUL.kill_dul` and
  :meth:`~EventDrivenDUL.stop_dul` (the only ways other threads give the DUL work) write
  to; a timeout of :data:`DUL_WAIT_S` keeps pynetdicom's timers (ARTIM) working;
- reads a P-DATA-TF PDU with one ``recv`` into its own buffer and hands the PDVs on as
  ``memoryview`` slices of it, so the data are copied once, into the DIMSE message, when
  nobody listens to ``EVT_DATA_RECV`` and only pynetdicom's own logging handler (which logs
  nothing for P-DATA) to ``EVT_PDU_RECV``. Otherwise, and for every other PDU type,
  pynetdicom's own decoding runs.

A connection closed before its A-ASSOCIATE-RQ ends its association thread at once (pynetdicom
lets it wait ``acse_timeout``, holding a place of ``max_associations``).

Everything else (the state machine, the events, the abort on an exception) is pynetdicom's,
written against pynetdicom 3.0.x (``DULServiceProvider.run_reactor``, ``_read_pdu_data``).
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from pynetdicom import evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.utils import make_target

log = structlog.get_logger(__name__)

#: The longest the DUL thread waits for the socket or a wake-up before it looks at its
#: timers again (pynetdicom's own loop looks every ``_run_loop_delay``, 1 ms).
DUL_WAIT_S = 0.01

_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LB")
_P_DATA_TF = 0x04
_PDU_TYPES = range(0x01, 0x08)


class ReceivedPData:
    """A received P-DATA-TF PDU whose PDVs are views into the received bytes.

    Stands in for pynetdicom's ``P_DATA_TF`` on the DUL's receive queue: the state
    machine (``DT_2``) only asks it for :meth:`to_primitive`.
    """

    __slots__ = ("items",)

    def __init__(self, body: bytearray) -> None:
        """Split the PDU's variable field (after the 6-byte header) into PDVs.

        Raises:
            ValueError: The PDV items do not add up to the PDU's length.
        """
        view = memoryview(body)
        items: list[tuple[int, memoryview]] = []
        offset, end = 0, len(body)
        while offset < end:
            if end - offset < 6:
                raise ValueError("truncated presentation data value item")
            item_length, context_id = _PDV_HEADER.unpack_from(body, offset)
            if item_length < 2 or offset + 4 + item_length > end:
                raise ValueError(f"presentation data value item length {item_length} does not fit the PDU")
            items.append((context_id, view[offset + 5:offset + 4 + item_length]))
            offset += 4 + item_length
        if not items:
            raise ValueError("P-DATA-TF PDU without presentation data value items")
        self.items = items

    def to_primitive(self) -> P_DATA:
        """The P-DATA primitive, as ``P_DATA_TF.to_primitive`` makes it."""
        primitive = P_DATA()
        # Appended, as pynetdicom does: its setter accepts only [int, bytes] lists.
        primitive.presentation_data_value_list = []
        primitive.presentation_data_value_list.extend(self.items)  # type: ignore[arg-type]
        return primitive


class EventDrivenDUL(DULServiceProvider):
    """A DUL service provider whose thread waits on its socket and a wake-up pair.

    Made from pynetdicom's own provider by :func:`make_event_driven`, before its thread starts.
    """

    _wake_r: socket.socket
    _wake_w: socket.socket
    _loop: Callable[[], None]

    def run(self) -> None:
        """The thread's body: this class's loop (the target pynetdicom bound is the old one)."""
        self._loop()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # a wake-up is already pending (buffer full), or the loop has ended
            pass

    def send_pdu(self, primitive: Any) -> None:
        """Queue a primitive for the peer and wake the DUL thread to send it."""
        super().send_pdu(primitive)
        if threading.current_thread() is not self:  # the DUL thread itself looks again anyway
            self._wake()

    def kill_dul(self) -> None:
        """Stop the DUL thread (it wakes at once)."""
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        """pynetdicom's ``stop_dul``, waking the thread instead of letting it find out."""
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
            while self.is_alive():
                time.sleep(self._run_loop_delay)
            return True
        return False

    def _standard_p_data_events(self) -> bool:
        """True when receiving P-DATA needs no PDU object: nobody else listens."""
        if self.assoc.get_handlers(evt.EVT_DATA_RECV):
            return False
        return all(handler is standard_pdu_recv_handler for handler, _ in self.assoc.get_handlers(evt.EVT_PDU_RECV))

    def _read_pdu_data(self) -> None:
        """Read one PDU; a P-DATA-TF without extra copies (see the module docstring)."""
        if not self._standard_p_data_events():
            super()._read_pdu_data()
            return
        sock = self.socket
        assert sock is not None
        try:
            header = sock.recv(6)
            pdu_type, _, pdu_length = _HEADER.unpack(header)
        except (OSError, TimeoutError, struct.error):
            self.event_queue.put("Evt17")  # connection closed (pynetdicom logs nothing either)
            return
        if pdu_type not in _PDU_TYPES:
            log.error("unknown PDU type received", pdu_type=f"0x{pdu_type:02X}")
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError):
            body = bytearray()
        if len(body) != pdu_length:
            log.error("connection closed before the entire PDU was received", received=len(body), expected=pdu_length)
            self.event_queue.put("Evt17")
            return
        try:
            if pdu_type == _P_DATA_TF:
                pdu: Any = ReceivedPData(body)
                event = "Evt10"
            else:
                pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception as exc:
            log.error("unable to decode the received PDU", error=str(exc))
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _wait_for_work(self) -> None:
        """Block until the socket is readable, another thread woke us, or DUL_WAIT_S passed."""
        transport = self.socket
        sock = transport.socket if transport is not None else None
        try:
            if sock is None or sock.fileno() < 0:
                raise ValueError("no socket")
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes wait in the TLS buffer, which select cannot see
            readable, _, _ = select.select([sock, self._wake_r], [], [], DUL_WAIT_S)
        except (OSError, ValueError):
            time.sleep(self._run_loop_delay)  # no usable socket: the state machine winds down
            return
        if self._wake_r in readable:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:  # drained
                pass

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop, waiting in :meth:`_wait_for_work` instead of sleeping."""
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    log.exception("exception in the DUL thread, aborting the association")
                    # As pynetdicom does: bypass the state machine and send an A-ABORT.
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    if self.socket is not None:
                        self.socket.send(abort_pdu.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    self._wait_for_work()
                    continue
                awaiting_request = self.state_machine.current_state == "Sta2"
                self.state_machine.do_action(event)
                if awaiting_request and event == "Evt17":
                    # The peer closed the connection before asking for an association (a TCP
                    # health check, a port scan): no A-ASSOCIATE-RQ can come any more. The
                    # association thread waits for one for acse_timeout, counted against
                    # max_associations; None is what it gets when that wait times out.
                    self.to_user_queue.put(None)  # type: ignore[arg-type]
        finally:
            self._wake_r.close()
            self._wake_w.close()


def make_event_driven(dul: DULServiceProvider) -> EventDrivenDUL:
    """Turn a not yet started pynetdicom DUL provider into an :class:`EventDrivenDUL`."""
    if dul.is_alive():
        raise RuntimeError("the DUL thread already runs")
    dul.__class__ = EventDrivenDUL
    assert isinstance(dul, EventDrivenDUL)
    # pynetdicom bound the thread's target to its own run_reactor when it made the provider.
    dul._loop = make_target(dul.run_reactor)
    dul._wake_r, dul._wake_w = socket.socketpair()
    dul._wake_r.setblocking(False)
    dul._wake_w.setblocking(False)
    return dul
