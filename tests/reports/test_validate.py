"""Validation before sending: a read-back and dciodvfy stop broken objects, pass good ones."""

from __future__ import annotations

import copy

import pytest
from pydicom.dataset import Dataset

from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.resultset import build_result_set
from pacs_sentinel.reports.validate import check_before_sending, dciodvfy_path, read_back, run_dciodvfy, validate


@pytest.fixture(scope="module")
def result_sets(volume, seg_result, qc_review):  # type: ignore[no-untyped-def]
    return {
        seg_type: build_result_set(volume, seg_result, qc_review, seg_type=seg_type)
        for seg_type in ("BINARY", "LABELMAP")
    }


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
@pytest.mark.parametrize("mode", ["dciodvfy", "roundtrip", "off"])
def test_a_good_result_set_passes_every_mode(result_sets, seg_type: str, mode: str, require_tool) -> None:  # type: ignore[no-untyped-def]
    if mode == "dciodvfy":
        require_tool("dciodvfy")
    check_before_sending(result_sets[seg_type].datasets(), mode)  # type: ignore[arg-type]


def test_read_back_returns_the_highdicom_objects(result_sets) -> None:  # type: ignore[no-untyped-def]
    seg, sr, sc = (read_back(ds) for ds in result_sets["BINARY"].datasets())
    assert type(seg).__name__ == "Segmentation" and seg.pixel_array.any()
    assert type(sr).__name__ == "Comprehensive3DSR"
    assert sc.pixel_array.shape[-1] == 3


def _truncated_pixels(ds: Dataset) -> Dataset:
    broken = copy.deepcopy(ds)
    broken.PixelData = bytes(broken.PixelData)[: len(broken.PixelData) // 3]
    return broken


def test_roundtrip_stops_an_object_whose_pixels_do_not_decode(result_sets) -> None:  # type: ignore[no-untyped-def]
    seg, sr, sc = result_sets["BINARY"].datasets()
    with pytest.raises(ReportError, match=f"OT {sc.SOPInstanceUID} does not read back"):
        check_before_sending([seg, sr, _truncated_pixels(sc)], "roundtrip")
    check_before_sending([seg, sr, _truncated_pixels(sc)], "off")  # off really checks nothing


def test_dciodvfy_stops_an_object_the_read_back_accepts(result_sets, require_tool) -> None:  # type: ignore[no-untyped-def]
    require_tool("dciodvfy")
    seg, sr, sc = result_sets["BINARY"].datasets()
    broken = copy.deepcopy(sr)
    broken.CompletionFlag = "BOGUS"  # an enumerated value dciodvfy knows; pydicom/highdicom read it
    check_before_sending([seg, broken, sc], "roundtrip")
    with pytest.raises(ReportError, match=rf"SR {sr.SOPInstanceUID} fails dciodvfy: .*Completion Flag"):
        check_before_sending([seg, broken, sc], "dciodvfy")


def test_the_label_map_complaints_of_an_outdated_dciodvfy_are_not_errors(result_sets, require_tool) -> None:  # type: ignore[no-untyped-def]
    require_tool("dciodvfy")
    labelmap = result_sets["LABELMAP"].segmentation
    assert validate(labelmap) == []
    broken = copy.deepcopy(labelmap)
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):
        broken.StudyDate = "20241345"  # a real error is still one: there is no 13th month
    assert validate(broken)


def test_without_dciodvfy_the_read_back_decides(result_sets, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("pacs_sentinel.reports.validate.dciodvfy_path", lambda: None)
    assert dciodvfy_path.__module__ == "pacs_sentinel.reports.validate"
    seg, sr, sc = result_sets["BINARY"].datasets()
    check_before_sending([seg, sr, sc], "dciodvfy")
    with pytest.raises(ReportError, match="does not read back"):
        check_before_sending([seg, sr, _truncated_pixels(sc)], "dciodvfy")


def test_written_files_are_checked_as_written(result_sets, tmp_path, require_tool) -> None:  # type: ignore[no-untyped-def]
    require_tool("dciodvfy")
    paths = [p for p in result_sets["BINARY"].write(tmp_path) if p.suffix == ".dcm"]
    assert [p.name for p in paths] == ["SEG.dcm", "SR.dcm", "SC_1.dcm"]
    check_before_sending(paths, "dciodvfy")
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])  # a half-written file is never sent
    with pytest.raises(ReportError, match="SEG .* does not read back"):
        check_before_sending(paths, "dciodvfy")


def test_dciodvfy_quoting_latin1_text_is_a_report_not_a_crash(result_sets, require_tool) -> None:  # type: ignore[no-untyped-def]
    """dciodvfy prints a value it complains about in the object's own bytes: ISO_IR 100 text is
    no UTF-8, and must still give the validator's words, not a UnicodeDecodeError."""
    require_tool("dciodvfy")
    seg, sr, sc = result_sets["BINARY"].datasets()
    broken = copy.deepcopy(sc)
    broken.SpecificCharacterSet = "ISO_IR 100"
    broken.PatientName = "Müller" * 12 + "^Jürgen"  # 79 characters: longer than a PN component may be
    report = run_dciodvfy(broken)
    assert report is not None and any("Patient's Name" in line and "M\ufffdller" in line for line in report.errors)
    with pytest.raises(ReportError, match=rf"OT {sc.SOPInstanceUID} fails dciodvfy: .*Patient's Name"):
        check_before_sending([seg, sr, broken], "dciodvfy")
