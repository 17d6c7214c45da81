"""Kill the sender and the daemon in the middle of a transfer, restart, re-send: one result set."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from tests.conftest import received_modalities, require_program
from tests.e2e.conftest import sqlite_job_states, wait_for

pytestmark = pytest.mark.slow


def _indexed(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def test_kill_sender_and_daemon_mid_transfer(tmp_path: Path, pacs, daemon_factory, dcmtk_env) -> None:  # type: ignore[no-untyped-def]
    storescu = require_program("/usr/bin/storescu", "dcmtk")
    phantom = make_ct_phantom(21, shape=(120, 256, 256), spacing=(2.0, 1.6, 1.6))
    files = write_ct_series(phantom, tmp_path / "study", seed=21)
    # The quiet time must outlast a daemon restart on a loaded machine (3-4 s seen), or the
    # study counts as complete before the re-send starts: then a correct but different path
    # runs (a job superseded by its re-run; tests/daemon/test_study_completion.py covers it).
    daemon = daemon_factory(pacs.port, quiet_seconds=12.0)
    daemon.start()
    db_path = tmp_path / "var" / "sentinel.db"
    command = [storescu, "-aet", "MODALITY", "-aec", "SENTINEL", "127.0.0.1", str(daemon.port), *map(str, files)]

    sender = subprocess.Popen(command, env=dcmtk_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _indexed(db_path) >= 20, 60, 0.005, "the first instances to be stored")
    sender.kill()
    daemon.kill()
    sender.wait(10)
    stored_before = _indexed(db_path)
    assert 20 <= stored_before < len(files), "the transfer was not interrupted"
    assert sqlite_job_states(db_path) == []

    daemon.start()
    resent = subprocess.run(command, env=dcmtk_env, capture_output=True, text=True, timeout=300)
    assert resent.returncode == 0, resent.stderr
    wait_for(lambda: [s for _, s, _ in sqlite_job_states(db_path)] == ["DONE"], 240, 0.2, "the job to be DONE")
    assert _indexed(db_path) == len(files)
    assert [runs for _, _, runs in sqlite_job_states(db_path)] == [1]
    assert received_modalities(pacs) == ["OT", "SEG", "SR"]
