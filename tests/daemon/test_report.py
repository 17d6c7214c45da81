"""``sentinel report`` on a seeded history: figures per slice, drift warnings, the chart."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs_sentinel.daemon import monitoring
from pacs_sentinel.daemon.jobs import MIGRATIONS
from pacs_sentinel.dicom_io.index import Database

DAY = 86400.0


def _header(path: Path, manufacturer: str, station: str) -> Path:
    ds = pydicom.Dataset()
    ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = manufacturer, "Model X", station
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def seed(tmp_path: Path, now: float) -> Database:
    """History (8-30 days ago) and a 7-day window. CT1 (Acme, ST1) stays at 10 % flagged; CT2
    (Other, ST2) goes from 10 % to 60 % flagged with lower scores; DX1 runs cxr-cls, window only."""
    database = Database(tmp_path / "var" / "sentinel.db", migrations=MIGRATIONS)
    headers = {"CT1": _header(tmp_path / "ct1.dcm", "Acme", "ST1"), "CT2": _header(tmp_path / "ct2.dcm", "Other", "ST2"),
               "DX1": _header(tmp_path / "dx1.dcm", "Acme", "DXROOM")}
    plan = [  # (AE, pipeline, jobs, flagged, first day ago, last day ago, flagged reason, score when flagged)
        ("CT1", "organ-seg", 40, 4, 30, 8, "Fragmentation", 0.3),
        ("CT2", "organ-seg", 30, 3, 30, 8, "Fragmentation", 0.3),
        ("CT1", "organ-seg", 20, 2, 6.5, 0.5, "Fragmentation", 0.3),
        ("CT2", "organ-seg", 20, 12, 6.5, 0.5, "Poor input image quality", 0.2),
        ("DX1", "cxr-cls", 5, 1, 6.5, 0.5, "Low model confidence", 0.4),
    ]
    with database.transaction() as tx:
        for ae, pipeline, count, flagged, first, last, reason, low in plan:
            for n in range(count):
                finished = now - (first - (first - last) * n / max(1, count - 1)) * DAY
                series_uid = generate_uid()
                review = n < flagged
                tx["jobs"].insert({
                    "study_uid": generate_uid(), "pipeline": pipeline, "state": "DONE", "created_at": finished - 5,
                    "updated_at": finished, "finished_at": finished, "runs": 1, "series_uid": series_uid,
                    "verdict": "Needs review" if review else "Accepted", "quality_score": low if review else 0.8,
                    "reasons": f'["{reason}"]' if review else "[]", "needs_review": int(review)})
                tx["instances"].insert({
                    "sop_instance_uid": generate_uid(), "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                    "study_uid": "x", "series_uid": series_uid, "modality": "CT", "path": str(headers[ae]),
                    "size": 1, "transfer_syntax": ExplicitVRLittleEndian, "calling_ae": ae,
                    "received_at": finished - 10})
        # A job still running has no verdict and is not counted.
        tx["jobs"].insert({"study_uid": "y", "pipeline": "organ-seg", "state": "RUNNING", "created_at": now,
                           "updated_at": now, "runs": 1, "needs_review": 0})
    return database


def _row(stdout: str, section: str, name: str) -> list[str]:
    block = stdout.split(f"per {section}:\n", 1)[1].split("\n\n", 1)[0]
    line = next(line for line in block.splitlines() if line.startswith(name + " "))
    return line.split()


def test_report_figures_drift_and_chart_on_a_seeded_history(tmp_path: Path) -> None:
    seed(tmp_path, time.time())
    config = tmp_path / "config.toml"
    config.write_text('[node]\ndata_dir = "var"\n')
    chart = tmp_path / "chart.png"
    result = subprocess.run([sys.executable, "-m", "pacs_sentinel", "report", "-c", str(config), "--since", "7d",
                             "--chart", str(chart)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "45 job(s) with a result, 15 flagged for review (33.3 %)" in out
    assert _row(out, "pipeline", "organ-seg")[:4] == ["organ-seg", "40", "14", "35.0"]
    assert _row(out, "pipeline", "cxr-cls")[:4] == ["cxr-cls", "5", "1", "20.0"]
    # CT2: 12 of 20 flagged, mean score (12 * 0.2 + 8 * 0.8) / 20 = 0.44
    assert _row(out, "sending AE title", "CT2") == ["CT2", "20", "12", "60.0", "%", "0.44"]
    assert _row(out, "sending AE title", "CT1") == ["CT1", "20", "2", "10.0", "%", "0.75"]
    assert _row(out, "station", "ST2")[:3] == ["ST2", "20", "12"]
    assert _row(out, "manufacturer", "Acme")[:5] == ["Acme", "Model", "X", "25", "3"]  # CT1 + DX1
    assert _row(out, "reason", "Poor")[:8] == ["Poor", "input", "image", "quality", "12", "12", "100.0", "%"]
    assert _row(out, "reason", "(none)")[:3] == ["(none)", "30", "0"]
    warnings = [line for line in out.splitlines() if line.startswith("  WARNING")]
    assert any("sending AE title CT2: flag rate 0.60 in the window vs 0.10 before" in w for w in warnings)
    assert any("station ST2: mean quality score 0.44" in w for w in warnings)
    assert not any("CT1" in w or "ST1" in w or "DX" in w for w in warnings), warnings
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width >= 600


def test_an_empty_window_says_so(tmp_path: Path) -> None:
    seed(tmp_path, time.time() - 60 * DAY)
    config = tmp_path / "config.toml"
    config.write_text('[node]\ndata_dir = "var"\n')
    result = subprocess.run([sys.executable, "-m", "pacs_sentinel", "report", "-c", str(config), "--since", "1d"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": 0 job(s) with a result, 0 flagged for review")


@pytest.mark.parametrize("backend", ["pillow", "matplotlib"])  # matplotlib: in the test extras, optional at run time
def test_chart_backends_write_a_png(tmp_path: Path, backend: str) -> None:
    now = time.time()
    records = monitoring.load_records(seed(tmp_path, now), until=now)
    bucket, series = monitoring.flag_rate_series([r for r in records if r.finished_at >= now - 7 * DAY],
                                                 now - 7 * DAY, now)
    assert bucket == "day" and len(series) >= 5
    assert all(0 <= rate <= 1 for _, per in series for rate in per.values())
    path = tmp_path / f"{backend}.png"
    assert monitoring.render_flag_rate_chart(series, path, bucket=bucket, backend=backend) == backend
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 2  # something was drawn


def test_flag_rate_buckets_are_hours_for_short_windows() -> None:
    now = 1_000_000.0
    record = monitoring.JobRecord(1, "s", "organ-seg", now - 1800, True, 0.2, [], "CT1", "-", "-")
    bucket, series = monitoring.flag_rate_series([record], now - 6 * 3600, now)
    assert bucket == "hour" and series == [(now - 3600, {"organ-seg": 1.0})]


def test_the_report_page_shows_the_same_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from pacs_sentinel.daemon.config import parse_config
    from pacs_sentinel.daemon.review import ReviewStore
    from pacs_sentinel.daemon.web import TOKEN_ENV, ReviewWebServer
    from tests.conftest import free_port

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    database = seed(tmp_path, time.time())
    config = parse_config({"review": {"web": {"enabled": True, "port": free_port(), "token": "t0ken"}}})
    server = ReviewWebServer(ReviewStore(database), config.review)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(base + "/report").status_code == 401
        assert httpx.get(base + "/report/chart.png").status_code == 401
        auth = {"Authorization": "Bearer t0ken"}
        page = httpx.get(base + "/report", params={"since": "7d"}, headers=auth)
        assert page.status_code == 200
        text = " ".join(page.text.split())
        assert "45 job(s) with a result, 15 flagged for review (33.3 %)" in text
        assert "sending AE title CT2: flag rate 0.60 in the window vs 0.10 before" in text
        assert "<td>CT2</td><td>20</td><td>12</td><td>60.0 %</td> <td>0.44</td>" in text
        chart = httpx.get(base + "/report/chart.png", params={"since": "7d"}, headers=auth)
        assert chart.status_code == 200 and chart.headers["content-type"] == "image/png"
        assert chart.content.startswith(b"\x89PNG")
        assert httpx.get(base + "/report", params={"since": "soon"}, headers=auth).status_code == 400
    finally:
        server.stop()
