"""Which series goes to which pipeline."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from pacs_sentinel.daemon.config import PipelineConfig
from pacs_sentinel.daemon.routing import SeriesCandidate, ThirdPartySeg, matches, rejection_reason, select_series


def _candidate(uid: str, files: int, frames: int | None = None, **attributes: object) -> SeriesCandidate:
    header = Dataset()
    for keyword, value in attributes.items():
        setattr(header, keyword, value)
    if frames is not None:
        header.NumberOfFrames = frames
    return SeriesCandidate(uid, [Path(f"{uid}-{i}.dcm") for i in range(files)], header)


PIPELINE = PipelineConfig(name="seg", model="demo:organ-seg", match={"Modality": ["CT"], "BodyPartExamined": ["abdomen"]})


def test_every_match_attribute_must_have_an_allowed_value_case_insensitively() -> None:
    assert matches(PIPELINE, _candidate("1", 1, Modality="CT", BodyPartExamined="ABDOMEN").header)
    assert not matches(PIPELINE, _candidate("1", 1, Modality="CT", BodyPartExamined="CHEST").header)
    assert not matches(PIPELINE, _candidate("1", 1, Modality="CT").header)
    assert matches(PipelineConfig(name="x", model="m", match={"ImageType": ["AXIAL"]}),
                   _candidate("1", 1, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]).header)


def test_the_rejection_reason_names_the_series_and_the_rules_they_fail() -> None:
    # It was "no pipeline matches any series of the study", whatever the study held.
    cls = PipelineConfig(name="cls", kind="classification", model="demo:cxr-cls", match={"Modality": ["DX"]})
    mr = _candidate("1.2.1", 20, Modality="MR")
    chest = _candidate("1.2.2", 30, Modality="CT", BodyPartExamined="CHEST")
    assert rejection_reason([PIPELINE, cls], [mr, chest]) == (
        "no pipeline matches any series of the study: series 1.2.1 (MR): seg: Modality is 'MR', not one of ['CT'], "
        "BodyPartExamined is absent, not one of ['abdomen']; cls: Modality is 'MR', not one of ['DX'] | "
        "series 1.2.2 (CT): seg: BodyPartExamined is 'CHEST', not one of ['abdomen']; "
        "cls: Modality is 'CT', not one of ['DX']")
    many = [_candidate(f"1.3.{i}", 1, Modality="MR") for i in range(5)]
    reason = rejection_reason([PIPELINE], many)
    assert reason.endswith(" | and 2 more series") and reason.count("series 1.3.") == 3
    assert rejection_reason([PIPELINE], []) == "no pipeline matches any series of the study: it holds no image series"


def test_the_rejection_reason_names_a_third_party_seg_whose_series_was_never_received() -> None:
    """Found from outside: a SEG referencing a series the study lacks was rejected with "no
    third-party SEG references it" about the CT that was there, naming neither SEG nor series."""
    qc = PipelineConfig(name="vendor-qc", kind="seg-qc", match={"Modality": ["CT"]})
    header = Dataset()
    header.SOPInstanceUID = "1.9.9"
    seg = ThirdPartySeg("1.9", Path("seg.dcm"), header, ("1.2.7",))
    ct = _candidate("1.2.2", 30, Modality="CT")
    assert rejection_reason([qc], [ct], [seg]) == (
        "no pipeline matches any series of the study: series 1.2.2 (CT): vendor-qc: no third-party SEG references it"
        " | third-party SEG 1.9.9 references series 1.2.7, which the study does not hold (not received)")
    assert rejection_reason([qc], [], [seg]).endswith(
        ": it holds no image series | third-party SEG 1.9.9 references series 1.2.7, which the study does not "
        "hold (not received)")
    assert rejection_reason([PIPELINE], [ct], [seg]).count("third-party SEG") == 0  # no seg-qc pipeline


def test_the_series_with_most_images_is_chosen_and_frames_count() -> None:
    scout = _candidate("1", 2, Modality="CT", BodyPartExamined="ABDOMEN")
    axial = _candidate("2", 60, Modality="CT", BodyPartExamined="ABDOMEN")
    enhanced = _candidate("3", 1, frames=200, Modality="CT", BodyPartExamined="ABDOMEN")
    mr = _candidate("4", 300, Modality="MR", BodyPartExamined="ABDOMEN")
    assert select_series(PIPELINE, [scout, axial, mr]) is axial
    assert select_series(PIPELINE, [scout, axial, enhanced, mr]) is enhanced
    assert select_series(PIPELINE, [mr]) is None
    # A series too short for the model is still selected: loading it fails the job with a clear reason.
    assert select_series(PIPELINE, [scout]) is scout


def test_series_selection_policies() -> None:
    axial = [1, 0, 0, 0, 1, 0]
    coronal = [1, 0, 0, 0, 0, -1]
    thick_axial = _candidate("1", 60, Modality="CT", ImageOrientationPatient=axial, SliceThickness=5)
    thin_axial = _candidate("2", 40, Modality="CT", ImageOrientationPatient=axial, SliceThickness=1.25)
    thin_coronal = _candidate("3", 30, Modality="CT", ImageOrientationPatient=coronal, SliceThickness=0.6)
    series = [thick_axial, thin_axial, thin_coronal]

    def pipeline(policy: str) -> PipelineConfig:
        return PipelineConfig(name="p", model="m", match={"Modality": ["CT"]}, series_selection=policy)

    assert select_series(pipeline("most-images"), series) is thick_axial
    assert select_series(pipeline("thinnest"), series) is thin_coronal
    assert select_series(pipeline("thinnest-axial"), series) is thin_axial


