"""The worklist through the daemon and ``sentinel review``: a flagged study becomes one item that a
reviewer lists, reads, claims and resolves from the command line (run as subprocesses)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from pacs_sentinel.daemon.config import parse_config
from pacs_sentinel.daemon.jobs import FINISHED_STATES
from pacs_sentinel.dicom_io.scu import Peer, send_files
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from tests.daemon.conftest import make_config

VIEWER = "https://viewer.example.org/view?study={StudyInstanceUID}"


def _sentinel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pacs_sentinel", *args], capture_output=True, text=True, timeout=120)


def _finished(sentinel, count: int, timeout: float = 180) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = sentinel.jobs.jobs()
        if len(jobs) >= count and all(j.state in FINISHED_STATES for j in jobs) and not sentinel.outbox.pending_count():
            return
        time.sleep(0.1)
    pytest.fail(f"jobs did not finish: {sentinel.jobs.jobs()}")


def test_a_flagged_study_is_worked_through_the_review_commands(tmp_path: Path, pacs, sentinel_factory) -> None:  # type: ignore[no-untyped-def]
    config = make_config(tmp_path, pacs.port)
    sentinel = sentinel_factory(config)
    flagged = write_ct_series(make_ct_phantom(8, variant="metal-artifact"), tmp_path / "metal", seed=8)
    clean = write_ct_series(make_ct_phantom(9), tmp_path / "clean", seed=9)
    peer = Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)
    for files in (flagged, clean):
        assert all(r.delivered for r in send_files(files, peer, calling_ae="CT1"))
    _finished(sentinel, 2)
    flagged_uid = str(pydicom.dcmread(flagged[0]).StudyInstanceUID)

    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[node]\ndata_dir = "{config.node.data_dir}"\n\n[review]\nviewer_url = "{VIEWER}"\n')
    listed = _sentinel("review", "list", "-c", str(config_file))
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()[2:]
    assert len(rows) == 1, listed.stdout  # the accepted study has no item
    assert rows[0].split()[:2] == ["1", "open"] and flagged_uid in rows[0]

    shown = _sentinel("review", "show", "1", "-c", str(config_file))
    assert shown.returncode == 0, shown.stderr
    job = next(j for j in sentinel.jobs.jobs() if j.study_uid == flagged_uid)
    assert f"{job.quality_score:.2f}" in shown.stdout
    assert VIEWER.format(StudyInstanceUID=flagged_uid) in shown.stdout
    for reason in job.reasons:
        assert f"  - {reason}: " in shown.stdout  # each reason with its explanation
    assert str(Path(job.output_dir or "") / "overlay_1.png") in shown.stdout

    claimed = _sentinel("review", "claim", "1", "--reviewer", "dr-a", "-c", str(config_file))
    assert claimed.returncode == 0 and "claimed by dr-a" in claimed.stdout
    taken = _sentinel("review", "resolve", "1", "--decision", "ai-correct", "--reviewer", "dr-b", "-c", str(config_file))
    assert taken.returncode == 2 and taken.stderr.strip() == "sentinel: review item 1 is claimed by dr-a"
    resolved = _sentinel("review", "resolve", "1", "--decision", "ai-rejected", "--reviewer", "dr-a",
                         "--comment", "metal streaks", "-c", str(config_file))
    assert resolved.returncode == 0 and "resolved by dr-a: ai-rejected" in resolved.stdout

    assert _sentinel("review", "list", "--status", "open", "-c", str(config_file)).stdout.strip() == "no review items match"
    done = _sentinel("review", "list", "--status", "resolved", "--pipeline", "organ-seg", "--since", "1d",
                     "-c", str(config_file))
    assert "ai-rejected" in done.stdout and "dr-a" in done.stdout
    missing = _sentinel("review", "show", "7", "-c", str(config_file))
    assert missing.returncode == 2 and missing.stderr.strip() == "sentinel: no review item 7"
    bad_since = _sentinel("review", "list", "--since", "soon", "-c", str(config_file))
    assert bad_since.returncode == 2 and "'soon' is neither" in bad_since.stderr


def test_review_commands_without_a_database_say_so(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text('[node]\ndata_dir = "var"\n')
    result = _sentinel("review", "list", "-c", str(config_file))
    assert result.returncode == 2
    assert result.stderr.strip() == f"sentinel: no database at {tmp_path / 'var' / 'sentinel.db'}: " \
                                    "the daemon has not run with this configuration yet"


def test_viewer_url_template_accepts_only_the_study_uid_placeholder() -> None:
    from pacs_sentinel.errors import ConfigError

    parse_config({"review": {"viewer_url": VIEWER}})
    with pytest.raises(ConfigError, match=r"review.viewer_url: .*unknown placeholder\(s\) PatientID"):
        parse_config({"review": {"viewer_url": "https://x/{PatientID}"}})
