"""Training of the learned confidence estimator (``sentinel train-demo qc-estimator``).

Data: the demo organ-seg model's own predictions on phantoms it was never trained on
(:mod:`pacs_sentinel.qc.cases`), on clean and corrupted images, plus perturbed copies of those
masks and (``truth_share``) of the ground truth, and the ground truth itself; label: the Dice
against the phantom's ground truth. The families in
:data:`~pacs_sentinel.qc.corruptions.HELD_OUT_FAMILIES` are never drawn, and empty masks are
left out (QC scores an empty mask 0 by rule). Seeded end to end (phantoms, corruptions,
perturbations, torch), CPU-friendly: a few minutes on one thread.

Inputs carry the model's probability map as a third channel (the probabilities the model
produced for its own mask, also for the perturbed masks, as QC judges them). A share
``probability_dropout`` of each training batch gets the mask in that channel instead, the
input QC builds for a mask that came without probabilities (a third-party SEG), so one network
judges both; the card reports the validation metrics both ways.

The network (:func:`~pacs_sentinel.qc.estimator.build_estimator_network`) regresses the Dice
through a sigmoid with a mean-squared-error loss, Adam, one-cycle learning rate; the epoch with
the lowest validation MAE is kept. The card records the recipe, the seeds, the families and
the validation metrics (MAE, Spearman, AUROC of predicted Dice for Dice < 0.7).
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

from pacs_sentinel.inference.train_common import EarlyStopping, write_model_folder
from pacs_sentinel.qc.cases import (
    ESTIMATOR_TRAIN_SEED_OFFSET,
    ESTIMATOR_VAL_SEED_OFFSET,
    QCCase,
    draw_cases,
    seeds_for,
)
from pacs_sentinel.qc.corruptions import HELD_OUT_FAMILIES, IMAGE_FAMILIES, MASK_FAMILIES
from pacs_sentinel.qc.estimator import (
    BOX_MM,
    DEFAULT_SCOPE,
    ESTIMATOR_ARCHITECTURE,
    ESTIMATOR_DIR,
    GRID,
    WINDOW_HU,
    QualityEstimator,
    build_estimator_network,
    clear_estimator_cache,
)
from pacs_sentinel.qc.metrics import auroc, spearman

log = structlog.get_logger(__name__)

ESTIMATOR_VERSION = "2.1.0"
#: Recipe of the shipped estimator; the card records it.
ESTIMATOR_RECIPE: dict[str, Any] = {
    "n_train": 400,
    "n_val": 36,
    "perturbations_per_image": 5,
    "truth_share": 0.3,
    "epochs": 40,
    "patience": 40,
    "batch_size": 16,
    "learning_rate": 1e-3,
    "weight_decay": 1e-4,
    "intensity_jitter": 0.05,
    "probability_dropout": 0.3,
    "segmentation_model": "demo:organ-seg",
}


def training_image_families() -> list[str]:
    """Image families the estimator learns from: all but the held-out ones, clean twice as often."""
    families = [f for f in IMAGE_FAMILIES if f not in HELD_OUT_FAMILIES]
    return ["clean", *families]


def training_mask_families() -> list[str]:
    """Mask families the estimator learns from: all but the held-out ones and ``"empty"``."""
    return [f for f in MASK_FAMILIES if f not in HELD_OUT_FAMILIES and f != "empty"]


def _arrays(cases: list[QCCase]) -> tuple[torch.Tensor, torch.Tensor]:
    usable = [c for c in cases if c.inputs is not None]
    x = torch.from_numpy(np.stack([c.inputs for c in usable]).astype(np.float32))
    y = torch.tensor([c.dice for c in usable], dtype=torch.float32)
    return x, y


def without_probabilities(x: torch.Tensor) -> torch.Tensor:
    """The inputs as QC builds them for masks without a probability map: the mask in channel 3."""
    out = x.clone()
    out[:, 2] = out[:, 1]
    return out


def _augment(batch: torch.Tensor, jitter: float, probability_dropout: float = 0.0) -> torch.Tensor:
    """Flips that keep the image-mask relation (head-feet, front-back; never left-right, where the
    organ's side is information), a global intensity jitter of the image channel and, for a
    share ``probability_dropout`` of the cases, the mask in place of the probability map."""
    out = batch.clone()
    n = len(out)
    if out.shape[1] == 3 and probability_dropout > 0:
        dropped = torch.rand(n) < probability_dropout
        out[dropped, 2] = out[dropped, 1]
    for axis in (2, 3):  # (batch, channel, z, y, x): z and y
        flip = torch.rand(n) < 0.5
        out[flip] = torch.flip(out[flip], dims=(axis,))
    scale = 1 + torch.empty(n, 1, 1, 1).uniform_(-jitter, jitter)
    shift = torch.empty(n, 1, 1, 1).uniform_(-jitter, jitter)
    out[:, 0] = (out[:, 0] * scale + shift).clamp(0.0, 1.0)
    return out


def _predict(network: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    network.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(torch.sigmoid(network(x[i:i + batch])).reshape(-1))
    return torch.cat(out).numpy().astype(np.float64)


def _validation_metrics(predicted: np.ndarray, dice: np.ndarray) -> dict[str, float]:
    failed = dice < 0.7
    return {
        "n": int(len(dice)),
        "failures": int(failed.sum()),
        "mae": round(float(np.mean(np.abs(predicted - dice))), 4),
        "spearman": round(spearman(predicted, dice), 4),
        "auroc_failure": round(auroc(predicted, failed), 4),
    }


def fit_network(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, recipe: dict[str, Any], *,
                seed: int = 0, progress: bool = True) -> tuple[torch.nn.Module, list[dict[str, Any]], int]:
    """Train the estimator network on inputs ``x`` and Dice labels ``y``; keep the best validation epoch.

    Returns:
        The network (best epoch's weights), the per-epoch history and the best epoch.
    """
    # Seeded here, after the cases: loading the segmentation model (first call only) draws
    # from torch's RNG, and the weights must not depend on whether it was loaded before.
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    network = build_estimator_network(dict(ESTIMATOR_ARCHITECTURE, in_shape=[int(x.shape[1]), GRID, GRID, GRID]))
    optimiser = torch.optim.Adam(network.parameters(), lr=recipe["learning_rate"], weight_decay=recipe["weight_decay"])
    batch = recipe["batch_size"]
    steps = max(1, int(np.ceil(len(x) / batch)))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe["learning_rate"],
                                                    total_steps=max(2, steps * recipe["epochs"]))
    bar = tqdm(total=steps * recipe["epochs"], desc="estimator: train", disable=not progress, unit="step")
    stopping, history = EarlyStopping(network, patience=recipe["patience"], initial=np.inf, higher_is_better=False), []
    for epoch in range(1, recipe["epochs"] + 1):
        network.train()
        order = rng.permutation(len(x))
        losses = []
        for step in range(steps):
            index = torch.as_tensor(order[step * batch:(step + 1) * batch])
            optimiser.zero_grad()
            augmented = _augment(x[index], recipe["intensity_jitter"], recipe["probability_dropout"])
            predicted = torch.sigmoid(network(augmented)).reshape(-1)
            loss = torch.mean((predicted - y[index]) ** 2)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.item()))
            bar.update(1)
        # Kept by the mean of the validation MAE with and without the probability map (both paths).
        val_mae = float(np.mean(np.abs(_predict(network, x_val) - y_val.numpy())))
        if x_val.shape[1] == 3:
            val_mae = 0.5 * (val_mae + float(np.mean(np.abs(_predict(network, without_probabilities(x_val))
                                                            - y_val.numpy()))))
        history.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 5), "val_mae": round(val_mae, 4)})
        bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.4f}", val_mae=f"{val_mae:.4f}")
        if stopping.step(epoch, val_mae):
            break
    bar.close()
    stopping.restore_best()
    return network, history, stopping.best_epoch


def train_estimator(out_dir: Path | None = None, *, seed: int = 0, epochs: int | None = None, progress: bool = True,
                    n_train: int | None = None, n_val: int | None = None, model=None) -> dict[str, Any]:
    """Train the confidence estimator and write ``model.pt`` + ``card.json``.

    Args:
        out_dir: Folder to write into; default the shipped ``qc/models/estimator/``.
        seed: Seeds torch and the phantom sets (``seed * 1_000_000 + offset + i``).
        epochs: Maximum epochs (default from the recipe).
        progress: tqdm progress bars.
        n_train, n_val: Phantoms for training / validation (smoke tests).
        model: Segmentation model whose predictions are judged; default ``demo:organ-seg``.

    Returns:
        The card's ``metrics`` (validation MAE, Spearman, AUROC).
    """
    from pacs_sentinel.inference.models import load_segmentation_model

    recipe = dict(ESTIMATOR_RECIPE)
    for key, value in (("epochs", epochs), ("n_train", n_train), ("n_val", n_val)):
        if value is not None:
            recipe[key] = int(value)
    out_dir = Path(out_dir) if out_dir is not None else ESTIMATOR_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if model is None:
        model = load_segmentation_model(recipe["segmentation_model"], device="cpu")
    images, masks = training_image_families(), training_mask_families()
    common = dict(perturbations_per_image=recipe["perturbations_per_image"], truth_share=recipe["truth_share"],
                  collect_inputs=True, progress=progress)
    train = draw_cases(model, seeds_for(ESTIMATOR_TRAIN_SEED_OFFSET, recipe["n_train"], seed), images, masks,
                       desc="estimator: training cases", **common)
    val = draw_cases(model, seeds_for(ESTIMATOR_VAL_SEED_OFFSET, recipe["n_val"], seed), images, masks,
                     desc="estimator: validation cases", **common)
    x, y = _arrays(train)
    x_val, y_val = _arrays(val)

    network, history, best_epoch = fit_network(x, y, x_val, y_val, recipe, seed=seed, progress=progress)
    metrics = {"validation": _validation_metrics(_predict(network, x_val), y_val.numpy()),
               "validation_without_probabilities": _validation_metrics(
                   _predict(network, without_probabilities(x_val)), y_val.numpy()),
               "training": _validation_metrics(_predict(network, x), y.numpy())}
    card = {
        "name": "qc-estimator",
        "version": ESTIMATOR_VERSION,
        "task": "predict the Dice of a liver mask from (image, mask, model probability map)",
        # What it judges (QualityEstimator.covers): the structure the cases' masks are of, the
        # segmentation model's first label, in the model's modality.
        "scope": {"modalities": [str(model.card.get("modality") or "CT")],
                  "structures": [[code.value, code.scheme, code.meaning] for code in [model.labels[0].property_type]]},
        "architecture": dict(ESTIMATOR_ARCHITECTURE),
        "input": {"box_mm": BOX_MM, "grid": GRID, "window_hu": list(WINDOW_HU),
                  "channels": ["image windowed to [0, 1]", "mask voxel fraction",
                               "model probability (the mask when none)"]},
        "training": {
            "seed": seed,
            **recipe,
            "image_families": images,
            "mask_families": masks,
            "held_out_families": list(HELD_OUT_FAMILIES),
            "train_seeds": _span(seeds_for(ESTIMATOR_TRAIN_SEED_OFFSET, recipe["n_train"], seed)),
            "val_seeds": _span(seeds_for(ESTIMATOR_VAL_SEED_OFFSET, recipe["n_val"], seed)),
            "n_train_cases": int(len(x)),
            "n_val_cases": int(len(x_val)),
            "loss": "mean squared error of sigmoid output against the Dice",
            "augmentation": ("random flips head-feet and front-back, image intensity scale/shift, "
                             "mask in place of the probability map for a share probability_dropout"),
            "optimiser": "Adam, one-cycle learning rate",
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "history": history,
            "date": dt.date.today().isoformat(),
            "seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__,
        },
        "metrics": metrics,
    }
    write_model_folder(out_dir, network.state_dict(), card, render_estimator_card(card))
    clear_estimator_cache()
    log.info("qc estimator trained", out_dir=str(out_dir), **metrics["validation"])
    return metrics


def render_estimator_card(card: dict[str, Any]) -> str:
    """The human model card (``MODEL_CARD.md``) of a trained estimator."""
    t, m, i = card["training"], card["metrics"], card["input"]
    v = m["validation"]
    w = m.get("validation_without_probabilities", v)
    covered = card.get("scope") or DEFAULT_SCOPE
    scope = (" and ".join(f'{scheme} {value} "{meaning}"' for value, scheme, meaning in covered["structures"])
             + " on " + " or ".join(covered["modalities"]))
    return f"""# Model card: QC confidence estimator {card['version']}

**Part of PACS Sentinel's QC, trained on synthetic phantoms only; not for clinical use.**

## What it does
Predicts the Dice of a liver mask of the demo `organ-seg` task from the image, the mask and the
segmentation model's probability map together, or from the image and the mask alone when the mask
came without probabilities (a third-party SEG) (QC signal `predicted_dice`; QC030 "Low predicted
Dice" below 0.7). It is one input of the fitted QC fusion, never a verdict on its own.

It judges only what it was trained on: {scope}. A segment of another structure (matched by its
segmented property type) or a series of another modality is scored without it, by the fusion's
models fitted without its signal.

## Input, architecture
- A cube of {i['box_mm']:.0f} mm around the centre of the mask's bounding box, axial LPS order,
  averaged down to {i['grid']}^3 voxels: channel 1 the image windowed to {i['window_hu']} HU, channel 2 the
  mask's voxel fraction, channel 3 the segmentation model's probability map (the mask's voxel fraction
  again when the mask came without one: a third-party SEG).
- MONAI `Regressor`, channels {card['architecture']['channels']}, strides {card['architecture']['strides']},
  {card['architecture']['num_res_units']} residual unit(s); sigmoid output = predicted Dice.

## Training
- Masks: the demo organ-seg model's own predictions on {t['n_train']} phantoms it was never trained on
  (seeds {t['train_seeds']}), image families {', '.join(t['image_families'])}; plus
  {t['perturbations_per_image']} perturbed masks per phantom ({', '.join(t['mask_families'][1:])}), a share
  {t['truth_share']} of them perturbations of the ground truth (and the ground truth itself). Label: the
  Dice against the phantom's ground truth. {t['n_train_cases']} training masks, {t['n_val_cases']} validation
  masks (seeds {t['val_seeds']}).
- **Never seen** (held out for `sentinel qc-eval`): {', '.join(t['held_out_families'])}; empty masks (QC scores
  them 0 by rule).
- {t['loss']}; {t['optimiser']}; {t['augmentation']} ({t['probability_dropout']}); batch {t['batch_size']}, at most
  {t['epochs']} epochs, best validation MAE (mean of with and without probabilities) kept (epoch {t['best_epoch']} of
  {t['epochs_run']}). Seed {t['seed']}, {t['seconds']:.0f} s on CPU
  (torch {t['torch']}), {t['date']}. Reproduce: `sentinel train-demo qc-estimator`.

## Validation
{v['n']} masks, {v['failures']} with Dice < 0.7, with the model's probability map: **MAE {v['mae']:.3f}, Spearman
{v['spearman']:.3f}, AUROC for Dice < 0.7 {v['auroc_failure']:.3f}**; without it (the mask in channel 3): MAE
{w['mae']:.3f}, Spearman {w['spearman']:.3f}, AUROC {w['auroc_failure']:.3f} (training masks: MAE
{m['training']['mae']:.3f}, Spearman {m['training']['spearman']:.3f}).
Held-out families and the comparison with the other signals: `docs/benchmarks.md`.

## Limitations
Phantoms only, one organ, one grid of training phantoms; how far it carries to an image
corruption it never saw is measured on the held-out family (see the benchmark), and a kind of
mask error unlike every training family may be judged less well. A perturbed training mask is
shown with the probability map the model produced for its own mask, so the network learns in part
how far a mask departs from what the model believes; an own-model mask in use never departs from
its own map (it is p >= 0.5), and a mask that comes without a map is judged on image and mask.
"""


def _span(seeds: list[int]) -> str:
    return f"{seeds[0]}..{seeds[-1]}" if seeds else ""


def estimator_from(network: torch.nn.Module) -> QualityEstimator:
    """Wrap a network as an estimator (tests)."""
    return QualityEstimator(network, {"version": "test", "architecture": dict(ESTIMATOR_ARCHITECTURE)})
