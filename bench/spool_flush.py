"""What one stored instance costs the disk: the sealed one-flush store against the careful order.

:meth:`Spool.store_dataset` writes a new instance sealed, links it to its final name and
flushes it once (plus its folder only where the filesystem needs it);
:meth:`Spool.store` (a whole file whose preamble the spool does not own) keeps the careful
order every instance had before: ``fdatasync`` of the temporary file, rename, ``fsync`` of the
folder. Both write the same 512x512 16-bit CT instance (about 520 KB) and index it. Measured
with 1 and 4 threads storing at once, on an idle disk and on a busy one (a background process
writing 16 MB chunks without flushing, as a worker writing results would: on ext4 every journal
commit then waits for that dirty data). Medians of three rounds of 150 instances per cell.

Run: ``.venv/bin/python bench/spool_flush.py [--count N] [--no-doc]`` on a quiet machine; it
writes the ``spool_flush`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, write_section  # noqa: E402

from pacs_sentinel.dicom_io.index import Database  # noqa: E402
from pacs_sentinel.dicom_io.spool import (  # noqa: E402
    InstanceInfo,
    Spool,
    file_meta,
    filesystem_type,
    read_instance_info,
)

ROUNDS = 3
BUSY_CHUNK = 16 * 1024 * 1024


def _instance() -> tuple[bytes, InstanceInfo]:
    """One 512x512 CT slice's data set as a C-STORE carries it, and its attributes."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 512
    ds.PixelData = np.random.default_rng(0).integers(0, 2000, (512, 512), dtype=np.uint16).tobytes()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    encoded = buffer.getvalue()
    return encoded, read_instance_info(io.BytesIO(encoded), str(pydicom.uid.ExplicitVRLittleEndian))


def _busy_writer(folder: str, stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    """Keep dirty data in the page cache of the spool's filesystem until told to stop."""
    chunk = os.urandom(BUSY_CHUNK)
    path = os.path.join(folder, "busy.bin")
    while not stop.is_set():
        with open(path, "wb") as handle:
            for _ in range(16):  # 256 MB, then start over (the old data is dropped)
                if stop.is_set():
                    break
                handle.write(chunk)


def _round(kind: str, threads: int, count: int, encoded: bytes, info: InstanceInfo, folder: Path) -> float:
    """Milliseconds of wall time per stored instance for one round."""
    spool = Spool(folder, Database(folder / "index.db"))
    meta = file_meta(info, implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID, source_ae="BENCH")
    per_thread = count // threads

    def work(offset: int) -> None:
        for k in range(per_thread):
            one = InstanceInfo(**{**info.__dict__, "sop_instance_uid": f"{info.sop_instance_uid}.{offset + k}"})
            if kind == "sealed":
                spool.store_dataset(encoded, one, calling_ae="BENCH",
                                    implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID)
            else:
                spool.store(meta + encoded, one, calling_ae="BENCH")

    workers = [threading.Thread(target=work, args=(t * per_thread,)) for t in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return 1000 * (time.perf_counter() - started) / (per_thread * threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=150, help="instances per round (default 150)")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    encoded, info = _instance()
    root = Path(tempfile.mkdtemp(prefix="sentinel-flush-", dir=Path.cwd()))
    kinds = {"careful": "careful order (fdatasync, rename, folder fsync): before",
             "sealed": "sealed, linked, one fsync: now"}
    results: dict[tuple[str, str, int], list[float]] = {}
    started = time.perf_counter()
    try:
        for disk in ("idle", "busy"):
            stop = multiprocessing.Event()
            writer = None
            if disk == "busy":
                writer = multiprocessing.Process(target=_busy_writer, args=(str(root), stop), daemon=True)
                writer.start()
                time.sleep(2.0)  # let dirty data build up
            try:
                for rnd in range(ROUNDS):
                    for threads in (1, 4):
                        order = list(kinds) if rnd % 2 == 0 else list(kinds)[::-1]
                        for kind in order:
                            folder = Path(tempfile.mkdtemp(dir=root))
                            ms = _round(kind, threads, args.count, encoded, info, folder)
                            results.setdefault((disk, kind, threads), []).append(ms)
                            print(f"{disk:4s} {kind:8s} {threads} thread(s): {ms:6.2f} ms/instance", flush=True)
            finally:
                stop.set()
                if writer is not None:
                    writer.join(timeout=30)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - started
    fs = filesystem_type(Path.cwd()) or "unknown"
    lines = [
        "## Spool: what one stored instance costs the disk (`bench/spool_flush.py`)",
        "",
        f"{machine_line()} Spool filesystem: {fs}. Wall time {wall:.0f} s.",
        "",
        f"One ~{len(encoded) // 1024} KB CT instance stored and indexed per call, {args.count} per round, "
        f"medians of {ROUNDS} rounds (kinds interleaved); milliseconds of wall time per instance. "
        "Busy disk: a background process writes 16 MB chunks without flushing (dirty page cache, "
        "as a worker writing results makes).",
        "",
        "| disk | store | 1 thread (ms/instance) | 4 threads (ms/instance) |",
        "|---|---|---|---|",
    ]
    for disk in ("idle", "busy"):
        for kind, label in kinds.items():
            one = statistics.median(results[(disk, kind, 1)])
            four = statistics.median(results[(disk, kind, 4)])
            lines.append(f"| {disk} | {label} | {one:.2f} | {four:.2f} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_doc:
        write_section("spool_flush", section)


if __name__ == "__main__":
    main()
