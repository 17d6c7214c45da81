"""Sending speed of our storage SCU, with and without TCP_NODELAY, to DCMTK's storescp.

pynetdicom sets no TCP_NODELAY on its sockets; small PDUs then wait for the peer's delayed
ACK. The product's SCU sets it (``dicom_io.scu.NODELAY_HANDLERS``). This measures what that
buys: N small objects (copies of pydicom's CT_small.dcm, 39 KB, new UIDs) and N SR-sized
objects sent over one association to ``/usr/bin/storescp`` (started with TCP_NODELAY=1), three
repetitions, medians. The other direction (DCMTK storescu -> our SCP) is in bench/ingest.py.

Run: ``.venv/bin/python bench/send.py [--count N] [--no-doc]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_section  # noqa: E402

from pacs_sentinel.dicom_io import scu  # noqa: E402
from pacs_sentinel.dicom_io.scu import Peer, send_files  # noqa: E402

STORESCP = "/usr/bin/storescp"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _copies(source: Path, folder: Path, count: int) -> list[Path]:
    ds = pydicom.dcmread(source)
    paths = []
    for index in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _run(paths: list[Path], port: int, nodelay: bool) -> float:
    handlers = scu.NODELAY_HANDLERS
    if not nodelay:
        scu.NODELAY_HANDLERS = []
    try:
        started = time.perf_counter()
        results = send_files(paths, Peer("STORESCP", "127.0.0.1", port), calling_ae="BENCH")
        seconds = time.perf_counter() - started
    finally:
        scu.NODELAY_HANDLERS = handlers
    if not all(r.delivered for r in results):
        raise SystemExit(f"not all delivered: {[r.error for r in results if not r.delivered][:3]}")
    return len(paths) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="objects per run (default 100)")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args(argv)
    if not Path(STORESCP).exists():
        raise SystemExit(f"{STORESCP} is missing (Debian package dcmtk)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        sr_source = tmp_path / "sr.dcm"
        sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
        sr.save_as(sr_source, enforce_file_format=True)
        workloads = {
            f"CT_small ({Path(get_testdata_file('CT_small.dcm')).stat().st_size // 1024} KB)":
                _copies(Path(get_testdata_file("CT_small.dcm")), (tmp_path / "ct").resolve(), args.count)
                if (tmp_path / "ct").mkdir() is None else [],
            f"SR ({sr_source.stat().st_size // 1024} KB)":
                _copies(sr_source, (tmp_path / "sr").resolve(), args.count)
                if (tmp_path / "sr").mkdir() is None else [],
        }
        port = _free_port()
        out = tmp_path / "received"
        out.mkdir()
        receiver = subprocess.Popen([STORESCP, "-aet", "STORESCP", "--ignore", str(port)],
                                    env={**os.environ, "TCP_NODELAY": "1"},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=out)
        time.sleep(0.5)
        rows = []
        try:
            for name, paths in workloads.items():
                figures = {}
                for nodelay in (False, True):
                    rates = [_run(paths, port, nodelay) for _ in range(3)]
                    figures[nodelay] = statistics.median(rates)
                rows.append((name, figures[False], figures[True]))
                print(f"{name}: without TCP_NODELAY {figures[False]:.0f}/s, with {figures[True]:.0f}/s")
        finally:
            receiver.terminate()
            receiver.wait(10)

    lines = [
        "## Sending: our storage SCU to DCMTK storescp, TCP_NODELAY off vs on",
        "",
        machine_line(),
        f"{args.count} objects over one association per run, loopback, storescp `--ignore` with "
        "TCP_NODELAY=1; median of 3 runs (objects per second).",
        "",
        "| objects | without TCP_NODELAY | with TCP_NODELAY (the product) | speed-up |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {off:.0f}/s | {on:.0f}/s | {on / off:.1f}x |" for name, off, on in rows]
    section = "\n".join(lines)
    print(section)
    if not args.no_doc:
        write_section("send", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
