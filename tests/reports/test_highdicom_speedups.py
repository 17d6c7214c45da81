"""The highdicom speed-ups return what highdicom returns and write the same bytes."""

from __future__ import annotations

import copy
import datetime
import io
import itertools
from contextlib import contextmanager

import highdicom
import pytest
from highdicom import _standard_utils
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacs_sentinel.reports import highdicom_speedups, sr as sr_module
from pacs_sentinel.reports.seg import build_segmentation
from pacs_sentinel.reports.sr import build_qc_report

ATTRIBUTES = ["NumberOfFrames", "PixelData", "FloatPixelData", "DoubleFloatPixelData", "ContentDate",
              "ContentTime", "TotalPixelMatrixRows", "SharedFunctionalGroupsSequence", "NoSuchKeyword"]
EXCLUSIONS = [None, ["IconImageSequence"], ("IconImageSequence", "ReferencedImageSequence")]


def test_installed_for_the_pinned_highdicom():
    assert highdicom_speedups.is_checked_version()
    assert highdicom_speedups.install() is True  # idempotent: already installed on import
    original = highdicom_speedups.original_is_attribute_in_iod()
    assert _standard_utils.is_attribute_in_iod is not original
    assert _standard_utils.is_attribute_in_iod.__wrapped__ is original
    # Every highdicom module that had bound the original now has the memoized one.
    assert highdicom.base.is_attribute_in_iod is _standard_utils.is_attribute_in_iod
    assert highdicom.sr.content.is_attribute_in_iod is _standard_utils.is_attribute_in_iod


def test_other_highdicom_versions_are_not_patched():
    assert not highdicom_speedups.is_checked_version("0.30.0")
    assert not highdicom_speedups.is_checked_version("0.24.1")
    assert not highdicom_speedups.is_checked_version("1.0.0")
    assert not highdicom_speedups.is_checked_version("dev")
    assert highdicom_speedups.is_checked_version("0.28.2")


def _outcome(function, *args):
    """What a call gives: its value, or the type and text of what it raises."""
    try:
        return function(*args)
    except Exception as exc:  # the comparison covers highdicom's own errors too
        return (type(exc), str(exc))


def test_memoized_function_returns_what_the_original_returns():
    original = highdicom_speedups.original_is_attribute_in_iod()
    patched = _standard_utils.is_attribute_in_iod
    outcomes = []
    for sop_class, attribute, excluded in itertools.product(sorted(_standard_utils.get_sop_class_iod_map()),
                                                            ATTRIBUTES, EXCLUSIONS):
        expected = _outcome(original, attribute, sop_class, excluded)
        assert _outcome(patched, attribute, sop_class, excluded) == expected, (sop_class, attribute, excluded)
        # A pydicom UID is the same key as the plain string; asked again, the answer is the same.
        assert _outcome(patched, attribute, UID(sop_class), excluded) == expected
        outcomes.append(expected)
    assert outcomes.count(True) > 100 and outcomes.count(False) > 100  # both answers were compared


def test_memoized_function_raises_like_the_original_for_an_unknown_sop_class():
    for function in (highdicom_speedups.original_is_attribute_in_iod(), _standard_utils.is_attribute_in_iod):
        for _ in range(2):  # not cached: raises again
            with pytest.raises(KeyError, match="No IOD found for SOP Class UID: 1.2.3.4"):
                function("NumberOfFrames", "1.2.3.4")


def test_is_multiframe_image_goes_through_the_memoized_function(volume):
    before = _cache_hits()
    for ds in volume.datasets:
        assert _standard_utils.is_multiframe_image(ds) is False  # CT Image Storage: single-frame IOD
    assert _cache_hits() >= before + len(volume.datasets) - 1


def _cache_hits() -> int:
    # lru_cache of the memoized function: reached through the closure of the wrapper.
    for cell in _standard_utils.is_attribute_in_iod.__closure__ or ():
        info = getattr(cell.cell_contents, "cache_info", None)
        if info is not None:
            return info().hits
    raise AssertionError("memoized function has no lru_cache in its closure")


@contextmanager
def _plain(root):
    """In place of content_not_copied: highdicom's own behaviour, the SR deep-copies the content."""
    yield root


def _fixed_sr_bytes(monkeypatch, volume, seg, result, qc, *, copying: bool) -> bytes:
    uids = iter(f"1.2.826.0.1.3680043.8.498.{n}" for n in range(1, 100))
    monkeypatch.setattr(sr_module, "generate_uid", lambda *a, **k: next(uids))
    fixed = datetime.datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(sr_module, "creation_times", lambda: {
        "series_date": fixed.date(), "series_time": fixed.time(),
        "content_date": fixed.date(), "content_time": fixed.time()})
    if copying:
        monkeypatch.setattr(sr_module, "content_not_copied", _plain)
    document = build_qc_report(volume, seg, result, qc)
    monkeypatch.undo()
    # highdicom stamps these from its own clock reading; they are not what is compared.
    document.InstanceCreationTime = "030405"
    for item in document.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = "20260102030405"
    buffer = io.BytesIO()
    document.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("which", ["one segment", "two segments"])
