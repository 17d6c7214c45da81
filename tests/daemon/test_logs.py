"""Logging: what our dependencies' loggers are let through to the operator's log."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from pacs_sentinel.daemon.logs import configure_logging


@pytest.fixture
def standard_logging() -> Iterator[None]:
    """Give the standard library's loggers back as they were (configure_logging replaces the
    root handler; structlog is reset by the autouse fixture in tests/conftest.py)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logging.captureWarnings(False)  # configure_logging captures them; pytest swaps showwarning per test
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_an_overlapping_interval_run_is_not_a_warning_but_other_scheduler_warnings_are(standard_logging) -> None:
    stream = io.StringIO()
    configure_logging("console", "info", stream=stream)
    busy = threading.Event()

    def slow_poll() -> None:
        busy.set()
        time.sleep(0.5)

    scheduler = BackgroundScheduler()
    scheduler.start()
    try:
        scheduler.add_job(slow_poll, "interval", seconds=0.1, max_instances=1, coalesce=True, id="poll")
        assert busy.wait(5)
        time.sleep(0.8)  # several runs come due while the first one still runs: apscheduler skips them
    finally:
        scheduler.shutdown(wait=True)
    logging.getLogger("apscheduler.scheduler").warning("Run time of job was missed by 0:00:05")

    assert "maximum number of running instances reached" not in stream.getvalue()
    assert "Run time of job was missed" in stream.getvalue()


def test_the_json_format_renders_the_dependencies_lines_as_json_too(standard_logging) -> None:
    """One JSON object per line, also for what pynetdicom, pydicom and Python's warnings say."""
    import json
    import warnings

    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    logging.getLogger("pynetdicom.transport").error("TCP Initialisation Error: [Errno 111] Connection refused")
    logging.getLogger("pydicom").warning("Invalid value for VR IS: '1A'")
    warnings.warn("a dependency's warning", UserWarning, stacklevel=1)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]  # each line is JSON
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("pynetdicom.transport", "error"), ("pydicom", "warning"), ("py.warnings", "warning")]
    assert lines[0]["event"] == "TCP Initialisation Error: [Errno 111] Connection refused"
    assert "a dependency's warning" in lines[2]["event"] and all("timestamp" in line for line in lines)
