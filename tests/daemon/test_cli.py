"""The operator commands ``sentinel send`` and ``sentinel status``, run as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from pacs_sentinel.daemon.jobs import MIGRATIONS, JobState, JobStore
from pacs_sentinel.daemon.outbox import DEAD_LETTER
from pacs_sentinel.dicom_io.index import Database
from tests.conftest import free_port, unencodable_ct


def _sentinel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pacs_sentinel", *args], capture_output=True, text=True, timeout=120)


def test_send_a_folder(tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    result = _sentinel("send", str(folder), "--to", f"PACS@127.0.0.1:{pacs.port}")
    assert result.returncode == 0, result.stderr
    assert "sent 2 of 2 file(s)" in result.stdout
    assert len(list(pacs.spool.database.connection()["instances"].rows)) == 2


def test_send_reports_what_was_not_delivered(tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"no")
    result = _sentinel("send", str(broken), "--to", f"PACS@127.0.0.1:{pacs.port}", "--quiet")
    assert result.returncode == 1
    assert "not delivered" in result.stderr and "sent 0 of 1" in result.stdout


def test_send_names_a_file_it_cannot_encode_without_a_traceback(tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    """A file pydicom reads but cannot write back (here a value length of 3 on a US element,
    which misaligns the rest) is one line naming the problem; the good file still goes."""
    folder = tmp_path / "in"
    folder.mkdir()
    unencodable_ct(folder / "a-broken.dcm")
    (folder / "b-good.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    result = _sentinel("send", str(folder), "--to", f"PACS@127.0.0.1:{pacs.port}", "--quiet")
    assert result.returncode == 1
    assert "sent 1 of 2 file(s)" in result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "a-broken.dcm: not delivered (cannot encode the data set: " in lines[0], lines


def test_send_with_a_bad_address_is_a_one_line_error(tmp_path: Path) -> None:
    result = _sentinel("send", str(tmp_path), "--to", "PACS")
    assert result.returncode == 2
    assert result.stderr.strip() == "sentinel: 'PACS' is not of the form AE@host:port"


def test_send_to_a_host_that_does_not_resolve_is_a_one_line_error() -> None:
    result = _sentinel("send", get_testdata_file("CT_small.dcm"), "--to", "PACS@no.such.host.invalid:104", "--quiet")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("sentinel: could not connect to no.such.host.invalid:104 (cannot resolve the host name: ")


def test_send_to_a_closed_port_says_the_connection_was_refused() -> None:
    port = free_port()
    result = _sentinel("send", get_testdata_file("CT_small.dcm"), "--to", f"PACS@127.0.0.1:{port}", "--quiet")
    assert result.returncode == 2, result.stderr
    # It was "association with PACS@127.0.0.1:<port> aborted".
    assert result.stderr.strip() == f"sentinel: could not connect to 127.0.0.1:{port} (connection refused)"


def test_status_keeps_pynetdicom_s_log_lines_out_of_its_table(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[node]\ndata_dir = "var"\n\n[[destinations]]\nname = "down"\nae_title = "PACS"\n'
                      f'host = "127.0.0.1"\nport = {free_port()}\n')
    result = _sentinel("status", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # was "[error] Association request failed: ... [pynetdicom.transport]"
    assert "Association request failed" not in result.stdout
    assert any(line.startswith("down ") and "UNREACHABLE" in line for line in result.stdout.splitlines())


def test_status_shows_destination_health_outbox_and_dead_letters(tmp_path: Path, pacs) -> None:  # type: ignore[no-untyped-def]
    down_port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[node]
data_dir = "var"

[[destinations]]
name = "up"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs.port}

[[destinations]]
name = "down"
ae_title = "PACS"
host = "127.0.0.1"
port = {down_port}
""")
    database = Database(tmp_path / "var" / "sentinel.db", migrations=MIGRATIONS)
    jobs = JobStore(database)
    jobs.queue_study("1.2.3", {"organ-seg": 0.0})
    job = jobs.claim_next()
    assert job is not None
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    jobs.record_results(job.id, result={"verdict": "Accepted", "quality_score": 0.9, "reasons": []},
                        outbox_items=[{"destination": "down", "path": "/nowhere.dcm",
                                       "sop_instance_uid": ds.SOPInstanceUID, "sop_class_uid": ds.SOPClassUID}])
    database.connection().execute("UPDATE outbox SET state = ?, attempts = 50, last_error = 'association failed'",
                                  [DEAD_LETTER])

    result = _sentinel("status", "-c", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("up ") and "OK" in line for line in lines)
    assert any(line.startswith("down ") and "UNREACHABLE" in line for line in lines)
    assert "dead letters" in result.stdout and ds.SOPInstanceUID in result.stdout
    assert "association failed" in result.stdout
    assert any(line.startswith(f"{job.id} ") and "DELIVERING" in line for line in lines)
    assert "review worklist: 0 open, 0 claimed" in result.stdout  # an accepted result makes no item


