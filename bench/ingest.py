"""Ingest throughput: instances per second received by our SCP, DCMTK and pynetdicom.

Workload: 300 single-frame CT instances of 512x512 16-bit (about 520 KB each), generated
from the product's own phantom (``make_ct_phantom``), sent by DCMTK's ``storescu`` over loopback
once over one association and once over four parallel associations (four ``storescu``
processes with 75 files each). Receivers:

- **ours**: :class:`pacs_sentinel.dicom_io.scp.Receiver` as the daemon runs it (fsync
  ``always``, every instance indexed in SQLite before it is acknowledged), in its own process;
- **DCMTK** ``/usr/bin/storescp`` (``--fork`` for the four-association case), the native
  reference; it writes files without fsync and keeps no index;
- **pynetdicom** ``python -m pynetdicom storescp``, the library's own application.

Each receiver gets a fresh output folder per run; a run counts only when every ``storescu``
exited 0 and the receiver holds 300 files. Three repetitions (receivers interleaved), medians.
DCMTK's programs are called by full path (pynetdicom installs scripts of the same names into
the virtual environment) and with ``TCP_NODELAY=1`` (otherwise delayed ACKs cost ~40 ms per
instance on loopback).

Run ``.venv/bin/python bench/ingest.py [--repetitions 3] [--no-doc]``; ``--ablation`` also
measures our receiver with each tuning undone, one at a time. The tables go to stdout and to
the ``ingest`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- ingest:start -->", "<!-- ingest:end -->"
STORESCU, STORESCP, ECHOSCU = "/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu"
N_INSTANCES = 300
SHAPE = (512, 512)
OUR_AE = "SENTINEL"
SEED = 424242
#: How long one sending run may take before it counts as failed.
RUN_TIMEOUT_S = 300.0

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


# --------------------------------------------------------------------------- workload


def make_workload(out_dir: Path) -> list[Path]:
    """Write the 300 CT instances (one study, one series) and return their paths in order.

    Ten distinct 512x512 phantom slices are drawn with :func:`make_ct_phantom` and written by
    :func:`write_ct_series`; the 300 instances cycle through them with their own SOP Instance
    UIDs, instance numbers and positions (drawing a 300-slice phantom would only cost time).
    """
    from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series

    phantom = make_ct_phantom(SEED, shape=(10, *SHAPE), spacing=(1.0, 0.8, 0.8))
    slices = [pydicom.dcmread(p) for p in write_ct_series(phantom, out_dir / "seed", seed=SEED)]
    paths = []
    for k in range(N_INSTANCES):
        ds = slices[k % len(slices)]
        uid = generate_uid(entropy_srcs=["pacs-sentinel-bench-ingest", str(SEED), str(k)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = k + 1
        z = float(phantom.origin[2]) + k * 1.0
        ds.ImagePositionPatient = [f"{phantom.origin[0]:g}", f"{phantom.origin[1]:g}", f"{z:g}"]
        ds.SliceLocation = f"{z:g}"
        path = out_dir / f"CT{k + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    shutil.rmtree(out_dir / "seed")
    return paths


# --------------------------------------------------------------------------- receivers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_echo(port: int, ae_title: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode} before it answered C-ECHO")
        result = subprocess.run([ECHOSCU, "-aec", ae_title, "127.0.0.1", str(port)], env=DCMTK_ENV,
                                capture_output=True, timeout=10)
        if result.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"receiver on port {port} did not answer C-ECHO within {timeout} s")


@dataclass
class Receiver:
    """How to start one receiver and count what it stored."""

    name: str
    ae_title: str
    command: list[str]  # with {port} and {out} placeholders
    env: dict[str, str] = field(default_factory=lambda: dict(DCMTK_ENV))

    def start(self, out_dir: Path) -> tuple[subprocess.Popen, int]:
        port = _free_port()
        args = [a.format(port=port, out=out_dir) for a in self.command]
        process = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        _wait_for_echo(port, self.ae_title, process)
        return process, port

    @staticmethod
    def stop(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def stored_files(out_dir: Path) -> int:
    """Complete received files under ``out_dir`` (our temp files end in ``.partial``)."""
    return sum(1 for p in out_dir.rglob("*") if p.is_file() and not p.name.endswith(".partial")
               and p.suffix not in (".db", ".db-wal", ".db-shm") and not p.name.endswith(("-wal", "-shm")))


def our_receiver(processes: int, extra: list[str] | None = None, src: Path | None = None) -> Receiver:
    """Our receiver in a child process; ``src`` runs the package from another source tree (A/B)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--port", "{port}", "--data-dir", "{out}",
               "--processes", str(processes), *(extra or [])]
    name = f"ours ({processes} process{'es' if processes > 1 else ''})"
    env = dict(DCMTK_ENV)
    if src is not None:
        env["PYTHONPATH"] = str(src)
        name += f" from {src}"
    return Receiver(name, OUR_AE, command, env)


