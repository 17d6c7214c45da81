"""The QC refit from the worklist's decisions: feedback cases, the nightly job, `sentinel qc-refit` and
`sentinel models`, and the next job judged with the activated version."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from pacs_sentinel.daemon.config import parse_config
from pacs_sentinel.daemon.jobs import FINISHED_STATES, MIGRATIONS, JobStore, qc_signal_rows
from pacs_sentinel.daemon.refit import feedback_cases, run_refit, schedule, scheduled_refit
from pacs_sentinel.daemon.review import ReviewStore
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scu import Peer, send_files
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from pacs_sentinel.qc.evaluate import QC_VERSION as V
from pacs_sentinel.qc.evaluate import shipped_fusion
from pacs_sentinel.qc.refit import read_active, version_file
from pacs_sentinel.results import QCResult, SegmentLabel, SegmentQC, Verdict
from tests.daemon.conftest import make_config
from tests.qc.refit_cases import phantoms, synthetic_cases

LIVER = SegmentLabel("Liver", None, None, "liver")  # type: ignore[arg-type]


def _config(tmp_path: Path, pacs_port: int = 4242, **refit: object):  # type: ignore[no-untyped-def]
    data = make_config(tmp_path, pacs_port).model_dump(mode="json")
    data["qc"] = {"refit": {"eval_n_per_family": 1, "eval_perturbations": 1, **refit}}
    return parse_config(data)


def _qc(signals: list, score: float) -> QCResult:
    values = {s.name: round(s.value, 6) for s in signals}
    values["volume_ml"] = 1234.5
    values.update({f"{s.name}_subscore": round(s.subscore, 6) for s in signals})
    return QCResult(V, [SegmentQC(1, LIVER, score, Verdict.NEEDS_REVIEW, [], 1.2e6, values)])


def _decided(database: Database, study_uid: str, signals: list, decision: str | None,
             dice: float | None = None) -> int:
    """A flagged job of ``study_uid`` with these signals, its item resolved with ``decision``."""
    jobs, review = JobStore(database), ReviewStore(database)
    jobs.queue_study(study_uid, {"organ-seg": 0.0})
    job = jobs.claim_next()
    assert job is not None and job.study_uid == study_uid
    qc = _qc(signals, 0.4)
    jobs.record_results(job.id, result={"series_uid": "1.2", "model": "organ-seg", "model_version": "1.1.0",
                                        "qc_version": V, "verdict": "Needs review", "quality_score": 0.4,
                                        "reasons": [], "needs_review": True},
                        outbox_items=[], qc_signals=qc_signal_rows(qc))
    item = review.find(study_uid, "organ-seg")
    assert item is not None
    if dice is not None:  # a correction compared with our mask (daemon/feedback.py writes these rows)
        with database.transaction() as tx:
            tx["feedback"].insert({"sop_instance_uid": f"2.25.{job.id}", "study_uid": study_uid, "job_id": job.id,
                                   "pipeline": "organ-seg", "segment_number": 1, "dice": dice,
                                   "recorded_at": time.time()})
    if decision is not None:
        review.resolve(item.id, decision, "dr-a")
    return job.id


def _database(config) -> Database:  # type: ignore[no-untyped-def]
    return Database(config.node.data_dir / "sentinel.db", migrations=MIGRATIONS)


def test_decisions_become_labelled_cases_with_the_stored_signals(tmp_path: Path) -> None:
    database = _database(_config(tmp_path))
    signals = synthetic_cases(1)[0].signals
    correct = _decided(database, "1.1", signals, "ai-correct")
    rejected = _decided(database, "1.2", signals, "ai-rejected")
    good_fix = _decided(database, "1.3", signals, None, dice=0.91)  # the viewer's correction resolves it...
    with database.transaction() as tx:
        tx.execute("UPDATE review_items SET status = 'resolved', decision = 'ai-corrected', resolved_at = ? "
                   "WHERE job_id = ?", [time.time(), good_fix])
    bad_fix = _decided(database, "1.4", signals, "ai-corrected", dice=0.42)
    _decided(database, "1.5", signals, "ai-corrected")  # no correction compared: no label
    _decided(database, "1.6", signals, None)  # still open
    stored = JobStore(database).qc_signals(correct)
    assert {r["name"] for r in stored} == {s.name for s in signals}
    assert all(r["segment_label"] == "Liver" for r in stored)
    cases, newest = feedback_cases(database)
    assert {c.job_id: c.acceptable for c in cases} == {correct: True, rejected: False, good_fix: True, bad_fix: False}
    assert newest is not None
    by_name = {s.name: s for s in cases[0].signals}
    for s in signals:
        assert by_name[s.name].value == pytest.approx(s.value, abs=1e-6)
        assert by_name[s.name].subscore == pytest.approx(s.subscore, abs=1e-6)
    assert feedback_cases(database, since=newest) == ([], None)
    assert feedback_cases(database, pipelines=["vendor-seg-qc"]) == ([], None)  # other pipelines' items


def _feed(database: Database, cases: list, prefix: str) -> None:
    for case in cases:
        _decided(database, f"{prefix}.{case.job_id}", case.signals, case.decision)


def test_the_nightly_job_refits_only_with_min_new_cases_since_the_last_refit(tmp_path: Path) -> None:
    config = _config(tmp_path, enabled=True, hour=3, minute=15, min_new_cases=12)
    database = _database(config)
    _feed(database, synthetic_cases(10), "1")
    outcome = scheduled_refit(config, database)
    assert outcome is not None and outcome.skipped and "10 new feedback case(s)" in outcome.skipped
    assert not (config.node.data_dir / "qc").exists()
    _feed(database, synthetic_cases(8, seed=3), "2")
    outcome = run_refit(config, database, min_new_cases=12, phantoms=list(phantoms()))
    assert outcome.version == f"{V}+fb1" and outcome.n_cases == 18 and outcome.activated
    # Nothing decided since: the next night does nothing.
    again = scheduled_refit(config, database)
    assert again is not None and again.skipped and again.active_version == f"{V}+fb1"
    assert not version_file(config.node.data_dir / "qc", f"{V}+fb2").exists()

    scheduler = BackgroundScheduler(timezone="UTC")
    schedule(scheduler, config, database)
    job = scheduler.get_job("qc-refit")
    assert job is not None and job.func is scheduled_refit
    fields = {f.name: str(f) for f in job.trigger.fields}
    assert fields["hour"] == "3" and fields["minute"] == "15"
    disabled = BackgroundScheduler(timezone="UTC")
    schedule(disabled, _config(tmp_path), database)
    assert disabled.get_job("qc-refit") is None


def _run_cli(*args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run([sys.executable, "-m", "pacs_sentinel", *args], capture_output=True, text=True, timeout=300)


def test_sentinel_models_and_qc_refit_commands(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[node]\ndata_dir = "{config.node.data_dir}"\n\n[qc.refit]\nmin_new_cases = 5\n\n'
                           '[[pipelines]]\nname = "organ-seg"\nmodel = "demo:organ-seg"\n\n'
                           '[[pipelines]]\nname = "cxr"\nkind = "classification"\nmodel = "demo:cxr-cls"\n'
                           'match = { Modality = ["DX"] }\n')
    missing = _run_cli("qc-refit", "-c", str(config_file))
    assert missing.returncode == 2 and "no database" in missing.stderr
    database = _database(config)
    _feed(database, synthetic_cases(4), "1")
    scheduled = _run_cli("qc-refit", "-c", str(config_file), "--scheduled")
    assert scheduled.returncode == 0 and "no refit: 4 new feedback case(s) since the last refit, 5 needed" in scheduled.stdout
    too_few = _run_cli("qc-refit", "-c", str(config_file))
    assert too_few.returncode == 2 and "at least 6 feedback cases" in too_few.stderr
    _feed(database, synthetic_cases(14, seed=5), "2")
    refitted = _run_cli("qc-refit", "-c", str(config_file))  # draws the phantom evaluation itself (size 1)
    assert refitted.returncode == 0, refitted.stderr
    assert f"QC {V}+fb1: Platt a = " in refitted.stdout and "on 18 feedback case(s)" in refitted.stdout
    assert f"held-out feedback, old ({V})" in refitted.stdout and f"held-out phantoms, new ({V}+fb1)" in refitted.stdout
    assert f"activated: QC {V}+fb1 is now active" in refitted.stdout
    # A worse refit (labels against the scores), then listed beside the active one.
    from pacs_sentinel.qc.refit import refit

    worse = refit(synthetic_cases(12, contradict=True), qc_dir=config.node.data_dir / "qc", shipped=shipped_fusion(),
                  eval_n_per_family=1, eval_perturbations=1, phantoms=list(phantoms()))
    assert worse.version == f"{V}+fb2" and not worse.activated
    listed = _run_cli("models", "-c", str(config_file))
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert "organ-seg" in out and "1.1.0" in out and "shipped demo model" in out and "dice_mean 0.9485" in out
    assert "cxr-cls" in out and "auroc_mean 0.9733" in out
    lines = out.splitlines()
    shipped_line = next(line for line in lines if f" {V} " in line and "shipped" in line)
    active_line = next(line for line in lines if f"{V}+fb1 " in line)
    worse_line = next(line for line in lines if f"{V}+fb2 " in line)
    assert active_line.startswith("*") and not shipped_line.startswith("*") and not worse_line.startswith("*")
    from pacs_sentinel.qc.fusion import load_fusion

    shipped_auroc = load_fusion().info["metrics"]["cv_auroc_all"]  # the figure the shipped file records
    assert f"cv_auroc_all {shipped_auroc:.4f}" in shipped_line
    assert f"local refit of {V}" in active_line and "18 feedback cases" in active_line and "; activated" in active_line
    assert f"local refit of {V}+fb1" in worse_line and "12 feedback cases" in worse_line
    assert "held-out phantoms old -> new: auroc" in worse_line and "not activated" in worse_line


def test_after_an_activated_refit_the_next_job_records_the_new_qc_version(tmp_path: Path, pacs,  # type: ignore[no-untyped-def]
                                                                          sentinel_factory) -> None:
    config = _config(tmp_path, pacs.port, enabled=True, hour=4)
    database = _database(config)
    _feed(database, synthetic_cases(18), "1")
    outcome = run_refit(config, database, phantoms=list(phantoms()))
    assert outcome.activated and read_active(config.node.data_dir / "qc")["qc_version"] == f"{V}+fb1"
    database.close()
    sentinel = sentinel_factory(config)
    assert sentinel.scheduler.get_job("qc-refit") is not None  # [qc.refit] enabled: the nightly job
    files = write_ct_series(make_ct_phantom(11), tmp_path / "ct", seed=11)
    assert all(r.delivered for r in send_files(files, Peer("SENTINEL", "127.0.0.1", sentinel.scp.port),
                                               calling_ae="CT1"))
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        done = [j for j in sentinel.jobs.jobs(study_uid=study_uid) if j.state in FINISHED_STATES]
        if done:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the job did not finish")
    row = sentinel.database.connection().execute("SELECT qc_version FROM jobs WHERE id = ?", [done[0].id]).fetchone()
    assert row[0] == f"{V}+fb1"
    stored = sentinel.jobs.qc_signals(done[0].id)
    assert {"predicted_dice", "sample_dice", "largest_component_share"} <= {r["name"] for r in stored}
    sr = pydicom.dcmread(Path(done[0].output_dir or "") / "SR.dcm")
    assert f"{V}+fb1" in str(sr)  # the SR says which QC version judged the result