def test_status_shows_a_done_job_s_note_beside_its_reasons(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[node]\ndata_dir = "var"\n')
    jobs = JobStore(Database(tmp_path / "var" / "sentinel.db", migrations=MIGRATIONS))
    jobs.queue_study("1.2.3", {"vendor-qc": 0.0})
    job = jobs.claim_next()
    assert job is not None
    assert jobs.record_results(job.id, result={"verdict": "Needs review", "quality_score": 0.2,
                                               "reasons": ["Fragmentation"], "error": "SEG 1.2.9 not judged: why"},
                               outbox_items=[]) is JobState.DONE

    result = _sentinel("status", "-c", str(config))
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(f"{job.id} ")]
    assert "DONE" in line and "Fragmentation; SEG 1.2.9 not judged: why" in line


def test_run_on_a_taken_port_or_a_data_dir_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    """`sentinel run` that cannot start exits 2 with one line, no traceback, no abort; two nodes
    never share a data_dir (the second would take the first one's running jobs for interrupted)."""
    import socket

    from pacs_sentinel.daemon.config import parse_config
    from pacs_sentinel.daemon.service import Sentinel
    from pacs_sentinel.errors import SentinelError

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "c.toml"
    config.write_text(f'[node]\nport = {port}\ndata_dir = "{tmp_path / "var"}"\n')
    try:
        result = _sentinel("run", "-c", str(config))
    finally:
        taken.close()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"sentinel: cannot listen for DICOM on 127.0.0.1:{port}: [Errno 98] Address already in use")
    assert "Traceback" not in result.stderr + result.stdout

    settings = parse_config({"node": {"port": free_port(), "data_dir": str(tmp_path / "shared")}})
    first = Sentinel(settings)
    try:
        try:
            Sentinel(settings)
        except SentinelError as exc:
            assert "is in use by another PACS Sentinel" in str(exc) and f"process {os.getpid()}" in str(exc)
        else:
            raise AssertionError("a second node opened a data_dir in use")
        busy = _sentinel("run", "-c", str(_toml(tmp_path / "second.toml", settings)))
        assert busy.returncode == 2 and "is in use by another PACS Sentinel" in busy.stderr, busy.stderr
    finally:
        first.stop()
    Sentinel(settings).stop()  # released on stop


def _toml(path: Path, config) -> Path:  # type: ignore[no-untyped-def]
    path.write_text(f'[node]\nport = {config.node.port}\ndata_dir = "{config.node.data_dir}"\n')
    return path


def test_a_file_system_without_locks_is_named_as_such(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import errno
    import fcntl

    import pytest

    from pacs_sentinel.daemon.service import DataDirLock
    from pacs_sentinel.errors import SentinelError

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(SentinelError, match="cannot lock .*sentinel.lock: No locks available .*must support flock"):
        DataDirLock(tmp_path).acquire()


def test_outbox_retry_of_an_unknown_item_or_destination_is_a_one_line_error(tmp_path: Path) -> None:
    """Like `sentinel review show 99999`: it printed "0 dead letter(s) requeued" and exit 0."""
    config = tmp_path / "config.toml"
    config.write_text('[node]\ndata_dir = "var"\n\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\n'
                      'host = "127.0.0.1"\nport = 104\n')
    database = Database(tmp_path / "var" / "sentinel.db", migrations=MIGRATIONS)
    jobs = JobStore(database)
    jobs.queue_study("1.2.3", {"organ-seg": 0.0})
    job = jobs.claim_next()
    assert job is not None
    jobs.record_results(job.id, result={"verdict": "Accepted", "quality_score": 0.9, "reasons": []},
                        outbox_items=[{"destination": "pacs", "path": "/nowhere.dcm", "sop_instance_uid": "1.2.3.4",
                                       "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"}])
    database.connection().execute("UPDATE outbox SET state = ?", [DEAD_LETTER])
    (item_id,) = [row["id"] for row in database.connection()["outbox"].rows]

    unknown = _sentinel("outbox", "retry", "-c", str(config), "99999", str(item_id))
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "sentinel: no dead letter 99999"
    nowhere = _sentinel("outbox", "retry", "-c", str(config), "--destination", "nosuch")
    assert nowhere.returncode == 2
    assert nowhere.stderr.strip() == f"sentinel: no destination 'nosuch' in {config} (destinations: pacs)"
    other = _sentinel("outbox", "retry", "-c", str(config), "--destination", "pacs", str(item_id + 1))
    assert other.returncode == 2 and other.stderr.strip() == f"sentinel: no dead letter {item_id + 1} for destination 'pacs'"
    assert [row["state"] for row in database.connection()["outbox"].rows] == [DEAD_LETTER]  # nothing requeued

    requeued = _sentinel("outbox", "retry", "-c", str(config), "--destination", "pacs", str(item_id))
    assert requeued.returncode == 0, requeued.stderr
    assert requeued.stdout.startswith("1 dead letter(s) requeued")


def test_check_config_explain_of_a_missing_path_says_so(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[node]\ndata_dir = "var"\n')
    missing = tmp_path / "nope"
    result = _sentinel("check-config", "-c", str(config), "--explain", str(missing))
    assert result.returncode == 2
    # It was "no readable DICOM files with a SeriesInstanceUID", as for a folder of other files.
    assert result.stderr.strip().splitlines()[-1] == f"sentinel: {missing}: no such file or folder"
