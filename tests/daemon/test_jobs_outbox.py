"""Job state machine and the outbox's retries, against a real storage SCP."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from pacs_sentinel.daemon.config import DestinationConfig, OutboxConfig
from pacs_sentinel.daemon.jobs import MIGRATIONS, JobState, JobStore
from pacs_sentinel.daemon.outbox import Outbox
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scp import ScpSettings, StorageScp
from pacs_sentinel.dicom_io.spool import Spool, instance_info
from tests.conftest import free_port

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture
def database(tmp_path: Path) -> Database:
    return Database(tmp_path / "sentinel.db", migrations=MIGRATIONS)


def _receive(spool: Spool, path: Path) -> str:
    ds = pydicom.dcmread(path)
    info = instance_info(ds, str(ds.file_meta.TransferSyntaxUID))
    spool.store(path.read_bytes(), info, calling_ae="CT1")
    return info.study_uid


def test_quiet_study_queues_one_job_per_pipeline_once(database: Database, tmp_path: Path) -> None:
    jobs = JobStore(database)
    study_uid = _receive(Spool(tmp_path, database), CT_SMALL)
    now = time.time()
    created = jobs.queue_study(study_uid, {"a": now, "b": now})
    assert len(created) == 2
    assert jobs.queue_study(study_uid, {"a": now, "b": now}) == []  # still QUEUED: nothing new
    assert [j.state for j in jobs.jobs()] == [JobState.QUEUED, JobState.QUEUED]


def test_instances_after_a_job_started_rerun_the_study(database: Database, tmp_path: Path) -> None:
    jobs = JobStore(database)
    spool = Spool(tmp_path, database)
    study_uid = _receive(spool, CT_SMALL)
    series_uid = pydicom.dcmread(CT_SMALL).SeriesInstanceUID
    jobs.queue_study(study_uid, {"a": spool.series_last_received(series_uid)})
    job = jobs.claim_next()
    assert job is not None and job.state is JobState.RUNNING
    assert jobs.queue_study(study_uid, {"a": spool.series_last_received(series_uid)}) == []  # nothing new
    time.sleep(0.01)
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    late = tmp_path / "late.dcm"
    ds.save_as(late, enforce_file_format=True)
    _receive(spool, late)
    assert len(jobs.queue_study(study_uid, {"a": spool.series_last_received(series_uid)})) == 1


def test_running_jobs_are_requeued_at_start_up(database: Database) -> None:
    jobs = JobStore(database)
    jobs.queue_study("1.2.3", {"a": time.time()})
    claimed = jobs.claim_next()
    assert claimed is not None
    assert jobs.requeue_interrupted() == 1
    again = jobs.claim_next()
    assert again is not None and again.id == claimed.id and again.runs == 2


def _job_with_outbox(database: Database, destination: str) -> int:
    jobs = JobStore(database)
    jobs.queue_study("1.2.3", {"a": time.time()})
    job = jobs.claim_next()
    assert job is not None
    ds = pydicom.dcmread(CT_SMALL)
    state = jobs.record_results(job.id, result={"verdict": "Accepted", "quality_score": 0.9, "reasons": []},
                                outbox_items=[{"destination": destination, "path": str(CT_SMALL),
                                               "sop_instance_uid": ds.SOPInstanceUID,
                                               "sop_class_uid": ds.SOPClassUID}])
    assert state is JobState.DELIVERING
    return job.id


def test_outbox_retries_until_the_destination_comes_up(database: Database, tmp_path: Path) -> None:
    port = free_port()
    destination = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    outbox = Outbox(database, [destination], OutboxConfig(retry_initial_seconds=30), calling_ae="SENTINEL")
    job_id = _job_with_outbox(database, "pacs")

    failed_at = time.time()
    assert outbox.flush() == 0  # nobody listens yet
    row = next(database.connection()["outbox"].rows)
    assert row["state"] == "pending" and row["attempts"] == 1
    assert 29 <= row["next_attempt_at"] - failed_at <= 31  # the initial backoff
    # It was "association with PACS@127.0.0.1:<port> aborted": nothing was ever connected.
    assert row["last_error"] == f"could not connect to 127.0.0.1:{port} (connection refused)"
    assert JobStore(database).get(job_id).state is JobState.DELIVERING

    pacs = StorageScp(ScpSettings("PACS", "127.0.0.1", port), Spool(tmp_path / "pacs", Database(tmp_path / "p.db")))
    pacs.start()
    try:
        assert outbox.flush() == 0  # backoff not over yet
        with database.transaction() as db:  # ... and now it is (without waiting 30 s)
            db.execute("UPDATE outbox SET next_attempt_at = ?", [time.time() - 1])
        assert outbox.flush() == 1
    finally:
        pacs.stop()
    assert JobStore(database).get(job_id).state is JobState.DONE
    assert len(list(pacs.spool.database.connection()["instances"].rows)) == 1


def test_failure_status_is_a_failed_attempt_and_gives_up_after_max_attempts(database: Database, tmp_path: Path) -> None:
    pacs_spool = Spool(tmp_path / "pacs", Database(tmp_path / "p.db"))
    ds = pydicom.dcmread(CT_SMALL)
    (pacs_spool.root / ds.StudyInstanceUID).write_bytes(b"blocks the study folder: PACS answers 0xA700")
    pacs = StorageScp(ScpSettings("PACS", "127.0.0.1", free_port()), pacs_spool)
    pacs.start()
    try:
        destination = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port)
        outbox = Outbox(database, [destination], OutboxConfig(max_attempts=1), calling_ae="SENTINEL")
        job_id = _job_with_outbox(database, "pacs")
        assert outbox.flush() == 0
    finally:
        pacs.stop()
    row = next(database.connection()["outbox"].rows)
    assert row["state"] == "dead-letter" and "0xA700" in row["last_error"]
    job = JobStore(database).get(job_id)
    assert job.state is JobState.FAILED and "0xA700" in (job.error or "")


def _job_with_items(database: Database, destination: str, paths: list[Path]) -> int:
    jobs = JobStore(database)
    jobs.queue_study("1.2.3", {"a": time.time()})
    job = jobs.claim_next()
    assert job is not None
    items = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        items.append({"destination": destination, "path": str(path), "sop_instance_uid": ds.SOPInstanceUID,
                      "sop_class_uid": ds.SOPClassUID})
    state = jobs.record_results(job.id, result={"verdict": "Accepted", "quality_score": 0.9, "reasons": []},
                                outbox_items=items)
    assert state is JobState.DELIVERING
    return job.id


def _mr_only_pacs(port: int, status: int = 0x0000):  # type: ignore[no-untyped-def]
    """A pynetdicom PACS that supports MR Image Storage only, answering ``status``."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import MRImageStorage

    ae = AE(ae_title="PACS")
    ae.add_supported_context(MRImageStorage)
    return ae.start_server(("127.0.0.1", port), block=False,
                           evt_handlers=[(evt.EVT_C_STORE, lambda event: status)])


