"""The spool: received instances as files on disk, each indexed in SQLite.

An instance is stored by writing its bytes to a temporary file in the target folder,
giving it its final name, flushing it to disk and then indexing it. A crash at any point
leaves either no index row (the file, if complete, is re-indexed at start-up) or a
complete file with its row; a half-written file is never indexed (a process crash cannot
leave one under a final name, which a file gets only once it is written; a power cut can,
and its seal gives it away: see below).

Durability (``fsync`` of :meth:`Spool.store`):

- ``True`` (``[node] fsync = "always"``): the file and its name are on the disk before
  the instance is indexed and acknowledged; it survives a power cut. A new instance is
  written *sealed* (below), linked to its final name (a hard link, which never replaces a
  file; the temporary name is then removed) and flushed with one ``fsync`` of the file: on
  the journaling filesystems Linux spools live on (ext4, XFS, btrfs) that one flush commits
  the data and the new name together, because the link changed the file's inode in the
  same journal transaction. Elsewhere (NFS, tmpfs, unknown) the folder is
  fsynced as well, as POSIX asks. An instance that *replaces* a stored one under the same
  UID is flushed before its rename and the folder after it, so the stored copy stays whole
  until the new one is on the disk. A study or series folder is made durable in its parent
  the first time this process writes into it (created now or by another process a moment
  ago), so a new folder cannot vanish with the instances acknowledged inside it.
- ``False`` (``"never"``): the operating system writes the file back when it likes; a
  process crash loses nothing, a power cut may lose the last seconds of acknowledged
  instances. For spools on battery-backed storage or test systems.

Sealed files: a power cut between the link and the end of the flush can leave a torn
file under its final name (never acknowledged: the answer waits for the flush). Its
preamble, which PS3.10 7.1 leaves to the implementation, therefore carries a seal:
:data:`SEAL_MAGIC`, the length of everything after the preamble and its CRC-32.
:meth:`Spool.reconcile` checks the seal of every file it would re-index and sets a torn
one aside (renamed to ``*.torn``) instead of indexing it. Readers ignore the preamble.

The index row is committed with SQLite ``synchronous=NORMAL`` by default (see
:mod:`pacs_sentinel.dicom_io.index`): it survives a process crash, and a row lost to a power
cut is rebuilt from its fsynced file by :meth:`Spool.reconcile` at start-up. The file, not
the row, is what makes an acknowledged instance durable.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import structlog
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from pacs_sentinel.atomic import fsync_path
from pacs_sentinel.dicom_io.index import Database, Synchronous
from pacs_sentinel.errors import DecodeError, StorageError

log = structlog.get_logger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TEMP_SUFFIX = ".partial"

#: The attributes :func:`read_instance_info` reads; every other value is skipped, not copied.
IDENTIFYING_TAGS = [Tag(keyword) for keyword in (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientID")]

#: The DICOM file preamble and prefix (PS3.10 7.1).
PREAMBLE = b"\0" * 128 + b"DICM"

#: Study and series folders a process remembers as durable (oldest forgotten first).
KNOWN_FOLDERS_MAX = 4096

_datasync = getattr(os, "fdatasync", os.fsync)  # data and size, not the times (no fdatasync on macOS)

#: A sealed file's preamble starts with this, then :data:`_SEAL` (see the module docstring).
SEAL_MAGIC = b"PACS-SENTINEL SEAL 1\0"
#: Length of everything after the preamble, and its CRC-32.
_SEAL = struct.Struct("<QL")
#: The suffix a torn file found by :meth:`Spool.reconcile` is renamed to.
TORN_SUFFIX = ".torn"
#: Octal escapes in /proc/self/mountinfo paths (``\\040`` is a space).
_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")
#: Filesystems whose ``fsync`` of a file also commits the link that gave it its name (the
#: link logs the file's inode in the journal transaction the fsync waits for).
NAME_DURABLE_FILESYSTEMS = frozenset({"ext3", "ext4", "xfs", "btrfs"})


@dataclass(frozen=True)
class InstanceInfo:
    """The identifying attributes of one received instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str
    patient_id: str
    transfer_syntax: str


@dataclass(frozen=True)
class StoreOutcome:
    """What :meth:`Spool.store` did: ``duplicate`` is true when the instance was already stored."""

    info: InstanceInfo
    path: Path
    duplicate: bool


