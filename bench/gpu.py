"""The models on a CUDA GPU: seconds per study, float32 against float16 autocast, and agreement with the CPU.

Needs a CUDA device (exits with status 2 and says so where there is none). For the demo
organ-seg on three CT phantoms (128x128x64 and 160x160x48 as in ``bench/inference.py``, plus a
512x512x300 series covering the same 240x400x400 mm) and for the demo cxr-cls on radiograph
phantoms, it runs what the worker runs for one study, with the model warm, on:

- ``cpu``: float32 with ``--threads`` torch threads (default 2, the reference machine's cores);
- ``cuda``: float32 (``[inference] mixed_precision = false``);
- ``cuda+amp``: float16 autocast (``mixed_precision = true``, the default).

Segmentation: median seconds of ``preprocess``, ``forward``, ``samples`` (``--samples`` MC
dropout passes, batched), ``inverse`` and the whole ``predict``; the QC stage on its result
(``qc.evaluate.evaluate_segmentation``, CPU in every configuration); peak CUDA memory; and, against
the CPU result of the same input, the Dice of the masks, the largest probability difference,
and the QC score and verdict. Classification: median seconds of ``predict`` with the
pipeline's 8 MC dropout passes, the left-right flip and Grad-CAM, and the largest difference of the
calibrated probabilities and of the QC score from the CPU's over ``--radiographs`` images.

Prints a Markdown section and writes it to the ``gpu`` section of docs/benchmarks.md (unless
``--no-doc``; ``--out FILE`` writes the section to a file as well, for a device machine whose
copy of the repository is thrown away).

Run ``python bench/gpu.py [--runs 10] [--samples 4] [--threads 2] [--radiographs 20] [--no-doc] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line, write_section  # noqa: E402

from pacs_sentinel.daemon.logs import configure_logging  # noqa: E402
from pacs_sentinel.dicom_io.series import load_series_files  # noqa: E402
from pacs_sentinel.inference.classification import load_classification_model  # noqa: E402
from pacs_sentinel.inference.models import load_segmentation_model  # noqa: E402
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series  # noqa: E402
from pacs_sentinel.inference.radiographs import make_cxr_phantom  # noqa: E402
from pacs_sentinel.qc.classification import evaluate_classification  # noqa: E402
from pacs_sentinel.qc.agreement import dice  # noqa: E402
from pacs_sentinel.qc.evaluate import evaluate_segmentation  # noqa: E402

SEG_SPEC = "demo:organ-seg"
CLS_SPEC = "demo:cxr-cls"
#: (label, phantom shape (slices, rows, cols), spacing (mm)); all cover the same 240x400x400 mm.
INPUTS = [
    ("128x128x64", (64, 128, 128), (3.75, 3.125, 3.125)),
    ("160x160x48", (48, 160, 160), (5.0, 2.5, 2.5)),
    ("512x512x300", (300, 512, 512), (0.8, 0.78125, 0.78125)),
]
#: (name, device, mixed precision)
CONFIGS = [("cpu", "cpu", False), ("cuda", "cuda", False), ("cuda+amp", "cuda", True)]
SEG_STAGES = ("preprocess", "forward", "samples", "inverse")
#: QC runs on the CPU whatever the model's device: timed on the last result only.
QC_RUNS = 3
#: What the cxr-cls pipeline asks for (default_config.toml).
CLS_MC_SAMPLES = 8
CLS_TTA_FLIPS = ("x",)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def segmentation_rows(runs: int, samples: int, tmp: Path) -> tuple[list[str], list[str]]:
    """Rows of the segmentation timing table and of the agreement table."""
    timing_rows, agreement_rows = [], []
    for label, shape, spacing in INPUTS:
        phantom = make_ct_phantom(7, shape=shape, spacing=spacing)
        volume = load_series_files(write_ct_series(phantom, tmp / label, seed=7))
        reference = None
        for name, device, amp in CONFIGS:
            model = load_segmentation_model(SEG_SPEC, device=device).with_mixed_precision(amp)
            model.predict(volume, mc_dropout_samples=samples)  # warm-up (cuDNN autotuning, allocator)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            per_run, qc_seconds, result = [], [], None
            for _ in range(runs):
                synchronize(device)
                started = time.perf_counter()
                result = model.predict(volume, mc_dropout_samples=samples)
                synchronize(device)
                per_run.append({**{k: result.timing[k] for k in SEG_STAGES}, "predict": time.perf_counter() - started})
            for _ in range(QC_RUNS):
                started = time.perf_counter()
                qc = evaluate_segmentation(volume, result)
                qc_seconds.append(time.perf_counter() - started)
            peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device == "cuda" else "n/a"
            median = {k: statistics.median(r[k] for r in per_run) for k in (*SEG_STAGES, "predict")}
            timing_rows.append(f"| {label} | {name} | " + " | ".join(f"{median[k]:.3f}" for k in (*SEG_STAGES, "predict"))
                               + f" | {statistics.median(qc_seconds):.3f} | {peak} |")
            print(f"seg {label} {name}: " + ", ".join(f"{k} {median[k]:.3f}" for k in (*SEG_STAGES, "predict"))
                  + f", qc {statistics.median(qc_seconds):.3f}, peak MiB {peak}", flush=True)
            segment = qc.segments[0]
            if reference is None:
                reference = (result, segment)
            ref_result, ref_segment = reference
            agreement_rows.append(
                f"| {label} | {name} | {dice(result.mask, ref_result.mask):.4f} "
                f"| {float(np.abs(result.probabilities - ref_result.probabilities).max()):.4f} "
                f"| {segment.quality_score:.3f} ({ref_segment.quality_score:.3f}) "
                f"| {segment.verdict.name} ({ref_segment.verdict.name}) |")
    return timing_rows, agreement_rows


def classification_rows(runs: int, radiographs: int) -> list[str]:
    """Rows of the classification table: seconds per image and agreement with the CPU."""
    images = [make_cxr_phantom(seed).image for seed in range(90000, 90000 + radiographs)]
    reference: list[tuple[np.ndarray, list[float]]] = []
    rows = []
    for name, device, amp in CONFIGS:
        model = load_classification_model(CLS_SPEC, device=device, mixed_precision=amp)
        predict = lambda image: model.predict(image, mc_dropout_samples=CLS_MC_SAMPLES,  # noqa: E731
                                              tta_flips=CLS_TTA_FLIPS, gradcam=True)
        predict(images[0])  # warm-up
        seconds = []
        for _ in range(runs):
            synchronize(device)
            started = time.perf_counter()
            predict(images[0])
            synchronize(device)
            seconds.append(time.perf_counter() - started)
        outputs = []
        for image in images:
            result = predict(image)
            qc = evaluate_classification(result, image=image)
            outputs.append((np.asarray(result.probabilities), [f.quality_score for f in qc.findings]))
        if not reference:
            reference = outputs
        max_prob = max(float(np.abs(p - rp).max()) for (p, _), (rp, _) in zip(outputs, reference))
        max_score = max(max(abs(a - b) for a, b in zip(s, rs)) for (_, s), (_, rs) in zip(outputs, reference))
        rows.append(f"| {name} | {statistics.median(seconds):.4f} | {max_prob:.4f} | {max_score:.4f} |")
        print(f"cls {name}: {statistics.median(seconds):.4f} s/image, max |dp| {max_prob:.4f}, "
              f"max |dscore| {max_score:.4f}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per configuration (median)")
    parser.add_argument("--samples", type=int, default=4, help="MC dropout samples per CT study (pipeline default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the reference machine has 2 cores)")
    parser.add_argument("--radiographs", type=int, default=20, help="radiograph phantoms compared with the CPU")
    parser.add_argument("--no-doc", action="store_true", help="print only; do not touch docs/benchmarks.md")
    parser.add_argument("--out", type=Path, help="also write the Markdown section to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device; torch sees none here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    configure_logging("console", "warning", stream=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        timing_rows, agreement_rows = segmentation_rows(args.runs, args.samples, Path(tmp))
    cls_rows = classification_rows(args.runs, args.radiographs)
    properties = torch.cuda.get_device_properties(0)
    section = f"""## GPU: CUDA float32 and float16 autocast against the CPU

