"""The spool: received instances as files on disk, each indexed in SQLite.

An instance is stored by writing its bytes to a temporary file in the target folder,
flushing it to disk, renaming it into place and then indexing it. A crash at any point
leaves either no index row (the file, if complete, is re-indexed at start-up) or a
complete file with its row; a half-written file is never indexed (only renamed files are,
and a file is renamed only once it is complete).

Durability (``fsync`` of :meth:`Spool.store`):

- ``True`` (``[node] fsync = "always"``): the file is fsynced before the rename and its
  folder after it, so the file and its name are on the disk before the instance is indexed
  and acknowledged; it survives a power cut.
- ``False`` (``"never"``): the operating system writes the file back when it likes; a
  process crash loses nothing, a power cut may lose the last seconds of acknowledged
  instances. For spools on battery-backed storage or test systems.

The index row is committed with SQLite ``synchronous=NORMAL`` by default (see
:mod:`pacs_sentinel.dicom_io.index`): it survives a process crash, and a row lost to a power
cut is rebuilt from its fsynced file by :meth:`Spool.reconcile` at start-up. The file, not
the row, is what makes an acknowledged instance durable.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog

from pacs_sentinel.dicom_io.index import Database, Synchronous
from pacs_sentinel.errors import DecodeError, StorageError

log = structlog.get_logger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TEMP_SUFFIX = ".partial"


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


def _same_content(path: Path, encoded: bytes) -> bool:
    """True when the file holds exactly these bytes."""
    try:
        if path.stat().st_size != len(encoded):
            return False
        return path.read_bytes() == encoded
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Received instances on disk under ``<data_dir>/spool/<study>/<series>/<sop>.dcm``."""

    def __init__(self, data_dir: Path, database: Database, *, index_synchronous: Synchronous = "NORMAL") -> None:
        """Open (and create) the spool under ``data_dir``.

        Args:
            data_dir: The node's data folder; files go to ``<data_dir>/spool``.
            database: The index.
            index_synchronous: SQLite durability of the index rows (see the module docstring);
                ``FULL`` adds a log fsync to every stored instance and buys nothing that
                :meth:`reconcile` does not restore.
        """
        self.root = Path(data_dir) / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
        self.database = database
        self.index_synchronous: Synchronous = index_synchronous

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
        target = self.path_for(info)
        db = self.database.connection()
        existing = db.execute(
            "SELECT path FROM instances WHERE sop_instance_uid = ?", [info.sop_instance_uid]
        ).fetchone()
        if existing is not None and _same_content(Path(existing[0]), encoded):
            # An exact duplicate adds nothing: it neither rewrites the file nor makes the
            # study look newer (which would re-run a finished job). A changed instance sent
            # again under the same UID replaces the stored one.
            return StoreOutcome(info=info, path=Path(existing[0]), duplicate=True)

        temp = target.with_name(f"{target.name}.{os.getpid()}.{time.monotonic_ns()}{TEMP_SUFFIX}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "wb") as handle:
                handle.write(encoded)
                handle.flush()
                if fsync:
                    os.fsync(handle.fileno())
            os.replace(temp, target)
            if fsync:
                _fsync_dir(target.parent)
        except OSError as exc:
            try:
                temp.unlink(missing_ok=True)
            except OSError:
                pass  # the folder itself is unusable; nothing was written there
            raise StorageError(f"cannot write {target}: {exc}") from exc
        try:
            self._index(info, target, len(encoded), calling_ae)
        except Exception as exc:
            raise StorageError(f"cannot index {info.sop_instance_uid}: {exc}") from exc
        return StoreOutcome(info=info, path=target, duplicate=False)

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
        power cut under ``synchronous=NORMAL``). Run it before the SCP starts: a temporary
        file of a transfer in progress would be taken for an orphan.

        Returns:
            ``(temporary files removed, files re-indexed)``.
        """
        removed = reindexed = 0
        indexed = {row[0] for row in self.database.connection().execute("SELECT path FROM instances")}
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
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                info = instance_info(ds, str(ds.file_meta.TransferSyntaxUID))
                self._index(info, path, path.stat().st_size, calling_ae=str(ds.file_meta.get("SourceApplicationEntityTitle", "") or ""))
                reindexed += 1
            except Exception as exc:  # an unreadable file is kept for inspection, not deleted
                log.warning("spool file not re-indexed", path=str(path), error=str(exc))
        if removed or reindexed:
            log.info("spool reconciled", temp_files_removed=removed, files_reindexed=reindexed)
        return removed, reindexed
