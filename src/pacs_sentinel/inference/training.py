"""Training of the demo models on synthetic phantoms (``sentinel train-demo <name>``).

Training is seeded and reproducible: phantoms come from fixed seeds, ``torch``, ``numpy`` and
the MONAI random transforms are seeded, and the network sees exactly the preprocessing that
:meth:`~pacs_sentinel.inference.models.SegmentationModel.predict` applies. The model trains
on ``"normal"`` phantoms only; the other variants are evaluated, not learnt, because they are
what quality control must catch.

Recipe of ``organ-seg``: foreground-aware patch sampling (MONAI ``BorderPadd`` then
``RandCropByPosNegLabeld``, positive:negative 2:1, patches of the card's ``roi_size`` centred on
a liver voxel or on a body voxel outside it) from the preprocessed training volumes, a
Tversky + cross-entropy loss weighted towards recall (``"dice+ce"``, MONAI ``DiceCELoss``, is
the alternative), and early stopping on the Dice of a validation split that goes through
:meth:`~pacs_sentinel.inference.models.SegmentationModel.predict` itself (sliding window,
inverse transform, Dice on the source grid); the best epoch's weights are kept. Held-out
metrics (Dice, IoU, recall) come from a separate test split and from every phantom variant.

Patches much smaller than the working volume (e.g. 32x64x64 of 48x80x80) were tried and teach
the network a "liver at the patch centre" prior: validation Dice on whole volumes stayed below
0.83. Patches of the sliding-window size from a padded volume keep the inference context.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss, TverskyLoss
from monai.metrics import compute_dice, compute_iou
from monai.transforms import BorderPadd, Compose, RandCropByPosNegLabeld
from scipy import ndimage
from tqdm import tqdm

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.errors import ModelError
from pacs_sentinel.inference.models import (
    DEMO_MODELS_DIR,
    DEMO_UNET_KWARGS,
    SegmentationModel,
    build_demo_unet,
    labels_from_card,
    preprocess_array,
    preprocess_mask,
)
from pacs_sentinel.inference.phantoms import PHANTOM_VARIANTS, CTPhantom, make_ct_phantom
from pacs_sentinel.inference.train_common import EarlyStopping, write_model_folder

log = structlog.get_logger(__name__)

#: Demo models :func:`train_demo` knows how to train.
TRAINABLE_DEMOS = ("organ-seg",)

#: Seed offsets of the phantom sets, so that train, validation (early stopping), test
#: (held-out metrics) and variants never overlap. The test split keeps the seeds that the
#: held-out metrics of organ-seg 1.0.0 (and 1.1.0) were measured on.
TRAIN_SEED_OFFSET = 10_000
VAL_SEED_OFFSET = 15_000
TEST_SEED_OFFSET = 20_000
VARIANT_SEED_OFFSET = 30_000

#: Recipe of the organ-seg demo; the card records it.
ORGAN_SEG_RECIPE: dict[str, Any] = {
    "n_train": 64,
    "n_val": 8,
    "n_test": 16,
    "n_per_variant": 8,
    "epochs": 40,
    "patience": 10,
    "batch_size": 2,
    "pad_voxels": [8, 16, 16],
    "samples_per_volume": 1,
    "pos_neg": [2, 1],
    "loss": "tversky+ce",
    "tversky_alpha": 0.3,
    "tversky_beta": 0.7,
    "learning_rate": 3e-3,
    "noise_sd_max": 0.03,
    "intensity_jitter": 0.03,
}


def organ_seg_card_template() -> dict[str, Any]:
    """The parts of the organ-seg card that training does not compute."""
    return {
        "name": "organ-seg",
        "version": "1.1.0",
        "task": "segmentation",
        "description": "Liver-like organ on synthetic abdominal CT phantoms (demo model, not for clinical use).",
        "modality": "CT",
        "architecture": dict(DEMO_UNET_KWARGS),
        "spacing_mm": [5.0, 5.0, 5.0],
        "intensity_window": [-200.0, 300.0],
        "roi_size": [48, 80, 80],
        "sw_overlap": 0.25,
        "sw_batch_size": 1,
        "labels": [
            {
                "name": "Liver",
                "property_category": ["91723000", "SCT", "Anatomical Structure"],
                "property_type": ["10200004", "SCT", "Liver"],
                "tracking_id": "liver",
            }
        ],
    }


def _left_share(phantom: CTPhantom) -> float:
    """Share of the ground-truth liver on the patient's left of the body midline (as QC measures it)."""
    from pacs_sentinel.qc.heuristics import left_share
    from pacs_sentinel.qc.image import assess_image

    volume = phantom_volume(phantom)
    midline = assess_image(volume).midline_x_mm(volume)
    return left_share(phantom.liver, midline if midline is not None else 0.0, volume.spacing, volume.direction)


