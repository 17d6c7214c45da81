"""The review worklist: one item per study and pipeline whose AI result "Needs review".

The worker writes an item in the same transaction that records the job's results
(:meth:`ReviewStore.record_job_result`), so a crash never leaves a flagged result without its
item, and a job resumed after a crash or re-run for late arrivals updates the study's item
instead of adding a second one (the table is unique on ``(study_uid, pipeline)``).

Life of an item: ``open -> claimed -> resolved`` with a decision (``ai-correct``,
``ai-corrected``, ``ai-rejected``), the reviewer's name and comments. A re-run whose result
needs review again re-opens a resolved item (the new result has not been reviewed); a re-run
whose result is accepted closes an unresolved item without a decision, saying why.
"""

from __future__ import annotations

import enum
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlite_utils

from pacs_sentinel.dicom_io.index import Database, Migration
from pacs_sentinel.errors import SentinelError
from pacs_sentinel.results import Reason

#: Who closes an item that a later accepted run made moot.
SYSTEM_REVIEWER = "sentinel"


class ReviewError(SentinelError):
    """A review action is not possible (no such item, wrong status, bad decision...)."""


class ReviewInputError(ReviewError):
    """A review action was asked with an invalid value (decision, reviewer, filter): the request
    is wrong, whatever the item's state (the web page answers 400, not 409)."""


class ReviewStatus(str, enum.Enum):
    """Where an item is in its life."""

    OPEN = "open"
    CLAIMED = "claimed"
    RESOLVED = "resolved"


class Decision(str, enum.Enum):
    """What the reviewer decided about the AI result."""

    AI_CORRECT = "ai-correct"
    AI_CORRECTED = "ai-corrected"
    AI_REJECTED = "ai-rejected"


#: What each QC finding means, in words for the reviewer (every :class:`Reason` has one).
REASON_EXPLANATIONS: dict[Reason, str] = {
    Reason.EMPTY_MASK: "the model found nothing to segment",
    Reason.VOLUME_ANOMALY: "the segmented volume is outside the range the model card records",
    Reason.SHAPE_IRREGULARITY: "the mask's shape is unusual (not compact, holes, odd outline)",
    Reason.FRAGMENTATION: "the mask is split into several separate pieces",
    Reason.LOW_MODEL_CONFIDENCE: "the model's probabilities are close to its decision threshold",
    Reason.HIGH_UNCERTAINTY: "repeated stochastic passes of the model disagree",
    Reason.POOR_INPUT_QUALITY: "the image is noisy, blurred, has metal artefacts or a cut-off field of view",
    Reason.BORDER_CONTACT: "the mask reaches the edge of the image, so part of the organ may be missing",
    Reason.IMPLAUSIBLE_LOCATION: "the mask lies on the unexpected side of the body",
    Reason.DISAGREEMENT: "the segmentation differs clearly from our own model's prediction of the same organ",
    Reason.LOW_PREDICTED_DICE: "a second network that looks at image and mask together expects a poor overlap "
                               "with the true organ",
    Reason.LOW_EXPECTED_DICE: "the model's own probability map does not back the mask: it is unsure around "
                              "the outline, or the mask adds or leaves out tissue the model judges otherwise",
    Reason.UNFAMILIAR_INPUT: "the image looks unlike the images the model was trained on (inverted, rotated, "
                             "cropped, blurred, another body part), so its output may not hold",
    Reason.UNCOVERED_STRUCTURE: "no model of this node knows this structure, so only general checks of the mask "
                                "and the image could be made: they cannot tell whether it is the right organ",
}
_EXPLANATION_BY_LABEL = {reason.label: text for reason, text in REASON_EXPLANATIONS.items()}


def explain_reason(label: str) -> str:
    """``"Fragmentation"`` -> ``"Fragmentation: the mask is split into several separate pieces"``."""
    explanation = _EXPLANATION_BY_LABEL.get(label)
    return f"{label}: {explanation}" if explanation else label


def viewer_link(template: str, study_uid: str) -> str | None:
    """The PACS viewer URL of a study from ``[review] viewer_url`` (None when not configured)."""
    if not template:
        return None
    return template.format(StudyInstanceUID=quote(study_uid, safe=""))


