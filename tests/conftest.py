"""Session-wide test settings and helpers shared by every test package."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pydicom.data
import pytest
import structlog
from pydicom import config as pydicom_config

from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scp import ScpSettings, StorageScp
from pacs_sentinel.dicom_io.spool import Spool

# Strict when writing: every object we build must be valid (STYLE.md, highdicom habit).
pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE

IN_CI = os.environ.get("CI", "").lower() == "true"
_STRUCTLOG_AT_START = dict(structlog.get_config())


@pytest.fixture(autouse=True)
def _isolated_structlog() -> Iterator[None]:
    """Each test starts with the logging configuration the session started with and leaves no configuration behind: a test
    that runs a CLI command in-process configures logging (level, processors), which would
    otherwise hide the INFO lines a later test captures with ``structlog.testing.capture_logs``."""
    structlog.configure(**_STRUCTLOG_AT_START)
    yield
    structlog.configure(**_STRUCTLOG_AT_START)


#: The test files pydicom ships in its package folder.
PYDICOM_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def shipped_path(name: str) -> Path:
    """A file pydicom ships, from its package folder (``get_testdata_file`` may download);
    the test is skipped when this pydicom version does not ship it."""
    path = PYDICOM_TEST_FILES / name
    if not path.exists():
        pytest.skip(f"pydicom does not ship {name} in this version")
    return path


def shipped(name: str) -> pydicom.Dataset:
    """:func:`shipped_path`, read."""
    return pydicom.dcmread(shipped_path(name))


def require_program(path: str, package: str) -> str:
    """Return ``path`` if the program is installed; skip locally, fail in CI, when not.

    DCMTK's programs are called by full path: pynetdicom installs scripts of the same
    names (storescu, storescp, echoscu) into the virtual environment.
    """
    if shutil.which(path) is None:
        message = f"{path} is not installed (Debian package {package}; .ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def fsync_log(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths flushed with ``os.fsync`` (opened with ``os.open``) while the test runs, in order."""
    synced: list[str] = []
    real_fsync, real_open = os.fsync, os.open
    opened: dict[int, str] = {}

    def open_(path, flags, *args):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, *args)
        opened[fd] = os.fspath(path)
        return fd

    def fsync(fd: int) -> None:
        synced.append(opened.get(fd, "?"))
        real_fsync(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.fixture
def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK programs on loopback (no delayed-ACK waits)."""
    return {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StorageScp]:
    """An in-process storage SCP standing in for the PACS (AE title PACS)."""
    spool = Spool(tmp_path / "pacs", Database(tmp_path / "pacs" / "pacs.db"))
    server = StorageScp(ScpSettings("PACS", "127.0.0.1", free_port()), spool)
    server.start()
    yield server
    server.stop()


def unencodable_ct(path: Path) -> Path:
    """Write pydicom's ``CT_small.dcm`` to ``path`` with the value length of Columns changed
    from 2 to 3: pydicom still reads the file (the rest is misparsed) but cannot write it back."""
    shipped("CT_small.dcm").save_as(path, enforce_file_format=True)  # explicit VR little endian, with file meta
    raw = bytearray(path.read_bytes())
    columns = raw.find(bytes([0x28, 0, 0x11, 0]) + b"US" + bytes([2, 0]))
    assert columns > 0
    raw[columns + 6] = 3
    path.write_bytes(bytes(raw))
    return path


def received_modalities(pacs: StorageScp) -> list[str]:
    """Modalities of everything the PACS fixture received, sorted."""
    paths = [row[0] for row in pacs.spool.database.connection().execute("SELECT path FROM instances")]
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in paths)


#: Manufacturer of the third-party SEGs the tests write (anything but PACS Sentinel).
THIRD_PARTY_MANUFACTURER = "Vendor AI Inc"


def make_third_party_seg(sources: list[pydicom.Dataset], masks: list, labels: list[tuple[str, str, str]], *,
                         seg_type: str = "BINARY", tracking: bool = True) -> pydicom.Dataset:
    """A SEG written by "another vendor" with highdicom, as a vendor AI would send it.

    Args:
        sources: The source instances; frame ``k`` of each mask belongs to ``sources[k]``
            (any order: the SEG keeps it).
        masks: One boolean ``(len(sources), rows, cols)`` array per segment.
        labels: (code value, scheme, meaning) of each segment's segmented property type.
        seg_type: ``"BINARY"``, ``"FRACTIONAL"`` (0.8 inside, 0.3 in a ring around each
            mask) or ``"LABELMAP"``.
        tracking: Give each segment a Tracking ID/UID (both are optional in a SEG).

    Returns:
        The SEG as a pydicom dataset with file meta, read back from its bytes.
    """
    import io

    import highdicom as hd
    import numpy as np
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algorithm = hd.AlgorithmIdentificationSequence(name="VendorSeg", family=codes.cid7162.ArtificialIntelligence,
                                                   version="3.1")
    descriptions = []
    for number, (value, scheme, meaning) in enumerate(labels, start=1):
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"{meaning} {number}",
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept(value, scheme, meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid() if tracking else None,
            tracking_id=f"vendor {meaning} {number}" if tracking else None,
        ))
    stacked = np.stack([np.asarray(m, dtype=bool) for m in masks], axis=-1)
    if seg_type == "FRACTIONAL":
        # 0.8 inside each mask; 0.3 (below half of the maximum: outside) in a ring around it.
        from scipy import ndimage

        ring = np.stack([ndimage.binary_dilation(stacked[..., i], iterations=2) & ~stacked[..., i]
                         for i in range(stacked.shape[-1])], axis=-1)
        pixels = np.where(stacked, 0.8, np.where(ring, 0.3, 0.0)).astype(np.float32)
    elif seg_type == "LABELMAP":
        pixels = np.zeros(stacked.shape[:3], dtype=np.uint8)
        for index in range(stacked.shape[-1]):
            pixels[stacked[..., index]] = index + 1
    else:
        pixels = stacked.astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues[seg_type],
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=300,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=THIRD_PARTY_MANUFACTURER,
        manufacturer_model_name="VendorSeg",
        software_versions="3.1",
        device_serial_number="V-0001",
        series_description="Vendor AI liver",
    )
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))
