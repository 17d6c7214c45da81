"""The outbox: results wait here until their destination acknowledged them.

Each flush sends, per destination, every due item in one association. A failed attempt
(association refused, no response, failure status) is retried with exponential backoff;
after ``max_attempts`` the item moves to the dead letters (state ``dead-letter``, shown by
``sentinel status``) and its job is FAILED with the reason. A permanent failure (the
destination does not support the object's SOP class: retrying cannot help until its
configuration changes) is a dead letter at once. ``sentinel outbox retry`` puts dead letters
back in the queue (:func:`requeue_dead_letters`), e.g. after the destination was fixed. A job
whose items are all delivered becomes DONE. When a re-run of the study (late arrivals) records
its results, the earlier job's undelivered items become ``superseded`` and are never sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from pacs_sentinel.daemon.config import DestinationConfig, OutboxConfig
from pacs_sentinel.daemon.jobs import JobState
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scu import Peer, send_files
from pacs_sentinel.errors import DeliveryError, SentinelError

log = structlog.get_logger(__name__)

#: Outbox item states.
PENDING = "pending"
SENT = "sent"
DEAD_LETTER = "dead-letter"
#: Not delivered because a re-run of the study replaced the job's results (daemon/jobs.py).
SUPERSEDED = "superseded"


class Outbox:
    """Delivers queued result files to the configured destinations."""

    def __init__(
        self,
        database: Database,
        destinations: Sequence[DestinationConfig],
        settings: OutboxConfig,
        *,
        calling_ae: str,
    ) -> None:
        self.database = database
        self.destinations = {d.name: d for d in destinations}
        self.settings = settings
        self.calling_ae = calling_ae
        self._lock = threading.Lock()

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts."""
        return min(self.settings.retry_max_seconds, self.settings.retry_initial_seconds * 2 ** max(0, attempts - 1))

    def flush(self) -> int:
        """Send every due item; returns how many were delivered. Never raises."""
        if not self._lock.acquire(blocking=False):
            return 0  # a flush is already running; it will pick these items up
        try:
            return sum(self._flush_destination(name) for name in self._due_destinations())
        except Exception:
            log.exception("outbox flush failed")
            return 0
        finally:
            self._lock.release()

    def _due_destinations(self) -> list[str]:
        rows = self.database.connection().execute(
            "SELECT DISTINCT destination FROM outbox WHERE state = 'pending' AND next_attempt_at <= ?", [time.time()]
        ).fetchall()
        return [r[0] for r in rows]

    def _flush_destination(self, name: str) -> int:
        db = self.database.connection()
        items = db.execute(
            "SELECT id, job_id, path, attempts FROM outbox WHERE state = 'pending' AND destination = ? "
            "AND next_attempt_at <= ? ORDER BY id",
            [name, time.time()],
        ).fetchall()
        destination = self.destinations.get(name)
        if destination is None:
            self._fail_items(items, f"destination {name!r} is no longer configured", give_up=True)
            return 0
        peer = Peer(destination.ae_title, destination.host, destination.port)
        try:
            results = send_files([Path(i[2]) for i in items], peer, calling_ae=self.calling_ae)
        except (DeliveryError, OSError) as exc:
            log.warning("delivery attempt failed", destination=name, items=len(items), error=str(exc))
            self._fail_items(items, str(exc), give_up=getattr(exc, "permanent", False))
            return 0
        delivered = 0
        now = time.time()
        with self.database.transaction() as tx:
            for item, result in zip(items, results, strict=True):
                if result.delivered:
                    tx.execute("UPDATE outbox SET state = 'sent', sent_at = ?, attempts = attempts + 1, "
                               "last_error = NULL WHERE id = ?", [now, item[0]])
                    delivered += 1
                else:
                    self._fail_item(tx, item, result.error, give_up=result.permanent)
        log.info("delivered", destination=name, delivered=delivered, failed=len(items) - delivered)
        self._complete_jobs({i[1] for i in items})
        return delivered

    def _fail_items(self, items: list[tuple], error: str, *, give_up: bool = False) -> None:  # type: ignore[type-arg]
        with self.database.transaction() as tx:
            for item in items:
                self._fail_item(tx, item, error, give_up=give_up)
        self._complete_jobs({i[1] for i in items})

    def _fail_item(self, tx, item: tuple, error: str, *, give_up: bool = False) -> None:  # type: ignore[no-untyped-def, type-arg]
        attempts = int(item[3]) + 1
        if give_up or attempts >= self.settings.max_attempts:
            tx.execute("UPDATE outbox SET state = ?, attempts = ?, last_error = ? WHERE id = ?",
                       [DEAD_LETTER, attempts, error, item[0]])
            log.error("delivery given up: dead letter", outbox_id=item[0], job_id=item[1], attempts=attempts,
                      error=error)
        else:
            tx.execute("UPDATE outbox SET attempts = ?, last_error = ?, next_attempt_at = ? WHERE id = ?",
                       [attempts, error, time.time() + self.backoff(attempts), item[0]])

    def _complete_jobs(self, job_ids: set[int]) -> None:
        now = time.time()
        with self.database.transaction() as tx:
            for job_id in job_ids:
                counts = dict(tx.execute("SELECT state, COUNT(*) FROM outbox WHERE job_id = ? GROUP BY state",
                                         [job_id]).fetchall())
                if counts.get("pending"):
                    continue
                if counts.get(DEAD_LETTER):
                    error = tx.execute("SELECT destination || ': ' || last_error FROM outbox WHERE job_id = ? "
                                       "AND state = ? LIMIT 1", [job_id, DEAD_LETTER]).fetchone()[0]
                    state, message = JobState.FAILED.value, f"delivery failed ({error})"
                else:
                    state, message = JobState.DONE.value, None
                # DONE keeps the note the job was recorded with (e.g. a SEG that was not judged).
                tx.execute("UPDATE jobs SET state = ?, error = COALESCE(?, error), finished_at = ?, updated_at = ? "
                           "WHERE id = ? AND state = ?", [state, message, now, now, job_id, JobState.DELIVERING.value])

    def pending_count(self) -> int:
        """Items not yet delivered nor given up."""
        return int(self.database.connection().execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0])