def body_area_cm2(phantom: CTPhantom) -> float:
    """The body's axial cross-section (cm²) as QC measures it (the patient's size: QC's check of
    an input unlike the training images)."""
    from pacs_sentinel.qc.image import assess_image

    volume = phantom_volume(phantom)
    area = assess_image(volume).body_area_cm2(volume)
    return area if area is not None else 0.0


def phantom_volume(phantom: CTPhantom) -> Volume:
    """Wrap a phantom as a :class:`Volume` (axial, no source datasets) for evaluation."""
    return Volume(
        array=phantom.hu.astype(np.float32),
        spacing=phantom.spacing,
        origin=phantom.origin,
        direction=np.eye(3),
        datasets=[],
    )


def _evaluate(model: SegmentationModel, phantoms: list[CTPhantom]) -> dict[str, Any]:
    """Dice, IoU, recall, volumes and connected components of the model's masks on ``phantoms``.

    Everything is measured on the source grid, on the masks :meth:`SegmentationModel.predict`
    returns. Recall (sensitivity) is ``TP / (TP + FN)`` over the voxels of one case; the
    means are over cases.
    """
    dices, ious, recalls, predicted_ml, true_ml, components, big_components, seconds = [], [], [], [], [], [], [], []
    for phantom in phantoms:
        result = model.predict(phantom_volume(phantom))
        mask = result.mask[0]
        pred = torch.as_tensor(mask[None, None], dtype=torch.float32)
        truth = torch.as_tensor(phantom.liver[None, None], dtype=torch.float32)
        dices.append(float(compute_dice(pred, truth, include_background=True).item()))
        ious.append(float(compute_iou(pred, truth, include_background=True).item()))
        positives = int(phantom.liver.sum())
        recalls.append(float((mask & phantom.liver).sum()) / positives if positives else float("nan"))
        voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
        predicted_ml.append(float(mask.sum()) * voxel_ml)
        true_ml.append(phantom.liver_volume_ml)
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(labelled.ravel())[1:] * voxel_ml
        components.append(int(count))
        big_components.append(int((sizes >= 1.0).sum()))
        seconds.append(result.seconds)
    dices_arr = np.nan_to_num(np.array(dices), nan=0.0)
    recalls_arr = np.nan_to_num(np.array(recalls), nan=0.0)
    return {
        "n": len(phantoms),
        "dice_mean": round(float(dices_arr.mean()), 4),
        "dice_min": round(float(dices_arr.min()), 4),
        "iou_mean": round(float(np.nan_to_num(np.array(ious), nan=0.0).mean()), 4),
        "recall_mean": round(float(recalls_arr.mean()), 4),
        "recall_min": round(float(recalls_arr.min()), 4),
        "predicted_volume_ml": [round(v, 1) for v in predicted_ml],
        "true_volume_ml": [round(v, 1) for v in true_ml],
        "components": components,
        "components_ge_1ml": big_components,
        "predict_seconds_mean": round(float(np.mean(seconds)), 3),
    }