def _review_v1(db: sqlite_utils.Database) -> None:
    db["review_items"].create(
        {
            "id": int,
            "study_uid": str,
            "pipeline": str,
            "job_id": int,
            "series_uid": str,
            "model": str,
            "model_version": str,
            "qc_version": str,
            "quality_score": float,
            "reasons": str,
            "output_dir": str,
            "status": str,
            "decision": str,
            "reviewer": str,
            "comments": str,
            "created_at": float,
            "updated_at": float,
            "claimed_at": float,
            "resolved_at": float,
            "runs": int,
        },
        pk="id",
        not_null={"study_uid", "pipeline", "job_id", "status", "created_at", "updated_at"},
        defaults={"runs": 1},
    )
    db["review_items"].create_index(["study_uid", "pipeline"], unique=True)
    db["review_items"].create_index(["status"])


def _feedback_v1(db: sqlite_utils.Database) -> None:
    db["feedback"].create(
        {
            "id": int,
            "sop_instance_uid": str,
            "study_uid": str,
            "series_uid": str,
            "pipeline": str,
            "job_id": int,
            "review_item_id": int,
            "segment_number": int,
            "segment_label": str,
            "correction_segment_number": int,
            "dice": float,
            "hd95_mm": float,
            "path": str,
            "creator": str,
            "error": str,
            "recorded_at": float,
        },
        pk="id",
        not_null={"sop_instance_uid", "study_uid", "job_id", "recorded_at"},
    )
    db["feedback"].create_index(["sop_instance_uid", "segment_number"], unique=True)
    db["feedback"].create_index(["study_uid"])


#: The worklist and the feedback (corrected segmentations) that resolves its items.
MIGRATIONS: list[Migration] = [("review-v1", _review_v1), ("feedback-v1", _feedback_v1)]


@dataclass(frozen=True)
class ReviewItem:
    """One row of the worklist."""

    id: int
    study_uid: str
    pipeline: str
    job_id: int
    series_uid: str | None
    model: str | None
    model_version: str | None
    qc_version: str | None
    quality_score: float | None
    reasons: list[str]
    output_dir: str | None
    status: ReviewStatus
    decision: Decision | None
    reviewer: str | None
    comments: str | None
    created_at: float
    updated_at: float
    claimed_at: float | None
    resolved_at: float | None
    runs: int

    def overlay_paths(self) -> list[Path]:
        """The overlay PNGs the job wrote, in order: ``overlay_<n>.png`` in its output folder,
        then those of its ``seg-<k>`` sub-folders (a seg-qc job that judged several SEGs)."""
        if not self.output_dir:
            return []
        folder = Path(self.output_dir)

        def numbered(directory: Path, prefix: str) -> list[Path]:
            found = [p for p in directory.glob(f"{prefix}*") if re.fullmatch(rf"{prefix}\d+(\.png)?", p.name)]
            return sorted(found, key=lambda p: int(re.sub(r"\D", "", p.name)))

        paths = [p for p in numbered(folder, "overlay_") if p.suffix == ".png"]
        for sub in numbered(folder, "seg-"):
            if sub.is_dir():
                paths += [p for p in numbered(sub, "overlay_") if p.suffix == ".png"]
        return paths

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ReviewItem:
        """Build an item from a ``review_items`` row."""
        return cls(
            id=int(row["id"]),
            study_uid=row["study_uid"],
            pipeline=row["pipeline"],
            job_id=int(row["job_id"]),
            series_uid=row["series_uid"],
            model=row["model"],
            model_version=row["model_version"],
            qc_version=row["qc_version"],
            quality_score=row["quality_score"],
            reasons=json.loads(row["reasons"]) if row["reasons"] else [],
            output_dir=row["output_dir"],
            status=ReviewStatus(row["status"]),
            decision=Decision(row["decision"]) if row["decision"] else None,
            reviewer=row["reviewer"],
            comments=row["comments"],
            created_at=float(row["created_at"]),
            updated_at=float(row["updated_at"]),
            claimed_at=row["claimed_at"],
            resolved_at=row["resolved_at"],
            runs=int(row["runs"] or 1),
        )