def _uid(value: object, keyword: str) -> str:
    text = str(value or "").strip()
    if not _UID.match(text) or len(text) > 64:
        raise DecodeError(f"{keyword} {text!r} is not a valid UID")
    return text


def instance_info(dataset: pydicom.Dataset, transfer_syntax: str) -> InstanceInfo:
    """Read the identifying attributes of a received dataset.

    Raises:
        DecodeError: A UID is missing or malformed, or the dataset cannot be decoded.
    """
    try:
        return InstanceInfo(
            sop_instance_uid=_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID"),
            sop_class_uid=_uid(dataset.get("SOPClassUID"), "SOPClassUID"),
            study_uid=_uid(dataset.get("StudyInstanceUID"), "StudyInstanceUID"),
            series_uid=_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID"),
            modality=str(dataset.get("Modality", "") or ""),
            patient_id=str(dataset.get("PatientID", "") or ""),
            transfer_syntax=transfer_syntax,
        )
    except DecodeError:
        raise
    except Exception as exc:  # a lazily decoded dataset raises whatever its parser raised
        raise DecodeError(f"cannot decode dataset: {exc}") from exc


def read_instance_info(dataset: BytesIO, transfer_syntax: str) -> InstanceInfo:
    """Read the identifying attributes of an encoded data set (a C-STORE's *Data Set*).

    Every element is walked, nested sequences and encapsulated pixel data included
    (:func:`_scan_little_endian`), but only the top-level values of :data:`IDENTIFYING_TAGS` are
    copied: the pixel data stay where they are. An element, item or fragment that runs past the
    end of the data set, or a sequence or item without its delimiter, is a
    :class:`~pacs_sentinel.errors.DecodeError`: a truncated instance is refused (0xC210), never
    stored as if whole. Values the walk does not read itself (text that is not ASCII, several
    values) and data sets it does not walk (big endian; a VR that is not two capital letters; UN
    of undefined length) go through pydicom's reader, so both give the same answers. A deflated
    data set is inflated first.

    Raises:
        DecodeError: The data set is truncated or cannot be parsed, or a UID is missing or malformed.
    """
    syntax = UID(transfer_syntax)
    if syntax.is_deflated:
        try:
            dataset = BytesIO(zlib.decompress(dataset.getvalue(), -zlib.MAX_WBITS))
        except zlib.error as exc:
            raise DecodeError(f"cannot inflate deflated data set: {exc}") from exc
    if syntax.is_little_endian:
        with dataset.getbuffer() as view:
            values = _scan_little_endian(view, syntax.is_implicit_VR)
        if values is not None:
            return InstanceInfo(
                sop_instance_uid=_uid(values.get(_SOP_INSTANCE_UID), "SOPInstanceUID"),
                sop_class_uid=_uid(values.get(_SOP_CLASS_UID), "SOPClassUID"),
                study_uid=_uid(values.get(_STUDY_UID), "StudyInstanceUID"),
                series_uid=_uid(values.get(_SERIES_UID), "SeriesInstanceUID"),
                modality=values.get(_MODALITY, "").strip(),
                patient_id=values.get(_PATIENT_ID, "").rstrip(" \0"),
                transfer_syntax=str(syntax),
            )
    try:
        dataset.seek(0)
        ds = read_dataset(dataset, syntax.is_implicit_VR, syntax.is_little_endian, specific_tags=IDENTIFYING_TAGS)
    except Exception as exc:  # the parser raises whatever the bytes provoke
        raise DecodeError(f"cannot decode dataset: {exc}") from exc
    # pydicom reads on in the other VR encoding when the first element's VR looks wrong; a data
    # set not encoded as its presentation context says would be stored behind file meta that
    # names the wrong transfer syntax, unreadable to every other program.
    found_implicit = ds.original_encoding[0]
    if found_implicit is not None and found_implicit != syntax.is_implicit_VR:
        raise DecodeError(f"data set encoded in {'implicit' if found_implicit else 'explicit'} VR, "
                          f"not as its transfer syntax {syntax.name} says")
    return instance_info(ds, str(syntax))


_SOP_CLASS_UID, _SOP_INSTANCE_UID, _STUDY_UID, _SERIES_UID, _MODALITY, _PATIENT_ID = (int(tag) for tag in IDENTIFYING_TAGS)
_WANTED = frozenset(int(tag) for tag in IDENTIFYING_TAGS)
_PIXEL_DATA, _ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0x7FE00010, 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
#: Explicit VRs whose length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_IMPLICIT_HEADER = struct.Struct("<HHL")
_EXPLICIT_HEADER = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<L")


