"""Start-up warm-up: pay the one-time costs before the first study, not during it.

The first SEG a process builds costs about a second more than the next ones (highdicom loads
its tables of the standard, pydicom its code dictionaries, ...), and a model is loaded on its
first use. :func:`warm_up` runs in the worker thread when the daemon starts, while no study
can be complete yet (a study is complete only ``quiet_seconds`` after its last instance): it
loads every pipeline's model (kept warm by the model cache) and builds, writes and reads back
one small result set (SEG, SR, SC) of a synthetic phantom with a fixed QC judgement, the
same report code a job runs (it logs no line that looks like a job's).
Nothing it does is kept except the warm caches; a failure is logged and never stops the
daemon (a broken model then fails its jobs with the usual message).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import structlog

from pacs_sentinel.daemon.config import Config
from pacs_sentinel.dicom_io.series import load_series_files
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from pacs_sentinel.qc.evaluate import QC_VERSION
from pacs_sentinel.reports.resultset import build_result_set
from pacs_sentinel.reports.validate import check_before_sending
from pacs_sentinel.results import Code, QCResult, SegmentationResult, SegmentLabel, SegmentQC, Verdict

log = structlog.get_logger(__name__)

#: The phantom of the warm-up result set: small, so that it costs little beyond the set-up.
WARM_UP_SHAPE = (4, 32, 32)
WARM_UP_SPACING = (5.0, 12.5, 12.5)
WARM_UP_LABEL = SegmentLabel(
    name="Liver",
    property_category=Code("123037004", "SCT", "Anatomical Structure"),
    property_type=Code("10200004", "SCT", "Liver"),
    tracking_id="warm-up Liver",
)


def load_models(config: Config) -> int:
    """Load the model of every segmentation and classification pipeline; how many loaded."""
    from pacs_sentinel.inference.classification import load_classification_model
    from pacs_sentinel.inference.models import load_segmentation_model

    inference = config.inference
    loaded = 0
    for pipeline in config.pipelines:
        loader = {"segmentation": load_segmentation_model, "classification": load_classification_model}.get(pipeline.kind)
        if loader is None or not pipeline.model:
            continue
        try:
            loader(pipeline.model, device=inference.device, mixed_precision=inference.mixed_precision)
            loaded += 1
        except Exception as exc:  # the pipeline's jobs will fail with this; the daemon runs on
            log.warning("model not loaded at start-up", pipeline=pipeline.name, error=str(exc))
    return loaded


def warm_up_reports() -> None:
    """Build, write and read back one small SEG + SR + SC result set in a temporary folder.

    Raises:
        SentinelError: Any stage fails (the caller logs it).
    """
    phantom = make_ct_phantom(0, shape=WARM_UP_SHAPE, spacing=WARM_UP_SPACING)
    with tempfile.TemporaryDirectory(prefix="sentinel-warm-up-") as tmp:
        volume = load_series_files(write_ct_series(phantom, Path(tmp) / "series", seed=0))
        mask = np.zeros((1, *volume.array.shape), dtype=bool)
        mask[0, 1:3, 12:20, 12:20] = True  # a block inside the phantom: a SEG with frames
        result = SegmentationResult(probabilities=mask.astype(np.float32), mask=mask, labels=[WARM_UP_LABEL],
                                    model_name="warm-up", model_version="0")
        # A fixed judgement, not the QC: the warm-up must not log a "qc evaluated" line that is
        # about no study (the QC has no one-time set-up worth paying here).
        volume_mm3 = float(mask.sum()) * volume.voxel_volume_mm3
        qc = QCResult(qc_version=QC_VERSION, segments=[
            SegmentQC(1, WARM_UP_LABEL, 1.0, Verdict.ACCEPTED, [], volume_mm3, {"volume_ml": volume_mm3 / 1000.0})])
        written = build_result_set(volume, result, qc).write(Path(tmp) / "results")
        # Read-back only: dciodvfy is a subprocess with nothing to warm up.
        check_before_sending([path for path in written if path.suffix == ".dcm"], "roundtrip")


def warm_up(config: Config) -> float:
    """Load the models and warm up the report writers; never raises.

    Returns:
        Seconds it took.
    """
    started = time.perf_counter()
    # The log lines of the throw-away result set (e.g. "qc evaluated") say they are the warm-up's.
    with structlog.contextvars.bound_contextvars(warm_up=True):
        models = load_models(config)
        try:
            warm_up_reports()
        except Exception as exc:  # a warm-up failure must not stop the worker; the first job shows the real error
            log.warning("report warm-up failed", error=f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    log.info("warmed up", models=models, seconds=round(seconds, 2))
    return seconds
