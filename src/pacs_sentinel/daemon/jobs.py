"""Jobs and their state machine, kept in SQLite.

``RECEIVING -> QUEUED -> RUNNING -> (DELIVERING -> DONE) | FAILED | REJECTED``.
A study is RECEIVING while instances arrive (it has no job yet, or only finished ones
older than its newest instance); the quiet timer turns it into one QUEUED job per
matching pipeline. Jobs found RUNNING at start-up were interrupted and are re-queued. A
re-run's results supersede what an earlier job of the study and pipeline has not delivered yet.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from typing import Any

import sqlite_utils
import structlog

from pacs_sentinel.daemon import review
from pacs_sentinel.dicom_io.index import Database, Migration
from pacs_sentinel.results import QCResult

log = structlog.get_logger(__name__)


class JobState(str, enum.Enum):
    """States of a job (DESIGN.md, "Job states")."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DELIVERING = "DELIVERING"
    DONE = "DONE"
    FAILED = "FAILED"
    REJECTED = "REJECTED"


FINISHED_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.REJECTED})


def _jobs_v1(db: sqlite_utils.Database) -> None:
    db["jobs"].create(
        {
            "id": int,
            "study_uid": str,
            "pipeline": str,
            "state": str,
            "created_at": float,
            "updated_at": float,
            "started_at": float,
            "finished_at": float,
            "runs": int,
            "error": str,
            "series_uid": str,
            "model": str,
            "model_version": str,
            "qc_version": str,
            "verdict": str,
            "quality_score": float,
            "reasons": str,
            "needs_review": int,
            "output_dir": str,
        },
        pk="id",
        not_null={"study_uid", "state", "created_at", "updated_at"},
        defaults={"runs": 0, "needs_review": 0},
    )
    db["jobs"].create_index(["study_uid"])
    db["jobs"].create_index(["state"])
    db["outbox"].create(
        {
            "id": int,
            "job_id": int,
            "destination": str,
            "path": str,
            "sop_instance_uid": str,
            "sop_class_uid": str,
            "state": str,
            "attempts": int,
            "next_attempt_at": float,
            "last_error": str,
            "sent_at": float,
        },
        pk="id",
        foreign_keys=[("job_id", "jobs", "id")],
        defaults={"attempts": 0},
    )
    db["outbox"].create_index(["state", "destination"])


def _qc_signals_v1(db: sqlite_utils.Database) -> None:
    # Every QC signal of every judged segment of a job's result, so that a reviewer's decision
    # on the result can be turned back into a fusion input (qc/refit.py).
    db["qc_signals"].create(
        {
            "id": int,
            "job_id": int,
            "segment_number": int,
            "segment_label": str,
            "quality_score": float,
            "name": str,
            "value": float,
            "subscore": float,
        },
        pk="id",
        foreign_keys=[("job_id", "jobs", "id")],
        not_null={"job_id", "segment_number", "name", "value", "subscore"},
    )
    db["qc_signals"].create_index(["job_id"])


#: The jobs tables, the review worklist that job results feed (daemon/review.py) and the
#: QC signals behind each result.
MIGRATIONS: list[Migration] = [("jobs-v1", _jobs_v1), *review.MIGRATIONS, ("qc-signals-v1", _qc_signals_v1)]


def qc_signal_rows(qc: QCResult) -> list[dict[str, Any]]:
    """The ``qc_signals`` rows of a QC result: one per (segment, signal) with its value and sub-score.

    :attr:`~pacs_sentinel.results.SegmentQC.signals` holds ``name -> value`` and
    ``name_subscore -> subscore``; a name with both is a signal (the values of an empty mask,
    which has no signals, are left out). Classification findings have no fusion: none stored.
    """
    rows = []
    for segment in qc.segments:
        values = segment.signals
        for name, value in values.items():
            subscore = values.get(f"{name}_subscore")
            if name.endswith("_subscore") or subscore is None:
                continue
            rows.append({"segment_number": segment.segment_number, "segment_label": segment.label.name,
                         "quality_score": segment.quality_score, "name": name, "value": float(value),
                         "subscore": float(subscore)})
    return rows


