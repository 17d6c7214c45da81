"""How the SEG builder encodes frames (issue 6, large volumes): transfer syntax, workers, no copies.

Uncompressed Explicit VR Little Endian stays the default; JPEG 2000 lossless (BINARY and
LABELMAP) and RLE lossless (LABELMAP) are available through ``build_segmentation`` and must
decode to exactly the mask. The single-frame BINARY path hands highdicom a view of the mask
instead of two copies of it (75 MiB each for a 512x512x300 volume).
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.overlay import representative_slice
from pacs_sentinel.reports.seg import SEG_TRANSFER_SYNTAXES, build_segmentation
from pacs_sentinel.results import SegmentationResult

from .conftest import LIVER, SPLEEN, make_result


def read_back(seg: hd.seg.Segmentation) -> hd.seg.Segmentation:
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.seg.segread(buffer)


def pixels_by_source(volume, seg: hd.seg.Segmentation, segments: list[int]) -> np.ndarray:
    """``(slices, rows, cols, segments)`` of the SEG read back, in the volume's slice order."""
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    return read_back(seg).get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=segments, assert_missing_frames_are_empty=True
    )


def disjoint(volume) -> SegmentationResult:
    """Two non-overlapping segments (a label map can hold them exactly)."""
    result = make_result(volume, [LIVER, SPLEEN])
    mask = result.mask.copy()
    mask[1] = False
    mask[1, 4:7, 50:60, 48:60] = True
    return SegmentationResult(probabilities=result.probabilities, mask=mask, labels=result.labels,
                              model_name=result.model_name, model_version=result.model_version)


def test_uncompressed_is_the_default(volume, seg_result, qc_review):
    seg = build_segmentation(volume, seg_result, qc_review)
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert SEG_TRANSFER_SYNTAXES[0] == ExplicitVRLittleEndian


@pytest.mark.parametrize("workers", [0, 2])
def test_binary_jpeg2000_lossless_decodes_to_the_mask(volume, seg_result_two, qc_review_two, workers):
    seg = build_segmentation(volume, seg_result_two, qc_review_two, transfer_syntax_uid=JPEG2000Lossless,
                             workers=workers)
    assert seg.file_meta.TransferSyntaxUID == JPEG2000Lossless
    pixels = pixels_by_source(volume, seg, [1, 2])
    np.testing.assert_array_equal(pixels.astype(bool), np.moveaxis(seg_result_two.mask, 0, -1))
    # Empty frames are still left out: one frame per segment and non-empty slice.
    assert int(seg.NumberOfFrames) == int(seg_result_two.mask.reshape(2, volume.array.shape[0], -1).any(axis=2).sum())


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_labelmap_compressed_decodes_to_the_labels(volume, qc_review_two, syntax):
    result = disjoint(volume)
    seg = build_segmentation(volume, result, qc_review_two, seg_type="LABELMAP", transfer_syntax_uid=syntax)
    assert seg.file_meta.TransferSyntaxUID == syntax
    frames = read_back(seg)
    uids = {str(ds.SOPInstanceUID): i for i, ds in enumerate(volume.datasets)}
    expected = np.zeros(volume.array.shape, dtype=np.uint8)
    expected[result.mask[0]] = 1
    expected[result.mask[1]] = 2
    decoded = np.asarray(frames.pixel_array).reshape(-1, *volume.array.shape[1:])
    for frame, item in zip(decoded, frames.PerFrameFunctionalGroupsSequence, strict=True):
        index = uids[str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        np.testing.assert_array_equal(frame, expected[index])


def test_binary_jpeg2000_passes_dciodvfy(volume, seg_result_two, qc_review_two, dciodvfy_clean):
    seg = build_segmentation(volume, seg_result_two, qc_review_two, transfer_syntax_uid=JPEG2000Lossless)
    dciodvfy_clean(seg, "Segmentation")


@pytest.mark.parametrize(
    ("seg_type", "syntax"),
    [("BINARY", RLELossless), ("BINARY", JPEGBaseline8Bit), ("LABELMAP", JPEGBaseline8Bit), ("BINARY", "1.2.3")],
)
def test_unsuitable_transfer_syntax_is_refused_by_name(volume, seg_result, qc_review, seg_type, syntax):
    with pytest.raises(ReportError, match=f"transfer syntax {syntax} is not available for a {seg_type} SEG"):
        build_segmentation(volume, seg_result, qc_review, seg_type=seg_type, transfer_syntax_uid=syntax)


@pytest.mark.parametrize("workers", [-1, 1.5, True, "2"])
def test_bad_workers_are_refused(volume, seg_result, qc_review, workers):
    with pytest.raises(ReportError, match="workers must be an integer >= 0"):
        build_segmentation(volume, seg_result, qc_review, transfer_syntax_uid=JPEG2000Lossless, workers=workers)


def test_binary_frames_are_a_view_of_the_mask_not_a_copy(volume, seg_result_two, qc_review_two, monkeypatch):
    handed: list[np.ndarray] = []
    real = hd.seg.Segmentation

    def recording(*args, **kwargs):
        handed.append(kwargs["pixel_array"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hd.seg, "Segmentation", recording)
    before = seg_result_two.mask.copy()
    build_segmentation(volume, seg_result_two, qc_review_two)
    assert len(handed) == 1
    assert handed[0].dtype == np.uint8
    assert np.shares_memory(handed[0], seg_result_two.mask)
    np.testing.assert_array_equal(seg_result_two.mask, before)  # and highdicom did not write into it


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
def test_uint8_mask_gives_the_same_frames_as_bool(volume, qc_review_two, seg_type):
    result = disjoint(volume)
    as_uint8 = SegmentationResult(probabilities=result.probabilities, mask=result.mask.astype(np.uint8),
                                  labels=result.labels, model_name=result.model_name,
                                  model_version=result.model_version)
    from_bool = read_back(build_segmentation(volume, result, qc_review_two, seg_type=seg_type))
    from_uint8 = read_back(build_segmentation(volume, as_uint8, qc_review_two, seg_type=seg_type))
    np.testing.assert_array_equal(from_uint8.pixel_array, from_bool.pixel_array)
    assert int(from_uint8.NumberOfFrames) == int(from_bool.NumberOfFrames)


def test_representative_slice_of_several_labels_is_the_largest_union(volume):
    result = disjoint(volume)
    mask = result.mask.copy()
    mask[1] = False
    small = int(np.argsort(mask[0].reshape(mask.shape[1], -1).sum(axis=1))[-3])  # not the liver's largest
    mask[1, small] = True  # the second label fills this whole slice: largest union
    two = SegmentationResult(probabilities=result.probabilities, mask=mask, labels=result.labels,
                             model_name=result.model_name, model_version=result.model_version)
    assert representative_slice(two) == small
    one = SegmentationResult(probabilities=result.probabilities, mask=mask[:1], labels=result.labels[:1],
                             model_name=result.model_name, model_version=result.model_version)
    assert representative_slice(one) == int(np.argmax(mask[0].reshape(mask.shape[1], -1).sum(axis=1)))
