"""Verdict thresholds from a risk-coverage curve; the [qc] keys and `sentinel qc-threshold`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pacs_sentinel.daemon.cli import main
from pacs_sentinel.daemon.config import load_config
from pacs_sentinel.daemon.worker import segmentation_threshold, shipped_segmentation_threshold, threshold_setting
from pacs_sentinel.errors import ConfigError
from pacs_sentinel.qc.evaluate import shipped_fusion
from pacs_sentinel.qc.fusion import calibrated_threshold
from pacs_sentinel.qc.metrics import (
    auroc_difference_interval,
    aurc,
    derive_threshold,
    normalized_aurc,
    risk_coverage,
)

REPO = Path(__file__).resolve().parents[2]


def _synthetic_curve() -> tuple[np.ndarray, np.ndarray]:
    """100 cases, scores 0.01..1.00; failures: the 8 lowest scores plus two at 0.50 and 0.90."""
    scores = np.arange(1, 101) / 100.0
    failed = np.zeros(100, bool)
    failed[:8] = True
    failed[[49, 89]] = True
    return scores, failed


def test_target_review_rate_sends_that_share_to_review() -> None:
    scores, failed = _synthetic_curve()
    point = derive_threshold(scores, failed, target_review_rate=0.15)
    assert point.threshold == pytest.approx(0.16)
    assert point.review_rate == pytest.approx(0.15) and point.coverage == pytest.approx(0.85)
    assert point.sensitivity == pytest.approx(0.8)  # 8 of 10 failures are among the 15 lowest
    assert point.risk == pytest.approx(2 / 85)


def test_max_risk_gives_the_largest_coverage_within_the_risk() -> None:
    scores, failed = _synthetic_curve()
    # Accepting from 0.09 up: 2 failures in 92 (2.2 %); from 0.51 up: 1 in 50 (2 %).
    assert derive_threshold(scores, failed, max_risk=0.025).threshold == pytest.approx(0.09)
    point = derive_threshold(scores, failed, max_risk=0.02)
    assert point.threshold == pytest.approx(0.51) and point.risk == pytest.approx(0.02)
    assert derive_threshold(scores, failed, max_risk=0.0).threshold == pytest.approx(0.91)
    # Unreachable: every accepted set has a failure rate above the limit -> accept only perfect scores.
    all_failed = np.ones(5, bool)
    assert derive_threshold(np.linspace(0.1, 0.9, 5), all_failed, max_risk=0.1).coverage == 0.0


def test_threshold_arguments_are_checked() -> None:
    scores, failed = _synthetic_curve()
    with pytest.raises(ValueError, match="exactly one"):
        derive_threshold(scores, failed)
    with pytest.raises(ValueError, match="exactly one"):
        derive_threshold(scores, failed, target_review_rate=0.1, max_risk=0.1)
    with pytest.raises(ValueError, match="no calibration"):
        derive_threshold(np.array([]), np.array([], bool), max_risk=0.1)


def test_risk_coverage_and_aurc_on_a_known_curve() -> None:
    scores, failed = _synthetic_curve()
    curve = risk_coverage(scores, failed.astype(float))
    assert curve[0] == 0.0 and curve[-1] == pytest.approx(0.10)
    assert curve[10] == pytest.approx(1 / 11)  # the 0.90 failure is the 11th most trusted
    oracle = aurc(-failed.astype(float), failed.astype(float))
    assert normalized_aurc(-failed.astype(float), failed.astype(float)) == pytest.approx(0.0)
    assert aurc(scores, failed.astype(float)) > oracle
    assert normalized_aurc(np.zeros(100), failed.astype(float)) == pytest.approx(1.0)


def _config(tmp_path, qc: str):
    path = tmp_path / "config.toml"
    path.write_text(f"[qc]\n{qc}\n")
    return path


def test_config_takes_at_most_one_threshold_rule(tmp_path) -> None:
    assert load_config(_config(tmp_path, "")).qc.accept_threshold == 0.5
    config = load_config(_config(tmp_path, "target_review_rate = 0.15"))
    point = calibrated_threshold(shipped_fusion(), target_review_rate=0.15)
    assert segmentation_threshold(config.qc) == point.threshold
    assert segmentation_threshold(load_config(_config(tmp_path, "accept_threshold = 0.3")).qc) == 0.3
    assert threshold_setting(load_config(_config(tmp_path, "accept_threshold = 0.3")).qc) == "accept_threshold = 0.3"
    assert threshold_setting(load_config(_config(tmp_path, "max_risk = 0.02")).qc) == "max_risk = 0.02"
    assert threshold_setting(load_config(_config(tmp_path, "")).qc) == "accept_threshold = 0.5"
    with pytest.raises(ConfigError, match="only one"):
        load_config(_config(tmp_path, "accept_threshold = 0.3\nmax_risk = 0.02"))
    with pytest.raises(ConfigError, match="only one"):
        load_config(_config(tmp_path, "target_review_rate = 0.1\nmax_risk = 0.02"))
    with pytest.raises(ConfigError, match="target_review_rate"):
        load_config(_config(tmp_path, "target_review_rate = 1.5"))


def test_the_shipped_configuration_reads_segmentation_verdicts_off_the_calibration_curve() -> None:
    """config.toml (the daemon's embedded default) sets target_review_rate = 0.15: segmentation is
    judged at the calibration curve's threshold for it, classification keeps accept_threshold."""
    config = load_config(REPO / "config.toml")
    assert config.qc.target_review_rate == 0.15 and config.qc.max_risk is None
    assert config.qc.accept_threshold == 0.5  # what classification findings use
    point = calibrated_threshold(shipped_fusion(), target_review_rate=0.15)
    assert shipped_segmentation_threshold() == (point.threshold, "target_review_rate = 0.15")
    assert segmentation_threshold(config.qc) == point.threshold > 0.8  # stricter than the 0.5 line


def test_qc_threshold_prints_the_operating_point(tmp_path, capsys) -> None:
    assert main(["qc-threshold", "--max-risk", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "calibration set:" in out and "operating point for max_risk = 0.05" in out
    assert "failures among accepted" in out and "review rate" in out
    assert main(["qc-threshold", "-c", str(_config(tmp_path, "target_review_rate = 0.2"))]) == 0
    out = capsys.readouterr().out
    expected = calibrated_threshold(shipped_fusion(), target_review_rate=0.2).threshold
    assert f"operating point for target_review_rate = 0.2:\n  threshold {expected:.4f}" in out


def test_paired_bootstrap_interval_of_an_auroc_difference() -> None:
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(40), 3)  # 40 phantoms, 3 masks each
    failed = rng.random(len(groups)) < 0.3
    perfect = np.where(failed, 0.2, 0.8) + 0.01 * rng.random(len(groups))
    noise = rng.random(len(groups))
    low, high = auroc_difference_interval(perfect, noise, failed, groups)
    assert 0 < low < high < 1  # a perfect detector beats a random one on every resample
    assert auroc_difference_interval(noise, noise, failed, groups) == (0.0, 0.0)  # paired: no spread
    low, high = auroc_difference_interval(noise, perfect, failed, groups)
    assert -1 < low < high < 0
    # Whole phantoms are resampled: with one group there is only the one sample, so no spread.
    one = np.zeros(len(groups))
    assert auroc_difference_interval(perfect, noise, failed, one)[0] == auroc_difference_interval(
        perfect, noise, failed, one)[1]
    with pytest.raises(ValueError, match="lengths differ"):
        auroc_difference_interval(perfect, noise[:-1], failed, groups)
    with pytest.raises(ValueError, match="level"):
        auroc_difference_interval(perfect, noise, failed, groups, level=1.0)
    assert np.isnan(auroc_difference_interval(perfect, noise, np.zeros(len(groups), bool), groups)[0])
