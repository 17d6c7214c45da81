"""The storage and verification SCP: receive instances, persist, index, then answer.

The C-STORE handler runs inside the association, so it only persists and indexes: no
inference, no network calls. It answers 0x0000 only once the instance is on disk and
indexed; every failure has its own status so the sender knows to keep its copy:

- 0x0000 success, also for an exact duplicate of a stored instance (stored once);
- 0xA700 out of resources: free disk under the data folder below ``min_free_disk_mb``, or
  the file could not be written or indexed;
- 0xA900 the data set's SOP Class UID differs from the presentation context's, or its SOP
  Instance UID from the request's Affected SOP Instance UID;
- 0xC210 cannot understand: the data set cannot be decoded, is truncated (something runs past
  its end: :func:`~pacs_sentinel.dicom_io.spool.read_instance_info`) or lacks a valid UID.

Associations are refused at association time (A-ASSOCIATE-RJ, rejected-permanent,
service-user) when the called AE title is not ours (reason 7) or, with a non-empty
``allowed_peers``, when the calling AE title (and host, where the entry names one) is not
in the list (reason 3). With ``tls`` the listener speaks DICOM over TLS only.

:class:`StorageScp` serves in background threads of the current process.
:class:`Receiver` runs one :class:`StorageScp` in-process, or several listener processes
sharing one listening socket, each writing the spool and the index itself: one Python
process holds one GIL, and on these machines two listener processes receive markedly more
instances per second over parallel associations (docs/benchmarks.md). The listeners keep
the associations balanced (:class:`AcceptBalance`): a listener accepts a new association
only while it serves no more than any other, so four associations land two and two on two
listeners, where ``SO_REUSEPORT``'s hash of the caller's port put three or four on one
listener in 10 of 16 cases.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import multiprocessing.connection
import os
import select
import shutil
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import structlog
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import (AE, ALL_TRANSFER_SYNTAXES, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION,
                        evt)
from pynetdicom.association import Association
from pynetdicom._handlers import standard_dimse_recv_handler, standard_dimse_sent_handler
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, StoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from pacs_sentinel.dicom_io.dimse import make_store_fast
from pacs_sentinel.dicom_io.dul import make_event_driven
from pacs_sentinel.dicom_io.index import Database, Synchronous
from pacs_sentinel.dicom_io.reactor import make_event_driven_acceptor
from pacs_sentinel.dicom_io.spool import Spool, StoreOutcome, read_instance_info
from pacs_sentinel.errors import DecodeError, SentinelError, StorageError

log = structlog.get_logger(__name__)
_PYNETDICOM_LOG = logging.getLogger("pynetdicom")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

#: A-ASSOCIATE-RJ fields: result rejected-permanent, source service-user, reason.
REJECT_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE_NOT_RECOGNIZED = 0x01, 0x01, 0x03

#: Transfer syntaxes accepted, in order of preference when a sender offers several:
#: explicit VR first (it keeps the value representations of private attributes).
ACCEPTED_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian] + [ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian]

#: How long a free-disk measurement is trusted (seconds): ``disk_usage`` is a system call
#: per instance otherwise, and a second's worth of instances cannot fill a disk unnoticed
#: when the threshold is the usual gigabyte.
DISK_CHECK_INTERVAL_S = 1.0

#: How often a listener process checks that the process that started it is still alive.
PARENT_CHECK_INTERVAL_S = 1.0

#: Pending connections on the listening socket shared by listener processes.
LISTEN_BACKLOG = 64

#: How long a listener that serves more associations than another leaves a new caller to
#: the other one before it accepts the caller itself (a listener that is stuck or gone must
#: not keep callers waiting), and how often it looks meanwhile.
BALANCE_GRACE_S = 0.1
BALANCE_POLL_S = 0.0005

#: Storage classes accepted beyond pynetdicom's default list of 120 (which stops short of the
#: 128-context limit): Label Map Segmentation, which our own ``[reports] seg_type =
#: "LABELMAP"`` writes and which viewers send back as corrections.
EXTRA_STORAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.7",)

#: Called after an instance is on disk and indexed, with the sender's AE title.
StoredCallback = Callable[[StoreOutcome, str], None]

FsyncPolicy = Literal["always", "never"]


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS for the listener (``[node.tls]``)."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False

    def server_context(self) -> ssl.SSLContext:
        """The server's TLS context: our certificate, the CA that signs clients, TLS >= 1.2.

        Raises:
            OSError: A file cannot be read.
            ssl.SSLError: A file holds no usable certificate or key.
            ValueError: ``require_client_cert`` without ``ca_file``.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=str(self.cert_file), keyfile=str(self.key_file))
        if self.ca_file is not None:
            context.load_verify_locations(cafile=str(self.ca_file))
            context.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        elif self.require_client_cert:
            raise ValueError("require_client_cert needs ca_file (the CA that signs client certificates)")
        return context


