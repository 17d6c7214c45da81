"""Phantom cases with a known Dice: the data the estimator learns from, the fusion is fitted on
and ``sentinel qc-eval`` measures with.

A case is one mask judged on one phantom image: the demo segmentation model's own prediction
(mask family ``"none"``, with its MC-dropout samples when asked for) or a perturbation of it
(:mod:`pacs_sentinel.qc.corruptions`; a perturbed mask carries no samples, the model's doubts
being about its own mask), on a clean or corrupted phantom. Its label is the Dice against the
phantom's ground-truth liver.

Seed sets never overlap (offsets added to ``seed * 1_000_000``, like the organ-seg trainer):
estimator training ``ESTIMATOR_TRAIN_SEED_OFFSET``, estimator validation
``ESTIMATOR_VAL_SEED_OFFSET``, fusion calibration ``CALIBRATION_SEED_OFFSET``, evaluation
``EVALUATION_SEED_OFFSET`` and its extra draw of the held-out families
``EVALUATION_HELD_OUT_SEED_OFFSET``, and (since QC 2.7.0) the vendor-like masks the fusion's
agreement models are fitted on ``AGREEMENT_SEED_OFFSET``; all far from the organ-seg model's own (10 000 - 39 999).

This module drives the demo model, so it imports :mod:`pacs_sentinel.inference`; it is used
by training and evaluation, never by the daemon's QC path.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.qc.agreement import dice
from pacs_sentinel.qc.corruptions import IMAGE_FAMILIES, corrupt_image, perturb_mask
from pacs_sentinel.qc.estimator import INPUT_CHANNELS, QualityEstimator, estimator_input
from pacs_sentinel.qc.evaluate import segment_signals
from pacs_sentinel.qc.heuristics import Signal
from pacs_sentinel.qc.image import assess_image

ESTIMATOR_TRAIN_SEED_OFFSET = 40_000
ESTIMATOR_VAL_SEED_OFFSET = 45_000
CALIBRATION_SEED_OFFSET = 50_000
AGREEMENT_SEED_OFFSET = 55_000
EVALUATION_SEED_OFFSET = 60_000
EVALUATION_HELD_OUT_SEED_OFFSET = 65_000


@dataclass
class QCCase:
    """One judged mask with its true Dice.

    Attributes:
        seed: Phantom seed (also seeds the corruption and the perturbations).
        image_family: Key of :data:`~pacs_sentinel.qc.corruptions.IMAGE_FAMILIES`.
        mask_family: ``"none"`` (the model's mask), ``"truth"`` (the ground truth) or a
            perturbation family (of the model's mask or of the ground truth).
        dice: Dice of the mask against the ground truth.
        empty: The mask is empty (QC scores it 0 without signals).
        signals: The QC signals (None for an empty mask or when not collected).
        inputs: The estimator input ``(channels, G, G, G)`` float16 (None when empty or not collected).
        uncertainty: The case carries the model's stochastic samples.
        predicted_dice_without_probabilities: The estimator's predicted Dice when the mask is
            judged without the model's probability map (a third-party SEG's path; None when
            not collected or the estimator takes no probability map).
        agreement_dice: Dice of the mask with the model's own mask on the same image (the
            seg-qc agreement signal; None when not collected).
    """

    seed: int
    image_family: str
    mask_family: str
    dice: float
    empty: bool
    signals: list[Signal] | None = None
    inputs: np.ndarray | None = None
    uncertainty: bool = False
    predicted_dice_without_probabilities: float | None = None
    agreement_dice: float | None = None


def draw_cases(model, seeds: Sequence[int], image_families: Sequence[str], mask_families: Sequence[str], *,
               perturbations_per_image: int = 3, include_own: bool = True, truth_share: float = 0.0,
               mc_dropout_samples: int = 0, cycle_perturbations: bool = False,
               estimator: QualityEstimator | None = None, collect_signals: bool = False,
               collect_inputs: bool = False, input_channels: int = INPUT_CHANNELS,
               collect_without_probabilities: bool = False, collect_agreement: bool = False,
               progress: bool = True,
               desc: str = "cases") -> list[QCCase]:
    """Draw cases: phantom ``i`` uses ``seeds[i]`` and image family ``image_families[i % n]``.

    Args:
        model: A :class:`~pacs_sentinel.inference.models.SegmentationModel` (the demo organ-seg).
        seeds: Phantom seeds.
        image_families: Cycled over the seeds.
        mask_families: Perturbations drawn (uniformly, seeded) for each image.
        perturbations_per_image: Perturbed masks per image.
        include_own: Include the model's own mask as a case.
        truth_share: Share of perturbations applied to the ground truth instead of the model's
            mask (with that share, the ground truth itself is a case too): masks of every Dice,
            not only of the model's habits (estimator training).
        mc_dropout_samples: Stochastic passes of the model (uncertainty signals on own masks).
        cycle_perturbations: Take the perturbation families in turn (every family as often,
            each image family meeting every mask family) instead of drawing them (evaluation).
        estimator: Adds the estimator's signal when collecting signals.
        collect_signals: Compute every QC signal of each case.
        collect_inputs: Keep the estimator input of each case (the model's probability map in
            the third channel, for every mask family: a perturbed mask is judged against the
            probabilities the model produced for its own mask, as QC judges it).
        input_channels: Channels of the kept inputs (:func:`~pacs_sentinel.qc.estimator.estimator_input`).
        collect_without_probabilities: With ``collect_signals`` and a three-channel estimator,
            also run the estimator without the probability map (the fusion's
            ``without-probabilities`` model is fitted on it; nothing else reads it).
        collect_agreement: Record each mask's Dice with the model's own mask (the agreement
            models of the fusion are fitted on it, with masks of the ground truth standing in
            for a vendor's).
        progress: tqdm progress bar.

    Returns:
        The cases, in seed order.
    """
    from pacs_sentinel.inference.phantoms import make_ct_phantom

    perturbations = [f for f in mask_families if f != "none"]
    cases: list[QCCase] = []
    for i, seed in enumerate(tqdm(seeds, desc=desc, disable=not progress, unit="phantom")):
        family = image_families[i % len(image_families)]
        variant, corruption = IMAGE_FAMILIES[family]
        rng = np.random.default_rng(seed)
        phantom = make_ct_phantom(seed, variant=variant)
        hu = corrupt_image(phantom.hu, corruption, rng, phantom.spacing)
        volume = Volume(array=hu, spacing=phantom.spacing, origin=phantom.origin, direction=np.eye(3), datasets=[])
        result = model.predict(volume, mc_dropout_samples=mc_dropout_samples)
        masks: list[tuple[str, np.ndarray]] = [("none", result.mask[0])] if include_own else []
        if truth_share > 0 and rng.random() < truth_share:
            masks.append(("truth", phantom.liver.copy()))
        if perturbations:
            if cycle_perturbations:
                names = cycled_perturbations(i, len(image_families), perturbations_per_image, perturbations)
            else:
                names = list(rng.choice(perturbations, size=perturbations_per_image, replace=True))
            for name in names:
                source = phantom.liver if truth_share > 0 and rng.random() < truth_share else result.mask[0]
                masks.append((str(name), perturb_mask(source, str(name), rng, hu, phantom.spacing)))
        image_qc = assess_image(volume) if collect_signals else None
        midline = image_qc.midline_x_mm(volume) if image_qc is not None else None
        body_area = image_qc.body_area_cm2(volume) if image_qc is not None else None
        for mask_family, mask in masks:
            case = QCCase(seed, family, mask_family, dice(mask, phantom.liver), empty=not mask.any(),
                          uncertainty=mask_family == "none" and result.uncertainty is not None)
            if collect_agreement:
                case.agreement_dice = dice(mask, result.mask[0])
            if not case.empty and collect_inputs:
                case.inputs = estimator_input(hu, mask, phantom.spacing, probabilities=result.probabilities[0],
                                              channels=input_channels).astype(np.float16)
            if not case.empty and collect_signals:
                judged = copy.copy(result)
                judged.mask = mask[None]
                if mask_family != "none":
                    judged.uncertainty = None
                case.signals = segment_signals(volume, judged, 0, image_signals=image_qc.signals,
                                               midline_x=midline, estimator=estimator, body_area_cm2=body_area)
                if collect_without_probabilities and estimator is not None and estimator.channels == 3:
                    case.predicted_dice_without_probabilities = estimator.predict(hu, mask, phantom.spacing)
            cases.append(case)
    return cases


def cycled_perturbations(i: int, n_image_families: int, per_image: int, families: Sequence[str]) -> list[str]:
    """The perturbation families of phantom ``i`` when they are taken in turn.

    Phantom ``i`` is the ``r = i // n``-th of its image family ``f = i % n``; it takes
    ``per_image`` consecutive families from ``per_image * f + r * step`` on (modulo their
    number ``m``). With ``step = per_image * n + 1`` (this is ``i * per_image + i // n``) every
    image family meets every mask family when ``step`` and ``m`` are coprime; otherwise
    ``step`` grows to the next coprime value (one image family, 2 masks per phantom and 9
    families: step 3 would only ever draw 6 of the 9).
    """
    m = len(families)
    step = per_image * n_image_families + 1
    while math.gcd(step, m) != 1:
        step += 1
    start = per_image * (i % n_image_families) + (i // n_image_families) * step
    return [families[(start + k) % m] for k in range(per_image)]


def seeds_for(offset: int, n: int, seed: int = 0) -> list[int]:
    """Phantom seeds ``seed * 1_000_000 + offset + i`` for ``i < n``."""
    return [seed * 1_000_000 + offset + i for i in range(n)]
