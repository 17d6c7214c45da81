"""The SQLite index beside the spool: one database file, one connection per thread.

The SCP's association threads (and, with several listener processes, those processes),
the scheduler and the worker all write to the same database; SQLite in WAL mode lets
readers go on while one writer commits, and every thread gets its own connection so no
connection is ever shared across threads.

Durability of a commit is chosen per transaction (``synchronous``):

- ``FULL`` (the default) fsyncs the write-ahead log at every commit: a committed
  transaction survives a power cut. Job states and the outbox use it; losing one of their
  rows would re-run a job or re-send a result.
- ``NORMAL`` fsyncs the log only at checkpoints: a committed transaction survives the
  death of the process (SIGKILL, crash: the log is in the operating system's cache) but
  the last transactions before a power cut may be lost. The spool's index rows use it,
  because the spool's files are the source of truth: each is fsynced before its row is
  written, and :meth:`pacs_sentinel.dicom_io.spool.Spool.reconcile` re-indexes at start-up
  every file that has no row. So an acknowledged instance is never lost, and a commit
  costs no fsync (the SCP's throughput doubles, see docs/benchmarks.md).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import sqlite_utils

#: A named migration: (name, function applying it to the database).
Migration = tuple[str, Callable[[sqlite_utils.Database], None]]

BUSY_TIMEOUT_MS = 30_000

#: ``PRAGMA synchronous`` levels a transaction may ask for (see the module docstring).
Synchronous = Literal["FULL", "NORMAL"]


def _instances_v1(db: sqlite_utils.Database) -> None:
    db["instances"].create(
        {
            "sop_instance_uid": str,
            "sop_class_uid": str,
            "study_uid": str,
            "series_uid": str,
            "modality": str,
            "path": str,
            "size": int,
            "transfer_syntax": str,
            "calling_ae": str,
            "received_at": float,
        },
        pk="sop_instance_uid",
    )
    db["instances"].create_index(["study_uid"])
    db["studies"].create(
        {
            "study_uid": str,
            "patient_id": str,
            "calling_ae": str,
            "first_received_at": float,
            "last_received_at": float,
        },
        pk="study_uid",
    )


MIGRATIONS: list[Migration] = [("instances-v1", _instances_v1)]


class Database:
    """The product's SQLite database with per-thread connections and named migrations."""

    def __init__(self, path: Path, migrations: list[Migration] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate(MIGRATIONS + list(migrations or []))

    def connection(self) -> sqlite_utils.Database:
        """This thread's connection (opened on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous = FULL")
            db = sqlite_utils.Database(conn)
            self._local.db = db
            self._local.synchronous = "FULL"
        return db

    def rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Run a query on this thread's connection; each row as a column -> value dict."""
        cursor = self.connection().execute(sql, params or [])
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    @contextmanager
    def transaction(self, *, synchronous: Synchronous = "FULL") -> Iterator[sqlite_utils.Database]:
        """A write transaction (``BEGIN IMMEDIATE``); committed on success, rolled back on error.

        Args:
            synchronous: How durable the commit is: ``FULL`` survives a power cut, ``NORMAL``
                survives a process crash only (see the module docstring for who may use it).
        """
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        db = self.connection()
        if self._local.synchronous != synchronous:
            db.execute(f"PRAGMA synchronous = {synchronous}")  # outside any transaction, as SQLite requires
            self._local.synchronous = synchronous
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None

    def _migrate(self, migrations: list[Migration]) -> None:
        db = self.connection()
        db.execute("PRAGMA journal_mode = WAL")  # outside any transaction, as SQLite requires
        with self.transaction() as tx:
            if "migrations" not in tx.table_names():
                tx["migrations"].create({"name": str, "applied_at": str}, pk="name")
            applied = {row["name"] for row in tx["migrations"].rows}
            for name, apply in migrations:
                if name not in applied:
                    apply(tx)
                    tx.execute("INSERT INTO migrations (name, applied_at) VALUES (?, datetime('now'))", [name])
