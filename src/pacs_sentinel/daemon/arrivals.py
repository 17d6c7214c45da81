"""Notice new instances in the index and decide when each study is complete.

The watcher reads the ``studies`` table instead of relying on a callback from the SCP, so
instances stored by any process writing the index (one SCP thread or several listener
processes) start their study's quiet timer the same way, and nothing is missed across a
restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pacs_sentinel.daemon.config import StudyConfig
from pacs_sentinel.dicom_io.index import Database

#: How far back each poll looks, in seconds. A store computes its timestamp before its
#: transaction commits; a commit delayed by a busy database can therefore carry an older
#: timestamp than one already seen. Re-reading this window and de-duplicating by
#: (study, timestamp) makes sure no arrival is missed.
LOOKBACK_SECONDS = 120.0


@dataclass(frozen=True)
class StudyArrival:
    """A study whose newest instance arrived at ``last_received_at``."""

    study_uid: str
    calling_ae: str
    first_received_at: float
    last_received_at: float


def completion_time(arrival: StudyArrival, settings: StudyConfig) -> float:
    """When the study counts as complete (epoch seconds).

    The study is complete after the sender's quiet time without a new instance, but never
    later than ``max_wait_seconds`` after its first instance, so a sender that never pauses
    still gets results.
    """
    quiet = settings.quiet_seconds_by_calling_ae.get(arrival.calling_ae, settings.quiet_seconds)
    return min(arrival.last_received_at + quiet, arrival.first_received_at + settings.max_wait_seconds)


class ArrivalWatcher:
    """Polls the index for studies that received instances since the last poll."""

    def __init__(self, database: Database, on_arrival: Callable[[StudyArrival], None]) -> None:
        self.database = database
        self.on_arrival = on_arrival
        self._seen: dict[tuple[str, float], float] = {}
        self._watermark = 0.0

    def start_from_now(self) -> None:
        """Ignore arrivals already in the index (start-up handles those explicitly)."""
        row = self.database.connection().execute("SELECT MAX(last_received_at) FROM studies").fetchone()
        self._watermark = float(row[0] or 0.0)
        for arrival in self._read(self._watermark - LOOKBACK_SECONDS):
            self._seen[(arrival.study_uid, arrival.last_received_at)] = arrival.last_received_at

    def _read(self, since: float) -> list[StudyArrival]:
        rows = self.database.connection().execute(
            "SELECT study_uid, calling_ae, first_received_at, last_received_at FROM studies "
            "WHERE last_received_at > ? ORDER BY last_received_at",
            [since],
        ).fetchall()
        return [StudyArrival(r[0], r[1] or "", float(r[2]), float(r[3])) for r in rows]

    def poll(self) -> int:
        """Report every new arrival once; returns how many were reported."""
        reported = 0
        for arrival in self._read(self._watermark - LOOKBACK_SECONDS):
            key = (arrival.study_uid, arrival.last_received_at)
            if key in self._seen:
                continue
            self._seen[key] = arrival.last_received_at
            self._watermark = max(self._watermark, arrival.last_received_at)
            self.on_arrival(arrival)
            reported += 1
        horizon = min(self._watermark, time.time()) - 2 * LOOKBACK_SECONDS
        for key in [k for k, seen_at in self._seen.items() if seen_at < horizon]:
            del self._seen[key]
        return reported

    def all_studies(self, study_uids: list[str]) -> list[StudyArrival]:
        """The arrival records of the given studies."""
        if not study_uids:
            return []
        marks = ",".join("?" * len(study_uids))
        rows = self.database.connection().execute(
            f"SELECT study_uid, calling_ae, first_received_at, last_received_at FROM studies "
            f"WHERE study_uid IN ({marks})",
            study_uids,
        ).fetchall()
        return [StudyArrival(r[0], r[1] or "", float(r[2]), float(r[3])) for r in rows]
