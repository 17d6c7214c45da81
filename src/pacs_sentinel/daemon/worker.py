"""The worker: takes QUEUED jobs one by one and runs load -> inference -> QC -> reports.

Every error becomes a job state (FAILED with a one-line reason, or REJECTED when the
study has nothing for the pipeline); the worker itself never dies on a bad study.
"""

from __future__ import annotations

import shutil
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import structlog

from pacs_sentinel.daemon.config import Config, PipelineConfig, QCConfig, default_config_text
from pacs_sentinel.daemon.jobs import Job, JobState, JobStore, qc_signal_rows
from pacs_sentinel.daemon.routing import read_candidates, segs_to_judge, select_series
from pacs_sentinel.daemon.seg_qc import judge_segs, third_party_segs
from pacs_sentinel.daemon.warmup import warm_up
from pacs_sentinel.dicom_io.series import load_series_files, pixel_spacing
from pacs_sentinel.dicom_io.spool import Spool
from pacs_sentinel.errors import SentinelError, SeriesError
from pacs_sentinel.inference.models import load_segmentation_model
from pacs_sentinel.qc.evaluate import evaluate_segmentation, shipped_fusion
from pacs_sentinel.qc.fusion import FusionModel
from pacs_sentinel.qc.refit import ActiveFusion
from pacs_sentinel.reports.resultset import ResultSet, build_result_set
from pacs_sentinel.reports.validate import check_before_sending
from pacs_sentinel.results import QCResult, Verdict

log = structlog.get_logger(__name__)


#: What a pipeline's analysis hands to delivery: the objects, the raw result, QC, series.
Analysis = tuple[ResultSet, Any, QCResult, str]


def segmentation_threshold(qc: QCConfig, fusion: FusionModel | None = None) -> float:
    """The verdict threshold of segmentation results: ``accept_threshold``, or the one the
    calibration curve of ``fusion`` (default the shipped one) gives for ``target_review_rate`` /
    ``max_risk``.

    Raises:
        ModelError: The fusion model has no calibration curve.
    """
    if qc.target_review_rate is None and qc.max_risk is None:
        return qc.accept_threshold
    from pacs_sentinel.qc.fusion import calibrated_threshold

    return calibrated_threshold(fusion if fusion is not None else shipped_fusion(),
                                target_review_rate=qc.target_review_rate, max_risk=qc.max_risk).threshold


def threshold_setting(qc: QCConfig) -> str:
    """The ``[qc]`` key that decides segmentation verdicts, as written, e.g. ``target_review_rate = 0.15``."""
    if qc.target_review_rate is not None:
        return f"target_review_rate = {qc.target_review_rate}"
    if qc.max_risk is not None:
        return f"max_risk = {qc.max_risk}"
    return f"accept_threshold = {qc.accept_threshold}"


def shipped_segmentation_threshold() -> tuple[float, str]:
    """The segmentation verdict threshold of the shipped configuration (``config.toml``, embedded
    as the daemon's default) and the ``[qc]`` setting it comes from."""
    qc = QCConfig.model_validate(tomllib.loads(default_config_text()).get("qc", {}))
    return segmentation_threshold(qc), threshold_setting(qc)


class JobRejected(SentinelError):
    """The study has nothing this pipeline can run on."""


