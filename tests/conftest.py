"""Session-wide test settings and helpers shared by every test package."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config

from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scp import ScpSettings, StorageScp
from pacs_sentinel.dicom_io.spool import Spool

# Strict when writing: every object we build must be valid (STYLE.md, highdicom habit).
pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_program(path: str, package: str) -> str:
    """Return ``path`` if the program is installed; skip locally, fail in CI, when not.

    DCMTK's programs are called by full path: pynetdicom installs scripts of the same
    names (storescu, storescp, echoscu) into the virtual environment.
    """
    if shutil.which(path) is None:
        message = f"{path} is not installed (Debian package {package}; .ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK programs on loopback (no delayed-ACK waits)."""
    return {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StorageScp]:
    """An in-process storage SCP standing in for the PACS (AE title PACS)."""
    spool = Spool(tmp_path / "pacs", Database(tmp_path / "pacs" / "pacs.db"))
    server = StorageScp(ScpSettings("PACS", "127.0.0.1", free_port()), spool)
    server.start()
    yield server
    server.stop()


def received_modalities(pacs: StorageScp) -> list[str]:
    """Modalities of everything the PACS fixture received, sorted."""
    paths = [row[0] for row in pacs.spool.database.connection().execute("SELECT path FROM instances")]
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in paths)
