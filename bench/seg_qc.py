"""How well seg-qc catches bad third-party masks, with and without the agreement signal.

A "vendor" segments the liver of held-out phantoms; its masks are the ground truth put through
perturbation families (clean, shifts, dilation, erosion, a missed part, a cut, islands, the
organ mirrored to the wrong side). Each
mask is judged as a ``seg-qc`` pipeline judges a third-party SEG
(:func:`pacs_sentinel.qc.segqc.judge_segmentation`, accept threshold 0.5) twice: with the
demo organ-seg model's card statistics only (``agreement = false``), and with the agreement
signal (Dice with the model's prediction, ``agreement = true``; used, as the daemon does, only
when the model's own mask scores at least 0.5 in our QC), and compared with QC 2.6.0's product
rule (the score without agreement times the agreement's factor). Clean phantoms, and a third as
many with a metal artefact, where the model fails. A mask *fails* when its true Dice with the
ground truth is below 0.7. Reported per family (clean images): true Dice, failure share, review
rates, the agreement Dice; pooled per image kind: AUROC of the quality score for failures, ECE
and Brier score of the score as P(Dice >= 0.7), failures caught (sensitivity) and good masks
sent to review (false alarms), and the seconds per study of the agreement model (with the QC of
its own mask) and of the QC.

Run: ``.venv/bin/python bench/seg_qc.py [--n N] [--seed-base S] [--no-doc]`` (default N=24,
about four minutes on 2 CPU cores, one torch thread). It writes the ``seg_qc`` section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # a light benchmark: the test machine is shared

import numpy as np  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from scipy import ndimage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_section  # noqa: E402

from pacs_sentinel.dicom_io.seg_masks import MappedSegment, MappedSegmentation  # noqa: E402
from pacs_sentinel.inference.models import load_segmentation_model  # noqa: E402
from pacs_sentinel.inference.phantoms import make_ct_phantom  # noqa: E402
from pacs_sentinel.inference.training import phantom_volume  # noqa: E402
from pacs_sentinel.qc.agreement import agreement_signal, dice  # noqa: E402
from pacs_sentinel.qc.corruptions import IMAGE_FAMILIES, corrupt_image  # noqa: E402
from pacs_sentinel.qc.evaluate import evaluate_segmentation  # noqa: E402
from pacs_sentinel.qc.metrics import expected_calibration_error  # noqa: E402
from pacs_sentinel.qc.segqc import LabelReference, judge_segmentation  # noqa: E402
from pacs_sentinel.results import Verdict  # noqa: E402

MODEL_SPEC = "demo:organ-seg"
FAIL_BELOW_DICE = 0.7
ACCEPT_THRESHOLD = 0.5
#: Seeds far from the demo model's training (10 000+), validation (20 000+), variant (30 000+)
#: and qc_eval (900 000+) seeds.
DEFAULT_SEED_BASE = 950_000


def _slices_of(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))


def perturbations(liver: np.ndarray, body: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The vendor's masks of one phantom: the truth and its perturbation families."""
    ball = ndimage.generate_binary_structure(3, 1)
    slices = _slices_of(liver)
    partial = liver.copy()
    partial[slices[int(len(slices) * 0.4)]:] = False  # misses the upper 60 % of the organ
    cut = liver.copy()
    middle = int(slices[len(slices) // 2])
    cut[middle - 1:middle + 1] = False  # broken in two by a 10 mm gap
    islands = liver.copy()
    candidates = np.argwhere(body & ~ndimage.binary_dilation(liver, ball, iterations=6))
    for z, y, x in candidates[rng.choice(len(candidates), 6, replace=False)]:
        islands[max(0, z - 2):z + 2, max(0, y - 6):y + 6, max(0, x - 6):x + 6] = True
    return {
        "clean": liver.copy(),
        "shift 10 mm": np.roll(liver, 4, axis=2),
        "shift 30 mm": np.roll(liver, 12, axis=2),
        "dilated 5 mm": ndimage.binary_dilation(liver, ball, iterations=2),
        "eroded 12.5 mm": ndimage.binary_erosion(liver, ball, iterations=5),
        "missed upper 60 %": partial,
        "cut in two (10 mm gap)": cut,
        "6 islands": islands,
        "mirrored to the left": liver[:, :, ::-1].copy(),
    }


def auroc(scores: np.ndarray, failed: np.ndarray) -> float:
    """AUROC of a low score for failures (ties count half); NaN without both classes."""
    bad, good = scores[failed], scores[~failed]
    if not len(bad) or not len(good):
        return float("nan")
    wins = (bad[:, None] < good[None, :]).sum() + 0.5 * (bad[:, None] == good[None, :]).sum()
    return float(wins / (len(bad) * len(good)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=24, help="phantoms (default 24)")
    parser.add_argument("--seed-base", type=int, default=DEFAULT_SEED_BASE)
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    model = load_segmentation_model(MODEL_SPEC, device="cpu")
    (label,) = model.labels
    statistics = dict(model.reference.get(label.name, {}))
    header = Dataset()
    header.ManufacturerModelName = "bench vendor"
    header.SOPInstanceUID = "1.2.3.4"
    rows: list[dict] = []
    seconds = {"agreement model": [], "QC per mask": []}
    # Clean images (our model is right) and, a third as many, images with a metal artefact (our
    # model fails there: the agreement must not be used against a vendor's correct mask).
    images = [("clean", args.seed_base + n) for n in range(args.n)]
    images += [("metal", args.seed_base + args.n + n) for n in range(max(1, args.n // 3))]
    for image, seed in images:
        variant, corruption = IMAGE_FAMILIES[image]
        phantom = make_ct_phantom(seed, variant=variant)
        rng = np.random.default_rng(seed)
        volume = phantom_volume(phantom)
        volume.array = corrupt_image(phantom.hu, corruption, rng, phantom.spacing).astype(np.float32)
        liver = phantom.liver.astype(bool)
        started = time.perf_counter()
        own = model.predict(volume, mc_dropout_samples=0)
        # As the daemon does: our own mask is judged, and its agreement is used only if it passes.
        reference_score = evaluate_segmentation(volume, own).segments[0].quality_score
        seconds["agreement model"].append(time.perf_counter() - started)
        for family, mask in perturbations(liver, phantom.hu > -500, rng).items():
            mapped = MappedSegmentation(header, [MappedSegment(1, label, mask, "bench vendor")])
            row = {"image": image, "family": family, "dice": dice(mask, liver), "reference": reference_score}
            for mode, reference in (("off", LabelReference(label, MODEL_SPEC, statistics)),
                                    ("on", LabelReference(label, MODEL_SPEC, statistics, own.mask[0],
                                                          reference_score))):
                started = time.perf_counter()
                _, qc, judgements = judge_segmentation(volume, mapped, [reference], accept_threshold=ACCEPT_THRESHOLD)
                seconds["QC per mask"].append(time.perf_counter() - started)
                row[f"score_{mode}"] = qc.quality_score
                row[f"review_{mode}"] = qc.verdict is Verdict.NEEDS_REVIEW
                if mode == "on":
                    row["agreement"] = judgements[0].agreement_dice
                    row["used"] = judgements[0].agreement_used
            # QC 2.6.0's rule, for comparison: the agreement's factor times the score without it.
            row["score_product"] = row["score_off"] * agreement_signal(row["agreement"]).fusion_factor
            row["review_product"] = row["review_off"] or row["score_product"] < ACCEPT_THRESHOLD
            rows.append(row)
            print(f"{image} seed {seed} {family:>18}: dice {row['dice']:.3f} score off {row['score_off']:.3f} "
                  f"on {row['score_on']:.3f} agreement {row['agreement']:.3f} used {row['used']}", file=sys.stderr)

    clean = [r for r in rows if r["image"] == "clean"]
    families = list(dict.fromkeys(r["family"] for r in clean))
    lines = [
        "## seg-qc: judging third-party masks (demo organ-seg as reference)",
        "",
        machine_line() + f" {args.n} held-out clean phantoms and {len(images) - args.n} with a metal artefact "
        f"(seeds {args.seed_base}+), one torch thread; `bench/seg_qc.py`. Vendor masks are the true liver put "
        f"through each family; a mask fails at a true Dice below {FAIL_BELOW_DICE}. Review rates at the accept "
        f"threshold {ACCEPT_THRESHOLD} (seg-qc's `[qc] accept_threshold`), without (`agreement = false`: image QC, "
        "mask heuristics, card statistics) and with the agreement signal (QC029, Dice with organ-seg's "
        "prediction; since QC 2.7.0 a feature of the fusion's `with-agreement` model, used when organ-seg's own "
        "mask scores at least 0.5 in our QC, so the score stays a calibrated P(Dice >= 0.7), and where used a "
        "Dice below 0.7 sends the mask to review whatever its score); \"product rule\" is QC 2.6.0's, the "
        "score without agreement times the agreement's factor, whatever our own mask's QC. ECE: expected calibration "
        "error of the score as P(true Dice >= 0.7), 10 equal-width bins; Brier: mean squared error of that "
        "probability.",
        "",
        "Clean images, per vendor mask family:",
        "",
        "| family | masks | mean true Dice | failing | review, no agreement | review, with agreement "
        "| review, product rule | mean agreement Dice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family in families:
        group = [r for r in clean if r["family"] == family]
        lines.append(
            f"| {family} | {len(group)} | {np.mean([r['dice'] for r in group]):.3f} "
            f"| {np.mean([r['dice'] < FAIL_BELOW_DICE for r in group]):.0%} "
            f"| {np.mean([r['review_off'] for r in group]):.0%} | {np.mean([r['review_on'] for r in group]):.0%} "
            f"| {np.mean([r['review_product'] for r in group]):.0%} "
            f"| {np.mean([r['agreement'] for r in group]):.3f} |")
    lines += ["", "Pooled:", "", "| images | scoring | masks | agreement used | AUROC (score vs failure) "
              "| ECE of P(Dice >= 0.7) | Brier | failures caught | good masks sent to review |",
              "|---|---|---|---|---|---|---|---|---|"]
    for image in ("clean", "metal", "all"):
        group = [r for r in rows if image in ("all", r["image"])]
        failed = np.array([r["dice"] < FAIL_BELOW_DICE for r in group])
        used = np.mean([r["used"] for r in group])
        for mode, name in (("off", "no agreement"), ("on", "with agreement"), ("product", "product rule (2.6.0)")):
            scores = np.array([r[f"score_{mode}"] for r in group])
            review = np.array([r[f"review_{mode}"] for r in group])
            lines.append(
                f"| {image} | {name} | {len(group)} | {dict(off='', on=f'{used:.0%}', product='100%')[mode]} "
                f"| {auroc(scores, failed):.3f} | {expected_calibration_error(scores, ~failed):.3f} "
                f"| {np.mean((scores - ~failed) ** 2):.3f} | {int((review & failed).sum())}/{int(failed.sum())} "
                f"| {int((review & ~failed).sum())}/{int((~failed).sum())} |")
    lines += ["", "Seconds: " + ", ".join(f"{name} {np.median(values):.3f} (median)" for name, values in seconds.items())
              + ". The agreement model runs once per study; the QC once per segment."]
    section = "\n".join(lines)
    print(section)
    if not args.no_doc:
        write_section("seg_qc", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