class _LeftToPydicom(Exception):
    """The walk meets an encoding it leaves to pydicom's reader."""


def _truncated(what: str, offset: int, needed: int, end: int) -> DecodeError:
    return DecodeError(f"truncated data set: {what} at byte {offset} needs {needed} bytes, {max(0, end - offset)} left")


def _scan_little_endian(buffer: memoryview, implicit: bool) -> dict[int, str] | None:
    """The identifying values of a little endian data set, after walking all of it.

    Returns ``None`` when the values, or the encoding, are left to pydicom (see
    :func:`read_instance_info`); the structure has been checked as far as the walk went.

    Raises:
        DecodeError: Something runs past the end of the data set, or a delimiter is missing
            or out of place.
    """
    found: dict[int, str] = {}
    try:
        _walk_elements(buffer, implicit, 0, len(buffer), found, in_item=False)
    except _LeftToPydicom:
        return None
    if found.pop(-1, None) is not None:
        return None  # a value the walk does not read itself: pydicom decides
    return found


def _walk_elements(buffer: memoryview, implicit: bool, offset: int, end: int, found: dict[int, str] | None, *,
                   in_item: bool) -> int:
    """Walk data elements from ``offset``: to ``end`` (the data set, or an item of defined
    length), or to the item delimiter when ``in_item`` (an item of undefined length). Values of
    :data:`_WANTED` tags go to ``found`` (top level only: ``found`` is None inside items; key -1
    marks a value to leave to pydicom). Returns the offset after the last element (after the
    delimiter)."""
    while offset < end:
        if end - offset < 8:
            raise _truncated("an element header", offset, 8, end)
        if implicit:
            group, element, length = _IMPLICIT_HEADER.unpack_from(buffer, offset)
            vr = b""
        else:
            group, element, vr, length = _EXPLICIT_HEADER.unpack_from(buffer, offset)
        tag = group << 16 | element
        if group == 0xFFFE:  # item tags have no VR in either encoding
            if tag == _ITEM_DELIMITER and in_item:
                return offset + 8
            raise DecodeError(f"malformed data set: item tag ({group:04X},{element:04X}) at byte {offset} "
                              "outside a sequence")
        if implicit:
            offset += 8
        elif vr in _LONG_VRS:
            if end - offset < 12:
                raise _truncated("an element header", offset, 12, end)
            length = _LONG_LENGTH.unpack_from(buffer, offset + 8)[0]
            offset += 12
        elif 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90:
            offset += 8
        else:
            raise _LeftToPydicom
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA:
                offset = _walk_fragments(buffer, offset, end)
            elif vr == b"UN":
                raise _LeftToPydicom  # its content is implicit VR (PS3.5 6.2.2)
            else:
                offset = _walk_items(buffer, implicit, offset, end)
            continue
        if offset + length > end:
            raise _truncated(f"element ({group:04X},{element:04X}) of {length} bytes", offset, length, end)
        if found is not None and tag in _WANTED:
            value = bytes(buffer[offset:offset + length])
            if not value.isascii() or b"\\" in value:
                found[-1] = ""  # another character set, or several values: pydicom decides
            else:
                found[tag] = value.decode("ascii").rstrip("\0 ")
        offset += length
    if in_item:
        raise DecodeError(f"truncated data set: an item of undefined length ends at byte {end} without its delimiter")
    return offset


def _item_header(buffer: memoryview, offset: int, end: int, what: str) -> tuple[int | None, int]:
    """The length of the next item of a sequence (``what``: its name in messages) and the
    offset after its header; length None at the sequence delimiter."""
    if end - offset < 8:
        raise _truncated(f"{what} header", offset, 8, end)
    group, element, length = _IMPLICIT_HEADER.unpack_from(buffer, offset)
    tag = group << 16 | element
    if tag == _SEQUENCE_DELIMITER:
        return None, offset + 8
    if tag != _ITEM:
        raise DecodeError(f"malformed data set: ({group:04X},{element:04X}) at byte {offset} where {what} "
                          "or its delimiter belongs")
    return length, offset + 8


