"""What each daemon-overhead saving (issue 4) buys: worker-thread CPU per stage with it off and on.

The overhead ratio of ``bench/inference.py`` is wall time over wall time; on a shared 2-core
machine both are noisy (the network's time most of all: torch's threads wait for each other
when other work holds the cores). The savings are in Python code, so this script measures the
CPU seconds of the calling thread (``time.thread_time``), which other processes disturb much
less, for the non-network stages of one study (128x128x64 phantom, demo organ-seg result with
4 MC dropout samples):

- ``load``: ``load_series_files``;
- ``build``: ``build_result_set`` (SEG, SR, SC);
- ``write``: ``ResultSet.write`` (DICOM files and the overlay PNG);
- ``validate``: ``check_before_sending(..., "dciodvfy")`` (read-back in this thread, dciodvfy
  in subprocesses, not counted here).

Each saving is switched off and on in the same process, the variants interleaved run by run:
``none`` (all off: the code before issue 4's changes), each one alone, ``all`` (the shipped
code). The savings: ``memo`` (highdicom's ``is_attribute_in_iod`` memoized,
:mod:`pacs_sentinel.reports.highdicom_speedups`), ``no-copy`` (the SR takes its content tree
over instead of deep-copying it, same module), ``native`` (uncompressed pixel data read
directly, :func:`pacs_sentinel.dicom_io.series.native_stored_values`), ``evidence`` (the SR's
evidence check searches its content tree by Value Type strings,
:func:`pacs_sentinel.reports.highdicom_speedups.find_content_items`).

It also measures the start-up warm-up (:mod:`pacs_sentinel.daemon.warmup`): in fresh processes,
the report stages of the first study, without and with the warm-up before it.

Writes the ``inference-overhead`` section of docs/benchmarks.md (unless ``--no-doc``). Run
``.venv/bin/python bench/overhead.py [--runs 15] [--no-doc]`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line, write_section  # noqa: E402

STAGES = ("load", "build", "write", "validate")
#: Variant -> (memo, no-copy, native, evidence) switched on.
VARIANTS = {"none": (0, 0, 0, 0), "memo": (1, 0, 0, 0), "no-copy": (0, 1, 0, 0), "native": (0, 0, 1, 0),
            "evidence": (0, 0, 0, 1), "all": (1, 1, 1, 1)}
SHAPE, SPACING = (64, 128, 128), (3.75, 3.125, 3.125)


def _quiet_logs() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _case(tmp: Path):
    """The series, a warm model's result and its QC for the 128x128x64 phantom."""
    import torch

    from pacs_sentinel.dicom_io.series import load_series_files
    from pacs_sentinel.inference.models import load_segmentation_model
    from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
    from pacs_sentinel.qc.evaluate import evaluate_segmentation

    torch.set_num_threads(1)
    paths = write_ct_series(make_ct_phantom(4_000_000, shape=SHAPE, spacing=SPACING), tmp / "series", seed=1)
    volume = load_series_files(paths)
    result = load_segmentation_model("demo:organ-seg", device="cpu").predict(volume, threshold=0.5,
                                                                             mc_dropout_samples=4)
    return paths, result, evaluate_segmentation(volume, result, accept_threshold=0.5)


def _timed_study(paths, result, qc, out_dir: Path) -> dict[str, float]:
    """CPU milliseconds of this thread per non-network stage of one study."""
    from pacs_sentinel.dicom_io import series
    from pacs_sentinel.reports.resultset import build_result_set
    from pacs_sentinel.reports.validate import check_before_sending

    ms: dict[str, float] = {}

    def timed(stage, fn):
        mark = time.thread_time()
        value = fn()
        ms[stage] = (time.thread_time() - mark) * 1000
        return value

    volume = timed("load", lambda: series.load_series_files(paths))
    result_set = timed("build", lambda: build_result_set(volume, result, qc))
    written = timed("write", lambda: result_set.write(out_dir))
    timed("validate", lambda: check_before_sending([p for p in written if p.suffix == ".dcm"], "dciodvfy"))
    return ms


def ablation(runs: int, tmp: Path) -> dict[str, dict[str, float]]:
    """Median CPU ms per stage of each variant, interleaved run by run."""
    import highdicom
    from highdicom.sr import utils as sr_utils

    from pacs_sentinel.dicom_io import series
    from pacs_sentinel.reports import highdicom_speedups
    from pacs_sentinel.reports import sr as sr_module

    paths, result, qc = _case(tmp)
    patched = highdicom._standard_utils.is_attribute_in_iod
    original = highdicom_speedups.original_is_attribute_in_iod()
    modules = [m for name, m in sys.modules.items()
               if name.startswith("highdicom") and getattr(m, "is_attribute_in_iod", None) is patched]
    shipped_no_copy, shipped_native = sr_module.content_not_copied, series.native_stored_values
    fast_search, plain_search = sr_utils.find_content_items, highdicom_speedups.original_find_content_items()

    @contextlib.contextmanager
    def copied(root):  # highdicom's own behaviour: the SR deep-copies its content
        yield root

    def switch(memo: int, no_copy: int, native: int, evidence: int) -> None:
        for module in modules:
            module.is_attribute_in_iod = patched if memo else original
        sr_module.content_not_copied = shipped_no_copy if no_copy else copied
        series.native_stored_values = shipped_native if native else (lambda ds: None)
        sr_utils.find_content_items = fast_search if evidence else plain_search

    samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    try:
        for run in range(-1, runs):  # run -1: warm-up of every variant, not counted
            for variant, flags in VARIANTS.items():
                switch(*flags)
                ms = _timed_study(paths, result, qc, tmp / f"{variant}-{run}")
                if run >= 0:
                    samples[variant].append(ms)
    finally:
        switch(1, 1, 1, 1)
    return {v: {s: statistics.median(r[s] for r in rows) for s in STAGES} for v, rows in samples.items()}