def test_sr_without_the_content_copy_has_the_same_bytes(monkeypatch, which, volume, seg_result, seg_result_two,
                                                         qc_review, qc_review_two):
    result, qc = (seg_result, qc_review) if which == "one segment" else (seg_result_two, qc_review_two)
    seg = build_segmentation(volume, result, qc)
    copied = _fixed_sr_bytes(monkeypatch, volume, seg, result, qc, copying=True)
    taken_over = _fixed_sr_bytes(monkeypatch, volume, seg, result, qc, copying=False)
    assert len(copied) > 5000
    assert taken_over == copied


def test_the_document_still_deep_copies_afterwards(volume, seg_result, qc_review):
    seg = build_segmentation(volume, seg_result, qc_review)
    document = build_qc_report(volume, seg, seg_result, qc_review)
    root = document.content[0]
    assert "__deepcopy__" not in vars(root)
    again = copy.deepcopy(document)
    assert again.content[0] is not root
    assert again.ContentSequence[0] is not document.ContentSequence[0]
    assert again.ContentSequence == document.ContentSequence


def test_only_the_given_item_is_not_copied():
    root, other = Dataset(), Dataset()
    root.PatientID = other.PatientID = "x"
    with highdicom_speedups.content_not_copied(root):
        assert copy.deepcopy(root) is root
        assert copy.deepcopy(other) is not other  # another object (another thread's) copies as usual
    assert copy.deepcopy(root) is not root
    with pytest.raises(RuntimeError), highdicom_speedups.content_not_copied(root):
        raise RuntimeError("the attribute goes away on errors too")
    assert "__deepcopy__" not in vars(root)


def test_collect_evidence_uses_the_fast_search():
    from highdicom.sr import utils as sr_utils

    assert sr_utils.find_content_items is highdicom_speedups.find_content_items
    assert highdicom_speedups.original_find_content_items() is not highdicom_speedups.find_content_items
    # Other modules keep highdicom's own function.
    assert highdicom.sr.templates.find_content_items is highdicom_speedups.original_find_content_items()


@pytest.mark.parametrize("which", ["one segment", "two segments", "withheld"])
def test_fast_search_finds_what_highdicom_finds(which, volume, seg_result, seg_result_two, qc_review,
                                                 qc_review_two):
    from highdicom.sr import CodedConcept
    from highdicom.sr.enum import ValueTypeValues

    result, qc = (seg_result_two, qc_review_two) if which == "two segments" else (seg_result, qc_review)
    seg = build_segmentation(volume, result, qc)
    document = build_qc_report(volume, seg, result, qc, withheld_seg=which == "withheld")
    original = highdicom_speedups.original_find_content_items()
    found = {}
    subtree = next(item for item in document.ContentSequence if "ContentSequence" in item)
    for root in (document, subtree):
        for value_type in [*ValueTypeValues, "IMAGE", "COMPOSITE"]:
            expected = original(root, value_type=value_type, recursive=True)
            got = highdicom_speedups.find_content_items(root, value_type=value_type, recursive=True)
            assert [id(item) for item in got] == [id(item) for item in expected], value_type
            found[str(value_type)] = len(expected)
        # Queries the fast path does not take give highdicom's answer.
        name = CodedConcept("126010", "DCM", "Imaging Measurements")
        assert highdicom_speedups.find_content_items(root, name=name, recursive=True) == \
            original(root, name=name, recursive=True)
        assert highdicom_speedups.find_content_items(root, value_type="IMAGE") == original(root, value_type="IMAGE")
    assert found["ValueTypeValues.IMAGE"] >= 1 and found["ValueTypeValues.NUM"] >= 2  # both searches found items
    with pytest.raises(AttributeError, match="Content Sequence"):
        highdicom_speedups.find_content_items(Dataset(), value_type="IMAGE", recursive=True)


def test_sr_with_the_fast_search_has_the_same_bytes(monkeypatch, volume, seg_result_two, qc_review_two):
    from highdicom.sr import utils as sr_utils

    seg = build_segmentation(volume, seg_result_two, qc_review_two)
    fast = _fixed_sr_bytes(monkeypatch, volume, seg, seg_result_two, qc_review_two, copying=False)
    with monkeypatch.context() as patch:
        patch.setattr(sr_utils, "find_content_items", highdicom_speedups.original_find_content_items())
        plain = _fixed_sr_bytes(patch, volume, seg, seg_result_two, qc_review_two, copying=False)
    assert len(fast) > 5000 and fast == plain