def _walk_items(buffer: memoryview, implicit: bool, offset: int, end: int) -> int:
    """Walk the items of a sequence of undefined length up to and past its delimiter."""
    while True:
        length, offset = _item_header(buffer, offset, end, "a sequence item")
        if length is None:
            return offset
        if length == _UNDEFINED:
            offset = _walk_elements(buffer, implicit, offset, end, None, in_item=True)
        elif offset + length > end:
            raise _truncated(f"a sequence item of {length} bytes", offset, length, end)
        else:
            _walk_elements(buffer, implicit, offset, offset + length, None, in_item=False)
            offset += length


def _walk_fragments(buffer: memoryview, offset: int, end: int) -> int:
    """Walk encapsulated pixel data (items of defined length) up to and past its delimiter."""
    while True:
        length, offset = _item_header(buffer, offset, end, "a pixel data fragment")
        if length is None:
            return offset
        if length == _UNDEFINED:
            raise DecodeError(f"malformed encapsulated pixel data: a fragment of undefined length at byte {offset - 8}")
        if offset + length > end:
            raise _truncated(f"a pixel data fragment of {length} bytes", offset, length, end)
        offset += length


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, explicit VR little endian."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def file_meta(info: InstanceInfo, *, implementation_class_uid: str, implementation_version_name: str = "",
              source_ae: str = "") -> bytes:
    """The preamble, prefix and File Meta Information of a stored instance (PS3.10 7.1).

    Written directly (a handful of elements) instead of through pydicom's encoder, which
    costs as much per instance as the rest of storing it; tests compare both byte for byte.
    ``source_ae`` (the sender's AE title) goes into *Source Application Entity Title*, where
    :meth:`Spool.reconcile` finds it when it re-indexes a file; it is left out when it is not
    plain ASCII.
    """
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(info.sop_class_uid, b"\0")),
        _meta_element(0x0003, b"UI", _padded(info.sop_instance_uid, b"\0")),
        _meta_element(0x0010, b"UI", _padded(info.transfer_syntax, b"\0")),
        _meta_element(0x0012, b"UI", _padded(implementation_class_uid, b"\0")),
    ]
    if implementation_version_name:
        elements.append(_meta_element(0x0013, b"SH", _padded(implementation_version_name, b" ")))
    if source_ae.strip() and source_ae.isascii():
        elements.append(_meta_element(0x0016, b"AE", _padded(source_ae.strip(), b" ")))
    body = b"".join(elements)
    return PREAMBLE + struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _dataset_offset(head: bytes) -> int:
    """Where the data set starts in a DICOM file whose first bytes are ``head`` (0: unknown)."""
    if len(head) >= 144 and head[128:132] == b"DICM" and head[132:138] == b"\x02\x00\x00\x00UL":
        return 144 + struct.unpack_from("<L", head, 140)[0]
    return 0


def _seal(parts: Sequence[bytes | memoryview]) -> bytes:
    """The sealed preamble for a file whose bytes after the preamble are ``parts``."""
    crc, length = 0, 0
    for part in parts:
        crc = zlib.crc32(part, crc)  # releases the GIL for large buffers
        length += len(part)
    seal = SEAL_MAGIC + _SEAL.pack(length, crc)
    return seal + b"\0" * (128 - len(seal))


def _link_new(temp: str, final: str) -> bool:
    """Give ``temp`` the name ``final`` unless that name exists (a hard link never replaces).

    Returns ``False``, leaving ``temp`` as it is, when ``final`` exists (another writer
    stored the same instance a moment ago, or an unindexed file waits for reconciliation) or
    the filesystem has no hard links; the caller then replaces the file the careful way.
    """
    try:
        os.link(temp, final)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            return False
        raise
    os.unlink(temp)
    return True


def seal_state(path: Path) -> bool | None:
    """``True``: the file is sealed and whole; ``False``: sealed and torn; ``None``: not sealed.

    Raises:
        OSError: The file cannot be read.
    """
    with open(path, "rb") as handle:
        preamble = handle.read(128)
        if not preamble.startswith(SEAL_MAGIC) or len(preamble) < 128:
            return None
        length, expected = _SEAL.unpack_from(preamble, len(SEAL_MAGIC))
        crc, read = 0, 0
        while chunk := handle.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
            read += len(chunk)
    return read == length and crc == expected