def test_a_refused_sop_class_is_a_dead_letter_at_once_and_can_be_requeued(database: Database, tmp_path: Path) -> None:
    """A destination that does not support a SOP class will not learn it by being retried:
    the item is given up on the first attempt (max_attempts is 50) with the class named,
    the items it accepts are delivered, and ``requeue_dead_letters`` puts it back once the
    destination was fixed."""
    from pacs_sentinel.daemon.outbox import requeue_dead_letters

    mr_small = Path(get_testdata_file("MR_small.dcm"))
    port = free_port()
    destination = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    outbox = Outbox(database, [destination], OutboxConfig(max_attempts=50), calling_ae="SENTINEL")
    job_id = _job_with_items(database, "pacs", [CT_SMALL, mr_small])
    server = _mr_only_pacs(port)
    try:
        assert outbox.flush() == 1
    finally:
        server.shutdown()
    rows = {Path(r["path"]).name: r for r in database.connection()["outbox"].rows}
    assert rows["MR_small.dcm"]["state"] == "sent"
    ct = rows["CT_small.dcm"]
    assert ct["state"] == "dead-letter" and ct["attempts"] == 1
    assert "does not accept CT Image Storage (1.2.840.10008.5.1.4.1.1.2)" in ct["last_error"]
    job = JobStore(database).get(job_id)
    assert job.state is JobState.FAILED and "CT Image Storage" in (job.error or "")

    assert requeue_dead_letters(database, destination="elsewhere") == 0
    assert requeue_dead_letters(database) == 1
    ct = next(r for r in database.connection()["outbox"].rows if r["id"] == ct["id"])
    assert ct["state"] == "pending" and ct["attempts"] == 0
    assert JobStore(database).get(job_id).state is JobState.DELIVERING
    pacs = StorageScp(ScpSettings("PACS", "127.0.0.1", port), Spool(tmp_path / "pacs", Database(tmp_path / "p.db")))
    pacs.start()
    try:
        assert outbox.flush() == 1
    finally:
        pacs.stop()
    job = JobStore(database).get(job_id)
    assert job.state is JobState.DONE and job.error is None