@dataclass(frozen=True)
class ScpSettings:
    """Network identity, limits and durability of the SCP (mirrors ``[node]``).

    ``allowed_peers`` holds ``(calling AE title, host or None)``; empty admits every caller
    that calls our AE title. ``max_pdu_size`` 0 means unlimited. ``index_synchronous`` and
    ``fast_poll`` are tuning knobs measured by ``bench/ingest.py``; keep the defaults.
    """

    ae_title: str
    host: str
    port: int
    max_associations: int = 10
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu_size: int = 262144
    min_free_disk_mb: int = 1024
    fsync: FsyncPolicy = "always"
    allowed_peers: tuple[tuple[str, str | None], ...] = ()
    tls: TlsSettings | None = None
    index_synchronous: Synchronous = "NORMAL"
    fast_poll: bool = True

    def __post_init__(self) -> None:
        if self.fsync not in ("always", "never"):
            raise ValueError(f"fsync must be 'always' or 'never', got {self.fsync!r}")


# --------------------------------------------------------------------------- pynetdicom tuning
#
# pynetdicom 3 moves data between its two threads per association by polling:
# ``Association._run_reactor`` sleeps 1 ms before every look at the DIMSE message queue, and
# the DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever a loop found nothing to do, then
# reads each PDU from the socket 4 KB per ``recv``. Each received instance waits ~1 ms for
# the reactor and ~1 ms for its response to be picked up: as long as DCMTK needs for the
# whole instance. Neither module nor AE offers a knob for the reactor's sleep, so this is
# the one place where the SCP changes pynetdicom's behaviour, on its own acceptor
# associations only (the SCU and other AEs in the process are untouched):
#
# 1. the DUL thread waits in ``select`` on its socket and a wake-up pair instead of polling,
#    and reads a P-DATA-TF PDU with one copy (:mod:`~pacs_sentinel.dicom_io.dul`);
# 2. C-STORE and C-ECHO requests are served in the DUL thread as soon as they are complete;
#    the association reactor, for everything else, waits on the DIMSE queue instead of
#    sleeping (:mod:`~pacs_sentinel.dicom_io.reactor`);
# 3. C-STORE requests are decoded and responses encoded without pydicom
#    (:mod:`~pacs_sentinel.dicom_io.dimse`);
# 4. a plain (non-TLS) socket reads a whole PDU with one ``recv_into(MSG_WAITALL)``;
# 5. pynetdicom's per-message logging handlers are unbound while its logger would drop
#    their lines, and each association's presentation contexts are copied without
#    ``deepcopy`` (:class:`_SupportedContexts`);
# 6. listener processes (``Receiver`` with several processes, which run nothing but the
#    SCP) switch threads every :data:`LISTENER_SWITCH_INTERVAL_S` instead of every 5 ms, so
#    that the associations a process serves at once take turns at the GIL sooner.
#
# Written against pynetdicom 3.0.x (``Association._run_reactor``, ``DULServiceProvider``,
# ``DIMSEServiceProvider.send_msg``, ``AssociationSocket.recv``,
# ``RequestHandler._create_association``); tests/dicom_io cover these paths. Setting
# ``ScpSettings.fast_poll = False`` turns 1-5 off (the ablation in bench/ingest.py).

#: The DUL thread's delay where it still sleeps: while waiting for itself to stop, and when
#: its socket is gone (pynetdicom's default: 0.001).
DUL_IDLE_DELAY_S = 0.0001

#: ``sys.setswitchinterval`` in listener processes (Python's default: 0.005).
LISTENER_SWITCH_INTERVAL_S = 0.0005