def filesystem_type(path: Path | str) -> str:
    """The type of the filesystem ``path`` lives on (``/proc/self/mountinfo``; ``""`` unknown)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if "-" not in fields:
                    continue
                mount_point = _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
                fstype = fields[fields.index("-") + 1]
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, kind = mount_point, fstype
    except OSError:
        return ""
    return kind


def _same_dataset(path: Path, dataset: memoryview) -> bool:
    """True when the file at ``path`` holds exactly this data set (its file meta may differ)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(144)
            offset = _dataset_offset(head)
            if not offset or os.fstat(handle.fileno()).st_size != offset + len(dataset):
                return False
            handle.seek(offset)
            return handle.read() == dataset.tobytes()  # bytes == memoryview compares item by item: 20x slower
    except OSError:
        return False


def _remove_superseded(path: Path, *, fsync: bool, replaced_by: Path) -> None:
    """Remove the old copy of an instance now stored (and indexed) at ``replaced_by``.

    A failure is logged, not raised: the instance itself is safe, and the start-up
    reconciliation removes a leftover copy (it keeps the newer file).
    """
    try:
        path.unlink(missing_ok=True)
        if fsync:
            fsync_path(path.parent)
    except OSError as exc:
        log.warning("old copy of a moved instance not removed", path=str(path), replaced_by=str(replaced_by),
                    error=str(exc))
        return
    log.info("old copy of a moved instance removed", path=str(path), replaced_by=str(replaced_by))


def _write_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """Write every part to ``fd`` (one ``writev``; more only after a short write)."""
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        written = os.writev(fd, views)
        if not written:
            raise OSError(f"write to the spool made no progress ({sum(len(v) for v in views)} bytes left)")
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


