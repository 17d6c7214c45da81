"""Seconds per study of the segmentation pipeline, split by stage, and the daemon overhead ratio.

For each input (the demo organ-seg at a 128x128x64 phantom (rows x cols x slices) and at the
default 160x160x48 phantom) and each device (CPU, and CUDA when present) it times what the
daemon's worker does for one study, with the model already warm:

- ``load``: reading the series' DICOM files into a volume (``load_series_files``);
- ``preprocess``, ``forward``, ``samples`` (MC dropout), ``inverse``: from
  ``SegmentationResult.timing``;
- ``qc``: ``qc.evaluate.evaluate_segmentation``;
- ``report``: ``reports.resultset.build_result_set`` + ``ResultSet.write`` to a temp folder;
- ``validate``: ``reports.validate.check_before_sending`` on the written DICOM files, as the
  worker runs it before anything is queued for sending (``[reports] validate = "dciodvfy"``,
  the default: highdicom read-back + dciodvfy side by side; read-back only, and said so, where
  dciodvfy is not installed).

The **daemon overhead ratio** is ``(load + preprocess + inverse + qc + report + validate) /
(forward + samples)``: everything between "study complete" and "results handed to the SCU"
that is not the network, over what the network costs. Wall-clock figures on a shared machine
are noisy, so the CPU seconds of the calling (worker) thread in each non-network stage
(``time.thread_time``; dciodvfy runs in subprocesses and is not in it) are reported too. It also measures
the cost of ``N`` uncertainty samples batched in one pass against ``N`` separate passes, peak
memory (tracemalloc for numpy/Python allocations, ``ru_maxrss`` for the process) and the cold
model load. Medians of ``--runs`` runs. Prints a Markdown section and writes it to the
``inference`` section of docs/benchmarks.md (unless ``--no-doc``).

Run ``.venv/bin/python bench/inference.py [--runs 5] [--threads 2] [--samples 4] [--no-doc]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line, write_section  # noqa: E402

from pacs_sentinel.dicom_io.series import load_series_files  # noqa: E402
from pacs_sentinel.inference.models import clear_model_cache, load_segmentation_model  # noqa: E402
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series  # noqa: E402
from pacs_sentinel.inference.uncertainty import draw_samples  # noqa: E402
from pacs_sentinel.qc.evaluate import evaluate_segmentation  # noqa: E402
from pacs_sentinel.reports.resultset import build_result_set  # noqa: E402
from pacs_sentinel.reports.validate import check_before_sending, dciodvfy_path  # noqa: E402

MODEL_SPEC = "demo:organ-seg"
#: (label, phantom shape (slices, rows, cols), spacing (mm)); both cover the same 240x400x400 mm.
INPUTS = [
    ("128x128x64", (64, 128, 128), (3.75, 3.125, 3.125)),
    ("160x160x48", (48, 160, 160), (5.0, 2.5, 2.5)),
]
STAGES = ("load", "preprocess", "forward", "samples", "inverse", "qc", "report", "validate")
OVERHEAD = ("load", "preprocess", "inverse", "qc", "report", "validate")
#: Stages whose worker-thread CPU seconds are reported (preprocess and inverse are inside predict).
CPU_STAGES = ("load", "predict", "qc", "report", "validate")
#: ``[reports] validate`` as the daemon runs it by default.
VALIDATE_MODE = "dciodvfy"
NETWORK = ("forward", "samples")


def one_study(model, paths: list[Path], samples: int, out_root: Path, run: int) -> dict[str, float]:
    """Run one study as the worker does; seconds per stage (wall), ``cpu_<stage>`` (thread CPU)."""
    seconds: dict[str, float] = {}

    def timed(stage: str, fn):
        wall, cpu = time.perf_counter(), time.thread_time()
        value = fn()
        seconds[f"cpu_{stage}"] = time.thread_time() - cpu
        seconds[stage] = time.perf_counter() - wall
        return value

    started = time.perf_counter()
    volume = timed("load", lambda: load_series_files(paths))
    result = timed("predict", lambda: model.predict(volume, threshold=0.5, mc_dropout_samples=samples))
    seconds.update({k: result.timing[k] for k in ("preprocess", "forward", "samples", "inverse")})
    qc = timed("qc", lambda: evaluate_segmentation(volume, result, accept_threshold=0.5))
    written = timed("report", lambda: build_result_set(volume, result, qc).write(out_root / f"run-{run}"))
    timed("validate", lambda: check_before_sending([p for p in written if p.suffix == ".dcm"], VALIDATE_MODE))
    seconds["total"] = time.perf_counter() - started
    return seconds


def sample_cost(model, paths: list[Path], n: int, runs: int) -> dict[str, float]:
    """Median seconds of one forward pass, of ``n`` batched samples and of ``n`` sequential ones."""
    image = model.prepare(load_series_files(paths)).image

    def timed(fn) -> float:
        values = []
        for _ in range(runs):
            mark = time.perf_counter()
            fn()
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            values.append(time.perf_counter() - mark)
        return statistics.median(values)

    def draw(batch_size):
        return lambda: draw_samples(model.probabilities, model.network, image, model.geometry,
                                    mc_dropout_samples=n, tta_flips=(), batch_size=batch_size)

    single = timed(lambda: model.probabilities(image))
    return {"single": single, "batched": timed(draw(None)), "sequential": timed(draw(1))}


def measure(device: str, runs: int, samples: int, tmp: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    """Rows of the stage, sample-cost, memory and worker-thread CPU tables for one device."""
    clear_model_cache()
    mark = time.perf_counter()
    model = load_segmentation_model(MODEL_SPEC, device=device)
    cold_load = time.perf_counter() - mark
    stage_rows, sample_rows, memory_rows, cpu_rows = [], [], [], []
    for label, shape, spacing in INPUTS:
        paths = write_ct_series(make_ct_phantom(4_000_000, shape=shape, spacing=spacing), tmp / f"{label}-series", seed=1)
        one_study(model, paths, samples, tmp / f"{device}-{label}-warm", 0)  # warm-up
        per_run = [one_study(model, paths, samples, tmp / f"{device}-{label}", i) for i in range(runs)]
        tracemalloc.start()  # a separate, untimed run: tracing slows Python-heavy stages down
        one_study(model, paths, samples, tmp / f"{device}-{label}-memory", 0)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        median = {k: statistics.median(r[k] for r in per_run)
                  for k in (*STAGES, "total", *(f"cpu_{s}" for s in CPU_STAGES))}
        overhead = sum(median[k] for k in OVERHEAD)
        network = sum(median[k] for k in NETWORK)
        ratio = overhead / network
        # The same ratio from each stage's fastest run: on a shared machine the network's torch
        # threads lose most to other work (a slow run can take several times the quiet time),
        # so the least disturbed runs are closest to what a dedicated node sees.
        fastest = {k: min(r[k] for r in per_run) for k in STAGES}
        ratio_fastest = sum(fastest[k] for k in OVERHEAD) / sum(fastest[k] for k in NETWORK)
        own = (median["preprocess"] + median["inverse"]) / network
        print(f"{device} {label}: " + ", ".join(f"{k} {median[k]:.3f}" for k in (*STAGES, "total"))
              + f" s; overhead ratio {ratio:.2f} (fastest runs {ratio_fastest:.2f})", file=sys.stderr)
        stage_rows.append(f"| {device} | {label} | " + " | ".join(f"{median[k]:.3f}" for k in STAGES)
                          + f" | **{median['total']:.3f}** | **{ratio:.2f}** | **{ratio_fastest:.2f}** | {own:.2f} |")
        cpu = [median[f"cpu_{s}"] * 1000 for s in CPU_STAGES]
        cpu_rows.append(f"| {device} | {label} | " + " | ".join(f"{v:.1f}" for v in cpu)
                        + f" | {cpu[0] + sum(cpu[2:]):.1f} |")
        maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory_rows.append(f"| {device} | {label} | {peak / 2**20:.0f} | {maxrss_mb:.0f} |")
        for n in (4, 8):
            cost = sample_cost(model, paths, n, runs)
            speedup = cost["sequential"] / cost["batched"]
            print(f"{device} {label} N={n}: single {cost['single']:.3f} s, batched {cost['batched']:.3f} s, "
                  f"sequential {cost['sequential']:.3f} s, speed-up {speedup:.2f}x", file=sys.stderr)
            sample_rows.append(
                f"| {device} | {label} | {n} | {cost['single']:.3f} | {cost['batched']:.3f} "
                f"({cost['batched'] / n:.3f}/sample) | {cost['sequential']:.3f} | {speedup:.2f}x |")
    memory_rows.append(f"| {device} | cold model load | {cold_load:.2f} s | |")
    return stage_rows, sample_rows, memory_rows, cpu_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement; the median is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the daemon's inference.threads)")
    parser.add_argument("--samples", type=int, default=4, help="MC dropout samples per study (pipeline default 4)")
    parser.add_argument("--no-doc", action="store_true", help="print only; do not write docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    stage_rows, sample_rows, memory_rows, cpu_rows = [], [], [], []
    validator = "dciodvfy side by side" if dciodvfy_path() else "no dciodvfy (not installed: read-back only)"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        for device in devices:
            s, u, m, c = measure(device, args.runs, args.samples, Path(tmp))
            stage_rows += s
            sample_rows += u
            memory_rows += m
            cpu_rows += c
    load_after = os.getloadavg()[0]
    text = f"""## Inference: seconds per study, by stage (demo organ-seg)

