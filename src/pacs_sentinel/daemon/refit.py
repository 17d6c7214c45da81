"""QC refit from the review worklist's decisions: the nightly job and ``sentinel qc-refit``.

Feedback cases (:class:`pacs_sentinel.qc.refit.FeedbackCase`) are read from the database: each
resolved review item with a decision of a ``segmentation`` pipeline (the results the refitted
version will judge; seg-qc and classification results are left out), for every segment of its job whose QC signals were stored
(``qc_signals``, written with the job's results). Label "acceptable": ``ai-correct`` -> every
segment 1, ``ai-rejected`` -> every segment 0, ``ai-corrected`` -> the segment's Dice against the
reviewer's correction (``feedback`` table) >= 0.7; a corrected item without a compared
correction (decided on the command line or the web page, no SEG received) has no label and is
left out. The math, the versions and the activation rule are :mod:`pacs_sentinel.qc.refit`.

The scheduled job (``[qc.refit]``, cron at ``hour``:``minute`` UTC) refits only when at least
``min_new_cases`` cases were decided since the last refit (``active.json``'s ``cases_until``).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from pathlib import Path
from typing import Any

import structlog

from pacs_sentinel.daemon.config import Config
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.qc.fusion import ACCEPTABLE_DICE
from pacs_sentinel.qc.refit import FeedbackCase, RefitError, RefitOutcome, read_active, refit, signals_from_rows

log = structlog.get_logger(__name__)


def qc_dir(config: Config) -> Path:
    """``<data_dir>/qc``: local QC versions and ``active.json``."""
    return config.node.data_dir / "qc"


def feedback_cases(database: Database, *, since: float | None = None,
                   pipelines: list[str] | None = None) -> tuple[list[FeedbackCase], float | None]:
    """The feedback cases (see the module docstring), optionally only those resolved after ``since``.

    Args:
        database: The node's database.
        since: Only items resolved after this Unix time.
        pipelines: Only items of these pipelines (None: every pipeline).

    Returns:
        The cases and the newest resolution time among them (None when there are none).
    """
    items = database.rows("""
        SELECT r.job_id, r.pipeline, r.decision, r.resolved_at, j.qc_version FROM review_items r JOIN jobs j ON j.id = r.job_id
        WHERE r.status = 'resolved' AND r.decision IS NOT NULL AND r.resolved_at > ? ORDER BY r.resolved_at""",
                  [since if since is not None else -1.0])
    if pipelines is not None:
        items = [i for i in items if i["pipeline"] in pipelines]
    cases: list[FeedbackCase] = []
    newest = None
    for item in items:
        signals: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in database.rows("SELECT * FROM qc_signals WHERE job_id = ? ORDER BY id", [item["job_id"]]):
            signals[int(row["segment_number"])].append(row)
        dice = {int(r["segment_number"]): float(r["dice"]) for r in database.rows("SELECT segment_number, dice FROM feedback WHERE job_id = ? AND error IS NULL AND dice IS NOT NULL "
                      "ORDER BY id DESC", [item["job_id"]])}  # the first correction wins, as in the export
        for segment_number, rows in sorted(signals.items()):
            decision = item["decision"]
            if decision == "ai-correct":
                acceptable = True
            elif decision == "ai-rejected":
                acceptable = False
            elif segment_number in dice:
                acceptable = dice[segment_number] >= ACCEPTABLE_DICE
            else:
                continue  # corrected, but no correction was compared: no label
            found = signals_from_rows(rows)
            if found:
                cases.append(FeedbackCase(int(item["job_id"]), segment_number, found, acceptable, decision,
                                          item["qc_version"] or ""))
                newest = max(newest or 0.0, float(item["resolved_at"]))
    return cases, newest


def run_refit(config: Config, database: Database, *, min_new_cases: int | None = None, phantoms: list | None = None,
              model=None) -> RefitOutcome:
    """Refit the QC fusion on every feedback case when enough are new since the last refit.

    Args:
        config: The node's configuration (``[qc.refit]``, ``data_dir``).
        database: Its database.
        min_new_cases: Refit only with at least this many cases decided since the last refit
            (None: refit whatever their number, e.g. on demand).
        phantoms: Phantom evaluation cases already drawn (tests).

    Returns:
        The outcome (``skipped`` says why nothing was done).

    Raises:
        RefitError: Too few cases, or one class only. ModelError: invalid QC files.
    """
    from pacs_sentinel.qc.evaluate import shipped_fusion

    folder = qc_dir(config)
    state = read_active(folder)
    active = state.get("qc_version") or shipped_fusion().qc_version
    cases_until = state.get("cases_until")
    # The version judges the segmentation pipelines' own results (the worker's QC): their
    # decisions are the feedback. seg-qc results (third-party SEGs) keep the shipped fusion.
    pipelines = [p.name for p in config.pipelines if p.kind == "segmentation"]
    new, _ = feedback_cases(database, since=cases_until, pipelines=pipelines)
    if min_new_cases is not None and len(new) < min_new_cases:
        outcome = RefitOutcome(None, False, active, len(new),
                               skipped=f"{len(new)} new feedback case(s) since the last refit, "
                                       f"{min_new_cases} needed")
        log.info("qc refit skipped", new_cases=len(new), min_new_cases=min_new_cases, qc_version=active)
        return outcome
    cases, newest = feedback_cases(database, pipelines=pipelines)
    settings = config.qc.refit
    return refit(cases, qc_dir=folder, shipped=shipped_fusion(), eval_n_per_family=settings.eval_n_per_family,
                 eval_perturbations=settings.eval_perturbations, phantoms=phantoms, model=model,
                 extra_state={"cases_until": newest})


def scheduled_refit(config: Config, database: Database) -> RefitOutcome | None:
    """The nightly job: :func:`run_refit` with ``min_new_cases``; never raises (logs instead).

    It runs in the scheduler's thread beside the worker: the phantom evaluation shares the
    worker's cached model (its predictions take turns on the model's lock) and the process's
    torch threads (``[inference] threads``).
    """
    try:
        return run_refit(config, database, min_new_cases=config.qc.refit.min_new_cases)
    except RefitError as exc:
        log.warning("qc refit not possible", error=str(exc))
    except Exception:  # a failed refit must not stop the daemon; the active version stays
        log.exception("qc refit failed")
    return None


def schedule(scheduler: Any, config: Config, database: Database) -> None:
    """Add the nightly refit to an APScheduler scheduler when ``[qc.refit] enabled``."""
    settings = config.qc.refit
    if not settings.enabled:
        return
    scheduler.add_job(scheduled_refit, "cron", hour=settings.hour, minute=settings.minute, args=[config, database],
                      id="qc-refit", max_instances=1, coalesce=True, replace_existing=True)
    log.info("qc refit scheduled", hour=settings.hour, minute=settings.minute,
             min_new_cases=settings.min_new_cases, now=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
