"""Training of the demo models on synthetic phantoms (``sentinel train-demo <name>``).

Training is seeded and reproducible: phantoms come from fixed seeds, ``torch`` and ``numpy``
are seeded, and the network sees exactly the preprocessing that
:meth:`~pacs_sentinel.inference.models.SegmentationModel.predict` applies. The model trains
on ``"normal"`` phantoms only; the other variants are evaluated, not learnt, because they are
what quality control must catch.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice, compute_iou
from scipy import ndimage
from tqdm import tqdm

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.errors import ModelError
from pacs_sentinel.inference.models import (
    CARD_FILE,
    DEMO_MODELS_DIR,
    DEMO_UNET_KWARGS,
    WEIGHTS_FILE,
    SegmentationModel,
    build_demo_unet,
    labels_from_card,
    preprocess_array,
    preprocess_mask,
)
from pacs_sentinel.inference.phantoms import PHANTOM_VARIANTS, CTPhantom, make_ct_phantom

log = structlog.get_logger(__name__)

#: Demo models :func:`train_demo` knows how to train.
TRAINABLE_DEMOS = ("organ-seg",)

#: Seed offsets of the phantom sets, so that train, validation and variants never overlap.
TRAIN_SEED_OFFSET = 10_000
VAL_SEED_OFFSET = 20_000
VARIANT_SEED_OFFSET = 30_000

#: Recipe of the organ-seg demo; the card records it.
ORGAN_SEG_RECIPE: dict[str, Any] = {
    "n_train": 64,
    "n_val": 16,
    "n_per_variant": 8,
    "epochs": 30,
    "batch_size": 2,
    "learning_rate": 3e-3,
    "noise_sd_max": 0.03,
    "intensity_jitter": 0.03,
}


def organ_seg_card_template() -> dict[str, Any]:
    """The parts of the organ-seg card that training does not compute."""
    return {
        "name": "organ-seg",
        "version": "1.0.0",
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


def phantom_volume(phantom: CTPhantom) -> Volume:
    """Wrap a phantom as a :class:`Volume` (axial, no source datasets) for evaluation."""
    return Volume(
        array=phantom.hu.astype(np.float32),
        spacing=phantom.spacing,
        origin=phantom.origin,
        direction=np.eye(3),
        datasets=[],
    )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _evaluate(model: SegmentationModel, phantoms: list[CTPhantom]) -> dict[str, Any]:
    """Dice, IoU, volumes and connected components of the model's masks on ``phantoms``."""
    dices, ious, predicted_ml, true_ml, components, big_components, seconds = [], [], [], [], [], [], []
    for phantom in phantoms:
        result = model.predict(phantom_volume(phantom))
        mask = result.mask[0]
        pred = torch.as_tensor(mask[None, None], dtype=torch.float32)
        truth = torch.as_tensor(phantom.liver[None, None], dtype=torch.float32)
        dices.append(float(compute_dice(pred, truth, include_background=True).item()))
        ious.append(float(compute_iou(pred, truth, include_background=True).item()))
        voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
        predicted_ml.append(float(mask.sum()) * voxel_ml)
        true_ml.append(phantom.liver_volume_ml)
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(labelled.ravel())[1:] * voxel_ml
        components.append(int(count))
        big_components.append(int((sizes >= 1.0).sum()))
        seconds.append(result.seconds)
    dices_arr = np.nan_to_num(np.array(dices), nan=0.0)
    return {
        "n": len(phantoms),
        "dice_mean": round(float(dices_arr.mean()), 4),
        "dice_min": round(float(dices_arr.min()), 4),
        "iou_mean": round(float(np.nan_to_num(np.array(ious), nan=0.0).mean()), 4),
        "predicted_volume_ml": [round(v, 1) for v in predicted_ml],
        "true_volume_ml": [round(v, 1) for v in true_ml],
        "components": components,
        "components_ge_1ml": big_components,
        "predict_seconds_mean": round(float(np.mean(seconds)), 3),
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
    n_per_variant: int | None = None,
) -> dict[str, Any]:
    """Train a demo model on phantoms, evaluate it, and write ``model.pt`` and ``card.json``.

    Args:
        name: Demo model to train; only ``"organ-seg"`` for now.
        out_dir: Folder to write into; default the shipped ``demo_models/<name>/``.
        seed: Seeds torch, numpy and the phantom sets (seed ``s`` uses phantom seeds
            ``s * 1_000_000 + offset + i``).
        epochs: Passes over the training set; default from the recipe.
        progress: Show a tqdm progress bar.
        n_train, n_val, n_per_variant: Override the recipe's set sizes (smoke tests).

    Returns:
        The ``metrics`` section of the card: held-out Dice/IoU on normal phantoms and
        per-variant results.

    Raises:
        ModelError: Unknown demo name.
    """
    if name not in TRAINABLE_DEMOS:
        raise ModelError(f"cannot train demo model {name!r}; trainable demo models: {', '.join(TRAINABLE_DEMOS)}")
    recipe = dict(ORGAN_SEG_RECIPE)
    for key, value in (("epochs", epochs), ("n_train", n_train), ("n_val", n_val), ("n_per_variant", n_per_variant)):
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
    del train_phantoms

    network = build_demo_unet(**card["architecture"])
    optimiser = torch.optim.Adam(network.parameters(), lr=recipe["learning_rate"])
    batch_size = recipe["batch_size"]
    steps_per_epoch = max(1, len(images) // batch_size)
    total_steps = steps_per_epoch * recipe["epochs"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe["learning_rate"], total_steps=max(total_steps, 2))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    network.train()
    bar = tqdm(total=total_steps, desc=f"train {name}", disable=not progress, unit="step")
    losses: list[float] = []
    for _epoch in range(recipe["epochs"]):
        order = rng.permutation(len(images))
        for step in range(steps_per_epoch):
            index = torch.as_tensor(order[step * batch_size:(step + 1) * batch_size])
            batch = images[index]
            # Mild augmentation: global intensity jitter and Gaussian noise.
            jitter = recipe["intensity_jitter"]
            scale = 1 + torch.empty(len(batch), 1, 1, 1, 1).uniform_(-jitter, jitter)
            shift = torch.empty(len(batch), 1, 1, 1, 1).uniform_(-jitter, jitter)
            noise_sd = torch.empty(len(batch), 1, 1, 1, 1).uniform_(0, recipe["noise_sd_max"])
            batch = batch * scale + shift + torch.randn_like(batch) * noise_sd
            optimiser.zero_grad()
            loss = loss_fn(network(batch), targets[index])
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-steps_per_epoch:]):.4f}")
    bar.close()
    train_seconds = time.perf_counter() - started

    network.eval()
    model = SegmentationModel(name=card["name"], version=card["version"], labels=labels_from_card(card),
                              card=card, network=network, device=torch.device("cpu"))
    percentiles = {f"volume_ml_p{q:02d}": round(float(np.percentile(train_volumes_ml, q)), 1) for q in (1, 5, 50, 95, 99)}
    card["reference"] = {
        "Liver": {
            **percentiles,
            "volume_ml_mean": round(float(train_volumes_ml.mean()), 1),
            "volume_ml_std": round(float(train_volumes_ml.std(ddof=1)) if len(train_volumes_ml) > 1 else 0.0, 1),
            # Where the organ lies (QC's location check): share on the patient's left of the midline.
            "left_share_p01": round(float(np.percentile(train_left_shares, 1)), 3),
            "left_share_p99": round(float(np.percentile(train_left_shares, 99)), 3),
        }
    }
    val = _evaluate(model, [make_ct_phantom(base + VAL_SEED_OFFSET + i) for i in range(recipe["n_val"])])
    variants: dict[str, Any] = {"normal": val}
    for v_index, variant in enumerate(PHANTOM_VARIANTS):
        if variant == "normal":
            continue
        seeds = [base + VARIANT_SEED_OFFSET + 1000 * v_index + i for i in range(recipe["n_per_variant"])]
        variants[variant] = _evaluate(model, [make_ct_phantom(s, variant=variant) for s in seeds])
    metrics = {
        "dice_mean": val["dice_mean"],
        "dice_min": val["dice_min"],
        "iou_mean": val["iou_mean"],
        "dice_by_variant": {k: v["dice_mean"] for k, v in variants.items()},
        "variants": variants,
    }
    card["training"] = {
        "seed": seed,
        **recipe,
        "loss": "DiceCELoss (softmax, one-hot)",
        "optimiser": "Adam, one-cycle learning-rate schedule",
        "final_loss": round(float(np.mean(losses[-steps_per_epoch:])), 4),
        "data": "make_ct_phantom(variant='normal'), default grid 48x160x160 at 5x2.5x2.5 mm",
        "train_seeds": f"{base + TRAIN_SEED_OFFSET}..{base + TRAIN_SEED_OFFSET + recipe['n_train'] - 1}",
        "val_seeds": f"{base + VAL_SEED_OFFSET}..{base + VAL_SEED_OFFSET + recipe['n_val'] - 1}",
        "date": dt.date.today().isoformat(),
        "seconds": round(train_seconds, 1),
        "torch": torch.__version__,
    }
    card["metrics"] = metrics

    buffer_path = out_dir / WEIGHTS_FILE
    torch.save(network.state_dict(), buffer_path.with_name(WEIGHTS_FILE + ".tmp"))
    os.replace(buffer_path.with_name(WEIGHTS_FILE + ".tmp"), buffer_path)
    _atomic_write(out_dir / CARD_FILE, (json.dumps(card, indent=2) + "\n").encode("utf-8"))
    _atomic_write(out_dir / "MODEL_CARD.md", render_model_card(card).encode("utf-8"))
    log.info("demo model trained", name=name, out_dir=str(out_dir), dice=metrics["dice_mean"], seconds=round(train_seconds, 1))
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
            f"| {min(pred):.0f}–{max(pred):.0f} | {min(r['true_volume_ml']):.0f}–{max(r['true_volume_ml']):.0f} "
            f"| {min(r['components'])}–{max(r['components'])} |"
        )
    table = "\n".join(rows)
    v = m["variants"]
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
- Data: {t['n_train']} `normal` phantoms (seeds {t['train_seeds']}), default grid. Artefact and
  unusual-anatomy variants are **never** trained on: QC must catch them.
