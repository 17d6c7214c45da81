"""``sentinel demo`` runs end to end on embedded defaults and flags the two bad studies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_prints_results_and_flags_the_bad_studies(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "pacs_sentinel", "demo", "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split("  ")[0]: line for line in result.stdout.splitlines()
            if line.startswith(("clean abdomen CT", "heavy metal artefact", "unusual anatomy", "chest radiograph"))}
    assert set(rows) == {"clean abdomen CT", "heavy metal artefact", "unusual anatomy", "chest radiograph"}
    assert "Accepted" in rows["clean abdomen CT"]
    assert "Needs review" in rows["heavy metal artefact"]
    assert "Needs review" in rows["unusual anatomy"]
    for title in ("clean abdomen CT", "heavy metal artefact", "unusual anatomy"):
        assert "DONE" in rows[title] and "1 OT, 1 SEG, 1 SR" in rows[title]
    # The radiograph shows two findings: an SR and one Grad-CAM overlay per positive finding.
    assert "DONE" in rows["chest radiograph"] and "2 OT, 1 SR" in rows["chest radiograph"]
    pngs = [Path(line.strip()) for line in result.stdout.splitlines() if line.strip().endswith(".png")]
    assert len(pngs) == 5 and all(p.is_file() and p.stat().st_size > 0 for p in pngs)