class _WholePduSocket(AssociationSocket):
    """A plain TCP association socket that reads a PDU in one system call."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None or isinstance(sock, ssl.SSLSocket):
            return super().recv(nr_bytes)
        buffer = bytearray(nr_bytes)
        nr_read = 0
        with memoryview(buffer) as view:  # released before a short buffer is cut below
            while nr_read < nr_bytes:
                got = sock.recv_into(view[nr_read:], nr_bytes - nr_read, socket.MSG_WAITALL)
                if not got:  # connection broken: return what we have, as pynetdicom does
                    break
                nr_read += got
        del buffer[nr_read:]
        return buffer


class _TunedRequestHandler(RequestHandler):
    """Creates pynetdicom's acceptor association, then applies the tuning above."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        balance: AcceptBalance | None = getattr(self.server, "balance", None)
        if balance is not None:
            balance.hand_over(assoc)
        if getattr(self.server, "fast_poll", False):
            make_event_driven_acceptor(assoc)
            make_store_fast(assoc.dimse)
            dul = make_event_driven(assoc.dul)
            dul._run_loop_delay = DUL_IDLE_DELAY_S
            sock = dul.socket
            if sock is not None and type(sock) is AssociationSocket:
                sock.__class__ = _WholePduSocket
            if not _PYNETDICOM_LOG.isEnabledFor(logging.INFO):
                # pynetdicom's per-message logging handlers build lines nobody will see.
                assoc.unbind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
                assoc.unbind(evt.EVT_DIMSE_SENT, standard_dimse_sent_handler)
        return assoc


class _SupportedContexts(list):  # type: ignore[type-arg]
    """The server's presentation contexts, with a fast copy for each new association.

    pynetdicom deep-copies them for every association (``RequestHandler._create_association``)
    so that negotiating one cannot change another's. A generic ``deepcopy`` of ~120 contexts
    with ~35 transfer syntax UIDs each takes tens of milliseconds, while the caller waits for
    its A-ASSOCIATE-AC; the UIDs are immutable, so copying each context and its list of
    transfer syntaxes is the same copy.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


class AcceptBalance:
    """Associations served by each listener process, so that they take new callers in turn.

    One slot per listener in shared memory (a ``multiprocessing`` array of integers that
    each listener writes only its own slot of). A listener whose count is at most every
    other listener's accepts a new caller; the others leave the caller to it for up to
    :data:`BALANCE_GRACE_S`. Each listener accepts from the same listening socket, so a
    caller is never tied to a listener that is busy or gone.
    """

    def __init__(self, counts: Any, index: int) -> None:
        """``counts``: the shared array (one slot per listener); ``index``: this listener's slot."""
        self.counts = counts
        self.index = index
        self._lock = threading.Lock()
        self._local = threading.local()  # per request thread: was the caller handed to an association?

    def my_turn(self) -> bool:
        """True when this listener serves no more associations than any other."""
        mine = self.counts[self.index]
        return all(mine <= count for slot, count in enumerate(self.counts) if slot != self.index)

    def wait_for_turn(self, listening: socket.socket) -> None:
        """Return when this listener should accept the pending caller.

        Raises:
            BlockingIOError: Another listener accepted the caller meanwhile.
        """
        deadline = time.monotonic() + BALANCE_GRACE_S
        pending = select.poll()  # not select(): no limit on the descriptor's number
        pending.register(listening, select.POLLIN)
        while not self.my_turn() and time.monotonic() < deadline:
            time.sleep(BALANCE_POLL_S)
            if not pending.poll(0):
                raise BlockingIOError("another listener accepted the association")

    def opened(self) -> None:
        """Count a caller just accepted (before the next accept looks at the counts)."""
        with self._lock:
            self.counts[self.index] += 1

    def hand_over(self, association: Association) -> None:
        """Count the accepted caller until ``association``'s thread ends, not its request thread.

        pynetdicom's request handler starts the association's own thread and returns.
        Called in the request thread, which :meth:`request_done` ends.
        """
        self._local.handed_over = True
        run = association.run

        def run_then_uncount() -> None:
            try:
                run()
            finally:
                self._closed()

        association.run = run_then_uncount  # type: ignore[method-assign]

    def request_done(self) -> None:
        """The request thread of an accepted caller ends: uncount it unless its association counts it."""
        if not getattr(self._local, "handed_over", False):
            self._closed()
        self._local.handed_over = False

    def _closed(self) -> None:
        with self._lock:
            self.counts[self.index] -= 1


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server plus a bounded TLS handshake and, for listener processes,
    a listening socket shared with the others and balanced accepting."""

    fast_poll = False
    handshake_timeout: float | None = 30.0
    shared_socket: socket.socket | None = None
    balance: AcceptBalance | None = None

    def server_bind(self) -> None:
        if self.shared_socket is None:
            super().server_bind()
            return
        # Already bound and listening (made by the Receiver). Non-blocking: when several
        # listeners wake for one caller, those that lose the race get BlockingIOError
        # (socketserver then simply waits again) instead of waiting in accept().
        self.socket.close()
        self.socket = self.shared_socket
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.shared_socket is None:
            super().server_activate()

    def server_close(self) -> None:
        if self.shared_socket is None:
            super().server_close()
        else:
            self.socket.close()  # no shutdown(): that would stop the other listeners accepting

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self.balance is not None:
            self.balance.wait_for_turn(self.socket)
        client, address = self.socket.accept()
        if self.shared_socket is not None:
            client.setblocking(True)  # as pynetdicom's own listening socket hands them out
        if self.ssl_context:
            # The handshake runs in the accepting thread: bound it, or one silent client
            # would stop every other caller from being accepted.
            client.settimeout(self.handshake_timeout)
            client = self.ssl_context.wrap_socket(client, server_side=True)
            client.settimeout(None)
        if self.balance is not None:
            self.balance.opened()
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            if self.balance is not None:
                self.balance.request_done()


class _DiskGuard:
    """Answers "is there room for one more instance?", measuring at most once a second."""

    def __init__(self, path: Path, min_free_mb: int) -> None:
        self.path = path
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self._checked_at = -DISK_CHECK_INTERVAL_S
        self._free = 0
        self._lock = threading.Lock()

    def free_bytes(self) -> int:
        """Free bytes under ``path`` (at most :data:`DISK_CHECK_INTERVAL_S` old)."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at >= DISK_CHECK_INTERVAL_S:
                self._free = shutil.disk_usage(self.path).free
                self._checked_at = now
            return self._free

    def has_room(self) -> bool:
        return self.min_free_bytes <= 0 or self.free_bytes() >= self.min_free_bytes