@dataclass(frozen=True)
class Job:
    """One row of the jobs table."""

    id: int
    study_uid: str
    pipeline: str
    state: JobState
    created_at: float
    runs: int
    error: str | None
    verdict: str | None
    quality_score: float | None
    reasons: list[str]
    needs_review: bool
    output_dir: str | None
    series_uid: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        """Build a job from a ``jobs`` row."""
        return cls(
            id=int(row["id"]),
            study_uid=row["study_uid"],
            pipeline=row["pipeline"] or "",
            state=JobState(row["state"]),
            created_at=float(row["created_at"]),
            runs=int(row["runs"] or 0),
            error=row["error"],
            verdict=row["verdict"],
            quality_score=row["quality_score"],
            reasons=json.loads(row["reasons"]) if row["reasons"] else [],
            needs_review=bool(row["needs_review"]),
            output_dir=row["output_dir"],
            series_uid=row.get("series_uid"),
        )


def _supersede_older_results(tx: Any, job_id: int, now: float) -> None:
    """Stop delivering what earlier jobs of the same study and pipeline have not delivered yet.

    A re-run (late arrivals) replaces their results: their pending and dead-letter outbox items
    become ``superseded`` (never sent, never requeued by ``sentinel outbox retry``), and such a
    job still waiting on delivery (DELIVERING, or FAILED because delivery failed) is DONE with
    a note saying by which job and how many objects were dropped. Objects already sent stay sent.
    """
    study_uid, pipeline = tx.execute("SELECT study_uid, pipeline FROM jobs WHERE id = ?", [job_id]).fetchone()
    older = tx.execute(
        """SELECT o.job_id, COUNT(*) FROM outbox o JOIN jobs j ON j.id = o.job_id
           WHERE j.study_uid = ? AND j.pipeline IS ? AND j.id < ? AND o.state IN ('pending', 'dead-letter')
           GROUP BY o.job_id""",
        [study_uid, pipeline, job_id],
    ).fetchall()
    for old_id, count in older:
        tx.execute("UPDATE outbox SET state = 'superseded', last_error = ? "
                   "WHERE job_id = ? AND state IN ('pending', 'dead-letter')",
                   [f"superseded by job {job_id} (a re-run of the study)", old_id])
        tx.execute(
            "UPDATE jobs SET state = ?, error = ?, finished_at = ?, updated_at = ? "
            "WHERE id = ? AND (state = ? OR (state = ? AND error LIKE 'delivery failed%'))",
            [JobState.DONE.value, f"superseded by job {job_id}: {count} undelivered object(s) dropped", now, now,
             old_id, JobState.DELIVERING.value, JobState.FAILED.value],
        )
        log.info("undelivered results superseded", job_id=old_id, newer_job_id=job_id, objects=int(count))