def outbox_summary(database: Database) -> dict[str, dict[str, int]]:
    """Item counts per destination and state, e.g. ``{"pacs": {"sent": 3, "pending": 1}}``."""
    summary: dict[str, dict[str, int]] = {}
    rows = database.connection().execute("SELECT destination, state, COUNT(*) FROM outbox GROUP BY destination, state")
    for destination, state, count in rows:
        summary.setdefault(destination, {})[state] = int(count)
    return summary


def dead_letters(database: Database, limit: int = 20) -> list[dict[str, object]]:
    """The newest dead letters: what could not be delivered, where, and why."""
    cursor = database.connection().execute(
        "SELECT id, job_id, destination, sop_class_uid, sop_instance_uid, attempts, last_error FROM outbox "
        "WHERE state = ? ORDER BY id DESC LIMIT ?", [DEAD_LETTER, limit])
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def requeue_dead_letters(database: Database, *, item_ids: Sequence[int] = (), destination: str | None = None) -> int:
    """Put dead letters back in the queue, due now, with their attempts counted from zero.

    Their jobs return from FAILED to DELIVERING (and end DONE once everything is delivered);
    a job that failed for another reason than delivery is left alone. The running daemon's
    next outbox flush sends them.

    Args:
        database: The daemon's database.
        item_ids: Only these outbox items (default: every dead letter).
        destination: Only the dead letters for this destination.

    Returns:
        How many items were requeued.

    Raises:
        SentinelError: One of ``item_ids`` is not a dead letter (of ``destination``); nothing is requeued.
    """
    where, params = ["state = ?"], [DEAD_LETTER]
    if item_ids:
        where.append(f"id IN ({', '.join('?' * len(item_ids))})")
        params += [int(i) for i in item_ids]
    if destination is not None:
        where.append("destination = ?")
        params.append(destination)
    now = time.time()
    with database.transaction() as tx:
        rows = tx.execute(f"SELECT id, job_id FROM outbox WHERE {' AND '.join(where)}", params).fetchall()
        missing = sorted({int(i) for i in item_ids} - {item_id for item_id, _ in rows})
        if missing:
            raise SentinelError(f"no dead letter {', '.join(map(str, missing))}"
                                + (f" for destination {destination!r}" if destination is not None else ""))
        for item_id, _ in rows:
            tx.execute("UPDATE outbox SET state = ?, attempts = 0, next_attempt_at = ? WHERE id = ?",
                       [PENDING, now, item_id])
        for job_id in {job_id for _, job_id in rows}:
            tx.execute("UPDATE jobs SET state = ?, error = NULL, finished_at = NULL, updated_at = ? "
                       "WHERE id = ? AND state = ? AND error LIKE 'delivery failed%'",
                       [JobState.DELIVERING.value, now, job_id, JobState.FAILED.value])
    if rows:
        log.info("dead letters requeued", items=len(rows), destination=destination)
    return len(rows)
