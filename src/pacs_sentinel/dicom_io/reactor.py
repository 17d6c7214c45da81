"""The two places where the node changes how a pynetdicom association's reactor loop works.

pynetdicom 3 runs one reactor thread per association. It takes every complete DIMSE message
off the association's queue and serves it as a request, unless a ``send_*()`` call paused it
first. Two changes, both written against pynetdicom 3.0.x (``Association._run_reactor``):

- :class:`EventDrivenAcceptor`, for the Storage SCP's own associations: the reactor blocks
  on the DIMSE queue instead of sleeping 1 ms before every look (see
  :mod:`pacs_sentinel.dicom_io.scp` for what that buys);
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
import time
from typing import Any

import structlog
from pynetdicom import evt
from pynetdicom.association import Association

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


class EventDrivenAcceptor(Association):
    """An acceptor association whose reactor blocks on the DIMSE queue instead of polling."""

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