class _TverskyCELoss(torch.nn.Module):
    """Tversky loss on the foreground channels plus cross-entropy (softmax outputs, label map targets).

    ``alpha`` weighs false positives and ``beta`` false negatives (MONAI's convention), so
    ``beta > alpha`` favours recall; ``alpha = beta = 0.5`` is the Dice loss.
    """

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.tversky = TverskyLoss(to_onehot_y=True, softmax=True, include_background=False, alpha=alpha, beta=beta)
        self.ce = torch.nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.tversky(logits, target) + self.ce(logits, target[:, 0].long())


def _loss_function(recipe: dict[str, Any]) -> torch.nn.Module:
    """The training loss the recipe names: ``"dice+ce"`` or ``"tversky+ce"``."""
    if recipe["loss"] == "dice+ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if recipe["loss"] == "tversky+ce":
        return _TverskyCELoss(recipe["tversky_alpha"], recipe["tversky_beta"])
    raise ModelError(f"unknown loss {recipe['loss']!r}; expected 'dice+ce' or 'tversky+ce'")


def _loss_description(recipe: dict[str, Any]) -> str:
    if recipe["loss"] == "tversky+ce":
        return (f"monai.losses.TverskyLoss (liver channel, alpha {recipe['tversky_alpha']} on false positives, "
                f"beta {recipe['tversky_beta']} on false negatives) + cross-entropy, softmax")
    return "monai.losses.DiceCELoss (softmax, one-hot)"


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MONAI ``MetaTensor`` as a plain ``torch.Tensor`` (other tensors unchanged)."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def _mean_dice(model: SegmentationModel, phantoms: list[CTPhantom]) -> float:
    """Mean Dice of :meth:`SegmentationModel.predict` on ``phantoms`` (source grid): the early-stopping score."""
    dices = []
    for phantom in phantoms:
        mask = model.predict(phantom_volume(phantom)).mask[0]
        total = int(mask.sum()) + int(phantom.liver.sum())
        dices.append(2.0 * float((mask & phantom.liver).sum()) / total if total else 1.0)
    return float(np.mean(dices)) if dices else 0.0


def held_out_metrics(model: SegmentationModel, *, seed: int = 0, n_test: int = 16,
                     n_per_variant: int = 8) -> dict[str, Any]:
    """The ``metrics`` section of an organ-seg card: the test split and every variant.

    Args:
        model: The model to evaluate (any weights with the organ-seg geometry).
        seed: Training seed whose phantom seeds are used (see :func:`train_demo`).
        n_test: Held-out ``normal`` phantoms.
        n_per_variant: Phantoms per other variant.
    """
    base = seed * 1_000_000
    test = _evaluate(model, [make_ct_phantom(base + TEST_SEED_OFFSET + i) for i in range(n_test)])
    variants: dict[str, Any] = {"normal": test}
    for v_index, variant in enumerate(PHANTOM_VARIANTS):
        if variant == "normal":
            continue
        seeds = [base + VARIANT_SEED_OFFSET + 1000 * v_index + i for i in range(n_per_variant)]
        variants[variant] = _evaluate(model, [make_ct_phantom(s, variant=variant) for s in seeds])
    return {
        "dice_mean": test["dice_mean"],
        "dice_min": test["dice_min"],
        "iou_mean": test["iou_mean"],
        "recall_mean": test["recall_mean"],
        "recall_min": test["recall_min"],
        "dice_by_variant": {k: v["dice_mean"] for k, v in variants.items()},
        "iou_by_variant": {k: v["iou_mean"] for k, v in variants.items()},
        "recall_by_variant": {k: v["recall_mean"] for k, v in variants.items()},
        "variants": variants,
    }