def receivers(parallel: int, our_processes: int) -> list[Receiver]:
    dcmtk = [STORESCP, "-aet", "STORESCP", "-od", "{out}"] + (["--fork"] if parallel > 1 else []) + ["{port}"]
    pynetdicom_app = [sys.executable, "-m", "pynetdicom", "storescp", "-aet", "STORESCP", "-od", "{out}", "{port}"]
    return [
        our_receiver(our_processes),
        Receiver("DCMTK storescp" + (" --fork" if parallel > 1 else ""), "STORESCP", dcmtk),
        Receiver("pynetdicom storescp", "STORESCP", pynetdicom_app),
    ]


# --------------------------------------------------------------------------- sending


def send(files: list[Path], port: int, ae_title: str, parallel: int) -> float:
    """Send ``files`` with ``parallel`` storescu processes; returns the wall time in seconds."""
    chunks = [files[i::parallel] for i in range(parallel)]
    started = time.perf_counter()
    senders = [
        subprocess.Popen([STORESCU, "-aet", "BENCH", "-aec", ae_title, "127.0.0.1", str(port), *map(str, chunk)],
                         env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for chunk in chunks
    ]
    errors = []
    for sender in senders:
        _, stderr = sender.communicate(timeout=RUN_TIMEOUT_S)
        if sender.returncode != 0:
            errors.append(stderr.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError("storescu failed: " + " | ".join(errors))
    return elapsed


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants, plus their reaped children.

    Read from ``/proc/<pid>/stat`` (utime, stime, cutime, cstime): a listener process counts
    while it lives, a ``storescp --fork`` child once its parent has reaped it.
    """
    total, pending, seen = 0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue  # the process exited meanwhile
    return total / CLOCK_TICKS


@dataclass
class Run:
    """One measured run: instances per second and the receiver's CPU milliseconds per instance."""

    rate: float
    cpu_ms: float


def measure(receiver: Receiver, files: list[Path], parallel: int, work_dir: Path) -> Run:
    """One run: fresh folder, start the receiver, send, check, stop.

    The receiver's CPU time is taken between the start of the senders and their end: less
    noisy than the wall time when other work shares the machine.
    """
    out_dir = Path(tempfile.mkdtemp(prefix="recv-", dir=work_dir))
    process, port = receiver.start(out_dir)
    try:
        cpu_before = tree_cpu_seconds(process.pid)
        elapsed = send(files, port, receiver.ae_title, parallel)
        cpu = tree_cpu_seconds(process.pid) - cpu_before
    finally:
        Receiver.stop(process)
    count = stored_files(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    if count != len(files):
        raise RuntimeError(f"{receiver.name} stored {count} of {len(files)} instances")
    return Run(len(files) / elapsed, 1000 * cpu / len(files))


# --------------------------------------------------------------------------- our server (child)


def quiet_logging() -> None:
    """Log as the daemon does by default (level info): no per-instance debug lines."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))


def serve(args: argparse.Namespace) -> None:
    """Run our receiver until SIGTERM (the benchmark's child process)."""
    from pacs_sentinel.dicom_io.scp import Receiver as OurReceiver
    from pacs_sentinel.dicom_io.scp import ScpSettings

    quiet_logging()

    settings = ScpSettings(OUR_AE, "127.0.0.1", args.port, fsync=args.fsync, index_synchronous=args.index_sync,
                           fast_poll=not args.slow_poll, max_pdu_size=args.max_pdu)
    data_dir = Path(args.data_dir)
    receiver = OurReceiver(settings, data_dir, data_dir / "sentinel.db", processes=args.processes,
                           log_setup=quiet_logging)
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    receiver.start()
    try:
        while not stopping:
            time.sleep(0.1)
    finally:
        receiver.stop()


# --------------------------------------------------------------------------- report


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.platform()}, {cpu or platform.processor()}, {os.cpu_count()} logical CPUs"


def _version(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


Results = dict[str, dict[int, list[Run]]]


def medians(results: Results) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """Median instances per second and median receiver CPU ms per instance, by receiver and associations."""
    rate = {name: {p: statistics.median(r.rate for r in runs) for p, runs in by_p.items()} for name, by_p in results.items()}
    cpu = {name: {p: statistics.median(r.cpu_ms for r in runs) for p, runs in by_p.items()} for name, by_p in results.items()}
    return rate, cpu


def render(results: Results, ablation: Results, repetitions: int, wall: float) -> str:
    import pynetdicom

    med, cpu = medians(results)
    ours = next(n for n in med if n.startswith("ours"))
    dcmtk_1 = next(n for n in med if n.startswith("DCMTK") and "fork" not in n)
    dcmtk_4 = next(n for n in med if n.startswith("DCMTK") and "fork" in n)
    lines = [
        "## Ingest throughput (C-STORE receive)",
        "",
        f"Generated by `bench/ingest.py --repetitions {repetitions}`. {N_INSTANCES} CT instances "
        f"{SHAPE[0]}x{SHAPE[1]} 16-bit (~520 KB each, explicit VR little endian) sent over loopback by DCMTK "
        "`storescu` (`TCP_NODELAY=1`), over 1 association and over 4 parallel associations (4 `storescu` "
        "processes, 75 files each). Instances per second = 300 / wall time from starting the sender(s) "
        f"until all exited; median of {repetitions} runs, fresh output folder per run.",
        "",
        f"- Machine: {machine()}",
        f"- Date (UTC): {dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()}",
        f"- Python {platform.python_version()}, pynetdicom {pynetdicom.__version__}, pydicom {pydicom.__version__}, "
        f"DCMTK {_version([STORESCP, '--version']).replace('$', '').strip()}",
        f"- Wall time of the whole benchmark: {wall:.0f} s",
        "",
        "| receiver | 1 association (inst/s) | 4 associations (inst/s) | receiver CPU ms/instance (1 / 4) |",
        "|---|---|---|---|",
    ]
    nan = float("nan")
    for name, by_p in med.items():
        label = name.replace(" --fork", "") if name.startswith("DCMTK") else name
        if name.startswith("DCMTK") and "fork" in name:
            continue
        four = med[dcmtk_4][4] if name == dcmtk_1 else by_p.get(4, nan)
        cpu_four = cpu[dcmtk_4][4] if name == dcmtk_1 else cpu[name].get(4, nan)
        label = "DCMTK storescp (`--fork` for 4)" if name == dcmtk_1 else label
        lines.append(f"| {label} | {by_p.get(1, nan):.0f} | {four:.0f} | {cpu[name].get(1, nan):.2f} / {cpu_four:.2f} |")
    r1 = med[ours][1] / med[dcmtk_1][1]
    r4 = med[ours][4] / med[dcmtk_4][4]
    lines += [
        f"| **ratio ours / DCMTK** | **{r1:.2f}** | **{r4:.2f}** | |",
        "",
        "Receiver CPU = user + system time of the receiving process(es) while the senders ran "
        "(`/proc/<pid>/stat`, listener processes and reaped `--fork` children included), per instance: "
        "steadier than the wall time when other work shares the machine.",
        "",
        "Ours: fsync `always` (each file and its name flushed to disk before the answer), every instance indexed in SQLite "
        "before the answer; DCMTK and pynetdicom's app write files without fsync and keep no index. "
        "Target: ours >= 0.5 x DCMTK over 1 and over 4 associations.",
    ]
    if ablation:
        amed, acpu = medians(ablation)
        lines += [
            "",
            "### What each tuning buys (ours, one undone at a time, same run)",
            "",
            "| configuration | 1 association (inst/s) | 4 associations (inst/s) | receiver CPU ms/instance (1 / 4) |",
            "|---|---|---|---|",
        ]
        for name, by_p in amed.items():
            lines.append(f"| {name} | {by_p.get(1, nan):.0f} | {by_p.get(4, nan):.0f} | "
                         f"{acpu[name].get(1, nan):.2f} / {acpu[name].get(4, nan):.2f} |")
    return "\n".join(lines) + "\n"


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{START}\n{section}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


#: Our receiver with one tuning undone each: (label, processes, extra --serve arguments).
ABLATION = [
    ("every tuning on", None, []),
    ("1 process (no listener processes)", 1, []),
    ("pynetdicom's own loops and encoders (no fast path)", None, ["--slow-poll"]),
    ("index synchronous=FULL (fsync per commit)", None, ["--index-sync", "FULL"]),
    ("fsync never", None, ["--fsync", "never"]),
    ("max PDU 16 KB (DCMTK's default)", None, ["--max-pdu", "16384"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="our listener processes (default 2)")
    parser.add_argument("--ablation", action="store_true", help="also measure ours with each tuning undone")
    parser.add_argument("--only-ours", action="store_true", help="measure only our receiver (for tuning)")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--baseline-src", type=Path, action="append", default=[],
                        help="with --only-ours: also measure our receiver run from this source folder "
                             "(e.g. an exported older commit's src/), interleaved; repeatable")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--fsync", default="always", help=argparse.SUPPRESS)
    parser.add_argument("--index-sync", default="NORMAL", help=argparse.SUPPRESS)
    parser.add_argument("--slow-poll", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-pdu", type=int, default=262144, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    for program in (STORESCU, STORESCP, ECHOSCU):
        if shutil.which(program) is None:
            sys.exit(f"{program} is not installed (Debian package dcmtk)")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sentinel-ingest-") as tmp:
        work = Path(tmp)
        files = make_workload(work / "files")
        results: Results = {}
        ablation: Results = {}
        for rep in range(args.repetitions):
            for parallel in (1, 4):
                chosen = receivers(parallel, args.processes)
                if args.only_ours:
                    chosen = chosen[:1] + [our_receiver(args.processes, src=src.resolve()) for src in args.baseline_src]
                    if rep % 2:  # interleave: alternate which variant runs first
                        chosen.reverse()
                for receiver in chosen:
                    run = measure(receiver, files, parallel, work)
                    key = receiver.name.replace(" --fork", "") + (" --fork" if parallel > 1 and receiver.name.startswith("DCMTK") else "")
                    results.setdefault(key, {}).setdefault(parallel, []).append(run)
                    print(f"rep {rep + 1} {parallel} assoc {receiver.name:32s} {run.rate:7.1f} inst/s "
                          f"{run.cpu_ms:6.2f} CPU ms/inst", file=sys.stderr)
                if args.ablation:
                    for label, processes, extra in ABLATION[1:]:
                        receiver = our_receiver(processes or args.processes, extra)
                        run = measure(receiver, files, parallel, work)
                        ablation.setdefault(label, {}).setdefault(parallel, []).append(run)
                        print(f"rep {rep + 1} {parallel} assoc {label:44s} {run.rate:7.1f} inst/s "
                              f"{run.cpu_ms:6.2f} CPU ms/inst", file=sys.stderr)
        if args.ablation:
            ours = next(n for n in results if n.startswith("ours"))
            ablation = {f"{ABLATION[0][0]} ({args.processes} processes)": results[ours], **ablation}
    wall = time.perf_counter() - started
    if args.only_ours:
        rate, cpu = medians(results)
        for name in results:
            print(f"{name}: inst/s {({p: round(v, 1) for p, v in rate[name].items()})} "
                  f"CPU ms/inst {({p: round(v, 2) for p, v in cpu[name].items()})}")
        return
    section = render(results, ablation, args.repetitions, wall)
    print(section)
    if not args.no_doc:
        write_doc(section)


if __name__ == "__main__":
    main()
