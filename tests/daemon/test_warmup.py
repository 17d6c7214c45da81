"""The start-up warm-up loads the models and pays highdicom's one-time set-up; it never fails the daemon."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import structlog

from pacs_sentinel.daemon import warmup
from pacs_sentinel.daemon.config import parse_config
from pacs_sentinel.errors import ReportError
from pacs_sentinel.inference import models
from tests.daemon.conftest import make_config


def test_warm_up_loads_the_models_and_builds_a_result_set(tmp_path: Path) -> None:
    config = make_config(tmp_path, 4242)
    models.clear_model_cache()
    with structlog.testing.capture_logs() as logs:
        seconds = warmup.warm_up(config)
    assert seconds > 0
    assert [entry for entry in logs if entry["log_level"] == "warning"] == []
    # Nothing it logs looks like a job's line (operators and tests count those per study).
    assert not {"job started", "qc evaluated", "job processed"} & {entry["event"] for entry in logs}
    done = [entry for entry in logs if entry["event"] == "warmed up"]
    assert done and done[0]["models"] == len([p for p in config.pipelines if p.kind != "seg-qc"]) >= 1
    # The models are now in the cache: the first job does not load them.
    assert len(models._cache) >= 1


def test_report_warm_up_writes_nothing_that_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    warmup.warm_up_reports()
    assert list(tmp_path.iterdir()) == []


def test_a_broken_model_or_writer_is_logged_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_config(tmp_path, 4242).model_dump(mode="json")
    config = parse_config(base)

    def broken_model(spec: str, **kwargs: object) -> None:
        raise models.ModelError(f"model {spec}: weights file missing")

    def broken_reports() -> None:
        raise ReportError("cannot build SEG: simulated")

    monkeypatch.setattr(models, "load_segmentation_model", broken_model)
    monkeypatch.setattr(warmup, "warm_up_reports", broken_reports)
    with structlog.testing.capture_logs() as logs:
        warmup.warm_up(config)
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert any(entry["event"] == "model not loaded at start-up" and "weights file missing" in entry["error"]
               for entry in warnings)
    assert any(entry["event"] == "report warm-up failed" and "simulated" in entry["error"] for entry in warnings)