def _resolve_peers(peers: tuple[tuple[str, str | None], ...]) -> dict[str, set[str] | None]:
    """Calling AE title -> addresses it may call from (``None``: any address)."""
    allowed: dict[str, set[str] | None] = {}
    for ae_title, host in peers:
        if host is None:
            allowed[ae_title] = None
            continue
        addresses = {host}
        try:
            addresses |= {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
        except OSError as exc:
            log.warning("allowed peer host does not resolve; matching it literally", host=host, error=str(exc))
        if ae_title in allowed and allowed[ae_title] is None:
            continue
        allowed[ae_title] = (allowed.get(ae_title) or set()) | addresses
    return allowed


class StorageScp:
    """A storage + verification SCP writing into a :class:`Spool`."""

    def __init__(self, settings: ScpSettings, spool: Spool, on_stored: StoredCallback | None = None,
                 *, listening_socket: socket.socket | None = None, balance: AcceptBalance | None = None) -> None:
        """Prepare the SCP (nothing listens before :meth:`start`).

        Args:
            settings: Identity, limits, access control, TLS and durability.
            spool: Where instances are stored and indexed.
            on_stored: Called after each stored instance (in a thread of the association: it waits for the call).
            listening_socket: Accept from this bound, listening socket (shared with other
                listener processes by :class:`Receiver`) instead of binding ``settings.port``.
            balance: With ``listening_socket``: take callers in turn with the other listeners.
        """
        self.settings = settings
        self.spool = spool
        self.on_stored = on_stored
        self.listening_socket = listening_socket
        self.balance = balance
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._disk = _DiskGuard(spool.root, settings.min_free_disk_mb)
        self._allowed = _resolve_peers(settings.allowed_peers)

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.acse_timeout = self.settings.acse_timeout
        ae.dimse_timeout = self.settings.dimse_timeout
        ae.network_timeout = self.settings.network_timeout
        ae.maximum_pdu_size = self.settings.max_pdu_size
        ae.require_called_aet = True
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        for sop_class in EXTRA_STORAGE_CLASSES:
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    def handle_requested(self, event: Event) -> None:
        """EVT_REQUESTED handler: refuse callers missing from ``allowed_peers``.

        pynetdicom's ``require_calling_aet`` checks AE titles only; this handler checks the
        title and the caller's address, and rejects the way pynetdicom itself does
        (A-ASSOCIATE-RJ rejected-permanent, service-user, calling AE title not recognized).
        """
        if not self._allowed:
            return
        assoc = event.assoc
        calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        hosts = self._allowed.get(calling_ae, set())
        if calling_ae in self._allowed and (hosts is None or address in hosts):
            return
        log.warning("association refused: caller not in allowed_peers", calling_ae=calling_ae, address=address)
        assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE_NOT_RECOGNIZED)
        assoc.sentinel_refusal_logged = True  # type: ignore[attr-defined]
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def handle_rejected(self, event: Event) -> None:
        """EVT_REJECTED handler: say in the log why an association was refused, so that a
        misconfigured modality can be found (pynetdicom refuses a wrong called AE title and one
        association too many on its own, silently)."""
        assoc = event.assoc
        if getattr(assoc, "sentinel_refusal_logged", False):
            return  # handle_requested said why
        request = assoc.requestor.primitive
        called_ae = str(getattr(request, "called_ae_title", "") or "").strip()
        if called_ae != self.settings.ae_title:
            why = f"called AE title {called_ae!r} is not ours ({self.settings.ae_title!r})"
        else:
            why = f"more than max_associations = {self.settings.max_associations} at once"
        log.warning("association refused", reason=why, calling_ae=str(assoc.requestor.ae_title).strip(),
                    address=str(assoc.requestor.address))

    def handle_aborted(self, event: Event) -> None:
        """EVT_ABORTED handler: an association the peer (or the network) broke off. Instances
        it acknowledged are stored; one in transfer was not, and the peer was not told it was."""
        assoc = event.assoc
        log.warning("association aborted", calling_ae=str(assoc.requestor.ae_title).strip(),
                    address=str(assoc.requestor.address))

    def handle_store(self, event: Event) -> int:
        """EVT_C_STORE handler: persist and index, then return the DIMSE status.

        The data set is stored as received: its identifying attributes are read from the
        encoded bytes (:func:`read_instance_info`, no copy of the pixel data) and the bytes
        go to the file as they are, behind the file meta the spool writes.
        """
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        encoded: BytesIO = event.request.DataSet  # type: ignore[assignment]
        try:
            info = read_instance_info(encoded, str(event.context.transfer_syntax))
        except DecodeError as exc:
            log.warning("instance refused: cannot understand", calling_ae=calling_ae, error=str(exc))
            return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:  # never let a parser's surprise become a success
            log.warning("instance refused: cannot decode", calling_ae=calling_ae, error=str(exc))
            return STATUS_CANNOT_UNDERSTAND
        bound = log.bind(study_uid=info.study_uid, sop_instance_uid=info.sop_instance_uid, calling_ae=calling_ae)
        if info.sop_class_uid != str(event.context.abstract_syntax):
            bound.warning("instance refused: SOP class does not match the presentation context",
                          sop_class_uid=info.sop_class_uid, context=str(event.context.abstract_syntax))
            return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
        requested_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        if requested_uid != info.sop_instance_uid:
            # The response would confirm an instance that is not the one stored (DCMTK's storescp
            # answers the same).
            bound.warning("instance refused: SOP Instance UID differs from the request's Affected SOP Instance UID",
                          affected_sop_instance_uid=requested_uid)
            return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
        try:
            if not self._disk.has_room():
                bound.error("instance refused: free disk below min_free_disk_mb",
                            free_mb=self._disk.free_bytes() // (1024 * 1024),
                            min_free_disk_mb=self.settings.min_free_disk_mb)
                return STATUS_OUT_OF_RESOURCES
            with encoded.getbuffer() as dataset:
                outcome = self.spool.store_dataset(
                    dataset, info, calling_ae=calling_ae, fsync=self.settings.fsync == "always",
                    implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID,
                    implementation_version_name=PYNETDICOM_IMPLEMENTATION_VERSION)
        except (StorageError, OSError) as exc:
            bound.error("instance refused: cannot store", error=str(exc))
            return STATUS_OUT_OF_RESOURCES
        except Exception:  # never answer success for an instance that is not stored
            bound.exception("instance refused: unexpected error while storing")
            return STATUS_OUT_OF_RESOURCES
        bound.debug("instance stored", duplicate=outcome.duplicate)
        if self.on_stored is not None:
            try:
                self.on_stored(outcome, calling_ae)
            except Exception:  # the instance is durable; start-up reconciliation picks it up
                bound.exception("post-store notification failed")
        return STATUS_SUCCESS

    def start(self) -> None:
        """Start serving in background threads (returns at once).

        Raises:
            OSError: The port cannot be bound, or a TLS file cannot be read.
            ssl.SSLError: A TLS file holds no usable certificate or key.
        """
        ae = self._make_ae()
        ssl_context = self.settings.tls.server_context() if self.settings.tls is not None else None
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_REQUESTED, self.handle_requested),
                    (evt.EVT_REJECTED, self.handle_rejected), (evt.EVT_ABORTED, self.handle_aborted)]
        server_class = type("SentinelAssociationServer", (_Server,), {
            "shared_socket": self.listening_socket,
            "balance": self.balance,
            "fast_poll": self.settings.fast_poll,
            "handshake_timeout": self.settings.acse_timeout,
        })
        server = ae.make_server(
            (self.settings.host, self.settings.port),
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=server_class,
            request_handler=_TunedRequestHandler,
        )
        if self.settings.fast_poll:
            server.contexts = _SupportedContexts(server.contexts)
        ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{self.port}", daemon=True)
        self._thread.start()
        log.info("SCP listening", ae_title=self.settings.ae_title, host=self.settings.host, port=self.port,
                 tls=ssl_context is not None, allowed_peers=len(self.settings.allowed_peers))

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop accepting associations and close the server."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# --------------------------------------------------------------------------- several processes