- Seed {t['seed']}; {t['epochs']} epochs, batch {t['batch_size']}, Adam, one-cycle LR (max {t['learning_rate']}),
  Dice + cross-entropy loss; augmentation: intensity scale/shift ±{t['intensity_jitter']}, Gaussian
  noise SD up to {t['noise_sd_max']} (of the scaled window).
- Trained on {t['date']} in {t['seconds']:.0f} s (CPU, torch {t['torch']}); final loss {t['final_loss']}.
- Reproduce: `sentinel train-demo organ-seg` (or `train_demo("organ-seg", seed={t['seed']})`).

## Held-out results
Held-out normal phantoms (seeds {t['val_seeds']}): **Dice {m['dice_mean']:.3f}** (min {m['dice_min']:.3f}),
**IoU {m['iou_mean']:.3f}**, on the source grid.

| variant | n | Dice mean | Dice min | IoU mean | predicted volume (ml) | true volume (ml) | connected components |
|---|---|---|---|---|---|---|---|
{table}

Reference liver volume of the training phantoms (used by QC for volume anomalies): p01
{ref['volume_ml_p01']} ml, p05 {ref['volume_ml_p05']}, median {ref['volume_ml_p50']}, p95 {ref['volume_ml_p95']},
p99 {ref['volume_ml_p99']} ml (mean {ref['volume_ml_mean']} ± {ref['volume_ml_std']}).

