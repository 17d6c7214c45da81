"""SIGKILL while a job runs: after a restart the job completes exactly once."""

from __future__ import annotations

import pytest

from pacs_sentinel.dicom_io.scu import Peer, send_files
from tests.conftest import received_modalities
from tests.e2e.conftest import sqlite_job_states, wait_for

pytestmark = pytest.mark.slow


def test_sigkill_while_running_then_restart_completes_once(phantom_study, pacs, daemon_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(pacs.port)
    daemon.start()
    results = send_files(phantom_study, Peer("SENTINEL", "127.0.0.1", daemon.port), calling_ae="MODALITY")
    assert all(r.delivered for r in results)

    db_path = tmp_path / "var" / "sentinel.db"
    wait_for(lambda: any(state == "RUNNING" for _, state, _ in sqlite_job_states(db_path)), 60, 0.01,
             "the job to be RUNNING")
    daemon.kill()
    assert [state for _, state, _ in sqlite_job_states(db_path)] == ["RUNNING"]
    assert received_modalities(pacs) == []

    daemon.start()  # the same configuration and data folder
    wait_for(lambda: [s for _, s, _ in sqlite_job_states(db_path)] == ["DONE"], 180, 0.2, "the job to be DONE")
    jobs = sqlite_job_states(db_path)
    assert len(jobs) == 1 and jobs[0][2] == 2, jobs  # one job, run twice (interrupted + resumed)
    assert received_modalities(pacs) == ["OT", "SEG", "SR"]
    assert "interrupted jobs re-queued" in daemon.log
