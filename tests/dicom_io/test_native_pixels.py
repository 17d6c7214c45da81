"""Uncompressed pixel data read directly gives exactly what pydicom decodes; the rest goes to pydicom."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from pacs_sentinel.dicom_io import series
from pacs_sentinel.dicom_io.series import load_series_files, native_stored_values
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from tests.conftest import shipped



def as_frames(ds: Dataset) -> np.ndarray:
    """pydicom's own decoding, with the frame axis always present."""
    pixels = pixel_array(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return pixels.reshape(frames, int(ds.Rows), int(ds.Columns))


def assert_same_as_pydicom(ds: Dataset) -> None:
    ours = native_stored_values(ds)
    assert ours is not None
    theirs = as_frames(ds)
    assert ours.dtype == theirs.dtype
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    assert not ours.flags.writeable  # a view of the file's bytes, or a corrected copy: never written to


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "rtdose.dcm", "rtdose_1frame.dcm"])
def test_shipped_uncompressed_files(name: str) -> None:
    assert_same_as_pydicom(shipped(name))


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "MR_truncated.dcm"])
def test_other_files_go_to_pydicom(name: str) -> None:
    assert native_stored_values(shipped(name)) is None


def _with_stored_bits(signed: int, stored: int, allocated: int = 16) -> Dataset:
    ds = copy.deepcopy(shipped("CT_small.dcm"))
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 2 ** allocated, size=int(ds.Rows) * int(ds.Columns), dtype=np.uint64)
    raw[:6] = [0, 1, (1 << stored) - 1, 1 << (stored - 1), (1 << allocated) - 1, 0xF123 % (1 << allocated)]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, stored, stored - 1, signed
    ds.PixelData = raw.astype(f"<u{allocated // 8}").tobytes()
    return ds


@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("stored", [12, 15, 16])
def test_bits_above_bits_stored_are_handled_as_pydicom_does(signed: int, stored: int) -> None:
    # Garbage in the unused high bits: masked off (unsigned) or replaced by the sign (signed).
    assert_same_as_pydicom(_with_stored_bits(signed, stored))


@pytest.mark.parametrize("signed", [0, 1])
def test_eight_bit_data(signed: int) -> None:
    assert_same_as_pydicom(_with_stored_bits(signed, 8, allocated=8))


def test_odd_length_padding_and_short_data() -> None:
    ds = _with_stored_bits(0, 8, allocated=8)
    ds.PixelData = ds.PixelData + b"\x00"  # the padding byte of odd-length data
    assert_same_as_pydicom(ds)
    ds.PixelData = ds.PixelData[:-10]  # too short: pydicom says what is wrong
    assert native_stored_values(ds) is None


def test_colour_and_float_go_to_pydicom() -> None:
    ds = copy.deepcopy(shipped("CT_small.dcm"))
    ds.SamplesPerPixel = 3
    assert native_stored_values(ds) is None
    ds = copy.deepcopy(shipped("CT_small.dcm"))
    del ds.PixelData
    ds.FloatPixelData = np.zeros(int(ds.Rows) * int(ds.Columns), dtype="<f4").tobytes()
    assert native_stored_values(ds) is None


def test_a_phantom_series_loads_to_the_same_volume_either_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_ct_series(make_ct_phantom(11, shape=(12, 48, 48), spacing=(5.0, 8.0, 8.0)), tmp_path, seed=11)
    direct = load_series_files(paths)
    monkeypatch.setattr(series, "native_stored_values", lambda ds: None)
    decoded = load_series_files(paths)
    assert direct.array.dtype == decoded.array.dtype == np.float32
    np.testing.assert_array_equal(direct.array, decoded.array)
    assert direct.array.min() < -900 and direct.array.max() > 0  # HU after the rescale, not raw values