def parse_since(text: str, *, now: float | None = None) -> float:
    """A ``--since`` value as a Unix time: ``"7d"``, ``"12h"``, ``"30m"`` ago, or an ISO date/time.

    Raises:
        ReviewError: The text is neither.
    """
    import datetime

    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match:
        seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now - float(match.group(1)) * seconds
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReviewInputError(f"since: {text!r} is neither a duration (7d, 12h, 30m) nor an ISO date") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _status_for_change(tx: sqlite_utils.Database, item_id: int, reviewer: str) -> str:
    """The item's status, when ``reviewer`` may change it (claim or resolve).

    Raises:
        ReviewError: No such item, it is resolved, or someone else claimed it.
    """
    row = tx.execute("SELECT status, reviewer FROM review_items WHERE id = ?", [item_id]).fetchone()
    if row is None:
        raise ReviewError(f"no review item {item_id}")
    status, current = row
    if status == ReviewStatus.RESOLVED.value:
        raise ReviewError(f"review item {item_id} is already resolved")
    if status == ReviewStatus.CLAIMED.value and current != reviewer:
        raise ReviewError(f"review item {item_id} is claimed by {current}")
    return str(status)


class ReviewStore:
    """The worklist in the daemon's database; every change is one transaction."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @staticmethod
    def record_job_result(tx: sqlite_utils.Database, job_id: int, result: dict[str, Any]) -> int | None:
        """Create, update or close the item of a job's study and pipeline, inside ``tx``.

        Called by :meth:`~pacs_sentinel.daemon.jobs.JobStore.record_results` in the
        transaction that stores the job's results.

        Args:
            tx: The open transaction.
            job_id: The job (its study and pipeline are read from the jobs table).
            result: The job's result columns (``needs_review``, ``quality_score``, ...).

        Returns:
            The item's id, or None when the result needs no review and there was no item.
        """
        job = tx.execute("SELECT study_uid, pipeline FROM jobs WHERE id = ?", [job_id]).fetchone()
        if job is None or job[1] is None:
            return None
        study_uid, pipeline = job
        row = tx.execute(
            "SELECT id, status, job_id FROM review_items WHERE study_uid = ? AND pipeline = ?", [study_uid, pipeline]
        ).fetchone()
        now = time.time()
        if not result.get("needs_review"):
            if row is None or row[1] == ReviewStatus.RESOLVED.value:
                return None if row is None else int(row[0])
            # A later run of the study was accepted: the flagged result it replaces needs no review.
            tx["review_items"].update(int(row[0]), {
                "status": ReviewStatus.RESOLVED.value, "decision": None, "reviewer": SYSTEM_REVIEWER,
                "comments": f"superseded by job {job_id}, whose result was accepted",
                "resolved_at": now, "updated_at": now, "job_id": job_id,
            })
            return int(row[0])
        columns = {
            "job_id": job_id,
            "series_uid": result.get("series_uid"),
            "model": result.get("model"),
            "model_version": result.get("model_version"),
            "qc_version": result.get("qc_version"),
            "quality_score": result.get("quality_score"),
            "reasons": json.dumps(list(result.get("reasons") or [])),
            "output_dir": result.get("output_dir"),
            "updated_at": now,
        }
        if row is None:
            return int(tx["review_items"].insert({
                **columns, "study_uid": study_uid, "pipeline": pipeline, "status": ReviewStatus.OPEN.value,
                "created_at": now, "runs": 1,
            }).last_pk)
        item_id, status, previous_job = int(row[0]), row[1], int(row[2])
        if previous_job != job_id:
            # A re-run (late arrivals): the new result replaces the old one on the item; a
            # decision about the old result does not hold for the new one.
            columns["runs"] = tx.execute("SELECT runs FROM review_items WHERE id = ?", [item_id]).fetchone()[0] + 1
            if status == ReviewStatus.RESOLVED.value:
                columns.update({"status": ReviewStatus.OPEN.value, "decision": None, "resolved_at": None,
                                "claimed_at": None, "reviewer": None})
        tx["review_items"].update(item_id, columns)
        return item_id

    def get(self, item_id: int) -> ReviewItem:
        """The item with this id.

        Raises:
            ReviewError: No such item.
        """
        rows = self.database.rows("SELECT * FROM review_items WHERE id = ?", [item_id])
        if not rows:
            raise ReviewError(f"no review item {item_id}")
        return ReviewItem.from_row(rows[0])

    def find(self, study_uid: str, pipeline: str) -> ReviewItem | None:
        """The item of a study and pipeline, if there is one."""
        rows = self.database.rows("SELECT * FROM review_items WHERE study_uid = ? AND pipeline = ?", [study_uid, pipeline])
        return ReviewItem.from_row(rows[0]) if rows else None

    def items(
        self,
        *,
        status: str | None = None,
        pipeline: str | None = None,
        since: float | None = None,
        order: str = "priority",
        limit: int = 500,
    ) -> list[ReviewItem]:
        """Items matching the filters.

        Args:
            status: ``open``, ``claimed``, ``resolved``, or None for all.
            pipeline: Only this pipeline's items.
            since: Only items created at or after this Unix time.
            order: ``"priority"``: lowest quality score first, then oldest first (the
                worklist order); ``"newest"``: newest first.
            limit: At most this many.

        Raises:
            ReviewError: An unknown status or order.
        """
        where, params = [], []
        if status is not None:
            try:
                where.append("status = ?")
                params.append(ReviewStatus(status).value)
            except ValueError:
                raise ReviewInputError(f"status: {status!r} is not one of open, claimed, resolved") from None
        if pipeline is not None:
            where.append("pipeline = ?")
            params.append(pipeline)
        if since is not None:
            where.append("created_at >= ?")
            params.append(since)
        orders = {"priority": "COALESCE(quality_score, 0) ASC, created_at ASC, id ASC", "newest": "id DESC"}
        if order not in orders:
            raise ReviewInputError(f"order: {order!r} is not one of {', '.join(orders)}")
        sql = "SELECT * FROM review_items"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {orders[order]} LIMIT ?"
        return [ReviewItem.from_row(r) for r in self.database.rows(sql, [*params, limit])]

    def claim(self, item_id: int, reviewer: str) -> ReviewItem:
        """Claim an open item for ``reviewer`` (claiming one's own claim again is a no-op).

        Raises:
            ReviewError: No such item, it is resolved, or someone else claimed it.
        """
        reviewer = _reviewer(reviewer)
        now = time.time()
        with self.database.transaction() as tx:
            status = _status_for_change(tx, item_id, reviewer)
            if status == ReviewStatus.OPEN.value:
                tx["review_items"].update(item_id, {"status": ReviewStatus.CLAIMED.value, "reviewer": reviewer,
                                                    "claimed_at": now, "updated_at": now})
        return self.get(item_id)

    def resolve(self, item_id: int, decision: str, reviewer: str, comments: str | None = None) -> ReviewItem:
        """Resolve an open item, or one claimed by ``reviewer``, with a decision.

        Raises:
            ReviewError: No such item, an unknown decision, it is resolved already, or
                another reviewer claimed it.
        """
        reviewer = _reviewer(reviewer)
        try:
            chosen = Decision(decision)
        except ValueError:
            raise ReviewInputError(
                f"decision: {decision!r} is not one of {', '.join(d.value for d in Decision)}") from None
        now = time.time()
        with self.database.transaction() as tx:
            _status_for_change(tx, item_id, reviewer)
            tx["review_items"].update(item_id, {
                "status": ReviewStatus.RESOLVED.value, "decision": chosen.value, "reviewer": reviewer,
                "comments": (comments or "").strip() or None, "resolved_at": now, "updated_at": now,
            })
        return self.get(item_id)


    @staticmethod
    def resolve_corrected(tx: sqlite_utils.Database, study_uid: str, pipeline: str, reviewer: str,
                          comments: str) -> int | None:
        """Inside ``tx``: resolve the item of a study and pipeline as ``ai-corrected``.

        A corrected segmentation received from a viewer is the reviewer's decision, whoever
        claimed the item. An item resolved already keeps its decision.

        Returns:
            The item's id, or None when the study and pipeline have no item.
        """
        row = tx.execute("SELECT id, status FROM review_items WHERE study_uid = ? AND pipeline = ?",
                         [study_uid, pipeline]).fetchone()
        if row is None:
            return None
        if row[1] != ReviewStatus.RESOLVED.value:
            now = time.time()
            tx["review_items"].update(int(row[0]), {
                "status": ReviewStatus.RESOLVED.value, "decision": Decision.AI_CORRECTED.value,
                "reviewer": reviewer[:64] or "viewer", "comments": comments, "resolved_at": now, "updated_at": now,
            })
        return int(row[0])


def _reviewer(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise ReviewInputError("reviewer: a name is required")
    if len(name) > 64:
        raise ReviewInputError("reviewer: at most 64 characters")
    return name
