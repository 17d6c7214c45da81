"""`sentinel qc-eval` runs on a tiny set and prints every metric, for every method."""

from __future__ import annotations

import re

from PIL import Image

from pacs_sentinel.daemon.cli import main
from pacs_sentinel.qc.cases import QCCase, cycled_perturbations
from pacs_sentinel.qc.corruptions import HELD_OUT_FAMILIES, IMAGE_FAMILIES, MASK_FAMILIES
from pacs_sentinel.qc.evaluation import (
    METRICS,
    Margin,
    margins_table,
    signal_margins,
    subsets,
    targets_table,
)
from pacs_sentinel.qc.heuristics import Signal
from pacs_sentinel.results import Reason


def test_qc_eval_on_a_tiny_set_prints_every_metric(tmp_path, capsys) -> None:
    status = main(["qc-eval", "--n-per-family", "1", "--perturbations", "1", "--radiographs", "4", "--held-out", "2",
                   "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert status == 0
    header = next(line for line in out.splitlines() if line.startswith("| method |"))
    for metric in METRICS:
        assert f" {metric} |" in header, metric
    for method in ("fused", "product (QC 1.2.0)", "heuristics OR", "entropy", "pairwise Dice", "expected Dice",
                   "estimator"):
        rows = [line for line in out.splitlines()
                if line.startswith(f"| {method} |") and len(line.split("|")) == len(METRICS) + 4]
        assert len(rows) == 4, method  # one per subset
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
    assert re.search(r"\| fused AUROC minus each single signal, held-out families \| > 0 \| (-?\d\.\d{3}|n/a)", out)
    for target in ("fused Spearman minus each single signal, held-out families",
                   "fused sensitivity at 15 % minus each single signal, 10 % failure mix",
                   "each single signal's failures among accepted minus fused's, 10 % failure mix",
                   "fused AUROC minus each single signal, all cases"):
        assert re.search(rf"\| {target} \| > 0 \| (-?\d\.\d{{3}}|n/a)", out), target
    # The fused score against each single signal on the same cases: held-out families, 10 % mix, all cases.
    assert out.count("| figure | single signal | cases | failures | fused | signal | fused better by | 95 % CI |") == 3
    # The extra draw of the held-out family: 2 phantoms, each its own mask and one perturbed one.
    assert re.search(r"an extra draw of 4 cases on 2 phantoms of the held-out families \(seeds 65000\.\.65001", out)
    held = re.search(r"#### held-out families: (\d+) cases", out)
    assert held and int(held.group(1)) == 2 * 2 + 2  # the main draw's ghosting phantom had 2 cases too
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


def test_an_extra_held_out_draw_enters_the_held_out_subset_only() -> None:
    held_image = next(f for f in IMAGE_FAMILIES if f in HELD_OUT_FAMILIES)
    seen_image = next(f for f in IMAGE_FAMILIES if f not in HELD_OUT_FAMILIES)
    main_draw = [QCCase(0, held_image, "none", 0.9, empty=False), QCCase(1, seen_image, "none", 0.9, empty=False)]
    extra = [QCCase(2, held_image, "none", 0.9, empty=False), QCCase(2, held_image, "shift", 0.5, empty=False)]
    parts = subsets(main_draw, extra)
    assert parts["held-out families"] == [main_draw[0], *extra]
    assert parts["all cases"] == main_draw
    assert parts["own-model masks"] == main_draw


def _table(fused: float, **singles: float) -> dict[str, dict[str, float]]:
    nan = float("nan")
    row = {m: nan for m in METRICS}
    table = {"fused": row | {"AUROC": fused}, "heuristics OR": row | {"AUROC": 0.5}}
    for name in ("entropy", "pairwise Dice", "expected Dice", "estimator"):
        table[name] = row | {"AUROC": singles.get(name.replace(" ", "_"), nan)}
    return table


def _row(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {start}"))


def test_the_fused_score_must_beat_each_single_signal_on_the_same_cases() -> None:
    held = _table(0.98, expected_Dice=0.99, estimator=0.95)
    numbers = {"held-out families": held, "all cases": held, "10 % failure mix": held}
    margins = {
        # Pairwise Dice ranks the own masks perfectly, and so does the fused score: a tie, excepted.
        "held-out families": [Margin("pairwise Dice", 100, 1, 1.0, 1.0, 0.0, 0.0),
                              Margin("expected Dice", 300, 70, 0.981, 0.979, -0.004, 0.007),
                              Margin("estimator", 300, 70, 0.981, 0.950, 0.02, 0.04),
                              Margin("expected Dice", 300, 70, 0.936, 0.922, 0.002, 0.03, "Spearman")],
        # Entropy is beaten on its own cases although its AUROC there is above the fused score's on all cases.
        "all cases": [Margin("entropy", 144, 28, 0.991, 0.909, 0.05, 0.11),
                      Margin("estimator", 432, 187, 0.977, 0.979, -0.01, 0.005)],
        "10 % failure mix": [Margin("heuristics OR", 129, 13, 0.923, 1.0, -0.15, 0.0, "sens@15%"),
                             Margin("estimator", 129, 13, 0.923, 0.923, -0.08, 0.08, "sens@15%"),
                             # Fewer is better: no failure accepted against 2.6 % is a margin of +0.026.
                             Margin("estimator", 129, 13, 0.0, 0.026, 0.0, 0.06, "accepted-failure rate"),
                             Margin("heuristics OR", 129, 13, 0.0, 0.0, 0.0, 0.0, "accepted-failure rate")],
    }
    text = targets_table(numbers, {}, margins)
    assert _row(text, "fused AUROC minus each single signal, held-out families") == (
        "| fused AUROC minus each single signal, held-out families | > 0 | 0.002 (vs expected Dice, same 300 cases: "
        "0.981 vs 0.979; 95 % CI -0.004 to 0.007; tied at the best value: pairwise Dice) "
        "| yes, within noise (95 % CI reaches 0) |")
    margins["held-out families"][1] = Margin("expected Dice", 300, 70, 0.981, 0.979, 0.001, 0.007)
    assert _row(targets_table(numbers, {}, margins), "fused AUROC minus each single signal, held-out").endswith(
        "95 % CI 0.001 to 0.007; tied at the best value: pairwise Dice) | yes |")
    assert _row(text, "fused AUROC minus each single signal, all cases").endswith(
        "| -0.002 (vs estimator, same 432 cases: 0.977 vs 0.979; 95 % CI -0.010 to 0.005) | **no** |")
    assert _row(text, "fused Spearman minus each single signal, held-out").endswith("95 % CI 0.002 to 0.030) | yes |")
    # Each figure a target names, the sensitivity and the failures among accepted of the 10 % mix too.
    assert _row(text, "fused sensitivity at 15 % minus each single signal").endswith(
        "| -0.077 (vs heuristics OR, same 129 cases: 0.923 vs 1.000; 95 % CI -0.150 to 0.000) | **no** |")
    assert _row(text, "each single signal's failures among accepted minus fused's").endswith(
        "| 0.026 (vs estimator, same 129 cases: 0.000 vs 0.026; 95 % CI 0.000 to 0.060; tied at the best value: "
        "heuristics OR) | yes, within noise (95 % CI reaches 0) |")
    assert Margin("estimator", 129, 13, 0.02, 0.01, -0.03, 0.0, "accepted-failure rate").margin < 0
    # A figure no single signal could be compared on is not met.
    del margins["10 % failure mix"]
    assert _row(targets_table(numbers, {}, margins), "fused sensitivity at 15 %").endswith("| n/a | **no** |")
    table = margins_table(margins["held-out families"])
    assert "| AUROC | expected Dice | 300 | 70 | 0.981 | 0.979 | +0.002 | 0.001 to 0.007 |" in table


def test_signal_margins_compare_on_the_cases_each_signal_scores() -> None:
    class Fixed:  # a fusion whose score is the case's expected Dice
        def score(self, signals):
            return next(s.value for s in signals if s.name == "expected_dice"), None

    cases = []
    for seed, (dice, expected, predicted, own) in enumerate(
            [(0.9, 0.95, 0.6, True), (0.5, 0.60, 0.9, True), (0.8, 0.85, 0.8, False), (0.6, 0.65, 0.7, False),
             (0.95, 0.97, 0.95, False), (0.3, 0.40, 0.2, False)]):
        signals = [Signal("expected_dice", expected, 1.0, Reason.LOW_EXPECTED_DICE),
                   # The estimator's reason fires below 0.7 (cases 0 and 5).
                   Signal("predicted_dice", predicted, 0.0 if predicted < 0.7 else 1.0, Reason.LOW_PREDICTED_DICE)]
        if own:
            signals.append(Signal("sample_dice", 1.0 - dice, 1.0, Reason.HIGH_UNCERTAINTY))
        cases.append(QCCase(seed, "clean", "none" if own else "shift", dice, empty=False, signals=signals,
                            uncertainty=own))
    margins = {m.signal: m for m in signal_margins(cases, Fixed())}
    # Pairwise Dice only on the two own masks, where it ranks them backwards and the fused score does not.
    assert (margins["pairwise Dice"].n, margins["pairwise Dice"].failures) == (2, 1)
    assert margins["pairwise Dice"].single == 0.0 and margins["pairwise Dice"].fused == 1.0
    # The estimator on every case: 3 failures, 3 of the 9 failure / good pairs in the wrong order.
    assert margins["estimator"].n == 6 and margins["estimator"].failures == 3
    assert margins["estimator"].fused == 1.0 and abs(margins["estimator"].single - 6 / 9) < 1e-9
    assert margins["expected Dice"].margin == 0.0 and margins["expected Dice"].tied_at_ceiling
    assert "entropy" not in margins  # no mask_entropy signal: no case to compare on

    figures = {(m.metric, m.signal): m for m in signal_margins(
        cases, Fixed(), ("Spearman", "sens@15%", "accepted-failure rate"))}
    assert figures["Spearman", "estimator"].fused == 1.0  # the expected Dice grows with the Dice here
    assert figures["Spearman", "estimator"].margin > 0.5
    # One case of six is reviewed at 15 %: both put the worst failure (case 5) there, one of three.
    assert figures["sens@15%", "estimator"].fused == figures["sens@15%", "estimator"].single == 1 / 3
    # Fused reviews case 5 only (score < 0.5) and accepts failures 1 and 3: 2 of 5. The estimator
    # reviews cases 0 and 5 and accepts the same two failures among 4: 2 of 4, worse by 0.1.
    accepted = figures["accepted-failure rate", "estimator"]
    assert (accepted.fused, accepted.single) == (0.4, 0.5) and abs(accepted.margin - 0.1) < 1e-12
    assert accepted.low <= accepted.margin <= accepted.high


def test_cycled_perturbations_meet_every_mask_family() -> None:
    perturbations = [f for f in MASK_FAMILIES if f != "none"]  # 9 families
    # One image family (qc-eval's extra held-out draw), 2 masks per phantom: 9 phantoms take each family twice.
    drawn = [name for i in range(9) for name in cycled_perturbations(i, 1, 2, perturbations)]
    assert sorted(drawn) == sorted(perturbations * 2)
    # Nine image families (the main draw): unchanged from i * 2 + i // 9, and each image family meets every family.
    for i in range(144):
        turn = i * 2 + i // 9
        assert cycled_perturbations(i, 9, 2, perturbations) == [perturbations[(turn + k) % 9] for k in range(2)]
    for family in range(9):
        met = {name for i in range(family, 144, 9) for name in cycled_perturbations(i, 9, 2, perturbations)}
        assert met == set(perturbations)