def train_demo(
    name: str,
    *,
    out_dir: Path | None = None,
    seed: int = 0,
    epochs: int | None = None,
    progress: bool = True,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    n_per_variant: int | None = None,
    patience: int | None = None,
) -> dict[str, Any]:
    """Train a demo model on phantoms, evaluate it, and write ``model.pt`` and ``card.json``.

    Args:
        name: Demo model to train; only ``"organ-seg"`` for now.
        out_dir: Folder to write into; default the shipped ``demo_models/<name>/``.
        seed: Seeds torch, numpy, the MONAI crops and the phantom sets (seed ``s`` uses
            phantom seeds ``s * 1_000_000 + offset + i``).
        epochs: Maximum passes over the training set (early stopping may end sooner);
            default from the recipe.
        progress: Show a tqdm progress bar.
        n_train, n_val, n_test, n_per_variant: Override the recipe's set sizes (smoke tests):
            training, validation (early stopping), test (held-out metrics), per variant.
        patience: Epochs without a better validation Dice before training stops.

    Returns:
        The ``metrics`` section of the card: held-out Dice/IoU/recall on normal phantoms and
        per-variant results.

    Raises:
        ModelError: Unknown demo name.
    """
    if name not in TRAINABLE_DEMOS:
        raise ModelError(f"cannot train demo model {name!r}; trainable demo models: {', '.join(TRAINABLE_DEMOS)}")
    recipe = dict(ORGAN_SEG_RECIPE)
    overrides = (("epochs", epochs), ("n_train", n_train), ("n_val", n_val), ("n_test", n_test),
                 ("n_per_variant", n_per_variant), ("patience", patience))
    for key, value in overrides:
        if value is not None:
            recipe[key] = int(value)
    out_dir = Path(out_dir) if out_dir is not None else DEMO_MODELS_DIR / name
    out_dir.mkdir(parents=True, exist_ok=True)
    card = organ_seg_card_template()
    started = time.perf_counter()

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = seed * 1_000_000
    train_phantoms = [make_ct_phantom(base + TRAIN_SEED_OFFSET + i) for i in range(recipe["n_train"])]
    images = torch.cat([preprocess_array(p.hu, p.spacing, card) for p in train_phantoms])
    targets = torch.cat([preprocess_mask(p.liver, p.spacing, card) for p in train_phantoms])
    train_volumes_ml = np.array([p.liver_volume_ml for p in train_phantoms])
    train_left_shares = np.array([_left_share(p) for p in train_phantoms])
    train_body_areas = np.array([body_area_cm2(p) for p in train_phantoms])
    del train_phantoms
    val_phantoms = [make_ct_phantom(base + VAL_SEED_OFFSET + i) for i in range(recipe["n_val"])]

    # Foreground-aware patches of the card's roi_size (what the sliding window feeds the network),
    # from volumes padded with zeros (air on the scaled window) by pad_voxels per side: centres on
    # liver voxels or on body voxels outside it (image > 0) with odds pos:neg. On the default grid
    # a patch is the whole volume shifted by up to pad_voxels, so the network keeps the context it
    # has at inference; patches much smaller than the volume teach a "liver at the patch centre"
    # prior that does not hold on whole volumes.
    patch = [int(n) for n in card["roi_size"]]
    pos, neg = recipe["pos_neg"]
    cropper = Compose([
        BorderPadd(keys=("image", "label"), spatial_border=[int(n) for n in recipe["pad_voxels"]], value=0.0),
        RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=patch, pos=pos, neg=neg,
                               num_samples=recipe["samples_per_volume"], image_key="image", image_threshold=0.0),
    ])
    cropper.set_random_state(seed=seed)

    network = build_demo_unet(**card["architecture"])
    model = SegmentationModel(name=card["name"], version=card["version"], labels=labels_from_card(card),
                              card=card, network=network, device=torch.device("cpu"))
    optimiser = torch.optim.Adam(network.parameters(), lr=recipe["learning_rate"])
    batch_size = recipe["batch_size"]
    steps_per_epoch = max(1, len(images) // batch_size)
    total_steps = steps_per_epoch * recipe["epochs"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe["learning_rate"], total_steps=max(total_steps, 2))
    loss_fn = _loss_function(recipe)
    bar = tqdm(total=total_steps, desc=f"train {name}", disable=not progress, unit="step")
    history: list[dict[str, float]] = []
    stopping = EarlyStopping(network, patience=recipe["patience"], initial=-1.0)
    for epoch in range(1, recipe["epochs"] + 1):
        network.train()
        order = rng.permutation(len(images))
        losses: list[float] = []
        for step in range(steps_per_epoch):
            crops = [crop for i in order[step * batch_size:(step + 1) * batch_size]
                     for crop in cropper({"image": images[i], "label": targets[i]})]
            # Plain tensors: MetaTensor bookkeeping through the network would cost more than the step.
            batch = torch.stack([_plain(c["image"]) for c in crops])
            labels = torch.stack([_plain(c["label"]) for c in crops])
            # Mild augmentation: global intensity jitter and Gaussian noise.
            jitter = recipe["intensity_jitter"]
            scale = 1 + torch.empty(len(batch), 1, 1, 1, 1).uniform_(-jitter, jitter)
            shift = torch.empty(len(batch), 1, 1, 1, 1).uniform_(-jitter, jitter)
            noise_sd = torch.empty(len(batch), 1, 1, 1, 1).uniform_(0, recipe["noise_sd_max"])
            batch = batch * scale + shift + torch.randn_like(batch) * noise_sd
            optimiser.zero_grad()
            loss = loss_fn(network(batch), labels)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.item()))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.4f}", val_dice=f"{max(stopping.best, 0.0):.4f}")
        network.eval()
        val_dice = _mean_dice(model, val_phantoms)
        history.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 4), "val_dice": round(val_dice, 4)})
        log.debug("epoch done", epoch=epoch, loss=history[-1]["loss"], val_dice=round(val_dice, 4))
        if stopping.step(epoch, val_dice):
            break
    bar.close()
    train_seconds = time.perf_counter() - started
    stopping.restore_best()
    best_dice, best_epoch = stopping.best, stopping.best_epoch

    percentiles = {f"volume_ml_p{q:02d}": round(float(np.percentile(train_volumes_ml, q)), 1) for q in (1, 5, 50, 95, 99)}
    card["reference"] = {
        "Liver": {
            **percentiles,
            "volume_ml_mean": round(float(train_volumes_ml.mean()), 1),
            "volume_ml_std": round(float(train_volumes_ml.std(ddof=1)) if len(train_volumes_ml) > 1 else 0.0, 1),
            # Where the organ lies (QC's location check): share on the patient's left of the midline.
            "left_share_p01": round(float(np.percentile(train_left_shares, 1)), 3),
            "left_share_p99": round(float(np.percentile(train_left_shares, 99)), 3),
            # How big the patients were (QC's check of an input unlike the training images).
            "body_area_cm2_p01": round(float(np.percentile(train_body_areas, 1)), 1),
            "body_area_cm2_p99": round(float(np.percentile(train_body_areas, 99)), 1),
        }
    }
    metrics = held_out_metrics(model, seed=seed, n_test=recipe["n_test"], n_per_variant=recipe["n_per_variant"])
    card["training"] = {
        "seed": seed,
        **recipe,
        "loss_function": _loss_description(recipe),
        "optimiser": "Adam, one-cycle learning-rate schedule",
        "patch_size": patch,
        "sampling": (f"BorderPadd {recipe['pad_voxels']} + RandCropByPosNegLabeld: {recipe['samples_per_volume']} "
                     f"patch(es) of {patch} per volume, pos:neg {pos}:{neg} (neg centres inside the body)"),
        "early_stopping": (f"mean validation Dice through SegmentationModel.predict, patience {recipe['patience']}, "
                           "best epoch kept"),
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_val_dice": round(best_dice, 4),
        "final_loss": history[best_epoch - 1]["loss"] if best_epoch else None,
        "history": history,
        "data": "make_ct_phantom(variant='normal'), default grid 48x160x160 at 5x2.5x2.5 mm",
        "train_seeds": f"{base + TRAIN_SEED_OFFSET}..{base + TRAIN_SEED_OFFSET + recipe['n_train'] - 1}",
        "val_seeds": f"{base + VAL_SEED_OFFSET}..{base + VAL_SEED_OFFSET + recipe['n_val'] - 1}",
        "test_seeds": f"{base + TEST_SEED_OFFSET}..{base + TEST_SEED_OFFSET + recipe['n_test'] - 1}",
        "date": dt.date.today().isoformat(),
        "seconds": round(train_seconds, 1),
        "torch": torch.__version__,
    }
    card["metrics"] = metrics

    write_model_folder(out_dir, network.state_dict(), card, render_model_card(card))
    log.info("demo model trained", name=name, out_dir=str(out_dir), dice=metrics["dice_mean"],
             recall=metrics["recall_mean"], best_epoch=best_epoch, seconds=round(train_seconds, 1))
    return metrics