def first_study(warm_up: bool) -> dict[str, float]:
    """In this (fresh) process: CPU ms of the first study's stages, after the warm-up or not."""
    from pacs_sentinel.daemon import warmup
    from pacs_sentinel.daemon.config import default_config_text, parse_config

    import tomllib

    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as name:
        tmp = Path(name)
        paths, result, qc = _case(tmp)  # the model is warm: the case needs its result
        out: dict[str, float] = {}
        if warm_up:
            config = parse_config(tomllib.loads(default_config_text()), base_dir=tmp)
            mark = time.thread_time()
            warmup.warm_up_reports()
            warmup.load_models(config)
            out["warm_up"] = (time.thread_time() - mark) * 1000
        out.update(_timed_study(paths, result, qc, tmp / "first"))
        return out


def first_study_in_fresh_processes(runs: int) -> dict[str, dict[str, float]]:
    """Median of ``runs`` fresh processes each, without and with the warm-up."""
    results: dict[str, list[dict[str, float]]] = {"cold": [], "warmed up": []}
    for _ in range(runs):
        for label, flag in (("cold", []), ("warmed up", ["--warm-up"])):
            completed = subprocess.run([sys.executable, __file__, "--first-study", *flag], capture_output=True,
                                       text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            results[label].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return {label: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for label, rows in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="interleaved runs per variant; medians")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per first-study case")
    parser.add_argument("--no-doc", action="store_true", help="print only; do not write docs/benchmarks.md")
    parser.add_argument("--first-study", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm-up", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _quiet_logs()
    if args.first_study:
        print(json.dumps(first_study(args.warm_up)))
        return 0
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as name:
        medians = ablation(args.runs, Path(name))
    first = first_study_in_fresh_processes(args.processes)
    load_after = os.getloadavg()[0]
    base = sum(medians["none"].values())
    rows = []
    for variant in VARIANTS:
        total = sum(medians[variant].values())
        rows.append(f"| {variant} | " + " | ".join(f"{medians[variant][s]:.1f}" for s in STAGES)
                    + f" | **{total:.1f}** | {total - base:+.1f} |")
    first_rows = []
    for label, ms in first.items():
        total = sum(ms[s] for s in STAGES)
        first_rows.append(f"| {label} | {ms.get('warm_up', 0.0):.0f} | " + " | ".join(f"{ms[s]:.0f}" for s in STAGES)
                          + f" | **{total:.0f}** |")
    import highdicom
    import pydicom

    text = f"""## Inference overhead: what each saving buys (worker-thread CPU)

Generated by `bench/overhead.py --runs {args.runs} --processes {args.processes}`.
{machine_line()} highdicom {highdicom.__version__}, pydicom {pydicom.__version__}.
1-minute load average {load_before:.1f} before, {load_after:.1f} after; wall time {time.perf_counter() - started:.0f} s.
CPU milliseconds of the worker thread (`time.thread_time`: steadier than wall time while other
work shares the machine) for the non-network stages of one 128x128x64 study (demo organ-seg
result, 4 MC dropout samples): reading the series, building SEG + SR + SC, writing them, and the
check before sending (read-back here; dciodvfy runs in subprocesses and is not counted). Medians
of {args.runs} runs, the variants interleaved run by run in one process. *none* = every saving off
(the code before them), *all* = the shipped code.

| variant | load | build | write | validate | sum | vs none |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

- *memo*: highdicom's `is_attribute_in_iod` memoized (`reports/highdicom_speedups.py`; called
  per source image by `is_multiframe_image` when the SEG and the SR's references are built).
- *no-copy*: the SR takes over the content tree built for it instead of deep-copying it (same
  module; same bytes, tested).
- *native*: uncompressed pixel data read straight from the file's bytes
  (`dicom_io/series.py native_stored_values`; same values as pydicom, tested).
- *evidence*: the SR's evidence check (highdicom's `collect_evidence`) finds the referenced
  images by reading Value Type strings instead of building a content item per item (same
  module; same items, same bytes, tested).

Not switchable here, and on in every variant: the overlay PNGs are encoded on a helper thread
during the DICOM writes (so *write* holds no PNG time), and the dciodvfy runs all start before
the read-backs; both lower wall time, see docs/benchmarks.md "Issue 4".

First study of a fresh process (CPU ms; medians of {args.processes} processes each; *warm-up* is what
`daemon/warmup.py` costs at start-up, before any study can be complete: models loaded and one
small result set built, written and read back):

| process | warm-up | load | build | write | validate | first study sum |
|---|---|---|---|---|---|---|
{chr(10).join(first_rows)}
"""
    print(text)
    if not args.no_doc:
        write_section("inference-overhead", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