class JobStore:
    """Creates, claims and finishes jobs; every transition is one transaction."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def queue_study(self, study_uid: str, pipelines: dict[str, float], *, rerun_late_arrivals: bool = True) -> list[int]:
        """Queue one job per pipeline unless an up-to-date job exists.

        Args:
            study_uid: The study.
            pipelines: For each matching pipeline, when the newest instance of the series
                it runs on arrived. Only the pipeline's input counts: our own results sent
                back to us, or other objects of the study, never re-run it.
            rerun_late_arrivals: False (``[study] late_arrival = "ignore"``): once a
                pipeline has a job for the study, later instances never queue another.

        A pipeline gets a new job when it has none for the study, or when its newest job
        is no longer QUEUED and was created before its input's newest instance arrived
        (late arrivals re-run the study). A QUEUED job will see every instance anyway.

        Returns:
            The ids of the jobs created.
        """
        created = []
        now = time.time()
        with self.database.transaction() as tx:
            for pipeline, input_received_at in pipelines.items():
                latest = tx.execute(
                    "SELECT state, created_at FROM jobs WHERE study_uid = ? AND pipeline = ? ORDER BY id DESC LIMIT 1",
                    [study_uid, pipeline],
                ).fetchone()
                if latest is not None and (
                    latest[0] == JobState.QUEUED.value
                    or float(latest[1]) >= input_received_at
                    or not rerun_late_arrivals
                ):
                    continue
                created.append(
                    tx["jobs"].insert(
                        {"study_uid": study_uid, "pipeline": pipeline, "state": JobState.QUEUED.value,
                         "created_at": now, "updated_at": now, "runs": 0, "needs_review": 0}
                    ).last_pk
                )
        return created

    def reject_study(self, study_uid: str, reason: str) -> int | None:
        """Record that a study matches no pipeline (once per batch of instances).

        Returns:
            The id of the REJECTED job, or None when an up-to-date one exists.
        """
        now = time.time()
        with self.database.transaction() as tx:
            row = tx.execute("SELECT last_received_at FROM studies WHERE study_uid = ?", [study_uid]).fetchone()
            last_received = float(row[0]) if row else now
            latest = tx.execute(
                "SELECT created_at FROM jobs WHERE study_uid = ? AND pipeline IS NULL ORDER BY id DESC LIMIT 1",
                [study_uid],
            ).fetchone()
            if latest is not None and float(latest[0]) >= last_received:
                return None
            return int(
                tx["jobs"].insert(
                    {"study_uid": study_uid, "pipeline": None, "state": JobState.REJECTED.value, "error": reason,
                     "created_at": now, "updated_at": now, "finished_at": now, "runs": 0, "needs_review": 0}
                ).last_pk
            )

    def requeue_interrupted(self) -> int:
        """Put jobs left RUNNING by a crash back to QUEUED; returns how many."""
        with self.database.transaction() as tx:
            cursor = tx.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ?",
                [JobState.QUEUED.value, time.time(), JobState.RUNNING.value],
            )
            return int(cursor.rowcount)

    def claim_next(self) -> Job | None:
        """Move the oldest QUEUED job to RUNNING and return it (None when none waits)."""
        now = time.time()
        with self.database.transaction() as tx:
            row = tx.execute(
                "SELECT id FROM jobs WHERE state = ? ORDER BY id LIMIT 1", [JobState.QUEUED.value]
            ).fetchone()
            if row is None:
                return None
            tx.execute(
                "UPDATE jobs SET state = ?, started_at = ?, updated_at = ?, runs = runs + 1, error = NULL WHERE id = ?",
                [JobState.RUNNING.value, now, now, row[0]],
            )
        return self.get(int(row[0]))

    def get(self, job_id: int) -> Job:
        """The job with this id.

        Raises:
            KeyError: No such job.
        """
        rows = self.database.rows("SELECT * FROM jobs WHERE id = ?", [job_id])
        if not rows:
            raise KeyError(job_id)
        return Job.from_row(rows[0])

    def newer_queued_job(self, job: Job) -> int | None:
        """The id of a QUEUED job for the same study and pipeline created after ``job``."""
        row = self.database.connection().execute(
            "SELECT id FROM jobs WHERE study_uid = ? AND pipeline = ? AND state = ? AND id > ? ORDER BY id LIMIT 1",
            [job.study_uid, job.pipeline, JobState.QUEUED.value, job.id],
        ).fetchone()
        return int(row[0]) if row else None

    def finish(self, job_id: int, state: JobState, *, error: str | None = None) -> None:
        """Move a job to a final state (FAILED or REJECTED, or DONE without results)."""
        now = time.time()
        with self.database.transaction() as tx:
            tx.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                [state.value, error, now, now, job_id],
            )

    def record_results(
        self,
        job_id: int,
        *,
        result: dict[str, Any],
        outbox_items: list[dict[str, Any]],
        qc_signals: list[dict[str, Any]] | None = None,
    ) -> JobState:
        """Store a job's results and queue its objects for delivery in one transaction.

        The same transaction creates or updates the study's review item when the result
        needs review (and closes an unresolved one when a re-run was accepted): see
        :meth:`pacs_sentinel.daemon.review.ReviewStore.record_job_result`.

        Args:
            job_id: The RUNNING job.
            result: Columns to set (series_uid, model, model_version, qc_version, verdict,
                quality_score, reasons (list), needs_review, output_dir).
            outbox_items: One dict per (destination, file): destination, path,
                sop_instance_uid, sop_class_uid.
            qc_signals: :func:`qc_signal_rows` of the result; they replace any rows an
                interrupted earlier run of the job left.

        Returns:
            The job's new state: DELIVERING, or DONE when there is nothing to deliver.
        """
        now = time.time()
        state = JobState.DELIVERING if outbox_items else JobState.DONE
        columns = dict(result)
        columns["reasons"] = json.dumps(columns.get("reasons", []))
        columns["needs_review"] = int(bool(columns.get("needs_review")))
        columns.update({"state": state.value, "updated_at": now})
        if state is JobState.DONE:
            columns["finished_at"] = now
        with self.database.transaction() as tx:
            tx["jobs"].update(job_id, columns)
            tx.execute("DELETE FROM qc_signals WHERE job_id = ?", [job_id])
            for row in qc_signals or []:
                tx["qc_signals"].insert({**row, "job_id": job_id})
            for item in outbox_items:
                tx["outbox"].insert(
                    {**item, "job_id": job_id, "state": "pending", "attempts": 0, "next_attempt_at": now}
                )
            _supersede_older_results(tx, job_id, now)
            review.ReviewStore.record_job_result(tx, job_id, result)
        return state

    def qc_signals(self, job_id: int) -> list[dict[str, Any]]:
        """The stored QC signal rows of a job, by segment then name."""
        return self.database.rows("SELECT * FROM qc_signals WHERE job_id = ? ORDER BY segment_number, id", [job_id])

    def jobs(self, *, study_uid: str | None = None, limit: int = 200) -> list[Job]:
        """Newest jobs first, optionally of one study."""
        if study_uid:
            rows = self.database.rows("SELECT * FROM jobs WHERE study_uid = ? ORDER BY id DESC LIMIT ?", [study_uid, limit])
        else:
            rows = self.database.rows("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", [limit])
        return [Job.from_row(r) for r in rows]

    def delivered_series(self, study_uid: str, pipelines: list[str]) -> dict[str, float]:
        """Source series of the study for which one of ``pipelines`` delivered a result.

        Returns:
            Series Instance UID -> when the first object of such a result was acknowledged
            by a destination (epoch seconds).
        """
        if not pipelines:
            return {}
        marks = ",".join("?" * len(pipelines))
        rows = self.database.connection().execute(
            f"""SELECT j.series_uid, MIN(o.sent_at) FROM jobs j JOIN outbox o ON o.job_id = j.id
                WHERE j.study_uid = ? AND j.pipeline IN ({marks}) AND j.series_uid IS NOT NULL
                  AND o.sent_at IS NOT NULL
                GROUP BY j.series_uid""",
            [study_uid, *pipelines],
        ).fetchall()
        return {str(r[0]): float(r[1]) for r in rows}

    def stale_studies(self) -> list[str]:
        """Studies with instances newer than their newest job (or with no job at all)."""
        rows = self.database.connection().execute(
            """SELECT s.study_uid FROM studies s
               WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid
                                 AND (j.created_at >= s.last_received_at OR j.state = 'QUEUED'))"""
        ).fetchall()
        return [r[0] for r in rows]
