"""When a study counts as complete, and what late instances do."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from pacs_sentinel.daemon.arrivals import ArrivalWatcher, StudyArrival, completion_time
from pacs_sentinel.daemon.config import StudyConfig
from pacs_sentinel.daemon.jobs import FINISHED_STATES, MIGRATIONS, JobState
from pacs_sentinel.daemon.service import Sentinel
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.spool import instance_info
from pacs_sentinel.dicom_io.scu import Peer, send_files
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from tests.conftest import received_modalities
from tests.daemon.conftest import make_config


def test_quiet_time_per_calling_ae_and_maximum_wait() -> None:
    settings = StudyConfig(quiet_seconds=10, quiet_seconds_by_calling_ae={"ARCHIVE": 120}, max_wait_seconds=60)
    modality = StudyArrival("1.2", "CT1", first_received_at=1000.0, last_received_at=1005.0)
    archive = StudyArrival("1.2", "ARCHIVE", first_received_at=1000.0, last_received_at=1005.0)
    trickle = StudyArrival("1.2", "CT1", first_received_at=1000.0, last_received_at=1055.0)
    assert completion_time(modality, settings) == 1015.0
    assert completion_time(archive, settings) == 1060.0  # 120 s quiet, capped by the 60 s maximum wait
    assert completion_time(trickle, settings) == 1060.0


def test_watcher_reports_each_arrival_once_even_when_a_commit_is_late(tmp_path: Path) -> None:
    database = Database(tmp_path / "db.sqlite")
    seen: list[tuple[str, float]] = []
    watcher = ArrivalWatcher(database, lambda a: seen.append((a.study_uid, a.last_received_at)))
    watcher.start_from_now()
    db = database.connection()
    now = time.time()
    db["studies"].insert({"study_uid": "1.1", "patient_id": "", "calling_ae": "A",
                          "first_received_at": now, "last_received_at": now})
    assert watcher.poll() == 1
    # A store that took its timestamp earlier but committed later must still be noticed.
    db["studies"].insert({"study_uid": "1.2", "patient_id": "", "calling_ae": "A",
                          "first_received_at": now - 5, "last_received_at": now - 5})
    assert watcher.poll() == 1
    assert watcher.poll() == 0
    db.execute("UPDATE studies SET last_received_at = ? WHERE study_uid = '1.1'", [now + 1])
    assert watcher.poll() == 1
    assert seen == [("1.1", now), ("1.2", now - 5), ("1.1", now + 1)]


def _jobs(sentinel) -> list:  # type: ignore[no-untyped-def, type-arg]
    return sorted(sentinel.jobs.jobs(), key=lambda j: j.id)


def _wait_finished(sentinel, count: int, timeout: float = 120) -> list:  # type: ignore[no-untyped-def, type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = _jobs(sentinel)
        outbox_busy = sentinel.outbox.pending_count() > 0
        if len(jobs) >= count and all(j.state in FINISHED_STATES for j in jobs) and not outbox_busy:
            return jobs
        time.sleep(0.1)
    pytest.fail(f"jobs did not finish: {_jobs(sentinel)}")


@pytest.mark.parametrize("mode", ["rerun", "ignore"])
def test_late_arrivals(mode: str, tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    files = write_ct_series(make_ct_phantom(11), tmp_path / "study", seed=11)
    sentinel = sentinel_factory(make_config(tmp_path, pacs.port, late_arrival=mode))
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)
    assert all(r.delivered for r in send_files(files[:40], peer, calling_ae="CT1"))
    first = _wait_finished(sentinel, 1)
    assert [j.state for j in first] == [JobState.DONE]

    assert all(r.delivered for r in send_files(files[40:], peer, calling_ae="CT1"))
    time.sleep(2.0)  # two quiet periods
    jobs = _wait_finished(sentinel, 2 if mode == "rerun" else 1)
    if mode == "rerun":
        assert [j.state for j in jobs] == [JobState.DONE, JobState.DONE]
        assert received_modalities(pacs) == ["OT", "OT", "SEG", "SEG", "SR", "SR"]
    else:
        assert [j.state for j in jobs] == [JobState.DONE]
        assert received_modalities(pacs) == ["OT", "SEG", "SR"]
    # Every instance is stored either way.
    assert len(list(sentinel.spool.database.connection()["instances"].rows)) == len(files)


def test_study_in_several_associations_within_the_quiet_time_is_one_job(tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    files = write_ct_series(make_ct_phantom(12), tmp_path / "study", seed=12)
    sentinel = sentinel_factory(make_config(tmp_path, pacs.port, quiet_seconds=2.0))
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)
    for start in range(0, len(files), 12):
        assert all(r.delivered for r in send_files(files[start:start + 12], peer, calling_ae="CT1"))
        time.sleep(0.5)
    jobs = _wait_finished(sentinel, 1)
    assert len(jobs) == 1 and jobs[0].state is JobState.DONE
    assert received_modalities(pacs) == ["OT", "SEG", "SR"]
    database = Database(sentinel.config.node.data_dir / "sentinel.db", migrations=MIGRATIONS)
    assert database.connection().execute("SELECT COUNT(*) FROM instances").fetchone()[0] == len(files)


def test_job_overtaken_by_late_arrivals_delivers_nothing(tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    files = write_ct_series(make_ct_phantom(13), tmp_path / "study", seed=13)
    sentinel = Sentinel(make_config(tmp_path, pacs.port))  # not started: the test drives the worker
    for path in files:
        ds = pydicom.dcmread(path)
        sentinel.spool.store(path.read_bytes(), instance_info(ds, str(ds.file_meta.TransferSyntaxUID)),
                             calling_ae="CT1")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    sentinel.jobs.queue_study(study_uid, {"organ-seg": time.time() - 1})
    running = sentinel.jobs.claim_next()
    assert running is not None
    time.sleep(0.01)
    rerun = sentinel.jobs.queue_study(study_uid, {"organ-seg": time.time()})  # a late instance arrived
    assert len(rerun) == 1

    sentinel.worker.run_job(running)
    overtaken = sentinel.jobs.get(running.id)
    assert overtaken.state is JobState.DONE and f"superseded by job {rerun[0]}" in (overtaken.error or "")
    assert sentinel.outbox.pending_count() == 0
    assert sentinel.jobs.get(rerun[0]).state is JobState.QUEUED
