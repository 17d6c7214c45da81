"""Logging, configured once for the whole process (structlog).

Every other module takes ``structlog.get_logger(__name__)``; the worker binds
``study_uid`` and ``job_id`` into the context so every line about a study carries them.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _StandardStream:
    """``sys.stdout`` or ``sys.stderr`` as it is when a line is written, not when logging was
    configured: whoever replaces the stream later (a test harness, a daemon manager) gets the
    lines, and a replaced stream that was closed is never written to."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


class _OverlappingPollFilter(logging.Filter):
    """Drops apscheduler's "skipped: maximum number of running instances reached": our
    interval jobs (arrival poll, outbox flush) run one at a time by design, and a poll that
    starts while the last one still runs (a busy CPU during a model's warm-up) has nothing
    to do; as a WARNING every half second it only alarms whoever reads the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


def configure_logging(fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog (and the standard library loggers of our dependencies).

    Args:
        fmt: ``"json"`` for one JSON object per line, ``"console"`` for readable lines.
        level: Lowest level written.
        stream: Where to write (standard output by default).
    """
    if stream is None or stream is sys.stdout:
        stream = _StandardStream("stdout")  # type: ignore[assignment]
    elif stream is sys.stderr:
        stream = _StandardStream("stderr")  # type: ignore[assignment]
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # pynetdicom, pydicom and apscheduler log through the standard library (pydicom's
    # warnings too, once captured): keep their noise down and render what remains like our own
    # lines, on the same stream, so that the JSON format is one JSON object per line throughout.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)],
    ))
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("pynetdicom", "apscheduler"):
        logging.getLogger(name).setLevel(logging.WARNING if level != "debug" else logging.INFO)
    scheduler_log = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(f, _OverlappingPollFilter) for f in scheduler_log.filters):
        scheduler_log.addFilter(_OverlappingPollFilter())