def test_nothing_accepted_or_status_0122_is_permanent_other_failures_are_retried(database: Database) -> None:
    port = free_port()
    destination = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    outbox = Outbox(database, [destination], OutboxConfig(max_attempts=50), calling_ae="SENTINEL")
    _job_with_items(database, "pacs", [CT_SMALL])
    server = _mr_only_pacs(port)  # refuses the only context proposed: pynetdicom aborts
    try:
        assert outbox.flush() == 0
    finally:
        server.shutdown()
    row = next(database.connection()["outbox"].rows)
    assert row["state"] == "dead-letter" and row["attempts"] == 1
    assert "accepted none of the proposed presentation contexts" in row["last_error"]
    assert "CT Image Storage" in row["last_error"]

    mr_small = Path(get_testdata_file("MR_small.dcm"))
    for status, state in ((0x0122, "dead-letter"), (0xA700, "pending")):
        with database.transaction() as tx:
            tx.execute("DELETE FROM outbox")
            tx.execute("DELETE FROM jobs")
        _job_with_items(database, "pacs", [mr_small])
        server = _mr_only_pacs(port, status)
        try:
            assert outbox.flush() == 0
        finally:
            server.shutdown()
        row = next(database.connection()["outbox"].rows)
        assert (row["state"], row["attempts"]) == (state, 1), hex(status)
        assert f"0x{status:04X}" in row["last_error"]


def test_a_rerun_supersedes_what_the_earlier_job_has_not_delivered(database: Database) -> None:
    """Late arrivals re-run a study while the first job's results still wait in the outbox
    (one dead letter, one pending): once the re-run records its results, the old undelivered
    objects are never sent (nor requeued by ``sentinel outbox retry``) and the old job is DONE
    with a note; what it already delivered, and other studies' items, are left alone."""
    from pacs_sentinel.daemon.outbox import SUPERSEDED, requeue_dead_letters

    jobs = JobStore(database)
    first = _job_with_items(database, "pacs", [CT_SMALL, CT_SMALL, CT_SMALL])
    ids = [r["id"] for r in database.connection()["outbox"].rows]
    with database.transaction() as tx:
        tx.execute("UPDATE outbox SET state = 'sent', sent_at = 1 WHERE id = ?", [ids[0]])
        tx.execute("UPDATE outbox SET state = 'dead-letter', last_error = 'no answer' WHERE id = ?", [ids[1]])
        tx.execute("UPDATE jobs SET state = 'FAILED', error = 'delivery failed (pacs: no answer)' WHERE id = ?",
                   [first])
    jobs.queue_study("9.9.9", {"a": time.time()})  # another study: untouched
    unrelated = jobs.claim_next()
    assert unrelated is not None
    jobs.record_results(unrelated.id, result={"verdict": "Accepted"},
                        outbox_items=[{"destination": "pacs", "path": str(CT_SMALL), "sop_instance_uid": "1.1",
                                       "sop_class_uid": "1.2"}])

    time.sleep(0.01)
    assert jobs.queue_study("1.2.3", {"a": time.time()})  # late arrivals: a re-run
    rerun = jobs.claim_next()
    assert rerun is not None and rerun.id not in (first, unrelated.id)
    jobs.record_results(rerun.id, result={"verdict": "Accepted"},
                        outbox_items=[{"destination": "pacs", "path": str(CT_SMALL), "sop_instance_uid": "2.2",
                                       "sop_class_uid": "1.2"}])

    states = {r["id"]: (r["job_id"], r["state"], r["last_error"]) for r in database.connection()["outbox"].rows}
    assert states[ids[0]][1] == "sent"
    for item in ids[1:]:
        assert states[item][1] == SUPERSEDED and f"superseded by job {rerun.id}" in states[item][2]
    assert [s for j, s, _ in states.values() if j in (unrelated.id, rerun.id)] == ["pending", "pending"]
    old = jobs.get(first)
    assert old.state is JobState.DONE and old.error == f"superseded by job {rerun.id}: 2 undelivered object(s) dropped"
    assert requeue_dead_letters(database) == 0
