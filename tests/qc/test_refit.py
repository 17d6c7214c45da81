"""QC refit on feedback: Platt recalibration, new versions beside the shipped one, the activation rule."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pacs_sentinel.errors import ModelError
from pacs_sentinel.qc.evaluate import QC_VERSION as V
from pacs_sentinel.qc.evaluate import shipped_fusion
from pacs_sentinel.qc.fusion import FUSION_FILE
from pacs_sentinel.qc.refit import (
    ActiveFusion,
    RefitError,
    decide,
    fit_platt,
    fusion_logit,
    next_version,
    read_active,
    recalibrated,
    refit,
    split_cases,
    version_file,
    write_active,
)
from tests.qc.refit_cases import phantoms, segment_signals, synthetic_cases


def test_platt_fit_recovers_slope_and_offset_and_never_goes_negative() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 4000)
    y = rng.random(4000) < 1 / (1 + np.exp(-(0.5 * z + 1.0)))
    a, b = fit_platt(z, y)
    assert a == pytest.approx(0.5, abs=0.08) and b == pytest.approx(1.0, abs=0.15)
    a, _ = fit_platt(z, rng.random(4000) < 1 / (1 + np.exp(2 * z)))  # labels against the logit
    assert a == 0.0
    # Few cases: the prior keeps the fit near the old version.
    a, b = fit_platt(np.array([2.0, -1.0, 0.5]), np.array([1.0, 0.0, 1.0]))
    assert 0.5 < a < 3 and abs(b) < 2


def test_recalibrated_fusion_keeps_weights_non_negative_and_the_ranking() -> None:
    shipped = shipped_fusion()
    same = recalibrated(shipped, 1.0, 0.0, "2.0.0+fb9")
    worse, better = segment_signals(0.5), segment_signals(0.9)
    assert same.score(better)[0] == pytest.approx(shipped.score(better)[0])
    steep = recalibrated(shipped, 2.5, -0.7, "2.0.0+fb9")
    assert all(w >= 0 for m in steep.models for w in m.weights)
    assert steep.score(worse)[0] < steep.score(better)[0]
    assert fusion_logit(steep, better) == pytest.approx(2.5 * fusion_logit(shipped, better) - 0.7)
    # The calibration curve moves with the scores (0 stays 0: an out-of-range check).
    scores = steep.calibration["scores"]
    assert len(scores) == len(shipped.calibration["scores"])
    old = np.array(shipped.calibration["scores"])
    assert all(s == 0 for s, t in zip(scores, old, strict=True) if t == 0)
    assert np.all(np.diff(np.array(scores)[np.argsort(old, kind="stable")]) >= 0)  # same order
    with pytest.raises(ValueError, match="slope"):
        recalibrated(shipped, -0.1, 0.0, "x")


def test_split_holds_out_both_classes_and_versions_count_up(tmp_path: Path) -> None:
    cases = synthetic_cases(12)
    fit, held = split_cases(cases)
    assert {c.acceptable for c in held} == {True, False}
    assert len(fit) + len(held) == 12 and not {c.job_id for c in fit} & {c.job_id for c in held}
    assert next_version("2.0.0", tmp_path) == "2.0.0+fb1"
    recalibrated(shipped_fusion(), 1, 0, "2.0.0+fb1").save(version_file(tmp_path, "2.0.0+fb1"))
    assert next_version("2.0.0", tmp_path) == "2.0.0+fb2"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_refit_that_is_no_worse_is_activated_and_used_from_then_on(tmp_path: Path) -> None:
    shipped_hash = _sha(FUSION_FILE)
    active = ActiveFusion(tmp_path, shipped_fusion())
    assert active.get().qc_version == V
    outcome = refit(synthetic_cases(18), qc_dir=tmp_path, shipped=shipped_fusion(), eval_n_per_family=1,
                    eval_perturbations=1, phantoms=list(phantoms()))
    assert outcome.activated, outcome.describe()
    assert outcome.version == f"{V}+fb1" and outcome.active_version == f"{V}+fb1"
    # Both evaluations, old and new, are kept with the version.
    saved = json.loads(version_file(tmp_path, f"{V}+fb1").read_text())
    refit_info = saved["info"]["refit"]
    assert refit_info["activated"] and refit_info["based_on"] == V
    for part in ("feedback", "phantoms"):
        assert refit_info[part]["old"]["qc_version"] == V
        assert refit_info[part]["new"]["qc_version"] == f"{V}+fb1"
    assert refit_info["feedback"]["new"]["log_loss"] <= refit_info["feedback"]["old"]["log_loss"] + 1e-3
    assert read_active(tmp_path)["qc_version"] == f"{V}+fb1"
    assert active.get().qc_version == f"{V}+fb1"  # the worker's next job
    assert _sha(FUSION_FILE) == shipped_hash  # the shipped model is never touched
    # The next refit is based on the active version and gets the next number.
    again = refit(synthetic_cases(18, seed=1), qc_dir=tmp_path, shipped=shipped_fusion(), eval_n_per_family=1,
                  eval_perturbations=1, phantoms=list(phantoms()))
    assert again.version == f"{V}+fb2"
    assert json.loads(version_file(tmp_path, f"{V}+fb2").read_text())["info"]["refit"]["based_on"] == f"{V}+fb1"


def test_a_refit_that_is_worse_is_not_activated_and_the_old_version_stays(tmp_path: Path) -> None:
    active = ActiveFusion(tmp_path, shipped_fusion())
    # 24 cases: enough that the labels, not the prior towards the old version, set the slope (to 0).
    outcome = refit(synthetic_cases(24, contradict=True), qc_dir=tmp_path, shipped=shipped_fusion(),
                    eval_n_per_family=1, eval_perturbations=1, phantoms=list(phantoms()))
    assert not outcome.activated
    assert outcome.a == 0.0  # labels against the scores: the recalibration flattens them
    assert any("phantoms auroc" in p for p in outcome.problems), outcome.problems
    assert outcome.phantoms["new"]["auroc"] < outcome.phantoms["old"]["auroc"]
    assert read_active(tmp_path)["qc_version"] == V
    assert read_active(tmp_path)["last_refit"] == {"version": f"{V}+fb1", "at": read_active(tmp_path)["last_refit"]["at"],
                                                   "activated": False}
    assert active.get().qc_version == V
    assert version_file(tmp_path, f"{V}+fb1").is_file()  # kept for inspection, never used
    assert any("not activated" in line for line in outcome.describe())


def test_decide_and_bad_inputs(tmp_path: Path) -> None:
    same = {"log_loss": 0.3, "brier": 0.1, "auroc": 0.9, "aurc": 0.1}
    assert decide(same, same, same, same) == (True, [])
    ok, problems = decide(same, {**same, "brier": 0.2}, same, same)
    assert not ok and "brier" in problems[0]
    # Same ranking on the phantoms but flattened scores (Brier worse): not activated.
    ok, problems = decide(same, same, same, {**same, "brier": 0.2})
    assert not ok and problems == ["held-out phantoms brier 0.1000 -> 0.2000"]
    nan = {**same, "auroc": float("nan")}
    assert decide(nan, nan, same, same)[0]  # one class held out: AUROC does not decide
    with pytest.raises(RefitError, match="both kinds"):
        refit([c for c in synthetic_cases(12) if c.acceptable], qc_dir=tmp_path, shipped=shipped_fusion(),
              eval_n_per_family=1, eval_perturbations=1, phantoms=[])
    write_active(tmp_path, {"qc_version": f"{V}+fb7"})
    with pytest.raises(ModelError, match="not found"):
        ActiveFusion(tmp_path, shipped_fusion()).get()
    (tmp_path / "active.json").write_text("{broken")
    with pytest.raises(ModelError, match="invalid"):
        ActiveFusion(tmp_path, shipped_fusion()).get()
