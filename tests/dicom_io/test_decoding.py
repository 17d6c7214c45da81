"""Compressed pixel data loads to the same pixels pydicom decodes (pylibjpeg plugins).

Files: the compressed variants pydicom ships (read from its package folder, never downloaded)
and, where DCMTK is installed, a phantom series recompressed by ``dcmcjpeg``/``dcmcjpls``/
``dcmcrle`` for the JPEG processes pydicom ships no grayscale file of (lossless SV1, baseline).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from pacs_sentinel.dicom_io.series import decode_frame, load_series_files, load_volume
from pacs_sentinel.errors import SeriesError
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from tests.conftest import require_program, shipped



def pydicom_modality_values(ds: Dataset) -> np.ndarray:
    """What pydicom itself decodes, after its own modality LUT."""
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)


#: Lossless encodings of MR_small.dcm that pydicom ships: each must give the original pixels.
LOSSLESS_MR = [
    ("MR_small_RLE.dcm", "RLE Lossless"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless Image Compression"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 Image Compression (Lossless Only)"),
    ("MR_small_bigendian.dcm", "Explicit VR Big Endian"),
    ("MR_small_implicit.dcm", "Implicit VR Little Endian"),
]


@pytest.mark.parametrize(("name", "syntax"), LOSSLESS_MR)
def test_lossless_mr_loads_to_the_uncompressed_original(name: str, syntax: str) -> None:
    original = load_volume([shipped("MR_small.dcm")], min_slices=1)
    ds = shipped(name)
    assert ds.file_meta.TransferSyntaxUID.name == syntax
    volume = load_volume([ds], min_slices=1)
    assert np.array_equal(volume.array, original.array)
    assert np.array_equal(volume.array[0], pydicom_modality_values(ds))
    assert volume.spacing == original.spacing and volume.origin == original.origin


#: Compressed grayscale files pydicom ships that have patient geometry (load as a volume).
WITH_GEOMETRY = [
    ("693_J2KI.dcm", "JPEG 2000 Image Compression"),  # lossy J2K CT, 512x512, rescaled to HU
    ("J2K_pixelrep_mismatch.dcm", "JPEG 2000 Image Compression (Lossless Only)"),  # signedness fixed up
]


@pytest.mark.parametrize(("name", "syntax"), WITH_GEOMETRY)
def test_compressed_ct_loads_to_the_pixels_pydicom_decodes(name: str, syntax: str) -> None:
    ds = shipped(name)
    assert ds.file_meta.TransferSyntaxUID.name == syntax
    volume = load_volume([ds], min_slices=1)
    assert volume.array.shape == (1, int(ds.Rows), int(ds.Columns))
    assert np.array_equal(volume.array[0], pydicom_modality_values(ds))


#: Compressed grayscale files without ImagePositionPatient: decoded through decode_frame.
WITHOUT_GEOMETRY = [
    ("JPEG2000.dcm", "JPEG 2000 Image Compression"),
    ("JPGExtended.dcm", "JPEG Extended (Process 2 and 4)"),
    ("JPEGLSNearLossless_16.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression"),
    ("JPEGLSNearLossless_08.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression"),
    ("image_dfl.dcm", "Deflated Explicit VR Little Endian"),
]


@pytest.mark.parametrize(("name", "syntax"), WITHOUT_GEOMETRY)
def test_compressed_frame_decodes_to_the_pixels_pydicom_decodes(name: str, syntax: str) -> None:
    ds = shipped(name)
    assert ds.file_meta.TransferSyntaxUID.name == syntax
    pixels = decode_frame(ds)
    assert pixels.dtype == np.float32
    assert np.array_equal(pixels, pydicom_modality_values(ds))


def test_jpeg_lossy_decodes_as_pydicom_does_or_fails_with_a_clear_message() -> None:
    """JPEG-lossy.dcm (12-bit JPEG extended) needs GDCM: the pylibjpeg plugins refuse it."""
    ds = shipped("JPEG-lossy.dcm")
    try:
        expected = pydicom_modality_values(ds)
    except Exception:  # noqa: BLE001 - whatever pydicom raises, we must turn it into a SeriesError
        with pytest.raises(SeriesError) as info:
            decode_frame(ds)
        assert re.match(
            rf"^cannot decode pixel data of {re.escape(str(ds.SOPInstanceUID))} "
            r"\(JPEG Extended \(Process 2 and 4\)\): \S", str(info.value))
        assert "\n" not in str(info.value)
    else:
        assert np.array_equal(decode_frame(ds), expected)


def test_corrupt_compressed_data_is_a_series_error() -> None:
    ds = shipped("MR_small_RLE.dcm")
    ds.PixelData = ds.PixelData[:200]  # truncated fragment
    with pytest.raises(SeriesError, match=r"^cannot decode pixel data of .* \(RLE Lossless\): "):
        load_volume([ds], min_slices=1)


def test_colour_images_are_refused() -> None:
    with pytest.raises(SeriesError, match=r"has colour pixel data \(RGB\); only grayscale images"):
        decode_frame(shipped("SC_rgb_rle.dcm"))


def test_frame_number_out_of_range() -> None:
    with pytest.raises(SeriesError, match=r"has no frame 2 \(it has 1\)$"):
        decode_frame(shipped("CT_small.dcm"), 2)


# --- JPEG processes pydicom ships no grayscale file of, encoded by DCMTK -----------------------

#: (program, options, transfer syntax name, lossless)
DCMTK_ENCODINGS = [
    ("/usr/bin/dcmcjpeg", ["+e1"], "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])", True),
    ("/usr/bin/dcmcjpeg", ["+el"], "JPEG Lossless, Non-Hierarchical (Process 14)", True),
    ("/usr/bin/dcmcjpeg", ["+ee"], "JPEG Extended (Process 2 and 4)", False),
    ("/usr/bin/dcmcjpeg", ["+eb"], "JPEG Baseline (Process 1)", False),
    ("/usr/bin/dcmcjpls", ["+el"], "JPEG-LS Lossless Image Compression", True),
    ("/usr/bin/dcmcrle", [], "RLE Lossless", True),
]


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(make_ct_phantom(5, shape=(4, 32, 48)), tmp_path_factory.mktemp("ct"), seed=5)


@pytest.mark.parametrize(("program", "options", "syntax", "lossless"), DCMTK_ENCODINGS,
                         ids=[f"{Path(p).name}{''.join(o)}" for p, o, _, _ in DCMTK_ENCODINGS])
def test_series_compressed_by_dcmtk_loads(phantom_files: list[Path], tmp_path: Path, program: str,
                                          options: list[str], syntax: str, lossless: bool) -> None:
    require_program(program, "dcmtk")
    original = load_series_files(phantom_files)
    compressed = []
    for path in phantom_files:
        out = tmp_path / path.name
        subprocess.run([program, *options, str(path), str(out)], check=True, capture_output=True)
        compressed.append(out)
    datasets = [pydicom.dcmread(p) for p in compressed]
    assert {ds.file_meta.TransferSyntaxUID.name for ds in datasets} == {syntax}
    volume = load_series_files(reversed(compressed))
    expected = np.stack([pydicom_modality_values(ds) for ds in datasets])
    # Baseline is 8-bit: DCMTK rescales the 12-bit data and writes a fractional slope, which
    # we apply in float32 and pydicom in float64.
    np.testing.assert_allclose(volume.array, expected, rtol=0, atol=1e-3)
    assert volume.spacing == pytest.approx(original.spacing)
    assert volume.origin == pytest.approx(original.origin)
    if lossless:
        assert np.array_equal(volume.array, original.array)
