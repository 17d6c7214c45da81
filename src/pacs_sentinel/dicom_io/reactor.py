"""The two places where the node changes how a pynetdicom association's reactor loop works.

pynetdicom 3 runs one reactor thread per association. It takes every complete DIMSE message
off the association's queue and serves it as a request, unless a ``send_*()`` call paused it
first. Two changes, both written against pynetdicom 3.0.x (``Association._run_reactor``,
``_serve_request``, ``_abort_blocking``):

- :class:`EventDrivenAcceptor`, for the Storage SCP's own associations: the reactor blocks
  on the DIMSE queue instead of sleeping 1 ms before every look (see
  :mod:`pacs_sentinel.dicom_io.scp` for what that buys), and C-STORE and C-ECHO requests
  do not travel through that queue at all: :class:`InlineRequestQueue` serves them in the
  DUL thread that completed them. Each hand-over between the two threads (a condition
  variable, then the wake-up of the DUL thread to send the answer) costs a trip through the
  scheduler and the GIL per instance, and the sender waits for the answer anyway: it sends
  nothing the DUL thread could read meanwhile. Other requests, and any request while
  another waits in the queue, go to the reactor as before. An abort asked for from the DUL
  thread does not wait for the DUL thread to stop (it would wait for itself);
- :class:`ResponseSafeRequestor`, for the SCU's associations: the reactor never takes a
  *response* off the queue. pynetdicom's pause handshake has a window: ``send_c_store``
  clears the checkpoint and waits for ``_is_paused``, which the reactor sets *before* it
  passes the checkpoint; a reactor that has just passed it still reads the queue once more.
  When the peer answers within that window — likely on a loaded machine — the reactor takes
  the C-STORE-RSP, logs "Received unexpected C-STORE service message", and the sender
  waits for a response that never comes until the DIMSE timeout aborts the association
  (seen in the demo while other work loaded both cores; pynetdicom issue #875 reports the
  same for C-FIND). A response belongs to the ``send_*()`` call waiting for it, so it is
  left where that call looks.

Everything else in both loops (release, abort, DUL alive, network timeout) is pynetdicom's
logic, in :func:`_housekeeping`.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import structlog
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

log = structlog.get_logger(__name__)

#: The acceptor reactor's longest wait for a DIMSE message before it checks for release,
#: abort and the network timeout (pynetdicom's own loop checks them every 1 ms).
REACTOR_WAIT_S = 0.005
#: The requestor reactor's sleep between looks, pynetdicom's own value.
REQUESTOR_SLEEP_S = 0.001


def _housekeeping(assoc: Association) -> bool:
    """pynetdicom's end-of-loop checks; True when the association is over."""
    if assoc.is_established and assoc.acse.is_release_requested():
        assoc.acse.send_release(is_response=True)
        assoc.is_released = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_RELEASED, {})
        assoc.kill()
        return True
    if assoc.acse.is_aborted():
        assoc.dul.receive_pdu(wait=False)  # fires EVT_ACSE_RECV for subscribers
        assoc.is_aborted = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_ABORTED, {})
        assoc.kill()
        return True
    if not assoc.dul.is_alive():
        assoc.kill()
        return True
    if assoc.dul.idle_timer_expired():
        log.warning("network timeout reached, aborting association")
        assoc.abort()
        assoc.kill()
        return True
    return False


#: Requests the DUL thread serves itself (their handlers never send on the association).
INLINE_REQUESTS = (C_STORE, C_ECHO)


class InlineRequestQueue(queue.Queue):  # type: ignore[type-arg]
    """An acceptor's DIMSE message queue that serves C-STORE and C-ECHO requests on arrival.

    ``DIMSEServiceProvider.receive_primitive`` puts each complete message here, in the DUL
    thread. A C-STORE or C-ECHO request on an accepted context of an established association
    is served right there when nothing is queued before it; everything else is queued for
    the reactor thread, as pynetdicom does.
    """

    assoc: Association

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, primitive = item
        assoc = self.assoc
        if (
            type(primitive) in INLINE_REQUESTS
            and primitive.is_valid_request
            and assoc.is_established
            and not assoc._sent_release
            and context_id in assoc._accepted_cx
            and threading.current_thread() is assoc.dul
            and self.empty()
        ):
            assoc._serve_request(primitive, context_id)
            return
        super().put(item, block, timeout)


class EventDrivenAcceptor(Association):
    """An acceptor association whose reactor blocks on the DIMSE queue instead of polling.

    Made from pynetdicom's association by :func:`make_event_driven_acceptor`.
    """

    def _abort_blocking(self, block: bool = True) -> None:
        # Waiting for the DUL thread to stop, in the DUL thread, would never end.
        super()._abort_blocking(block and threading.current_thread() is not self.dul)

    def _run_reactor(self) -> None:
        self._is_paused = False
        msg_queue: queue.Queue[Any] = self.dimse.msg_queue
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = msg_queue.get(timeout=REACTOR_WAIT_S)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, context_id)
            if _housekeeping(self):
                return


def make_event_driven_acceptor(assoc: Association) -> EventDrivenAcceptor:
    """Turn a new (not yet started) acceptor association into an :class:`EventDrivenAcceptor`."""
    if assoc.is_alive() or not assoc.is_acceptor:
        raise RuntimeError("only a new acceptor association can be made event driven")
    assoc.__class__ = EventDrivenAcceptor
    assert isinstance(assoc, EventDrivenAcceptor)
    messages = assoc.dimse.msg_queue
    messages.__class__ = InlineRequestQueue
    assert isinstance(messages, InlineRequestQueue)
    messages.assoc = assoc
    return assoc


class ResponseSafeRequestor(Association):
    """A requestor association whose reactor leaves DIMSE responses to the call awaiting them."""

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            time.sleep(REQUESTOR_SLEEP_S)
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.peek_msg()
            if msg is not None and msg.is_valid_request:
                context_id, msg = self.dimse.get_msg(block=False)
                if msg is not None:
                    self._serve_request(msg, context_id)
            if _housekeeping(self):
                return


def make_response_safe(assoc: Association) -> None:
    """Give a requestor association the response-safe reactor (before it is established).

    Called from the SCU's ``EVT_CONN_OPEN`` handler: the connection opens before the
    association is negotiated, and the reactor loop is looked up only after that.
    """
    if type(assoc) is Association and assoc.is_requestor:
        assoc.__class__ = ResponseSafeRequestor
