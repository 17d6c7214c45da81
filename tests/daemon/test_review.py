"""The review worklist: one item per flagged study and pipeline, and its open -> claimed -> resolved life."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pacs_sentinel.daemon.jobs import MIGRATIONS, JobState, JobStore
from pacs_sentinel.daemon.review import Decision, ReviewError, ReviewStatus, ReviewStore, explain_reason, parse_since
from pacs_sentinel.dicom_io.index import Database


def _result(needs_review: bool, score: float, reasons: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"series_uid": "1.2.3.1", "model": "organ-seg", "model_version": "1.1.0", "qc_version": "1.2.0",
            "verdict": "Needs review" if needs_review else "Accepted", "quality_score": score,
            "reasons": reasons if reasons is not None else (["Fragmentation"] if needs_review else []),
            "needs_review": needs_review, "output_dir": "/results/x", **extra}


@pytest.fixture
def stores(tmp_path: Path) -> tuple[JobStore, ReviewStore]:
    database = Database(tmp_path / "sentinel.db", migrations=MIGRATIONS)
    return JobStore(database), ReviewStore(database)


def _run(jobs: JobStore, study_uid: str, result: dict[str, Any], *, received_at: float = 0.0) -> int:
    jobs.queue_study(study_uid, {"organ-seg": received_at})
    job = jobs.claim_next()
    assert job is not None
    jobs.record_results(job.id, result=result, outbox_items=[])
    return job.id


def test_a_flagged_job_creates_one_open_item_and_an_accepted_one_none(stores) -> None:  # type: ignore[no-untyped-def]
    jobs, review = stores
    flagged = _run(jobs, "1.1", _result(True, 0.31, ["Fragmentation", "High uncertainty"]))
    _run(jobs, "2.2", _result(False, 0.93))
    items = review.items()
    assert len(items) == 1
    item = items[0]
    assert (item.study_uid, item.pipeline, item.job_id, item.status) == ("1.1", "organ-seg", flagged, ReviewStatus.OPEN)
    assert (item.model, item.model_version, item.qc_version) == ("organ-seg", "1.1.0", "1.2.0")
    assert item.quality_score == pytest.approx(0.31)
    assert item.reasons == ["Fragmentation", "High uncertainty"]
    assert item.decision is None and item.reviewer is None


def test_a_job_resumed_after_a_crash_does_not_duplicate_its_item(stores) -> None:  # type: ignore[no-untyped-def]
    jobs, review = stores
    job_id = _run(jobs, "1.1", _result(True, 0.3))
    first = review.items()[0]
    # The job is found RUNNING at start-up, re-queued, and records its results once more.
    jobs.database.connection().execute("UPDATE jobs SET state = ? WHERE id = ?", [JobState.RUNNING.value, job_id])
    assert jobs.requeue_interrupted() == 1
    again = jobs.claim_next()
    assert again is not None and again.id == job_id
    jobs.record_results(job_id, result=_result(True, 0.3), outbox_items=[])
    items = review.items()
    assert [i.id for i in items] == [first.id]
    assert items[0].runs == 1


def test_a_rerun_for_late_arrivals_updates_the_item_and_reopens_a_resolved_one(stores) -> None:  # type: ignore[no-untyped-def]
    jobs, review = stores
    _run(jobs, "1.1", _result(True, 0.3), received_at=0.0)
    item = review.items()[0]
    review.resolve(item.id, "ai-rejected", "dr-a", "wrong organ")
    rerun = _run(jobs, "1.1", _result(True, 0.2, ["Volume anomaly"]), received_at=1e12)  # instances after the job
    items = review.items()
    assert len(items) == 1
    updated = items[0]
    assert updated.id == item.id and updated.job_id == rerun and updated.runs == 2
    assert updated.status is ReviewStatus.OPEN and updated.decision is None and updated.reviewer is None
    assert updated.reasons == ["Volume anomaly"] and updated.quality_score == pytest.approx(0.2)


def test_an_accepted_rerun_closes_the_open_item_without_a_decision(stores) -> None:  # type: ignore[no-untyped-def]
    jobs, review = stores
    _run(jobs, "1.1", _result(True, 0.3), received_at=0.0)
    rerun = _run(jobs, "1.1", _result(False, 0.9), received_at=1e12)
    item = review.items()[0]
    assert item.status is ReviewStatus.RESOLVED and item.decision is None
    assert item.reviewer == "sentinel" and f"job {rerun}" in (item.comments or "")
    assert review.items(status="open") == []


def test_claim_and_resolve_rules(stores) -> None:  # type: ignore[no-untyped-def]
    jobs, review = stores
    _run(jobs, "1.1", _result(True, 0.3))
    item_id = review.items()[0].id
    claimed = review.claim(item_id, "dr-a")
    assert claimed.status is ReviewStatus.CLAIMED and claimed.reviewer == "dr-a" and claimed.claimed_at
    assert review.claim(item_id, "dr-a").status is ReviewStatus.CLAIMED  # again by the same: no-op
    with pytest.raises(ReviewError, match="claimed by dr-a"):
        review.claim(item_id, "dr-b")
    with pytest.raises(ReviewError, match="claimed by dr-a"):
        review.resolve(item_id, "ai-correct", "dr-b")
    with pytest.raises(ReviewError, match="'maybe' is not one of ai-correct, ai-corrected, ai-rejected"):
        review.resolve(item_id, "maybe", "dr-a")
    resolved = review.resolve(item_id, "ai-correct", "dr-a", "  looks fine ")
    assert resolved.status is ReviewStatus.RESOLVED and resolved.decision is Decision.AI_CORRECT
    assert resolved.comments == "looks fine" and resolved.resolved_at
    with pytest.raises(ReviewError, match="already resolved"):
        review.resolve(item_id, "ai-rejected", "dr-a")
    with pytest.raises(ReviewError, match="already resolved"):
        review.claim(item_id, "dr-a")
    with pytest.raises(ReviewError, match="no review item 99"):
        review.get(99)
    with pytest.raises(ReviewError, match="a name is required"):
        review.claim(item_id, " ")


def test_list_filters_and_priority_order(stores) -> None:  # type: ignore[no-untyped-def]
    jobs, review = stores
    for study, score in (("1", 0.4), ("2", 0.1), ("3", 0.25)):
        _run(jobs, study, _result(True, score))
    assert [i.study_uid for i in review.items()] == ["2", "3", "1"]  # lowest score first
    assert [i.study_uid for i in review.items(order="newest")] == ["3", "2", "1"]
    review.claim(review.find("3", "organ-seg").id, "dr-a")  # type: ignore[union-attr]
    assert [i.study_uid for i in review.items(status="open")] == ["2", "1"]
    assert [i.study_uid for i in review.items(status="claimed")] == ["3"]
    assert review.items(pipeline="cxr-cls") == []
    assert review.items(since=parse_since("1d")) != [] and review.items(since=parse_since("2999-01-01")) == []
    with pytest.raises(ReviewError, match="'done' is not one of open, claimed, resolved"):
        review.items(status="done")


def test_parse_since() -> None:
    assert parse_since("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_since("12h", now=100_000.0) == 100_000.0 - 12 * 3600
    assert parse_since("2026-01-02") == parse_since("2026-01-02T00:00:00+00:00")
    with pytest.raises(ReviewError, match="'yesterday' is neither"):
        parse_since("yesterday")


def test_reasons_are_explained_in_words() -> None:
    assert explain_reason("Fragmentation") == "Fragmentation: the mask is split into several separate pieces"
    assert explain_reason("Something new") == "Something new"


def test_every_qc_finding_is_explained_in_words() -> None:
    from pacs_sentinel.results import Reason

    for reason in Reason:
        assert explain_reason(reason.label).startswith(f"{reason.label}: "), reason


def test_overlay_paths_in_order_including_seg_qc_sub_folders(tmp_path: Path, stores) -> None:  # type: ignore[no-untyped-def]
    jobs, review = stores
    out = tmp_path / "job-1"
    for name in ("overlay_2.png", "overlay_10.png", "overlay_1.png", "seg-2/overlay_1.png", "seg-1/overlay_1.png",
                 "SC_1.dcm", "overlay_x.png", "seg-1/overlay_2.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"")
    _run(jobs, "1.1", _result(True, 0.3, output_dir=str(out)))
    names = [str(p.relative_to(out)) for p in review.items()[0].overlay_paths()]
    assert names == ["overlay_1.png", "overlay_2.png", "overlay_10.png", "seg-1/overlay_1.png", "seg-1/overlay_2.png",
                     "seg-2/overlay_1.png"]
