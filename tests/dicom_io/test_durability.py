"""A SIGKILL of the SCP mid-transfer loses no acknowledged instance and indexes no half file.

The SCP runs in a child process; DCMTK's storescu (the usual sender) and a pynetdicom sender
that records every 0x0000 it gets push instances at it concurrently; the child is killed
while both are sending. Then the spool is reconciled as at start-up and checked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.spool import TEMP_SUFFIX, Spool
from tests.conftest import free_port, require_program

SCP_SCRIPT = """
import sys, time
from pathlib import Path
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scp import ScpSettings, StorageScp
from pacs_sentinel.dicom_io.spool import Spool
port, data_dir = int(sys.argv[1]), Path(sys.argv[2])
spool = Spool(data_dir, Database(data_dir / "index.db"))
spool.reconcile()
StorageScp(ScpSettings("SENTINEL", "127.0.0.1", port, fsync="always"), spool).start()
while True:
    time.sleep(1)
"""

#: Acknowledgements each sender must have collected before the SCP is killed.
ACKS_BEFORE_KILL = 15


def _instances(folder: Path, prefix: str, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    paths = []
    for k in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{prefix}.{k + 1}"
        path = folder / f"{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _wait_for_echo(port: int, child: subprocess.Popen) -> None:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert child.poll() is None, "the SCP child exited"
        assoc = ae.associate("127.0.0.1", port, ae_title="SENTINEL")
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.1)
    pytest.fail("the SCP child did not answer C-ECHO")


class _RecordingSender(threading.Thread):
    """Sends instances one association at a time, recording each one acknowledged with 0x0000."""

    def __init__(self, port: int, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.port, self.files = port, files
        self.acknowledged: list[str] = []

    def run(self) -> None:
        ae = AE(ae_title="RECORDER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="SENTINEL")
        if not assoc.is_established:
            return
        for path in self.files:
            ds = pydicom.dcmread(path)
            status = assoc.send_c_store(ds)
            if not assoc.is_established or "Status" not in status or status.Status != 0x0000:
                break
            self.acknowledged.append(ds.SOPInstanceUID)
        if assoc.is_established:
            assoc.release()


def _storescu_acknowledged(log: str, files: list[Path]) -> list[str]:
    """The instances storescu reports as stored: it sends in order, one response per request."""
    responses = [line for line in log.splitlines() if "Received Store Response" in line]
    acknowledged = 0
    for line in responses:
        if "(Success)" not in line:
            break
        acknowledged += 1
    return [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files[:acknowledged]]


def test_sigkill_mid_transfer_loses_no_acknowledged_instance(tmp_path: Path, dcmtk_env: dict[str, str]) -> None:
    storescu = require_program("/usr/bin/storescu", "dcmtk")
    # storescu outpaces the Python sender by far: it gets more files, and starts second.
    dcmtk_files = _instances(tmp_path / "dcmtk", "1", 1200)
    recorder_files = _instances(tmp_path / "recorder", "2", 400)
    data_dir, port = tmp_path / "node", free_port()
    child = subprocess.Popen([sys.executable, "-c", SCP_SCRIPT, str(port), str(data_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_echo(port, child)
        recorder = _RecordingSender(port, recorder_files)
        recorder.start()
        deadline = time.monotonic() + 30
        while not recorder.acknowledged and recorder.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert recorder.acknowledged and recorder.is_alive(), "the Python sender did not get going"
        storescu_log = tmp_path / "storescu.log"
        with storescu_log.open("w") as log:
            sender = subprocess.Popen([storescu, "-v", "-aet", "MODALITY", "-aec", "SENTINEL", "127.0.0.1", str(port),
                                       *map(str, dcmtk_files)], env=dcmtk_env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            dcmtk_acks = storescu_log.read_text().count("Received Store Response (Success)")
            if dcmtk_acks >= ACKS_BEFORE_KILL and len(recorder.acknowledged) >= ACKS_BEFORE_KILL:
                break
            assert sender.poll() is None and recorder.is_alive(), "a sender finished before the kill"
            time.sleep(0.005)
        else:
            pytest.fail("the senders got too few acknowledgements")
        os.kill(child.pid, signal.SIGKILL)  # both senders are mid-transfer
        child.wait(timeout=10)
        sender.wait(timeout=30)
        recorder.join(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    acknowledged = _storescu_acknowledged(storescu_log.read_text(), dcmtk_files) + recorder.acknowledged
    assert len(acknowledged) >= 2 * ACKS_BEFORE_KILL
    assert len(acknowledged) < len(dcmtk_files) + len(recorder_files), "the kill came after the transfer"

    spool = Spool(data_dir, Database(data_dir / "index.db"))
    spool.reconcile()  # what the daemon does at start-up
    assert not list(spool.root.rglob(f"*{TEMP_SUFFIX}"))
    rows = {r["sop_instance_uid"]: Path(r["path"]) for r in spool.database.connection()["instances"].rows}
    missing = [uid for uid in acknowledged if uid not in rows]
    assert not missing, f"{len(missing)} acknowledged instances are not indexed"
    expected_pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm")).PixelData
    for uid, path in rows.items():  # every indexed file is complete
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == uid
        assert ds.PixelData == expected_pixels
    on_disk = {p for p in spool.root.rglob("*.dcm")}
    assert on_disk == set(rows.values())