def _span(values: list[float] | list[int]) -> str:
    """``"min–max"`` of a list of numbers, integers without decimals."""
    return f"{min(values):.0f}–{max(values):.0f}"


def render_model_card(card: dict[str, Any]) -> str:
    """The human model card (``MODEL_CARD.md``) for a trained organ-seg card."""
    t, m, ref = card["training"], card["metrics"], card["reference"]["Liver"]
    rows = []
    for variant, r in m["variants"].items():
        pred = r["predicted_volume_ml"]
        rows.append(
            f"| {variant} | {r['n']} | {r['dice_mean']:.3f} | {r['dice_min']:.3f} | {r['iou_mean']:.3f} "
            f"| {r['recall_mean']:.3f} | {r['recall_min']:.3f} "
            f"| {min(pred):.0f}–{max(pred):.0f} | {min(r['true_volume_ml']):.0f}–{max(r['true_volume_ml']):.0f} "
            f"| {min(r['components'])}–{max(r['components'])} |"
        )
    table = "\n".join(rows)
    v = m["variants"]
    history = ", ".join(f"{h['val_dice']:.3f}" for h in t["history"])
    normal_bias = np.mean(np.array(v["normal"]["predicted_volume_ml"]) / np.array(v["normal"]["true_volume_ml"]) - 1)
    return f"""# Model card: {card['name']} {card['version']}

**Demo model, not for clinical use.** It exists so that PACS Sentinel runs end to end without
downloads; real deployments configure their own models.

## What it does
Segments the liver-like organ (SCT 10200004 "Liver") of the synthetic abdominal CT phantoms
made by `pacs_sentinel.inference.phantoms.make_ct_phantom`. Input: an axial CT volume in HU of
any size and spacing. Output: a liver probability map and mask on the source grid.

## Architecture and preprocessing
- MONAI 3D `UNet`: channels {card['architecture']['channels']}, strides {card['architecture']['strides']},
  {card['architecture']['num_res_units']} residual unit(s), dropout {card['architecture']['dropout']}
  (Monte Carlo dropout possible), 2 output channels (background, liver), softmax.
- Reorient to axial LPS order, resample to {card['spacing_mm']} mm (box average then trilinear),
  clip to {card['intensity_window']} HU and scale to [0, 1], sliding-window inference with ROI
  {card['roi_size']} (Gaussian blending, overlap {card['sw_overlap']}), probabilities resampled
  trilinearly back to the source grid, threshold 0.5.

## Training recipe
- Data: {t['n_train']} `normal` phantoms for training (seeds {t['train_seeds']}), {t['n_val']} for early
  stopping (seeds {t['val_seeds']}), {t['n_test']} held out for the metrics below (seeds {t['test_seeds']}),
  default grid. Artefact and unusual-anatomy variants are **never** trained on: QC must catch them.
- Training sees exactly the preprocessing of inference (`preprocess_array` / `preprocess_mask`).
- Foreground-aware patch sampling (MONAI `BorderPadd` {t['pad_voxels']} voxels, then
  `RandCropByPosNegLabeld`): {t['samples_per_volume']} patch(es) of the card's ROI {t['patch_size']} per volume and
  step, centred on a liver voxel or on a body voxel outside it with odds {t['pos_neg'][0]}:{t['pos_neg'][1]}. On the
  default grid a patch is the whole volume shifted by up to the padding, i.e. the context inference sees.
- Seed {t['seed']}; batch {t['batch_size']} volumes, Adam, one-cycle LR (max {t['learning_rate']}) over at most
  {t['epochs']} epochs; loss: {t['loss_function']}; augmentation: intensity scale/shift
  ±{t['intensity_jitter']}, Gaussian noise SD up to {t['noise_sd_max']} (of the scaled window).
- Early stopping on the mean validation Dice, measured through `SegmentationModel.predict` on the
  source grid (patience {t['patience']}): {t['epochs_run']} epochs run, **best epoch {t['best_epoch']}**
  (validation Dice {t['best_val_dice']:.4f}), whose weights are kept. Validation Dice per epoch: {history}.
- Trained on {t['date']} in {t['seconds']:.0f} s (CPU, torch {t['torch']}); loss at the best epoch {t['final_loss']}.
- Reproduce: `sentinel train-demo organ-seg` (or `train_demo("organ-seg", seed={t['seed']})`).

## Held-out results
Held-out normal phantoms (seeds {t['test_seeds']}): **Dice {m['dice_mean']:.3f}** (min {m['dice_min']:.3f}),
**IoU {m['iou_mean']:.3f}**, **recall {m['recall_mean']:.3f}** (min {m['recall_min']:.3f}), on the source grid.
Recall (sensitivity) is TP / (TP + FN) over the voxels of a case, averaged over cases.

| variant | n | Dice mean | Dice min | IoU mean | recall mean | recall min | predicted volume (ml) | true volume (ml) | connected components |
|---|---|---|---|---|---|---|---|---|---|
{table}

Reference liver volume of the training phantoms (used by QC for volume anomalies): p01
{ref['volume_ml_p01']} ml, p05 {ref['volume_ml_p05']}, median {ref['volume_ml_p50']}, p95 {ref['volume_ml_p95']},
p99 {ref['volume_ml_p99']} ml (mean {ref['volume_ml_mean']} ± {ref['volume_ml_std']}).

## Behaviour per variant and limitations
Reference range for QC: p01–p99 = {ref['volume_ml_p01']}–{ref['volume_ml_p99']} ml. Patients' size (the body's
axial cross-section, QC's check of an input unlike the training images): p01–p99 =
{ref['body_area_cm2_p01']}–{ref['body_area_cm2_p99']} cm²; the model was never trained on a smaller or larger patient.
- `normal`: Dice {v['normal']['dice_mean']:.3f}, recall {v['normal']['recall_mean']:.3f};
  {_span(v['normal']['components'])} connected component(s), a second one is rarely more than a few ml (QC
  fragmentation checks should use a relative size threshold). The predicted volume runs
  {normal_bias * 100:+.1f} % from the truth on average.
- `metal-artifact`: Dice {v['metal-artifact']['dice_mean']:.3f}; streaks make the mask leak and fragment
  ({_span(v['metal-artifact']['components'])} components, predicted {_span(v['metal-artifact']['predicted_volume_ml'])} ml).
  QC is expected to flag it (fragmentation, shape, volume).
- `unusual-anatomy` (massive hepatomegaly, true {_span(v['unusual-anatomy']['true_volume_ml'])} ml): the model
  under-segments (Dice {v['unusual-anatomy']['dice_mean']:.3f}, recall {v['unusual-anatomy']['recall_mean']:.3f}) but the
  predicted volume ({_span(v['unusual-anatomy']['predicted_volume_ml'])} ml) is still above the reference p99; QC flags
  a volume anomaly.
- `situs-inversus`: the model has only seen livers on the patient's right; Dice
  {v['situs-inversus']['dice_mean']:.3f}, {_span(v['situs-inversus']['components'])} components, predicted volume
  {_span(v['situs-inversus']['predicted_volume_ml'])} ml, i.e. often inside the normal range: a volume check alone
  does not catch it (QC's location check does).
- `low-dose` (noise SD about 100 HU): Dice {v['low-dose']['dice_mean']:.3f}; the model copes, QC's input
  quality check is what should flag the images.
- Trained on phantoms only: it means nothing on real patient data. The training distribution
  is narrow (one grid, one body habitus model, no contrast phases beyond random organ HU), and
  the reference percentiles come from {t['n_train']} volumes only (p01/p99 are close to min/max).
"""
