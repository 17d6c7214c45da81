"""Which series goes to which pipeline."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from pacs_sentinel.daemon.config import PipelineConfig
from pacs_sentinel.daemon.routing import SeriesCandidate, matches, select_series


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