Generated by `bench/inference.py --runs {args.runs} --threads {args.threads} --samples {args.samples}`.
{machine_line()} torch {torch.__version__}, {args.threads} torch thread(s); medians of {args.runs} runs after one
warm-up, model already loaded (kept warm by the daemon); 1-minute load average {load_before:.1f} before,
{load_after:.1f} after (other work on a shared machine makes single runs noisy). Phantom seed 4000000; both inputs cover
240x400x400 mm and are resampled to the model's 48x80x80 working grid (5 mm), one sliding window.
A study = read the DICOM series, predict with {args.samples} MC dropout samples (pipeline default), QC,
SEG+SR+SC encoding and writing, and the check before sending (`[reports] validate = "{VALIDATE_MODE}"`:
highdicom read-back + {validator}).

| device | input (rows x cols x slices) | load | preprocess | forward | samples (N={args.samples}) | inverse | QC | report | validate | total | overhead ratio | ratio, fastest runs | pre+inverse / network |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(stage_rows)}

Overhead ratio = (load + preprocess + inverse + QC + report + validate) / (forward + samples) of the
medians; target <= 1.5. *Ratio, fastest runs*: the same from each stage's fastest of the {args.runs} runs
(timeit's rule for a noisy machine: other work only ever adds time, and it adds the most to the
network, whose torch threads wait for each other when the cores are taken).
The last column is the inference stage's own share: (preprocess + inverse) / (forward + samples).

CPU milliseconds of the worker thread per stage (`time.thread_time`, medians; less noisy than wall
time on a shared machine; torch's own intra-op threads and the dciodvfy subprocesses are not in it;
*predict* holds preprocess, network and inverse):

| device | input | load | predict | QC | report | validate | load+QC+report+validate |
|---|---|---|---|---|---|---|---|
{chr(10).join(cpu_rows)}

### Uncertainty samples: one batch vs separate passes

| device | input | N | one forward pass (s) | N batched (s) | N sequential (s) | speed-up |
|---|---|---|---|---|---|---|
{chr(10).join(sample_rows)}

Extra time per sample = batched / N. Speed-up = sequential / batched.

### Memory

| device | input | tracemalloc peak of one study (MiB, numpy/Python) | process max RSS so far (MiB) |
|---|---|---|---|
{chr(10).join(memory_rows)}
"""
    print(text)
    if not args.no_doc:
        write_section("inference", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
