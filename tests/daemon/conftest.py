"""Fixtures for daemon tests: in-process Sentinels (the receiving PACS is tests/conftest.py's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pacs_sentinel.daemon.config import Config, parse_config
from pacs_sentinel.daemon.service import Sentinel
from tests.conftest import free_port


def make_config(tmp_path: Path, pacs_port: int, **study: Any) -> Config:
    """A daemon configuration on free ports, sending to the PACS fixture."""
    return parse_config({
        "node": {"port": free_port(), "data_dir": str(tmp_path / "var"), "min_free_disk_mb": 0},
        "study": {"quiet_seconds": 1.0, **study},
        "outbox": {"retry_initial_seconds": 0.5},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "pipelines": [{"name": "organ-seg", "model": "demo:organ-seg"}],
    })


@pytest.fixture
def sentinel_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Start in-process Sentinels; all are stopped at the end of the test."""
    started: list[Sentinel] = []

    def start(config: Config) -> Sentinel:
        sentinel = Sentinel(config)
        sentinel.start()
        started.append(sentinel)
        return sentinel

    yield start
    for sentinel in started:
        sentinel.stop()
