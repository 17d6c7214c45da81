"""`sentinel qc-eval` runs on a tiny set and prints every metric, for every method."""

from __future__ import annotations

import re

from PIL import Image

from pacs_sentinel.daemon.cli import main
from pacs_sentinel.qc.cases import QCCase
from pacs_sentinel.qc.corruptions import HELD_OUT_FAMILIES, IMAGE_FAMILIES, MASK_FAMILIES
from pacs_sentinel.qc.evaluation import METRICS, subsets


def test_qc_eval_on_a_tiny_set_prints_every_metric(tmp_path, capsys) -> None:
    status = main(["qc-eval", "--n-per-family", "1", "--perturbations", "1", "--radiographs", "4",
                   "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert status == 0
    header = next(line for line in out.splitlines() if line.startswith("| method |"))
    for metric in METRICS:
        assert f" {metric} |" in header, metric
    for method in ("fused", "product (QC 1.2.0)", "heuristics OR", "entropy", "pairwise Dice", "expected Dice",
                   "estimator"):
        rows = [line for line in out.splitlines() if line.startswith(f"| {method} |")]
        assert len(rows) == 4, method  # one per subset
        assert len(rows[0].split("|")) == len(METRICS) + 4
    for subset in ("all cases", "own-model masks", "held-out families", "10 % failure mix"):
        assert re.search(rf"#### {subset}: \d+ cases, \d+ failures", out), subset
    for family in IMAGE_FAMILIES:
        assert f"| {family}" in out
    for family in HELD_OUT_FAMILIES:
        assert f"{family} (held out)" in out
    for metric in ("misclassification AUROC", "misclassification AURC", "ECE before temperature",
                   "ECE after temperature"):
        assert re.search(rf"\| {metric} \| (\d\.\d{{4}}|n/a) \|", out), metric
    assert "| fused AUROC on the held-out families | >= 0.97 |" in out  # the targets, met or not
    assert re.search(r"ECE of the fused score as P\(Dice >= 0.7\), all cases: (\d\.\d{3}|n/a)", out)
    for name in ("qc_risk_coverage.png", "qc_reliability.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 300 and image.size[1] > 300


def test_the_held_out_subset_is_every_mask_on_a_held_out_image_and_every_held_out_mask() -> None:
    held_image = next(f for f in IMAGE_FAMILIES if f in HELD_OUT_FAMILIES)
    seen_image = next(f for f in IMAGE_FAMILIES if f not in HELD_OUT_FAMILIES)
    cases = [QCCase(seed, image, mask, 0.5, empty=False)
             for seed, (image, mask) in enumerate((i, m) for i in (held_image, seen_image) for m in MASK_FAMILIES)]
    held = subsets(cases)["held-out families"]
    expected = [c for c in cases if c.image_family == held_image or c.mask_family in HELD_OUT_FAMILIES]
    assert held == expected
    # The held-out image's perturbed masks count: its own masks alone never fail.
    assert {c.mask_family for c in held} >= set(MASK_FAMILIES)
    assert all(c.image_family == held_image for c in held if c.mask_family not in HELD_OUT_FAMILIES)
