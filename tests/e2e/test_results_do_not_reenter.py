"""Our own results sent back to us (a PACS forwarding everything) never re-run a study."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pacs_sentinel.dicom_io.scu import Peer, send_files
from tests.e2e.conftest import sqlite_job_states, wait_for

pytestmark = pytest.mark.slow


def test_returned_results_are_stored_but_not_processed(phantom_study, pacs, daemon_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(pacs.port, quiet_seconds=1.0)
    daemon.start()
    peer = Peer("SENTINEL", "127.0.0.1", daemon.port)
    assert all(r.delivered for r in send_files(phantom_study, peer, calling_ae="MODALITY"))
    db_path = tmp_path / "var" / "sentinel.db"
    wait_for(lambda: [s for _, s, _ in sqlite_job_states(db_path)] == ["DONE"], 180, 0.2, "the job to be DONE")

    returned = sorted(Path(p) for (p,) in pacs.spool.database.connection().execute("SELECT path FROM instances"))
    assert len(returned) == 3
    assert all(r.delivered for r in send_files(returned, peer, calling_ae="PACS"))
    time.sleep(3.0)  # three quiet periods
    assert [s for _, s, _ in sqlite_job_states(db_path)] == ["DONE"]