## Behaviour per variant and limitations
Reference range for QC: p01–p99 = {ref['volume_ml_p01']}–{ref['volume_ml_p99']} ml.
- `normal`: Dice {v['normal']['dice_mean']:.3f}; one connected component, rarely a second one of a
  few ml (QC fragmentation checks should use a relative size threshold). The predicted volume runs
  a few percent above the truth.
- `metal-artifact`: Dice {v['metal-artifact']['dice_mean']:.3f}; streaks make the mask leak and fragment
  ({_span(v['metal-artifact']['components'])} components, predicted {_span(v['metal-artifact']['predicted_volume_ml'])} ml).
  QC is expected to flag it (fragmentation, shape, volume).
- `unusual-anatomy` (massive hepatomegaly, true {_span(v['unusual-anatomy']['true_volume_ml'])} ml): the model
  under-segments (Dice {v['unusual-anatomy']['dice_mean']:.3f}) but the predicted volume
  ({_span(v['unusual-anatomy']['predicted_volume_ml'])} ml) is still above the reference p99; QC flags a volume anomaly.
- `situs-inversus`: the model has only seen livers on the patient's right; Dice
  {v['situs-inversus']['dice_mean']:.3f}, {_span(v['situs-inversus']['components'])} components, predicted volume
  {_span(v['situs-inversus']['predicted_volume_ml'])} ml, i.e. often inside the normal range: a volume check alone
  does not catch it.
- `low-dose` (noise SD about 100 HU): Dice {v['low-dose']['dice_mean']:.3f}; the model copes, QC's input
  quality check is what should flag the images.
- Trained on phantoms only: it means nothing on real patient data. The training distribution
  is narrow (one grid, one body habitus model, no contrast phases beyond random organ HU), and
  the reference percentiles come from {t['n_train']} volumes only (p01/p99 are close to min/max).
"""
