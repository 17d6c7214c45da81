"""``seg-qc`` pipelines: judge the SEGs other systems send, and say so in an SR and an overlay.

Which SEGs: every SEG of the study that this node did not write, that references an image
series the pipeline matches, and that is not review feedback — a SEG that arrives after we
delivered a segmentation result for the same source series corrects OUR result and belongs to
the review worklist, not here (:func:`third_party_segs`).

How: the referenced series is loaded as a volume, each SEG's segments are placed on it
(:func:`~pacs_sentinel.dicom_io.seg_masks.map_segments`) and judged
(:func:`~pacs_sentinel.qc.segqc.judge_segmentation`) with the label statistics of our models
and, where one of them segments the same label, the agreement with its prediction. Each SEG
gets a result set of its own: the QC SR referencing that SEG's segments, and the overlay.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom
import structlog

from pacs_sentinel.daemon.config import Config, PipelineConfig
from pacs_sentinel.daemon.jobs import JobStore
from pacs_sentinel.daemon.routing import SeriesCandidate, ThirdPartySeg, read_third_party_segs
from pacs_sentinel.dicom_io.seg_masks import MappedSegmentation, map_segments
from pacs_sentinel.dicom_io.series import Volume, load_series_files
from pacs_sentinel.dicom_io.spool import Spool
from pacs_sentinel.errors import SentinelError, SeriesError
from pacs_sentinel.inference.models import SegmentationModel, load_segmentation_model
from pacs_sentinel.qc.agreement import matching_label
from pacs_sentinel.qc.evaluate import evaluate_segmentation
from pacs_sentinel.qc.segqc import LabelReference, judge_segmentation
from pacs_sentinel.reports.resultset import ResultSet, build_seg_qc_result_set
from pacs_sentinel.results import QCResult, SegmentationResult

log = structlog.get_logger(__name__)


@dataclass
class SegJudgement:
    """The outcome for one third-party SEG: its objects to send, its segments, QC, series."""

    seg_uid: str
    result_set: ResultSet
    result: SegmentationResult
    qc: QCResult
    series_uid: str


def third_party_segs(config: Config, spool: Spool, jobs: JobStore, study_uid: str,
                     series_files: dict[str, list]) -> list[ThirdPartySeg]:
    """The study's SEGs that are input of seg-qc pipelines (see the module docstring).

    Left out: our own objects, and corrections of our delivered results — a SEG referencing
    a source series for which a segmentation pipeline's result was delivered before the SEG
    arrived.
    """
    if not any(p.kind == "seg-qc" for p in config.pipelines):
        return []  # nothing would judge them: spare reading every series' header again
    segs = read_third_party_segs(series_files)
    if not segs:
        return []
    segmentation_pipelines = [p.name for p in config.pipelines if p.kind == "segmentation"]
    delivered = jobs.delivered_series(study_uid, segmentation_pipelines)
    kept = []
    for seg in segs:
        first = min((delivered[uid] for uid in seg.referenced_series if uid in delivered), default=None)
        if first is not None and spool.series_last_received(seg.series_uid) > first:
            log.info("SEG corrects a delivered result: review feedback, not judged", seg_uid=seg.sop_instance_uid)
            continue
        kept.append(seg)
    return kept


@dataclass
class _ReferenceModel:
    model: SegmentationModel
    threshold: float
    sw_overlap: float


def reference_models(config: Config, pipeline: PipelineConfig) -> list[_ReferenceModel]:
    """Our models whose labels a seg-qc pipeline matches segments against, in priority order.

    The pipeline's ``agreement_model`` when set, else the model of every segmentation
    pipeline of the configuration.

    Raises:
        ModelError: A model cannot be loaded.
    """
    inference = config.inference
    if pipeline.agreement_model is not None:
        sources = [(pipeline.agreement_model, pipeline.threshold, pipeline.sw_overlap)]
    else:
        sources = [(p.model, p.threshold, p.sw_overlap) for p in config.pipelines
                   if p.kind == "segmentation" and p.model is not None]
    return [
        _ReferenceModel(load_segmentation_model(spec, device=inference.device,
                                                mixed_precision=inference.mixed_precision), threshold, overlap)
        for spec, threshold, overlap in sources
    ]


def _label_references(models: list[_ReferenceModel], volume: Volume, segments: list[MappedSegmentation],
                      *, agreement: bool) -> list[LabelReference]:
    """Every label of our models with its statistics; predicted on ``volume`` where needed.

    A model runs (once) only when agreement is on and one of the segments matches one of
    its labels; its prediction is judged by our QC (the score that decides whether its
    agreement with a segment is used: :func:`~pacs_sentinel.qc.agreement.reference_trusted`).
    """
    references = []
    seg_labels = [segment.label for mapped in segments for segment in mapped.segments]
    for item in models:
        model = item.model
        wanted = agreement and any(matching_label(label, model.labels) for label in seg_labels)
        prediction, scores = None, None
        if wanted:
            prediction = model.predict(volume, threshold=item.threshold, mc_dropout_samples=0,
                                       sw_overlap=item.sw_overlap)
            scores = [s.quality_score for s in evaluate_segmentation(volume, prediction).segments]
            log.info("agreement model ran", model=model.name, version=model.version,
                     seconds=round(prediction.seconds, 2), reference_scores=scores)
        for index, label in enumerate(model.labels):
            references.append(LabelReference(
                label=label,
                model=f"{model.name} {model.version}",
                statistics=dict(model.reference.get(label.name, {})),
                prediction=None if prediction is None else prediction.mask[index],
                prediction_score=None if scores is None else scores[index],
            ))
    return references


def judge_segs(config: Config, pipeline: PipelineConfig, judged: list[tuple[ThirdPartySeg, SeriesCandidate]],
               *, not_judged: list[str] | None = None) -> list[SegJudgement]:
    """Judge every (SEG, referenced series) pair and build each SEG's result set.

    Args:
        not_judged: When given, a SEG that cannot be read or placed on its series (or whose
            series cannot be loaded) is left out and a line naming it and why is appended
            here; the others are judged. Without it the first such SEG raises.

    Raises:
        SeriesError: A series cannot be loaded, or a SEG cannot be read or placed on it
            (with ``not_judged``: only when that leaves no SEG to judge; the first reason).
        ModelError: A reference model cannot be loaded or run.
        ReportError: A result object cannot be built.
    """
    models = reference_models(config, pipeline)
    by_series: dict[str, tuple[SeriesCandidate, list[ThirdPartySeg]]] = {}
    for seg, series in judged:
        by_series.setdefault(series.series_uid, (series, []))[1].append(seg)
    outcomes: list[SegJudgement] = []
    failures: list[SeriesError] = []

    def skip(seg: ThirdPartySeg, exc: SeriesError) -> None:
        if not_judged is None:
            raise exc
        failures.append(exc)
        not_judged.append(f"SEG {seg.sop_instance_uid} not judged: {exc}")
        log.warning("third-party SEG not judged", seg_uid=seg.sop_instance_uid, reason=str(exc))

    for series, segs in by_series.values():
        try:
            volume = load_series_files(series.files, min_slices=pipeline.min_slices)
        except SeriesError as exc:
            for seg in segs:
                skip(seg, exc)
            continue
        placed: list[tuple[ThirdPartySeg, MappedSegmentation]] = []
        for seg in segs:
            try:
                try:
                    dataset = pydicom.dcmread(seg.path)
                except Exception as exc:  # pydicom raises many types for a bad file
                    raise SeriesError(f"cannot read SEG {seg.sop_instance_uid}: {exc}") from exc
                placed.append((seg, map_segments(dataset, volume)))
            except SeriesError as exc:
                skip(seg, exc)
        references = _label_references(models, volume, [m for _, m in placed], agreement=pipeline.agreement)
        for seg, segmentation in placed:
            result, qc, _ = judge_segmentation(volume, segmentation, references,
                                               accept_threshold=config.qc.accept_threshold)
            result_set = build_seg_qc_result_set(volume, segmentation.dataset, result, qc,
                                                 series_number_base=pipeline.series_number_base)
            outcomes.append(SegJudgement(seg.sop_instance_uid, result_set, result, qc, volume.series_uid))
    if not outcomes:
        if failures:
            raise failures[0]
        raise SentinelError("no third-party SEG to judge")
    return outcomes