def _listener_main(settings: ScpSettings, data_dir: Path, db_path: Path, index_synchronous: Synchronous,
                   ready: multiprocessing.connection.Connection, stop: Any,
                   log_setup: Callable[[], None] | None, parent_pid: int,
                   listening: socket.socket, counts: Any, index: int) -> None:
    """A listener process: serve on the shared socket until ``stop`` is set or the parent dies.

    Watching the parent matters: a listener orphaned by a SIGKILL of the daemon would go
    on accepting instances on the shared port beside the next daemon's listeners.
    """
    if log_setup is not None:
        log_setup()
    if settings.fast_poll:
        sys.setswitchinterval(LISTENER_SWITCH_INTERVAL_S)  # this process runs only the SCP
    try:
        database = Database(db_path)
        spool = Spool(data_dir, database, index_synchronous=index_synchronous)
        scp = StorageScp(settings, spool, listening_socket=listening, balance=AcceptBalance(counts, index))
        scp.start()
    except BaseException as exc:
        ready.send(f"{type(exc).__name__}: {exc}")
        raise
    ready.send("ready")
    ready.close()
    try:
        while not stop.wait(PARENT_CHECK_INTERVAL_S):
            if os.getppid() != parent_pid:
                log.warning("daemon process gone; listener stopping", parent_pid=parent_pid)
                break
    finally:
        scp.stop()
        database.close()


