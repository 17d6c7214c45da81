"""The storage SCU: send DICOM files to a destination in one association.

A missing response or a failure status counts as a failed attempt; only success
(0x0000) and the warning statuses 0xB000/0xB006/0xB007 (stored, with a remark) count as
delivered. A few failures are *permanent*: retrying cannot help until someone changes the
destination's configuration (it refused the object's SOP class or transfer syntax at
association negotiation, or answered 0x0122 "SOP class not supported"); the outbox gives
those up at once instead of retrying them for hours.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification

from pacs_sentinel.dicom_io.reactor import make_response_safe
from pacs_sentinel.dicom_io.spool import read_instance_info
from pacs_sentinel.errors import DecodeError, DeliveryError

log = structlog.get_logger(__name__)

DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
#: Failure statuses that no retry can cure: 0x0122 Refused, SOP Class not supported.
PERMANENT_STATUSES = frozenset({0x0122})
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class Peer:
    """A DICOM node to send to."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``AE@host:port``.

        Raises:
            ValueError: The text is not of that form.
        """
        try:
            ae_title, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            peer = cls(ae_title=ae_title, host=host.strip("[]"), port=int(port))
        except ValueError:
            raise ValueError(f"{text!r} is not of the form AE@host:port") from None
        if not peer.ae_title or not peer.host or not 0 < peer.port < 65536:
            raise ValueError(f"{text!r} is not of the form AE@host:port")
        return peer


@dataclass(frozen=True)
class SendResult:
    """The outcome of sending one file: ``status`` is None when no response came back."""

    path: Path
    status: int | None
    error: str = ""
    #: Retrying cannot help (the destination does not support the object's SOP class or
    #: transfer syntax): only a change on the destination's side can.
    permanent: bool = False

    @property
    def delivered(self) -> bool:
        """True when the destination acknowledged the instance."""
        return self.status in DELIVERED_STATUSES


def _set_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler: send small PDUs at once instead of waiting for delayed ACKs,
    and let no reactor take a response from the call that waits for it
    (:func:`~pacs_sentinel.dicom_io.reactor.make_response_safe`)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    make_response_safe(event.assoc)


NODELAY_HANDLERS = [(evt.EVT_CONN_OPEN, _set_nodelay)]


@dataclass(frozen=True)
class EchoResult:
    """Outcome of a C-ECHO: ``ok`` with the round trip in seconds, or the error."""

    ok: bool
    seconds: float
    error: str = ""


def echo(peer: Peer, *, calling_ae: str = "SENTINEL", timeout: float = 5.0) -> EchoResult:
    """Verify a peer with C-ECHO (association, echo, release)."""
    started = time.monotonic()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=NODELAY_HANDLERS)
    except OSError as exc:
        return EchoResult(False, time.monotonic() - started, str(exc))
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else _not_connected(assoc, peer, timeout)
        return EchoResult(False, time.monotonic() - started, reason or "association aborted")
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    seconds = time.monotonic() - started
    if not status or "Status" not in status:
        return EchoResult(False, seconds, "no response to C-ECHO")
    if int(status.Status) != 0x0000:
        return EchoResult(False, seconds, f"C-ECHO status 0x{int(status.Status):04X}")
    return EchoResult(True, seconds)


def _refused_classes(assoc: Association) -> dict[str, str]:
    """SOP class UID -> ``"<name> (<UID>): <reason>"`` for each context the peer rejected.

    A SOP class the peer does not support is refused for good: the error says which one, so
    an operator does not take it for a network fault.
    """
    refused: dict[str, str] = {}
    for context in assoc.rejected_contexts:
        uid = UID(str(context.abstract_syntax))
        label = uid if uid.name == uid else f"{uid.name} ({uid})"
        refused.setdefault(str(uid), f"{label}: {str(context.status).lower()}")
    return refused


def _not_connected(assoc: Association, peer: Peer, timeout: float) -> str | None:
    """``could not connect to <host>:<port> (<why>)`` when the association failed because its TCP
    connection could not be made, else None. pynetdicom reports a failed connect as an abort (the
    requestor's port is still 0) and only logs why; a plain TCP connect tells (``"connection
    refused"``, ``"timed out"``...)."""
    if assoc.is_established or assoc.is_rejected or assoc.requestor.port:
        return None
    why = ""
    try:
        with socket.create_connection((peer.host, peer.port), timeout=timeout):
            pass
    except OSError as exc:
        why = (exc.strerror or str(exc) or type(exc).__name__).lower()
    return f"could not connect to {peer.host}:{peer.port}" + (f" ({why})" if why else "")


def file_problem(path: Path, raw: bytes, ds: Dataset) -> str | None:
    """Why the file ``path`` (its bytes ``raw``, read as ``ds``) must not be sent, or None: its
    data set is truncated or malformed, which pydicom reads past (a value cut short at the end of
    the file comes back shorter) and re-encoding would hide. The same walk the SCP refuses such an
    instance with (0xC210). Files without the ``DICM`` preamble or a group length are left to pydicom."""
    if len(raw) < 144 or raw[128:132] != b"DICM" or raw[132:136] != b"\x02\x00\x00\x00":
        return None
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    try:
        read_instance_info(BytesIO(raw[meta_end:]), str(ds.file_meta.TransferSyntaxUID))
    except DecodeError as exc:
        return f"{path}: {exc}"
    return None


def encoding_problem(ds: Dataset) -> str | None:
    """Why ``ds`` cannot be encoded in its own transfer syntax (pydicom's message, naming the
    element), or None when it can. A file read with pydicom can hold elements it cannot write
    back (a wrong value length, a value that does not fit its VR)."""
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    fp = DicomBytesIO()
    fp.is_little_endian = syntax.is_little_endian
    fp.is_implicit_VR = syntax.is_implicit_VR
    try:
        write_dataset(fp, ds)
    except Exception as exc:  # pydicom puts a traceback into the message after its first line
        return "cannot encode the data set: " + (str(exc).splitlines() or [type(exc).__name__])[0]
    return None


def send_files(
    paths: Sequence[Path],
    peer: Peer,
    *,
    calling_ae: str = "SENTINEL",
    timeout: float = 30.0,
    on_result: Callable[[SendResult], None] | None = None,
) -> list[SendResult]:
    """Send files to a peer in one association, proposing only the contexts they need.

    Args:
        paths: DICOM files (with file meta) to send.
        peer: The destination.
        calling_ae: Our AE title.
        timeout: ACSE / DIMSE / network timeout in seconds.
        on_result: Called after each file sent (for progress bars).

    Returns:
        One result per file, in order.

    Raises:
        DeliveryError: The host name cannot be resolved, the connection cannot be made
            (``could not connect to <host>:<port> (connection refused)``), or the association
            was rejected or aborted.
    """
    datasets: list[tuple[Path, Dataset]] = []
    unreadable: dict[Path, str] = {}
    for path in map(Path, paths):
        try:
            raw = path.read_bytes()  # read once: parsed by pydicom, walked by file_problem
            ds = pydicom.dcmread(BytesIO(raw))
            _ = (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)  # both must be present
            problem = file_problem(path, raw, ds)
        except Exception as exc:  # a file we cannot read is a failed attempt, not a crash
            unreadable[path] = f"cannot read {path}: {exc}"
            continue
        if problem is not None:
            unreadable[path] = f"cannot send {problem}"
            continue
        datasets.append((path, ds))
    if on_result is not None:
        for path, error in unreadable.items():
            on_result(SendResult(path=path, status=None, error=error))
    if not datasets:
        return [SendResult(path=Path(p), status=None, error=unreadable[Path(p)]) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    # One context per (SOP class, transfer syntax) sent, so the peer can accept an object in
    # the syntax it is encoded in; uncompressed objects also offer the other uncompressed
    # syntaxes, with the object's own first.
    wanted: dict[tuple[str, str], None] = {}
    for _, ds in datasets:
        wanted[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))] = None
    for sop_class, syntax in wanted:
        syntaxes = [syntax]
        if syntax in UNCOMPRESSED:
            syntaxes += [s for s in UNCOMPRESSED if s != syntax]
        ae.add_requested_context(sop_class, syntaxes)
    if len(ae.requested_contexts) > 128:
        raise DeliveryError("more than 128 presentation contexts needed in one association")
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=NODELAY_HANDLERS)
    except (socket.gaierror, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
        why = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
        raise DeliveryError(f"could not connect to {peer.host}:{peer.port} (cannot resolve the host name: {why})") from None
    refused = _refused_classes(assoc)
    if not refused and (not_connected := _not_connected(assoc, peer, timeout)) is not None:
        raise DeliveryError(not_connected)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        none_accepted = bool(refused) and not assoc.accepted_contexts  # pynetdicom aborts then
        if none_accepted:
            reason += ": it accepted none of the proposed presentation contexts (" + "; ".join(refused.values()) + ")"
        raise DeliveryError(f"association with {peer.ae_title}@{peer.host}:{peer.port} {reason}",
                            permanent=none_accepted)
    results = []
    try:
        for path, ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:  # no accepted context for this object, or encoding error
                sop_class = str(ds.SOPClassUID)
                if sop_class in refused:
                    result = SendResult(path=path, status=None, permanent=True,
                                        error=f"{peer.ae_title} does not accept {refused[sop_class]}")
                elif (problem := encoding_problem(ds)) is not None:  # no retry can encode it
                    result = SendResult(path=path, status=None, permanent=True, error=problem)
                else:
                    result = SendResult(path=path, status=None, error=str(exc))
                results.append(result)
                if on_result is not None:
                    on_result(results[-1])
                continue
            code = int(status.Status) if status and "Status" in status else None
            error = "" if code in DELIVERED_STATUSES else (
                "no response" if code is None else f"status 0x{code:04X}"
            )
            if code in PERMANENT_STATUSES:
                error += f" (SOP class not supported by {peer.ae_title})"
            results.append(SendResult(path=path, status=code, error=error, permanent=code in PERMANENT_STATUSES))
            if on_result is not None:
                on_result(results[-1])
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    for path, _ in datasets[len(results):]:
        results.append(SendResult(path=path, status=None, error="association ended early"))
    by_path = {r.path: r for r in results}
    return [by_path.get(Path(p)) or SendResult(path=Path(p), status=None, error=unreadable[Path(p)]) for p in paths]