Generated by `bench/gpu.py --runs {args.runs} --samples {args.samples} --threads {args.threads} --radiographs {args.radiographs}`.
{machine_line()} GPU: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, torch {torch.__version__}
(CUDA {torch.version.cuda}); the CPU rows use {args.threads} torch threads of that machine's CPU, not the
2-core reference machine. Medians of {args.runs} runs with the model warm; `cuda+amp` is the shipped default
(`[inference] device = "auto"`, `mixed_precision = true`).

### Segmentation (demo organ-seg, {args.samples} MC dropout samples): seconds per study

| input (rows x cols x slices) | run on | preprocess | forward | samples | inverse | predict | QC (CPU, median of {QC_RUNS}) | peak CUDA MiB |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(timing_rows)}

### Segmentation: the same study against the CPU result

Dice of the mask with the CPU's, the largest difference of a voxel's probability, and the QC
score and verdict (the CPU's in brackets).

| input | run on | mask Dice vs CPU | max abs prob diff | QC score (CPU) | verdict (CPU) |
|---|---|---|---|---|---|
{chr(10).join(agreement_rows)}

### Classification (demo cxr-cls, {CLS_MC_SAMPLES} MC dropout passes + left-right flip + Grad-CAM)

Seconds per image (median of {args.runs}), and over {args.radiographs} radiograph phantoms the largest
difference from the CPU of a calibrated finding probability and of a finding's QC score.

| run on | seconds per image | max abs prob diff vs CPU | max abs QC score diff vs CPU |
|---|---|---|---|
{chr(10).join(cls_rows)}
"""
    print(section)
    if args.out:
        args.out.write_text(section, encoding="utf-8")
    if not args.no_doc:
        write_section("gpu", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