@dataclass
class _Listener:
    process: multiprocessing.process.BaseProcess
    ready: multiprocessing.connection.Connection = field(repr=False)


class Receiver:
    """The node's receiving side: a :class:`StorageScp` in this process or in several.

    With ``processes == 1`` the SCP runs in background threads of this process and
    ``on_stored`` is called for each stored instance. With ``processes > 1`` this process
    binds and listens, and that many listener processes accept from the same socket, each
    taking a new association only while it serves no more than the others
    (:class:`AcceptBalance`); each writes the spool and the index itself, so the daemon
    learns of new instances by polling the ``instances``/``studies`` tables (``on_stored``
    is not available). The socket also carries ``SO_REUSEPORT``, so that a restarted
    daemon can listen while the listeners of a killed one wind down (they stop within
    :data:`PARENT_CHECK_INTERVAL_S`). Run :meth:`Spool.reconcile` before :meth:`start`.
    """

    def __init__(self, settings: ScpSettings, data_dir: Path, db_path: Path, *, processes: int = 1,
                 on_stored: StoredCallback | None = None, database: Database | None = None,
                 log_setup: Callable[[], None] | None = None) -> None:
        """Prepare the receiver (nothing listens before :meth:`start`).

        Args:
            settings: The SCP's settings; with ``port`` 0 a free port is chosen.
            data_dir: The node's data folder (spool under ``<data_dir>/spool``).
            db_path: The SQLite index (``instances``/``studies`` tables).
            processes: Listener processes; 1 serves in this process.
            on_stored: Per-instance callback; only with ``processes == 1``.
            database: The index to use in this process (default: opens ``db_path``).
            log_setup: Picklable callable run first in each listener process to configure
                logging as the parent did (processes start with a fresh interpreter).

        Raises:
            ValueError: ``processes`` below 1, or ``on_stored`` with several processes.
        """
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        if processes > 1 and on_stored is not None:
            raise ValueError("on_stored needs processes = 1; with several listener processes poll the index")
        self.settings = settings
        self.data_dir = Path(data_dir)
        self.db_path = Path(db_path)
        self.processes = processes
        self.on_stored = on_stored
        self.log_setup = log_setup
        # Opening the database runs the migrations once, before any listener process does.
        self.database = database if database is not None else Database(self.db_path)
        self.spool = Spool(self.data_dir, self.database, index_synchronous=settings.index_synchronous)
        self._scp: StorageScp | None = None
        self._listeners: list[_Listener] = []
        self._stop: Any = None
        self._counts: Any = None
        self._port = settings.port

    def start(self) -> None:
        """Start listening; returns once every listener accepts associations.

        Raises:
            SentinelError: A listener process failed to start (its error in the message).
            OSError: The port cannot be bound.
        """
        if self.processes == 1:
            self._scp = StorageScp(self.settings, self.spool, on_stored=self.on_stored)
            self._scp.start()
            self._port = self._scp.port
            return
        context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        self._stop = context.Event()
        counts = context.RawArray("l", self.processes)  # associations served by each listener
        self._counts = counts
        with socket.socket(socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET) as listening:
            # One listening socket for every listener (passed to each process as it is
            # spawned); this process closes its copy once they all listen.
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listening.bind((self.settings.host, self.settings.port))
            listening.listen(LISTEN_BACKLOG)
            self._port = int(listening.getsockname()[1])
            settings = _replace_port(self.settings, self._port)
            for index in range(self.processes):
                parent_end, child_end = context.Pipe(duplex=False)
                process = context.Process(
                    target=_listener_main,
                    args=(settings, self.data_dir, self.db_path, self.settings.index_synchronous, child_end,
                          self._stop, self.log_setup, os.getpid(), listening, counts, index),
                    name=f"sentinel-listener-{len(self._listeners) + 1}",
                    daemon=True,
                )
                process.start()
                child_end.close()
                self._listeners.append(_Listener(process, parent_end))
            problems = []
            for listener in self._listeners:
                try:
                    message = listener.ready.recv() if listener.ready.poll(60) else "did not start within 60 s"
                except EOFError:
                    message = f"exited with {listener.process.exitcode}"
                if message != "ready":
                    problems.append(f"{listener.process.name}: {message}")
        if problems:
            self.stop()
            raise SentinelError("listener processes failed to start: " + "; ".join(problems))
        log.info("receiver listening", port=self._port, processes=self.processes)

    @property
    def port(self) -> int:
        """The bound port."""
        return self._port

    def associations_per_listener(self) -> list[int]:
        """Associations each listener process serves now (empty with one process)."""
        return list(self._counts) if self._counts is not None else []

    def stop(self) -> None:
        """Stop every listener (in-flight associations are finished by the OS or dropped)."""
        if self._scp is not None:
            self._scp.stop()
            self._scp = None
        if self._stop is not None:
            self._stop.set()
        for listener in self._listeners:
            listener.process.join(timeout=10)
            if listener.process.is_alive():
                listener.process.terminate()
                listener.process.join(timeout=5)
            listener.ready.close()
        self._listeners = []


def _replace_port(settings: ScpSettings, port: int) -> ScpSettings:
    from dataclasses import replace

    return replace(settings, port=port)