class Spool:
    """Received instances on disk under ``<data_dir>/spool/<study>/<series>/<sop>.dcm``."""

    def __init__(self, data_dir: Path, database: Database, *, index_synchronous: Synchronous = "NORMAL",
                 name_durable_with_file: bool | None = None) -> None:
        """Open (and create) the spool under ``data_dir``.

        Args:
            data_dir: The node's data folder; files go to ``<data_dir>/spool``.
            database: The index.
            index_synchronous: SQLite durability of the index rows (see the module docstring);
                ``FULL`` adds a log fsync to every stored instance and buys nothing that
                :meth:`reconcile` does not restore.
            name_durable_with_file: Whether a file's fsync also makes its new name durable,
                so a new instance's folder need not be fsynced; ``None``: decided from the
                spool's filesystem type (:data:`NAME_DURABLE_FILESYSTEMS`).
        """
        self.root = Path(data_dir) / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
        self.database = database
        self.index_synchronous: Synchronous = index_synchronous
        if name_durable_with_file is None:
            name_durable_with_file = filesystem_type(self.root) in NAME_DURABLE_FILESYSTEMS
        self.name_durable_with_file = name_durable_with_file
        self._root = str(self.root)
        self._known_folders: dict[str, None] = {}  # durable folders, in the order first seen
        self._folders_lock = threading.Lock()

    def path_for(self, info: InstanceInfo) -> Path:
        """Where an instance lives in the spool."""
        return self.root / info.study_uid / info.series_uid / f"{info.sop_instance_uid}.dcm"

    def store(self, encoded: bytes, info: InstanceInfo, *, calling_ae: str, fsync: bool = True) -> StoreOutcome:
        """Write an instance durably and index it; an exact duplicate is stored once.

        Args:
            encoded: The complete DICOM file (preamble, file meta, dataset).
            info: The instance's identifying attributes.
            calling_ae: AE title of the sender, recorded with the instance.
            fsync: Flush the file and its folder to the disk before indexing (see the
                module docstring).

        Returns:
            The outcome; only returned once the file is on disk and indexed.

        Raises:
            StorageError: The file could not be written or the index could not be updated.
        """
        view = memoryview(encoded)
        return self._store([view], view[_dataset_offset(encoded[:144]):], info, calling_ae, fsync)

    def store_dataset(self, dataset: bytes | memoryview, info: InstanceInfo, *, calling_ae: str,
                      implementation_class_uid: str, implementation_version_name: str = "",
                      fsync: bool = True) -> StoreOutcome:
        """:meth:`store` for an encoded data set as received: the spool writes the file meta.

        The data set is written as it is (no copy is made of it); the File Meta Information
        comes from :func:`file_meta`, with ``calling_ae`` as the source AE title.

        Raises:
            StorageError: The file could not be written or the index could not be updated.
        """
        try:
            header = file_meta(info, implementation_class_uid=implementation_class_uid,
                               implementation_version_name=implementation_version_name, source_ae=calling_ae)
        except UnicodeEncodeError as exc:
            raise StorageError(f"cannot write the file meta of {info.sop_instance_uid}: {exc}") from exc
        view = memoryview(dataset)
        header_view = memoryview(header)[128:]
        return self._store([_seal([header_view, view]), header_view, view], view, info, calling_ae, fsync,
                           sealed=True)

    def _store(self, parts: list[bytes | memoryview], dataset: memoryview, info: InstanceInfo, calling_ae: str,
               fsync: bool, *, sealed: bool = False) -> StoreOutcome:
        target = self.path_for(info)
        db = self.database.connection()
        existing = db.execute(
            "SELECT path FROM instances WHERE sop_instance_uid = ?", [info.sop_instance_uid]
        ).fetchone()
        if existing is not None and _same_dataset(Path(existing[0]), dataset):
            # An exact duplicate adds nothing: it neither rewrites the file nor makes the
            # study look newer (which would re-run a finished job). A changed instance sent
            # again under the same UID replaces the stored one.
            return StoreOutcome(info=info, path=Path(existing[0]), duplicate=True)

        final = os.fspath(target)
        folder = os.path.dirname(final)
        temp = f"{final}.{os.getpid()}.{time.monotonic_ns()}{TEMP_SUFFIX}"
        size = sum(len(part) for part in parts)
        try:
            self._ensure_folder(info, fsync)
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the folder went away since we saw it: make it again
                self._forget_folders(info)
                self._ensure_folder(info, fsync)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                _write_all(fd, parts)
                if sealed and existing is None and _link_new(temp, final):
                    # Named first, then one flush: data, size and (on a filesystem where
                    # name_durable_with_file) the new name reach the disk together.
                    if fsync:
                        os.fsync(fd)  # not fdatasync: the link changed only the inode's link count
                    flush_folder = fsync and not self.name_durable_with_file
                else:
                    # A replacement (or a file that is not sealed) is flushed before it takes
                    # the name, so the stored copy stays whole until the new one is on the disk.
                    if fsync:
                        _datasync(fd)
                    os.replace(temp, final)
                    flush_folder = fsync
            finally:
                os.close(fd)
            if flush_folder:
                fsync_path(folder)
        except OSError as exc:
            self._forget_folders(info)
            try:
                os.unlink(temp)
            except OSError:
                pass  # never created, or the folder itself is unusable
            raise StorageError(f"cannot write {final}: {exc}") from exc
        try:
            self._index(info, target, size, calling_ae)
        except Exception as exc:
            raise StorageError(f"cannot index {info.sop_instance_uid}: {exc}") from exc
        if existing is not None and existing[0] != final:
            # The instance moved to another study or series (a PACS split or merged studies):
            # its old copy would come back into the old study at the next reconciliation.
            _remove_superseded(Path(existing[0]), fsync=fsync, replaced_by=target)
        return StoreOutcome(info=info, path=target, duplicate=False)

    def _ensure_folder(self, info: InstanceInfo, fsync: bool) -> None:
        """Make the study and series folders exist, each durable in its parent.

        A folder is made durable (its parent fsynced) the first time this process writes
        into it, whoever created it: another thread or process may have created it a moment
        ago and not yet flushed its parent. After that a set lookup is all it costs.
        """
        parent = self._root
        for name in (info.study_uid, info.series_uid):
            folder = os.path.join(parent, name)
            if folder not in self._known_folders:
                try:
                    os.mkdir(folder)
                except FileExistsError:
                    if not os.path.isdir(folder):
                        raise NotADirectoryError(f"{folder} exists and is not a folder") from None
                if fsync:
                    fsync_path(parent)
                with self._folders_lock:
                    self._known_folders[folder] = None
                    if len(self._known_folders) > KNOWN_FOLDERS_MAX:
                        del self._known_folders[next(iter(self._known_folders))]
            parent = folder

    def _forget_folders(self, info: InstanceInfo) -> None:
        study = os.path.join(self._root, info.study_uid)
        with self._folders_lock:
            self._known_folders.pop(study, None)
            self._known_folders.pop(os.path.join(study, info.series_uid), None)

    def _index(self, info: InstanceInfo, path: Path, size: int, calling_ae: str) -> None:
        now = time.time()
        with self.database.transaction(synchronous=self.index_synchronous) as tx:
            # Plain SQL: sqlite-utils' upsert reads the table's schema on every call, which
            # costs as much as the insert itself on the SCP's hot path.
            tx.execute(
                """INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, modality, path,
                                          size, transfer_syntax, calling_ae, received_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(sop_instance_uid) DO UPDATE SET
                       sop_class_uid = excluded.sop_class_uid, study_uid = excluded.study_uid,
                       series_uid = excluded.series_uid, modality = excluded.modality, path = excluded.path,
                       size = excluded.size, transfer_syntax = excluded.transfer_syntax,
                       calling_ae = excluded.calling_ae, received_at = excluded.received_at""",
                [info.sop_instance_uid, info.sop_class_uid, info.study_uid, info.series_uid, info.modality,
                 str(path), size, info.transfer_syntax, calling_ae, now],
            )
            self._upsert_study(tx, info, calling_ae, now)

    @staticmethod
    def _upsert_study(tx, info: InstanceInfo, calling_ae: str, now: float) -> None:  # type: ignore[no-untyped-def]
        tx.execute(
            """INSERT INTO studies (study_uid, patient_id, calling_ae, first_received_at, last_received_at)
               VALUES (?, ?, ?, ?, ?)
               ON CONFLICT(study_uid) DO UPDATE SET last_received_at = excluded.last_received_at,
                                                    calling_ae = excluded.calling_ae""",
            [info.study_uid, info.patient_id, calling_ae, now, now],
        )

    def study_files(self, study_uid: str) -> dict[str, list[Path]]:
        """The indexed files of a study, grouped by SeriesInstanceUID."""
        rows = self.database.connection().execute(
            "SELECT series_uid, path FROM instances WHERE study_uid = ? ORDER BY path", [study_uid]
        )
        series: dict[str, list[Path]] = {}
        for series_uid, path in rows:
            series.setdefault(series_uid, []).append(Path(path))
        return series

    def series_last_received(self, series_uid: str) -> float:
        """When the newest instance of a series arrived (0 when it has none)."""
        row = self.database.connection().execute(
            "SELECT MAX(received_at) FROM instances WHERE series_uid = ?", [series_uid]
        ).fetchone()
        return float(row[0] or 0.0)

    def reconcile(self) -> tuple[int, int]:
        """Make the spool and the index agree after a crash.

        Removes orphan temporary files and re-indexes complete files that have no index row
        (written and renamed, but the process died before indexing, or the row was lost to a
        power cut under ``synchronous=NORMAL``). A sealed file whose seal does not match (torn
        by a power cut before its flush ended; never acknowledged) is renamed to ``*.torn``
        and not indexed. Run it before the SCP starts: a temporary file of a transfer in
        progress would be taken for an orphan.

        Returns:
            ``(temporary files removed, files re-indexed)``.
        """
        removed = reindexed = 0
        rows = self.database.connection().execute("SELECT sop_instance_uid, path FROM instances").fetchall()
        indexed = {row[1] for row in rows}
        path_of = {row[0]: row[1] for row in rows}
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            if path.name.endswith(TEMP_SUFFIX):
                path.unlink(missing_ok=True)
                removed += 1
                continue
            if path.suffix != ".dcm" or str(path) in indexed:
                continue
            try:
                if seal_state(path) is False:
                    path.rename(path.with_name(path.name + TORN_SUFFIX))
                    log.warning("torn spool file set aside, not indexed (it was never acknowledged)",
                                path=str(path), renamed_to=path.name + TORN_SUFFIX)
                    continue
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                info = instance_info(ds, str(ds.file_meta.TransferSyntaxUID))
                other = path_of.get(info.sop_instance_uid)
                if other is not None and other != str(path) and os.path.exists(other):
                    # Two copies of one instance (it moved to another study or series and the
                    # old copy outlived a crash): the newer one is the instance.
                    if path.stat().st_mtime_ns <= os.stat(other).st_mtime_ns:
                        _remove_superseded(path, fsync=True, replaced_by=Path(other))
                        continue
                    _remove_superseded(Path(other), fsync=True, replaced_by=path)
                self._index(info, path, path.stat().st_size, calling_ae=str(ds.file_meta.get("SourceApplicationEntityTitle", "") or ""))
                path_of[info.sop_instance_uid] = str(path)
                reindexed += 1
            except Exception as exc:  # an unreadable file is kept for inspection, not deleted
                log.warning("spool file not re-indexed", path=str(path), error=str(exc))
        if removed or reindexed:
            log.info("spool reconciled", temp_files_removed=removed, files_reindexed=reindexed)
        return removed, reindexed