class Worker:
    """Runs jobs in a background thread, one at a time."""

    def __init__(self, config: Config, jobs: JobStore, spool: Spool, on_results: Callable[[], None]) -> None:
        self.config = config
        self.jobs = jobs
        self.spool = spool
        self.on_results = on_results
        self.results_root = config.node.data_dir / "results"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._active_fusion: ActiveFusion | None = None

    def active_fusion(self) -> FusionModel:
        """The QC version active now (``<data_dir>/qc/active.json``, else the shipped one).

        Raises:
            ModelError: The shipped fusion, ``active.json`` or the version it names is invalid.
        """
        if self._active_fusion is None:
            self._active_fusion = ActiveFusion(self.config.node.data_dir / "qc", shipped_fusion())
        return self._active_fusion.get()

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._loop, name="sentinel-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Tell the worker a job may be waiting."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current job (waits up to ``timeout`` seconds)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        warm_up(self.config)  # one-time set-up before the first study, not during it (daemon/warmup.py)
        while not self._stop.is_set():
            try:
                job = self.jobs.claim_next()
            except Exception:
                log.exception("cannot claim a job")
                job = None
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        """Run one claimed job to its next state; never raises."""
        structlog.contextvars.bind_contextvars(study_uid=job.study_uid, job_id=job.id)
        started = time.monotonic()
        try:
            log.info("job started", pipeline=job.pipeline, run=job.runs)
            state = self._process(job)
            log.info("job processed", state=state.value, seconds=round(time.monotonic() - started, 2))
            if state is JobState.DELIVERING:
                self.on_results()
        except JobRejected as exc:
            log.warning("job rejected", reason=str(exc))
            self.jobs.finish(job.id, JobState.REJECTED, error=str(exc))
        except SentinelError as exc:
            log.error("job failed", error=str(exc))
            self.jobs.finish(job.id, JobState.FAILED, error=str(exc))
        except Exception as exc:  # a bug must fail the job, not kill the worker
            log.exception("job failed with an internal error")
            self.jobs.finish(job.id, JobState.FAILED, error=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            structlog.contextvars.unbind_contextvars("study_uid", "job_id")

    def _pipeline(self, name: str) -> PipelineConfig:
        for pipeline in self.config.pipelines:
            if pipeline.name == name:
                return pipeline
        raise SentinelError(f"pipeline {name!r} is no longer configured")

    def _process(self, job: Job) -> JobState:
        pipeline = self._pipeline(job.pipeline)
        if pipeline.kind == "seg-qc":
            return self._judge_segs(job, pipeline)
        candidates = read_candidates(self.spool.study_files(job.study_uid))
        series = select_series(pipeline, candidates)
        if series is None:
            raise JobRejected(f"no series of the study matches pipeline {pipeline.name!r}")
        if pipeline.kind == "segmentation":
            analysis = self._segment(pipeline, series.files)
        else:
            analysis = self._classify(pipeline, series.files)
        result_set, result, qc, series_uid = analysis
        return self._deliver(job, [(result_set, None)], qc, series_uid=series_uid, model=result.model_name,
                             model_version=result.model_version)

    def _judge_segs(self, job: Job, pipeline: PipelineConfig) -> JobState:
        """A seg-qc job: judge every third-party SEG of the study the pipeline matches."""
        series_files = self.spool.study_files(job.study_uid)
        segs = third_party_segs(self.config, self.spool, self.jobs, job.study_uid, series_files)
        judged = segs_to_judge(pipeline, read_candidates(series_files), segs)
        if not judged:
            raise JobRejected(f"no third-party SEG of the study references a series matching pipeline {pipeline.name!r}")
        not_judged: list[str] = []
        outcomes = judge_segs(self.config, pipeline, judged, not_judged=not_judged)
        qc = QCResult(qc_version=outcomes[0].qc.qc_version, segments=[s for o in outcomes for s in o.qc.segments])
        # One SEG: its objects in the job folder; several: one sub-folder per SEG.
        sets = [(o.result_set, None if len(outcomes) == 1 else f"seg-{n}") for n, o in enumerate(outcomes, start=1)]
        return self._deliver(job, sets, qc, series_uid=outcomes[0].series_uid,
                             model=", ".join(dict.fromkeys(o.result.model_name for o in outcomes))[:200],
                             model_version=", ".join(dict.fromkeys(o.result.model_version for o in outcomes))[:200],
                             # The SEGs that could be judged are; the job's note names the others.
                             note="; ".join(not_judged) or None)

    def _deliver(self, job: Job, result_sets: list[tuple[ResultSet, str | None]], qc: QCResult, *,
                 series_uid: str, model: str, model_version: str, note: str | None = None) -> JobState:
        """Write the result sets (each into the job folder or the named sub-folder), queue
        every DICOM file for every destination, and record the job's result row and QC signals
        (``note``: kept as the job's message, shown by ``sentinel status``, also once DONE)."""
        newer = self.jobs.newer_queued_job(job)
        if newer is not None:
            # More instances of the input series arrived while this job ran: the re-run sends
            # the one result set; this job's results are dropped, never delivered.
            log.info("job superseded by a re-run", newer_job_id=newer)
            self.jobs.finish(job.id, JobState.DONE, error=f"superseded by job {newer} (instances arrived while it ran)")
            return JobState.DONE

        out_dir = self.results_root / f"job-{job.id}"
        if out_dir.exists():
            shutil.rmtree(out_dir)  # left by an interrupted run of this job
        sent: list[tuple[Path, pydicom.Dataset]] = []  # (file, the object written to it), in sending order
        for result_set, folder in result_sets:
            written = result_set.write(out_dir if folder is None else out_dir / folder)
            sent += zip([p for p in written if p.suffix == ".dcm"], result_set.datasets(), strict=True)
        # Nothing leaves unchecked: a failure fails the job (the files stay in out_dir to look at).
        started = time.perf_counter()
        check_before_sending([path for path, _ in sent], self.config.reports.validate_)
        log.info("results validated", mode=self.config.reports.validate_,
                 objects=len(sent), seconds=round(time.perf_counter() - started, 3))
        outbox_items = [
            {"destination": destination.name, "path": str(path), "sop_instance_uid": str(ds.SOPInstanceUID),
             "sop_class_uid": str(ds.SOPClassUID)}
            for path, ds in sent for destination in self.config.destinations
        ]
        return self.jobs.record_results(
            job.id,
            result={
                "series_uid": series_uid,
                "model": model,
                "model_version": model_version,
                "qc_version": qc.qc_version,
                "verdict": qc.verdict.label,
                "quality_score": qc.quality_score,
                "reasons": [r.label for r in qc.reasons],
                "needs_review": qc.verdict is Verdict.NEEDS_REVIEW,
                "output_dir": str(out_dir),
                "error": note,
            },
            outbox_items=outbox_items,
            qc_signals=qc_signal_rows(qc),
        )


    def _segment(self, pipeline: PipelineConfig, files: list[Path]) -> Analysis:
        volume = load_series_files(files, min_slices=pipeline.min_slices)
        inference = self.config.inference
        model = load_segmentation_model(pipeline.model, device=inference.device,
                                        mixed_precision=inference.mixed_precision)
        result = model.predict(volume, threshold=pipeline.threshold, mc_dropout_samples=pipeline.mc_dropout_samples,
                               tta_flips=tuple(pipeline.tta_flips), sw_overlap=pipeline.sw_overlap)
        fusion = self.active_fusion()
        qc = evaluate_segmentation(volume, result, accept_threshold=segmentation_threshold(self.config.qc, fusion),
                                   fusion=fusion)
        withhold = pipeline.reports.on_review == "withhold-seg" and qc.verdict is Verdict.NEEDS_REVIEW
        result_set = build_result_set(volume, result, qc, series_number_base=pipeline.series_number_base,
                                      withheld_seg=withhold, seg_type=self.config.reports.seg_type)
        if withhold:
            log.info("segmentation withheld for review; SR and overlay say so")
        self._add_quality_issue(result_set, volume.datasets, qc, result.model_name, pipeline)
        return result_set, result, qc, volume.series_uid

    def _classify(self, pipeline: PipelineConfig, files: list[Path]) -> Analysis:
        from pacs_sentinel.inference.classification import (
            image_from_dataset,
            load_classification_model,
            without_padding,
        )
        from pacs_sentinel.qc.classification import evaluate_classification
        from pacs_sentinel.reports.resultset import build_classification_result_set

        source = first_image(files)
        image = image_from_dataset(source)
        spacing = radiograph_spacing(source)
        inference = self.config.inference
        model = load_classification_model(pipeline.model, device=inference.device,
                                          mixed_precision=inference.mixed_precision)
        result = model.predict(image, spacing,
                               mc_dropout_samples=pipeline.mc_dropout_samples, tta_flips=tuple(pipeline.tta_flips),
                               patient_orientation=source.get("PatientOrientation"))
        # The image checks judge the exposed area, as the model does (a padding border is no exposure).
        qc = evaluate_classification(result, accept_threshold=self.config.qc.accept_threshold,
                                     image=without_padding(image)[0])
        result_set = build_classification_result_set(source, result, qc,
                                                     series_number_base=pipeline.series_number_base)
        self._add_quality_issue(result_set, [source], qc, result.model_name, pipeline)
        return result_set, result, qc, str(source.SeriesInstanceUID)

    def _add_quality_issue(self, result_set: ResultSet, sources: list[pydicom.Dataset], qc: QCResult,
                           model_name: str, pipeline: PipelineConfig) -> None:
        """``[review] send_kos``: a result that needs review is sent with a "Quality Issue" KOS
        (series ``base + 4``) referencing the source instances."""
        if not self.config.review.send_kos or qc.verdict is not Verdict.NEEDS_REVIEW:
            return
        from pacs_sentinel.reports.kos import build_quality_issue_kos

        result_set.key_objects.append(build_quality_issue_kos(
            sources, qc, model_name=model_name, series_number=pipeline.series_number_base + 4))


def first_image(files: list[Path]) -> pydicom.Dataset:
    """The image a 2D classification runs on: the series' lowest InstanceNumber.

    Raises:
        SeriesError: No file of the series can be read as a single-frame image.
    """
    best: tuple[int, pydicom.Dataset] | None = None
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:  # a broken file is skipped, not fatal, when others are fine
            log.warning("unreadable instance skipped", path=str(path), error=str(exc))
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) != 1 or "PixelData" not in ds:
            continue
        number = int(ds.get("InstanceNumber", 0) or 0)
        if best is None or number < best[0]:
            best = (number, ds)
    if best is None:
        raise SeriesError("series has no single-frame image to classify")
    return best[1]


def radiograph_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The pixel spacing a radiograph is classified with: PixelSpacing, else ImagerPixelSpacing;
    None when it has neither.

    Raises:
        SeriesError: One of them is there but is not two plausible numbers (the findings report
            copies both, so a broken one would fail the job later with a library's TypeError).
    """
    found: tuple[float, float] | None = None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        spacing = pixel_spacing(value, str(ds.get("SOPInstanceUID", "?")), keyword)
        found = found or (float(spacing[0]), float(spacing[1]))
    return found


def output_files(job: Job) -> list[Path]:
    """The files a job wrote (empty when it wrote none)."""
    if not job.output_dir:
        return []
    return sorted(Path(job.output_dir).glob("*"))
