"""Helpers for whole-system tests: a daemon in its own process, talking on real sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, *, port: int, data_dir: Path, destination_port: int, destination_ae: str = "PACS",
                 quiet_seconds: float = 1.0) -> Path:
    """Write a daemon configuration for a test."""
    path.write_text(
        f"""
[node]
ae_title = "SENTINEL"
host = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
min_free_disk_mb = 16

[study]
quiet_seconds = {quiet_seconds}

[outbox]
retry_initial_seconds = 1.0

[logging]
format = "json"
level = "info"

[[destinations]]
name = "pacs"
ae_title = "{destination_ae}"
host = "127.0.0.1"
port = {destination_port}

[[pipelines]]
name = "organ-seg"
kind = "segmentation"
model = "demo:organ-seg"
match = {{ Modality = ["CT"] }}

[[pipelines]]
name = "cxr-cls"
kind = "classification"
model = "demo:cxr-cls"
match = {{ Modality = ["DX", "CR"] }}
min_slices = 1
""",
        encoding="utf-8",
    )
    return path


def echo(port: int, ae_title: str = "SENTINEL") -> bool:
    """True when a DICOM node answers C-ECHO on the port."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


class Daemon:
    """``sentinel run`` in a subprocess, its output in a log file."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.config = config
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the child's exit
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pacs_sentinel", "run", "-c", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        wait_for(lambda: self.process.poll() is not None or echo(self.port), 120, 0.2, "the daemon to listen")
        if self.process.poll() is not None:
            pytest.fail(f"daemon exited with {self.process.returncode}:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(30)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Make daemons that are stopped at the end of the test."""
    daemons: list[Daemon] = []

    def make(destination_port: int, *, quiet_seconds: float = 1.0, destination_ae: str = "PACS") -> Daemon:
        port = free_port()
        config = write_config(tmp_path / f"config-{len(daemons)}.toml", port=port, data_dir=tmp_path / "var",
                              destination_port=destination_port, destination_ae=destination_ae,
                              quiet_seconds=quiet_seconds)
        daemon = Daemon(config, port, tmp_path / "daemon.log")
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.stop()


@pytest.fixture(scope="session")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A clean synthetic CT study written as DICOM files."""
    out = tmp_path_factory.mktemp("phantom")
    return write_ct_series(make_ct_phantom(7), out, patient_id="E2E001", patient_name="E2E^Clean", seed=7)


@pytest.fixture
def storescp(tmp_path: Path, dcmtk_env: dict[str, str]) -> Iterator:  # type: ignore[type-arg]
    """DCMTK's storescp as the receiving PACS; yields (port, output folder)."""
    from tests.conftest import require_program

    program = require_program("/usr/bin/storescp", "dcmtk")
    port = free_port()
    out = tmp_path / "pacs"
    out.mkdir()
    process = subprocess.Popen([program, "-aet", "PACS", "-od", str(out), str(port)], env=dcmtk_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: echo(port, "PACS"), 30, 0.1, "storescp to listen")
    yield port, out
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


def sqlite_job_states(db_path: Path) -> list[tuple[int, str, int]]:
    """(id, state, runs) of every job, read directly from the daemon's database."""
    import sqlite3

    if not db_path.exists():
        return []
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        return [tuple(r) for r in conn.execute("SELECT id, state, runs FROM jobs ORDER BY id")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


class Orthanc:
    """A running Orthanc server (Debian package) with its own storage, on loopback ports."""

    def __init__(self, ae_title: str, dicom_port: int, http_port: int, log_path: Path) -> None:
        self.ae_title = ae_title
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.log_path = log_path

    def get(self, path: str) -> Any:
        """GET a REST resource (``/studies``, ``/instances/<id>/simplified-tags``, ...) as JSON.

        Raises:
            urllib.error.URLError: Orthanc did not answer, or answered with an HTTP error.
        """
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as response:
            return json.load(response)

    def get_bytes(self, path: str) -> bytes:
        """GET a REST resource as raw bytes (``/instances/<id>/file``)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as response:
            return bytes(response.read())

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _orthanc_answers(orthanc: Orthanc) -> bool:
    try:
        return orthanc.get("/system").get("DicomPort") == orthanc.dicom_port
    except (OSError, ValueError):  # not listening yet (URLError is an OSError)
        return False


@pytest.fixture
def orthanc_options() -> dict[str, Any]:
    """Extra Orthanc configuration options; override with ``@pytest.mark.parametrize("orthanc_options", ...)``."""
    return {}


@pytest.fixture
def orthanc(tmp_path: Path, orthanc_options: dict[str, Any]) -> Iterator[Orthanc]:
    """Orthanc as the PACS: a temporary JSON configuration, storage in ``tmp_path``, no plugins.

    HTTP and DICOM on free ports, remote (non-loopback) access and authentication off, so the
    test reads the REST API without credentials; ``orthanc_options`` are added to the
    configuration. Stopped (SIGTERM, then SIGKILL) at the end.
    """
    from tests.conftest import require_program

    program = require_program("/usr/sbin/Orthanc", "orthanc")
    root = tmp_path / "orthanc"
    root.mkdir()
    dicom_port = free_port()
    http_port = free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config = {
        "Name": "PACS Sentinel e2e",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        **orthanc_options,
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    server = Orthanc("ORTHANC", dicom_port, http_port, root / "orthanc.log")
    with open(server.log_path, "wb") as log:
        process = subprocess.Popen([program, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        wait_for(lambda: process.poll() is not None or (_orthanc_answers(server) and echo(dicom_port, "ORTHANC")),
                 60, 0.2, "Orthanc to answer GET /system and C-ECHO")
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited with {process.returncode}:\n{server.log}")
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
