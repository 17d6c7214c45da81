"""``sentinel models``: which models and QC versions a node runs, and how they were evaluated.

Models: each configured pipeline's model (name, version, where it comes from) and the
held-out figures its model card records (``metrics``: the demo models' test phantoms). QC
versions: the shipped fusion (its cross-validated calibration figures) and every local refit
in ``<data_dir>/qc`` (its feedback and phantom evaluations, old -> new, and whether it was
activated), the active one marked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pacs_sentinel.daemon.config import Config, PipelineConfig
from pacs_sentinel.errors import SentinelError


def model_source(spec: str) -> str:
    """Where a model spec comes from, in words."""
    from pacs_sentinel.inference.sources import resolve_spec

    if spec.startswith("demo:"):
        return "shipped demo model"
    path = resolve_spec(spec)
    if path.is_file():
        return f"TorchScript file {path}"
    if (path / "configs").is_dir():
        return f"MONAI bundle {path}"
    return f"model card folder {path}"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return "n/a" if math.isnan(value) else f"{value:.4g}"


def card_metrics(card: dict[str, Any]) -> str:
    """The card's top-level held-out figures (``metrics``), e.g. ``"dice_mean 0.9485, ..."``."""
    metrics = card.get("metrics") or {}
    if not isinstance(metrics, dict):
        return "-"
    flat = [f"{k} {_number(v)}" for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    n_test = (card.get("training") or {}).get("n_test") if isinstance(card.get("training"), dict) else None
    if flat and n_test and "n" not in metrics:
        flat.insert(0, f"test n {n_test}")
    return ", ".join(flat) or "-"


def _pipeline_row(pipeline: PipelineConfig) -> list[str]:
    spec = pipeline.model if pipeline.kind != "seg-qc" else pipeline.agreement_model
    if spec is None:
        return [pipeline.name, pipeline.kind, "-", "-", "judges incoming SEGs; models of the segmentation pipelines", "-"]
    try:
        if pipeline.kind == "classification":
            from pacs_sentinel.inference.classification import load_classification_model

            model = load_classification_model(spec, device="cpu")
        else:
            from pacs_sentinel.inference.models import load_segmentation_model

            model = load_segmentation_model(spec, device="cpu")
        name = model.name if pipeline.kind != "seg-qc" else f"{model.name} (agreement)"
        return [pipeline.name, pipeline.kind, name, model.version, model_source(spec), card_metrics(model.card)]
    except SentinelError as exc:
        return [pipeline.name, pipeline.kind, spec, "-", f"cannot load: {exc}", "-"]


def model_rows(config: Config) -> list[list[str]]:
    """One row per pipeline: pipeline, kind, model, version, source, card metrics."""
    return [_pipeline_row(p) for p in config.pipelines]


def _figures(part: dict[str, Any], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {_number(part[k])}" for k in keys if k in part)


def qc_version_rows(config: Config) -> list[list[str]]:
    """One row per QC version: active mark, version, origin, date, evaluation figures.

    Raises:
        ModelError: ``active.json`` is invalid.
    """
    from pacs_sentinel.daemon.refit import qc_dir
    from pacs_sentinel.qc.evaluate import shipped_fusion
    from pacs_sentinel.qc.refit import local_versions, read_active, version_file

    folder = qc_dir(config)
    shipped = shipped_fusion()
    active = read_active(folder).get("qc_version") or shipped.qc_version
    metrics = shipped.info.get("metrics", {})
    rows = [["*" if active == shipped.qc_version else "", shipped.qc_version, "shipped",
             str(shipped.info.get("date", "-")),
             "calibration set (cross-validated): " + _figures(metrics, ("n_cases", "cv_auroc_all", "cv_auroc_own_model",
                                                                        "cv_spearman_all", "cv_ece_all"))]]
    for version in local_versions(folder):
        path: Path = version_file(folder, version)
        try:
            refit = json.loads(path.read_text(encoding="utf-8"))["info"]["refit"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            rows.append(["*" if active == version else "", version, "local refit", "-", f"unreadable: {exc}"])
            continue
        feedback, phantoms = refit.get("feedback", {}), refit.get("phantoms", {})
        evaluation = (
            f"{refit.get('n_cases')} feedback cases (a {_number(refit.get('a'))}, b {_number(refit.get('b'))}); "
            f"held-out feedback old -> new: "
            + "; ".join(f"{k} {_number(feedback.get('old', {}).get(k))} -> {_number(feedback.get('new', {}).get(k))}"
                        for k in ("log_loss", "brier", "auroc"))
            + "; held-out phantoms old -> new: "
            + "; ".join(f"{k} {_number(phantoms.get('old', {}).get(k))} -> {_number(phantoms.get('new', {}).get(k))}"
                        for k in ("auroc", "aurc"))
            + ("; activated" if refit.get("activated") else f"; not activated ({'; '.join(refit.get('problems', []))})")
        )
        rows.append(["*" if active == version else "", version, f"local refit of {refit.get('based_on', '?')}",
                     str(refit.get("date", "-")), evaluation])
    return rows
