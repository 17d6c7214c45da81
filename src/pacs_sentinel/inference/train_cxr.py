"""Training of the ``cxr-cls`` demo classifier on radiograph phantoms (``sentinel train-demo cxr-cls``).

Seeded and reproducible: the phantom sets come from fixed seeds, ``torch`` and ``numpy`` are
seeded, and the network sees exactly the preprocessing that
:meth:`~pacs_sentinel.inference.classification.ClassificationModel.predict` applies
(:func:`~pacs_sentinel.inference.classification.preprocess_image`).

Four disjoint ``"normal"`` phantom sets: *train* (BCE loss, Adam, cosine learning rate, left-right
flips and intensity jitter), *validation* (early stopping on the mean AUROC, best epoch kept),
*calibration* (temperature scaling: one scalar ``T`` minimising the NLL, fitted with LBFGS; and
the Monte Carlo dropout reference statistics QC uses) and *test* (the metrics in the card:
AUROC, AUPRC, F1 at 0.5, sensitivity at 95 % specificity, ECE before and after scaling). The
QC variants (underexposed, noisy, rotated) are evaluated, never trained on.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from tqdm import tqdm

from pacs_sentinel.inference.classification import (
    DEMO_DENSENET_KWARGS,
    DEMO_GRADCAM_LAYER,
    DEMO_INPUT_SIZE,
    DEMO_ORIENTATION,
    DEMO_PERCENTILES,
    FEATURE_STATISTICS_FILE,
    ClassificationModel,
    FeatureStatistics,
    _set_dropout,
    build_classifier,
    fit_temperature,
    labels_from_card,
    load_classification_dir,
    pooled_features,
    preprocess_image,
)
from pacs_sentinel.inference.sources import DEMO_MODELS_DIR
from pacs_sentinel.inference.radiographs import FINDING_PREVALENCE, FINDINGS, RADIOGRAPH_VARIANTS, make_cxr_phantom
from pacs_sentinel.inference.train_common import EarlyStopping, write_card, write_model_folder
from pacs_sentinel.qc.metrics import expected_calibration_error
from pacs_sentinel.qc.metrics import roc_auc as auroc  # labels first, higher score = positive

log = structlog.get_logger(__name__)

#: Seed offsets of the phantom sets, so that no two sets share a phantom.
TRAIN_SEED_OFFSET = 110_000
VAL_SEED_OFFSET = 120_000
CAL_SEED_OFFSET = 130_000
TEST_SEED_OFFSET = 140_000
VARIANT_SEED_OFFSET = 150_000

#: Recipe of the cxr-cls demo; the card records it.
CXR_RECIPE: dict[str, Any] = {
    "n_train": 1600,
    "n_val": 300,
    "n_cal": 400,
    "n_test": 600,
    "n_per_variant": 100,
    "epochs": 14,
    "patience": 4,
    "batch_size": 32,
    "learning_rate": 1e-3,
    "weight_decay": 1e-4,
    "intensity_jitter": 0.05,
    "noise_sd_max": 0.02,
    "mc_dropout_samples": 8,
}

#: SNOMED CT codes of the findings, in :data:`FINDINGS` order.
FINDING_CODES = {
    "nodule": ("786838002", "SCT", "Nodule of lung"),
    "effusion": ("60046008", "SCT", "Pleural effusion"),
    "cardiomegaly": ("8186001", "SCT", "Cardiomegaly"),
}


def cxr_card_template() -> dict[str, Any]:
    """The parts of the cxr-cls card that training does not compute."""
    return {
        "name": "cxr-cls",
        "version": "1.0.0",
        "task": "classification",
        "description": "Nodule, pleural effusion and cardiomegaly on synthetic PA chest radiographs "
                       "(demo model, not for clinical use).",
        "modality": ["DX", "CR"],
        "architecture": {**DEMO_DENSENET_KWARGS, "out_channels": len(FINDINGS)},
        "architecture_name": "MONAI DenseNet121 (block_config 6-12-24-16, growth_rate 16, init_features 32)",
        "input_size": list(DEMO_INPUT_SIZE),
        "intensity_percentiles": list(DEMO_PERCENTILES),
        "gradcam_layer": DEMO_GRADCAM_LAYER,
        "patient_orientation": list(DEMO_ORIENTATION),
        "weights_dtype": "float16",
        "labels": [
            {"name": name, "code": list(FINDING_CODES[name]), "tracking_id": f"cxr-{name}"} for name in FINDINGS
        ],
        "thresholds": [0.5] * len(FINDINGS),
        "temperature": 1.0,
    }


# --------------------------------------------------------------------------- metrics


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (step-wise, no interpolation)."""
    y = np.asarray(labels).astype(bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = y[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / hits.sum())


def f1_score(labels: np.ndarray, predicted: np.ndarray) -> float:
    """F1 of boolean predictions; 0 when there is nothing positive at all."""
    y, p = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
    tp = int((y & p).sum())
    denominator = int(y.sum()) + int(p.sum())
    return float(2 * tp / denominator) if denominator else 0.0


def sensitivity_at_specificity(labels: np.ndarray, scores: np.ndarray, specificity: float = 0.95) -> float:
    """Highest sensitivity of a threshold whose specificity is at least ``specificity``."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    negatives = np.sort(s[~y])
    if len(negatives) == 0 or not y.any():
        return float("nan")
    # Calling "positive" only above the k-th smallest negative keeps k/n negatives negative.
    k = int(np.ceil(specificity * len(negatives)))
    threshold = negatives[min(k, len(negatives)) - 1]
    return float((s[y] > threshold).mean())


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, raw_probabilities: np.ndarray) -> dict[str, Any]:
    """Held-out metrics per finding and pooled, for calibrated and uncalibrated probabilities."""
    per_finding: dict[str, Any] = {}
    for j, name in enumerate(FINDINGS):
        y, p = labels[:, j], probabilities[:, j]
        per_finding[name] = {
            "n_positive": int(y.sum()),
            "auroc": round(auroc(y, p), 4),
            "auprc": round(auprc(y, p), 4),
            "f1_at_0_5": round(f1_score(y, p >= 0.5), 4),
            "sensitivity_at_95_specificity": round(sensitivity_at_specificity(y, p), 4),
            "ece_before_scaling": round(expected_calibration_error(raw_probabilities[:, j], y), 4),
            "ece_after_scaling": round(expected_calibration_error(p, y), 4),
        }
    return {
        "n": int(len(labels)),
        "auroc_mean": round(float(np.mean([v["auroc"] for v in per_finding.values()])), 4),
        "ece_before_scaling": round(expected_calibration_error(raw_probabilities, labels), 4),
        "ece_after_scaling": round(expected_calibration_error(probabilities, labels), 4),
        "per_finding": per_finding,
    }


# --------------------------------------------------------------------------- data


def _phantom_set(seeds: list[int], variant: str = "normal", desc: str = "", progress: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """Preprocessed inputs ``(n, 1, h, w)`` and 0/1 labels ``(n, findings)`` of phantoms."""
    inputs, labels = [], []
    for seed in tqdm(seeds, desc=desc, disable=not progress, unit="img", leave=False):
        phantom = make_cxr_phantom(seed, variant=variant)
        inputs.append(preprocess_image(phantom.image, DEMO_INPUT_SIZE, DEMO_PERCENTILES))
        labels.append([float(phantom.findings[name]) for name in FINDINGS])
    return torch.cat(inputs), np.asarray(labels, dtype=np.float64)


def _logits(network: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 64, repeats: int = 1) -> np.ndarray:
    """Logits ``(n, labels)``, or ``(repeats, n, labels)`` when ``repeats`` > 1 (MC dropout on)."""
    outs = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size]
            if repeats > 1:
                out = network(batch.repeat(repeats, 1, 1, 1)).view(repeats, len(batch), -1)
            else:
                out = network(batch)
            outs.append(out.float().numpy())
    return np.concatenate(outs, axis=-2 if repeats > 1 else 0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def train_cxr(
    out_dir: Path | None = None,
    *,
    seed: int = 0,
    epochs: int | None = None,
    progress: bool = True,
    n_train: int | None = None,
    n_val: int | None = None,
    n_cal: int | None = None,
    n_test: int | None = None,
    n_per_variant: int | None = None,
) -> dict[str, Any]:
    """Train the cxr-cls demo model, calibrate and evaluate it, and write its folder.

    Writes ``model.pt`` (float16 ``state_dict``), ``card.json`` and ``MODEL_CARD.md``.

    Args:
        out_dir: Folder to write into; default the shipped ``demo_models/cxr-cls/``.
        seed: Seeds torch, numpy and the phantom sets (seed ``s`` uses phantom seeds
            ``s * 1_000_000 + offset + i``).
        epochs: Maximum passes over the training set (early stopping may end sooner);
            default from :data:`CXR_RECIPE`.
        progress: Show tqdm progress bars.
        n_train, n_val, n_cal, n_test, n_per_variant: Override the recipe's set sizes
            (smoke tests).

    Returns:
        The ``metrics`` section of the card (held-out test metrics, per variant AUROC).
    """
    recipe = dict(CXR_RECIPE)
    overrides = {"epochs": epochs, "n_train": n_train, "n_val": n_val, "n_cal": n_cal, "n_test": n_test,
                 "n_per_variant": n_per_variant}
    recipe.update({k: int(v) for k, v in overrides.items() if v is not None})
    out_dir = Path(out_dir) if out_dir is not None else DEMO_MODELS_DIR / "cxr-cls"
    out_dir.mkdir(parents=True, exist_ok=True)
    card = cxr_card_template()
    started = time.perf_counter()

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = seed * 1_000_000

    def seeds(offset: int, n: int) -> list[int]:
        return [base + offset + i for i in range(n)]

    train_x, train_y = _phantom_set(seeds(TRAIN_SEED_OFFSET, recipe["n_train"]), desc="phantoms train", progress=progress)
    val_x, val_y = _phantom_set(seeds(VAL_SEED_OFFSET, recipe["n_val"]), desc="phantoms val", progress=progress)
    data_seconds = time.perf_counter() - started
    train_targets = torch.as_tensor(train_y, dtype=torch.float32)

    network = build_classifier(**card["architecture"])
    optimiser = torch.optim.Adam(network.parameters(), lr=recipe["learning_rate"], weight_decay=recipe["weight_decay"])
    batch_size = recipe["batch_size"]
    steps_per_epoch = max(1, len(train_x) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, steps_per_epoch * recipe["epochs"]))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    bar = tqdm(total=steps_per_epoch * recipe["epochs"], desc="train cxr-cls", disable=not progress, unit="step")
    history: list[dict[str, float]] = []
    stopping = EarlyStopping(network, patience=recipe["patience"], initial=-1.0)
    for epoch in range(1, recipe["epochs"] + 1):
        network.train()
        order = rng.permutation(len(train_x))
        losses = []
        for step in range(steps_per_epoch):
            index = torch.as_tensor(order[step * batch_size:(step + 1) * batch_size])
            batch = train_x[index]
            # Left-right flips (so that test-time "x" flips stay in distribution) and jitter.
            flip = torch.rand(len(batch)) < 0.5
            batch = torch.where(flip.view(-1, 1, 1, 1), torch.flip(batch, dims=(-1,)), batch)
            jitter = recipe["intensity_jitter"]
            scale = 1 + torch.empty(len(batch), 1, 1, 1).uniform_(-jitter, jitter)
            shift = torch.empty(len(batch), 1, 1, 1).uniform_(-jitter, jitter)
            noise = torch.randn_like(batch) * torch.empty(len(batch), 1, 1, 1).uniform_(0, recipe["noise_sd_max"])
            batch = batch * scale + shift + noise
            optimiser.zero_grad()
            loss = loss_fn(network(batch), train_targets[index])
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.item()))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.4f}", val_auroc=f"{stopping.best:.3f}")
        network.eval()
        val_p = _sigmoid(_logits(network, val_x))
        val_auroc = float(np.nanmean([auroc(val_y[:, j], val_p[:, j]) for j in range(len(FINDINGS))]))
        history.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 4), "val_auroc": round(val_auroc, 4)})
        log.debug("epoch done", epoch=epoch, loss=history[-1]["loss"], val_auroc=val_auroc)
        if stopping.step(epoch, val_auroc):
            break
    bar.close()
    train_seconds = time.perf_counter() - started
    stopping.restore_best()
    best_auroc, best_epoch = stopping.best, stopping.best_epoch

    # Temperature scaling on the calibration split; MC dropout reference statistics there too.
    cal_x, cal_y = _phantom_set(seeds(CAL_SEED_OFFSET, recipe["n_cal"]), desc="phantoms calibration", progress=progress)
    cal_logits = _logits(network, cal_x)
    temperature = fit_temperature(cal_logits, cal_y)
    card["temperature"] = round(temperature, 4)
    _set_dropout(network, True)
    mc = _sigmoid(_logits(network, cal_x, repeats=recipe["mc_dropout_samples"]) / temperature)
    _set_dropout(network, False)
    mc_std = mc.std(axis=0)
    cal_p = _sigmoid(cal_logits / temperature)
    card["reference"] = {
        name: {
            "prevalence": FINDING_PREVALENCE[name],
            "train_positive_fraction": round(float(train_y[:, j].mean()), 4),
            "mc_dropout_std_p50": round(float(np.percentile(mc_std[:, j], 50)), 4),
            "mc_dropout_std_p95": round(float(np.percentile(mc_std[:, j], 95)), 4),
            "calibration_auroc": round(auroc(cal_y[:, j], cal_p[:, j]), 4),
        }
        for j, name in enumerate(FINDINGS)
    }

    test_x, test_y = _phantom_set(seeds(TEST_SEED_OFFSET, recipe["n_test"]), desc="phantoms test", progress=progress)
    test_logits = _logits(network, test_x)
    metrics = classification_metrics(test_y, _sigmoid(test_logits / temperature), _sigmoid(test_logits))
    model = ClassificationModel(name=card["name"], version=card["version"], labels=labels_from_card(card),
                                card=card, network=network, device=torch.device("cpu"))
    predict_seconds = []
    for i in range(6 if recipe["n_test"] >= 100 else 0):  # the first call warms up and is not counted
        phantom = make_cxr_phantom(base + TEST_SEED_OFFSET + i, findings={n: True for n in FINDINGS})
        seconds = model.predict(phantom.image, mc_dropout_samples=8, tta_flips=("x",)).seconds
        if i:
            predict_seconds.append(seconds)
    metrics["predict_seconds_mean"] = round(float(np.mean(predict_seconds)), 3) if predict_seconds else None
    variants: dict[str, Any] = {}
    for v_index, variant in enumerate(RADIOGRAPH_VARIANTS):
        if variant == "normal" or recipe["n_per_variant"] <= 0:
            continue
        v_seeds = [base + VARIANT_SEED_OFFSET + 1000 * v_index + i for i in range(recipe["n_per_variant"])]
        v_x, v_y = _phantom_set(v_seeds, variant=variant)
        v_p = _sigmoid(_logits(network, v_x) / temperature)
        _set_dropout(network, True)
        v_mc = _sigmoid(_logits(network, v_x, repeats=recipe["mc_dropout_samples"]) / temperature)
        _set_dropout(network, False)
        variants[variant] = {
            "n": len(v_seeds),
            "auroc": {name: round(auroc(v_y[:, j], v_p[:, j]), 4) for j, name in enumerate(FINDINGS)},
            "ece": round(expected_calibration_error(v_p, v_y), 4),
            "mc_dropout_std_mean": round(float(v_mc.std(axis=0).mean()), 4),
        }
    metrics["mc_dropout_std_mean_normal"] = round(float(mc_std.mean()), 4)
    metrics["variants"] = variants
    total_seconds = time.perf_counter() - started

    card["training"] = {
        "seed": seed,
        **recipe,
        "loss": "BCEWithLogitsLoss (multi-label)",
        "optimiser": "Adam, cosine learning-rate schedule",
        "early_stopping": f"mean validation AUROC, patience {recipe['patience']}, best epoch kept",
        "calibration": "temperature scaling (one T, binary NLL, LBFGS) on the calibration split",
        "augmentation": "left-right flip p=0.5, intensity scale/shift, Gaussian noise",
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_val_auroc": round(best_auroc, 4),
        "history": history,
        "data": "make_cxr_phantom(variant='normal'), 256x256 at 1.68 mm, findings drawn with FINDING_PREVALENCE",
        "train_seeds": f"{base + TRAIN_SEED_OFFSET}..{base + TRAIN_SEED_OFFSET + recipe['n_train'] - 1}",
        "val_seeds": f"{base + VAL_SEED_OFFSET}..{base + VAL_SEED_OFFSET + recipe['n_val'] - 1}",
        "cal_seeds": f"{base + CAL_SEED_OFFSET}..{base + CAL_SEED_OFFSET + recipe['n_cal'] - 1}",
        "test_seeds": f"{base + TEST_SEED_OFFSET}..{base + TEST_SEED_OFFSET + recipe['n_test'] - 1}",
        "date": dt.date.today().isoformat(),
        "data_seconds": round(data_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(total_seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    card["metrics"] = metrics

    half = {k: v.half() if torch.is_floating_point(v) else v for k, v in network.state_dict().items()}
    write_model_folder(out_dir, half, card, render_cxr_model_card(card))
    # The feature statistics belong to these weights (as shipped: float16): fitted on the folder.
    metrics["feature_statistics"] = fit_feature_statistics(out_dir, seed=seed, progress=progress,
                                                           n_train=recipe["n_train"], n_val=recipe["n_val"])
    log.info("demo model trained", name=card["name"], out_dir=str(out_dir), auroc=metrics["auroc_mean"],
             temperature=card["temperature"], seconds=round(total_seconds, 1))
    return metrics


#: Recipe of the feature statistics (:class:`~pacs_sentinel.inference.classification.FeatureStatistics`).
FEATURE_RECIPE: dict[str, Any] = {"n_train": 1600, "n_val": 300, "shrinkage": 0.01, "low_quantile": 0.99,
                                  "high_factor": 1.5}


def fit_feature_statistics(model_dir: Path | None = None, *, seed: int = 0, progress: bool = True,
                           n_train: int | None = None, n_val: int | None = None) -> dict[str, Any]:
    """Fit where the model's training images lie in its feature space, and write it into the
    model folder (``feature_statistics.npz``, and the card's ``feature_statistics`` entry).

    The pooled features (input of the last linear layer) of the training phantoms, every
    radiograph variant in turn (normal, under-exposed, noisy, slightly rotated: the images
    the product is meant for), give the mean and the shrunk covariance; the validation
    phantoms, likewise, give the distance up to which an image counts as familiar (their
    99th percentile); :data:`FEATURE_RECIPE` the rest. The weights as loaded from the folder (float16
    stored) are used, so the statistics match the network QC runs.

    Returns:
        What the card records: sizes, limits and the validation distances' percentiles.
    """
    recipe = dict(FEATURE_RECIPE)
    recipe.update({k: v for k, v in (("n_train", n_train), ("n_val", n_val)) if v is not None})
    out_dir = Path(model_dir) if model_dir is not None else DEMO_MODELS_DIR / "cxr-cls"
    model = load_classification_dir(out_dir, torch.device("cpu"))
    base = seed * 1_000_000

    def features(offset: int, n: int, desc: str) -> np.ndarray:
        rows = []
        for i in tqdm(range(n), desc=desc, disable=not progress, unit="img", leave=False):
            image = make_cxr_phantom(base + offset + i, variant=RADIOGRAPH_VARIANTS[i % len(RADIOGRAPH_VARIANTS)]).image
            with pooled_features(model.network) as found:
                model.logits(model.network_input(image))
            rows.append(found[-1][0])
        return np.asarray(rows)

    started = time.perf_counter()
    train, val = features(TRAIN_SEED_OFFSET, recipe["n_train"], "features: train"), features(
        VAL_SEED_OFFSET, recipe["n_val"], "features: validation")
    statistics = FeatureStatistics.fit(train, val, shrinkage=recipe["shrinkage"], low_quantile=recipe["low_quantile"],
                                       high_factor=recipe["high_factor"])
    statistics.save(out_dir / FEATURE_STATISTICS_FILE)
    distances = np.array([statistics.distance(f) for f in val])
    entry = {
        "file": FEATURE_STATISTICS_FILE,
        "features": "input of the last linear layer (pooled image features)",
        "distance": "Mahalanobis, covariance shrunk towards its mean variance",
        **recipe,
        "variants": list(RADIOGRAPH_VARIANTS),
        "train_seeds": f"{base + TRAIN_SEED_OFFSET}..{base + TRAIN_SEED_OFFSET + recipe['n_train'] - 1}",
        "val_seeds": f"{base + VAL_SEED_OFFSET}..{base + VAL_SEED_OFFSET + recipe['n_val'] - 1}",
        "low": round(statistics.low, 4),
        "high": round(statistics.high, 4),
        "val_distance_p50": round(float(np.median(distances)), 4),
        "val_distance_p99": round(float(np.quantile(distances, 0.99)), 4),
        "val_distance_max": round(float(distances.max()), 4),
        "val_share_fired": round(float(np.mean(distances > (statistics.low + statistics.high) / 2)), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    card = dict(model.card)
    card["feature_statistics"] = entry
    write_card(out_dir, card, render_cxr_model_card(card))
    log.info("feature statistics fitted", out_dir=str(out_dir), low=entry["low"], high=entry["high"])
    return entry


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _feature_section(entry: dict[str, Any] | None) -> str:
    if not entry:
        return ""
    return f"""## Feature statistics (QC: an image unlike the training images)
`{entry['file']}` holds the mean and the inverse of the shrunk covariance (shrinkage {entry['shrinkage']})
of the pooled features ({entry['features']}) of {entry['n_train']} training phantoms
({entry['train_seeds']}, variants {', '.join(entry['variants'])} in turn). QC measures the Mahalanobis distance
of every classified image from them: familiar up to **{entry['low']}** (the {entry['low_quantile']} quantile of {entry['n_val']}
validation phantoms' distances, {entry['val_seeds']}; their median {entry['val_distance_p50']}), unlike
anything trained on from **{entry['high']}** ({entry['high_factor']} times that); in between the finding scores
are lowered, and QC032 is raised half way. Validation phantoms beyond half way: {entry['val_share_fired']} (largest
distance {entry['val_distance_max']}). Refit for these weights: `sentinel train-demo cxr-features`.
"""


def render_cxr_model_card(card: dict[str, Any]) -> str:
    """The human model card (``MODEL_CARD.md``) for a trained cxr-cls card."""
    t, m, ref = card["training"], card["metrics"], card["reference"]
    orientation = "\\".join(card.get("patient_orientation") or ["?", "?"])
    rows = []
    for name, r in m["per_finding"].items():
        code = next(lbl["code"] for lbl in card["labels"] if lbl["name"] == name)
        rows.append(f"| {name} ({code[1]} {code[0]} \"{code[2]}\") | {r['n_positive']} | {_fmt(r['auroc'])} | {_fmt(r['auprc'])} "
                    f"| {_fmt(r['f1_at_0_5'])} | {_fmt(r['sensitivity_at_95_specificity'])} "
                    f"| {_fmt(r['ece_before_scaling'])} | {_fmt(r['ece_after_scaling'])} |")
    variant_rows = []
    for variant, r in m["variants"].items():
        aurocs = " / ".join(_fmt(r["auroc"][n]) for n in FINDINGS)
        variant_rows.append(f"| {variant} | {r['n']} | {aurocs} | {_fmt(r['ece'])} | {_fmt(r['mc_dropout_std_mean'])} |")
    ref_rows = "\n".join(f"| {n} | {_fmt(r['mc_dropout_std_p50'])} | {_fmt(r['mc_dropout_std_p95'])} |" for n, r in ref.items())
    history = ", ".join(f"{h['val_auroc']:.3f}" for h in t["history"])
    arch = card["architecture"]
    return f"""# Model card: {card['name']} {card['version']}

**Demo model, not for clinical use.** It exists so that PACS Sentinel runs end to end without
downloads; real deployments configure their own models.

## What it does
Multi-label classification of posteroanterior chest radiographs (DX/CR) made by
`pacs_sentinel.inference.radiographs.make_cxr_phantom` into three findings: pulmonary nodule,
pleural effusion and cardiomegaly. Output: one calibrated probability per finding, decision
threshold {card['thresholds']}, and a Grad-CAM map (layer `{card['gradcam_layer']}`) per positive finding.

## Architecture and preprocessing
- MONAI `DenseNet121` (2D, 1 input channel, {arch['out_channels']} outputs, sigmoid): the DenseNet-121 block
  layout {arch['block_config']} with growth rate {arch['growth_rate']} and {arch['init_features']} initial features instead of
  32/64 (1.8 M parameters instead of 7 M), dropout {arch['dropout_prob']} in every dense layer (Monte Carlo
  dropout). Weights stored as float16 (about 3.8 MB), loaded as float32.
- Resize to {card['input_size']} (bilinear, anti-aliased, aspect ratio not kept); map the
  {card['intensity_percentiles'][0]:g}th-{card['intensity_percentiles'][1]:g}th intensity percentiles to [0, 1] (clipped to [-1, 2]).
  MONOCHROME1 images are inverted first (`image_from_dataset`). Trained on images as displayed,
  Patient Orientation `{orientation}`: an image whose
  Patient Orientation says it is stored otherwise (flipped, upside down, turned by 90 degrees) is
  turned to it first, and its Grad-CAM maps back.
- Calibration: probabilities are `sigmoid(logits / T)` with **T = {card['temperature']}**, fitted on the calibration split.

## Training recipe
- Data: {t['n_train']} `normal` phantoms for training (seeds {t['train_seeds']}), {t['n_val']} for early stopping
  ({t['val_seeds']}), {t['n_cal']} for temperature scaling ({t['cal_seeds']}), {t['n_test']} held out for testing
  ({t['test_seeds']}); findings drawn independently, each with prevalence 0.25. The QC variants
  (underexposed, noisy, rotated) are **never** trained on.
- Seed {t['seed']}; up to {t['epochs']} epochs, batch {t['batch_size']}, Adam (lr {t['learning_rate']}, weight decay
  {t['weight_decay']}), cosine schedule, `BCEWithLogitsLoss`; augmentation: {t['augmentation']}.
  Early stopping on the mean validation AUROC (patience {t['patience']}): {t['epochs_run']} epochs run, best epoch
  {t['best_epoch']} (validation AUROC per epoch: {history}).
- Trained on {t['date']} in {t['seconds']:.0f} s in all ({t['train_seconds']:.0f} s until the end of training, of which
  {t['data_seconds']:.0f} s drawing phantoms), CPU, {t['threads']} threads, torch {t['torch']}.
- Reproduce: `sentinel train-demo cxr-cls` (or `train_cxr(seed={t['seed']})`).

## Held-out test results ({m['n']} phantoms)
Mean AUROC **{_fmt(m['auroc_mean'])}**. ECE (10 bins, all findings pooled): **{_fmt(m['ece_before_scaling'])} before,
{_fmt(m['ece_after_scaling'])} after temperature scaling** (T = {card['temperature']}).

| finding | positives | AUROC | AUPRC | F1 @ 0.5 | sensitivity @ 95 % specificity | ECE before | ECE after |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Metrics use the calibrated probabilities (AUROC, AUPRC and sensitivity do not change with T).
Mean time of one `predict` (8 MC dropout samples, one flip, Grad-CAM for each positive finding; phantoms with all three findings) on
the training CPU: {m['predict_seconds_mean']} s.

## Behaviour on the QC variants (never trained on)
| variant | n | AUROC nodule / effusion / cardiomegaly | ECE | mean MC dropout SD |
|---|---|---|---|---|
{chr(10).join(variant_rows)}

Mean MC dropout SD on normal calibration phantoms: {_fmt(m['mc_dropout_std_mean_normal'])}.
Reference MC dropout SD per finding (calibration split, {t['mc_dropout_samples']} samples), in the card for QC:

| finding | SD p50 | SD p95 |
|---|---|---|
{ref_rows}

{_feature_section(card.get("feature_statistics"))}
## Limitations
- Trained on phantoms only: it means nothing on real radiographs. The phantoms have one body
  habitus model, one projection (PA), no lateral views, no devices, no other pathology.
- A 128x128 input (3.4 mm pixels) leaves a nodule of 6 mm radius under four pixels across: small faint nodules are
  the main source of errors. Grad-CAM maps come from a 4x4 feature map and only roughly
  localise a finding.
- Findings are drawn independently with prevalence 0.25, far above screening prevalence:
  positive predictive values on a real population would be much lower.
- Temperature scaling fixes the average calibration of normal phantoms; on the QC variants
  the model is still miscalibrated (see the table), which is what QC must catch.
"""