def test_match_regex_is_searched_case_insensitively() -> None:
    pipeline = PipelineConfig(name="p", model="m", match={"Modality": ["CT"]},
                              match_regex={"SeriesDescription": "portal|venous"})
    assert matches(pipeline, _candidate("1", 1, Modality="CT", SeriesDescription="Abdomen PORTAL 1.25mm").header)
    assert not matches(pipeline, _candidate("1", 1, Modality="CT", SeriesDescription="Arterial").header)


def test_a_study_of_non_image_objects_holds_no_image_series(tmp_path: Path) -> None:
    """An RT Plan has no image (no Rows): it was a candidate, and the rejection listed the
    ``match`` rules it fails instead of saying that the study holds no image series."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, RTPlanStorage, generate_uid

    from pacs_sentinel.daemon.routing import read_candidates

    by_series = {}
    for sop_class, modality in ((RTPlanStorage, "RTPLAN"), (BasicTextSRStorage, "SR")):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", generate_uid(), modality
        path = tmp_path / f"{modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        by_series[str(ds.SeriesInstanceUID)] = [path]
    candidates = read_candidates(by_series)
    assert candidates == []
    assert rejection_reason([PIPELINE], candidates) == \
        "no pipeline matches any series of the study: it holds no image series"
    images, _ = _study(tmp_path)  # an image series of the same study still is a candidate
    assert [c.series_uid for c in read_candidates({**by_series, **images})] == list(images)


# ----------------------------------------------------------------------------- seg-qc pipelines

SEG_QC = PipelineConfig(name="vendor-qc", kind="seg-qc", match={"Modality": ["CT"]})


def _write_seg(folder: Path, sources: list, *, own: bool = False) -> Path:
    import numpy as np

    from pacs_sentinel.reports.identity import MANUFACTURER, MODEL_NAME
    from tests.conftest import make_third_party_seg

    mask = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), dtype=bool)
    mask[:, 10:20, 10:20] = True
    seg = make_third_party_seg(sources, [mask], [("10200004", "SCT", "Liver")])
    if own:  # as if our own SEG came back from the PACS
        seg.Manufacturer, seg.ManufacturerModelName = MANUFACTURER, MODEL_NAME
    path = folder / f"{seg.SOPInstanceUID}.dcm"
    seg.save_as(path, enforce_file_format=True)
    return path


def _study(tmp_path: Path) -> tuple[dict[str, list[Path]], list]:
    from tests.reports.conftest import make_ct_series

    series = make_ct_series(slices=4, rows=32, cols=32)
    files = []
    for ds in series:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return {str(series[0].SeriesInstanceUID): files}, series


def test_third_party_segs_are_found_and_our_own_left_out(tmp_path: Path) -> None:
    from pacs_sentinel.daemon.routing import read_third_party_segs

    by_series, series = _study(tmp_path)
    vendor = _write_seg(tmp_path, series)
    own = _write_seg(tmp_path, series, own=True)
    for path in (vendor, own):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        by_series[str(header.SeriesInstanceUID)] = [path]

    segs = read_third_party_segs(by_series)

    assert [seg.path for seg in segs] == [vendor]
    assert segs[0].referenced_series == (str(series[0].SeriesInstanceUID),)


def test_seg_qc_judges_segs_on_matching_series_and_selects_no_image_series(tmp_path: Path) -> None:
    from pacs_sentinel.daemon.routing import matching_pipelines, read_candidates, read_third_party_segs, segs_to_judge

    by_series, series = _study(tmp_path)
    vendor = _write_seg(tmp_path, series)
    seg_series = str(pydicom.dcmread(vendor, stop_before_pixels=True).SeriesInstanceUID)
    by_series[seg_series] = [vendor]
    candidates = read_candidates(by_series)
    segs = read_third_party_segs(by_series)
    ct_uid = str(series[0].SeriesInstanceUID)
    organ = PipelineConfig(name="organ-seg", model="demo:organ-seg")
    mr_qc = PipelineConfig(name="mr-qc", kind="seg-qc", match={"Modality": ["MR"]})

    assert [c.series_uid for c in candidates] == [ct_uid]  # a SEG is never an image input
    assert select_series(SEG_QC, candidates) is None
    assert [(s.path, c.series_uid) for s, c in segs_to_judge(SEG_QC, candidates, segs)] == [(vendor, ct_uid)]
    assert segs_to_judge(mr_qc, candidates, segs) == []
    assert matching_pipelines([organ, SEG_QC, mr_qc], candidates, segs) == {
        "organ-seg": [ct_uid], "vendor-qc": [seg_series, ct_uid]}
    # Without a third-party SEG the seg-qc pipeline has nothing to do.
    assert matching_pipelines([organ, SEG_QC], candidates, []) == {"organ-seg": [ct_uid]}
