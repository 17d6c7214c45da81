"""What the result objects take over from the source images: patient and study identity, and
the character set it is written in — whatever optional attributes the source leaves out and
whichever character set it declares (docs/conformance.md §6)."""

from __future__ import annotations

import copy
import re

import pytest
from pydicom.dataset import Dataset

from pacs_sentinel.dicom_io.series import Volume, load_volume
from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.kos import build_quality_issue_kos
from pacs_sentinel.reports.resultset import build_result_set
from pacs_sentinel.reports.validate import check_before_sending
from pacs_sentinel.results import Verdict
from tests.reports.conftest import LIVER, make_ct_series, make_qc, make_result, roundtrip

#: Type 2 attributes of the Patient and General Study modules; a source may leave them out.
OPTIONAL_PATIENT_STUDY = ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                          "ReferringPhysicianName", "StudyDate", "StudyTime")
#: What each object must carry as the source has it.
COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
          "AccessionNumber", "StudyDate", "StudyTime", "StudyDescription", "PatientAge")


def _volume(edit) -> Volume:  # type: ignore[no-untyped-def]
    datasets = make_ct_series(seed=5)
    for ds in datasets:
        edit(ds)
    return load_volume([roundtrip(ds) for ds in datasets])  # as read from the spool: values not decoded yet


def _objects(volume: Volume) -> list[Dataset]:
    result = make_result(volume, [LIVER])
    qc = make_qc(volume, result, Verdict.NEEDS_REVIEW, [], 0.3)
    result_set = build_result_set(volume, result, qc)
    kos = build_quality_issue_kos(volume.datasets, qc, model_name="organ-seg", series_number=904)
    return [*result_set.datasets(), kos]


def _leave_out_optional(ds: Dataset) -> None:
    for keyword in OPTIONAL_PATIENT_STUDY:
        delattr(ds, keyword)


def test_a_source_without_the_optional_patient_and_study_attributes(require_tool) -> None:
    volume = _volume(_leave_out_optional)
    objects = _objects(volume)
    assert [ds.Modality for ds in objects] == ["SEG", "SR", "OT", "KO"]
    check_before_sending(objects, "dciodvfy" if require_tool("dciodvfy") else "roundtrip")
    for ds in objects:
        for keyword in OPTIONAL_PATIENT_STUDY:
            assert keyword in ds and ds[keyword].value in ("", None), (ds.Modality, keyword)
        assert str(ds.PatientName) == "Phantom^Reports"
    for keyword in OPTIONAL_PATIENT_STUDY:
        assert keyword not in volume.datasets[0], "the source itself is left as it was"


def test_every_object_carries_the_source_patient_and_study() -> None:
    volume = _volume(lambda ds: setattr(ds, "PatientAge", "054Y"))
    source = volume.datasets[0]
    for ds in _objects(volume):
        for keyword in COPIED:
            assert str(ds.get(keyword)) == str(source.get(keyword)), (ds.Modality, keyword)


def _names(character_set: str | list[str], name: str):  # type: ignore[no-untyped-def]
    def edit(ds: Dataset) -> None:
        ds.SpecificCharacterSet = character_set
        ds.PatientName = name
    return edit


# (source Specific Character Set, patient name, what the objects declare)
CHARACTER_SETS = {
    "latin1": ("ISO_IR 100", "Müller^Jürgen", "ISO_IR 100"),
    "utf8": ("ISO_IR 192", "Müller^Jürgen=山田^太郎", "ISO_IR 192"),
    # an empty first value means ISO 2022 IR 6 (PS3.3 C.12.1.1.2): Japanese sites send these
    "japanese": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    "japanese-explicit": (["ISO 2022 IR 6", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎",
                          ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    # highdicom 0.28 does not know Korean (IR 149): written in UTF-8, which holds any text
    "korean": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "ISO_IR 192"),
    "empty": ("", "Phantom^Reports", None),
    "ascii-misnamed": ("ISO_IR 6", "Phantom^Reports", "ISO_IR 192"),
}


@pytest.mark.parametrize("case", sorted(CHARACTER_SETS))
def test_objects_declare_a_character_set_that_holds_the_source_text(case: str, require_tool) -> None:
    character_set, name, declared = CHARACTER_SETS[case]
    volume = _volume(_names(character_set, name))
    objects = _objects(volume)
    check_before_sending(objects, "dciodvfy" if require_tool("dciodvfy") else "roundtrip")
    for ds in objects:
        value = ds.get("SpecificCharacterSet")
        assert (value if value is None or isinstance(value, str) else list(value)) == declared, ds.Modality
        assert str(roundtrip(ds).PatientName) == name, ds.Modality


def _raw(keyword: str, value: bytes):  # type: ignore[no-untyped-def]
    def edit(ds: Dataset) -> None:
        ds[keyword].value = value
    return edit


def _set(**values: object):  # type: ignore[no-untyped-def]
    def edit(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return edit


# Sources a PACS stores although their values break the VR rules (PS3.5 6.2), and what our
# objects carry instead of failing dciodvfy (and so sending nothing).
INVALID_SOURCES = {
    "backslash": (_set(StudyDescription="CT\\abdomen"), "StudyDescription", "CT/abdomen"),
    "tab": (_set(StudyDescription="CT\tabdomen"), "StudyDescription", "CT abdomen"),
    "long-description": (_set(StudyDescription="D" * 90), "StudyDescription", "D" * 64),
    # a PN component group holds 64 characters: the longest component is cut, all stay
    "long-name": (_set(PatientName="Verylong" * 12 + "^Given"), "PatientName", ("Verylong" * 12)[:58] + "^Given"),
    # Values highdicom parses itself, and refuses when they break the rules (common in the wild)
    "sex-U": (_raw("PatientSex", b"U"), "PatientSex", ""),
    "sex-word": (_raw("PatientSex", b"Female"), "PatientSex", "F"),
    "sex-lower-case": (_raw("PatientSex", b"m"), "PatientSex", "M"),
    "birth-date-with-dashes": (_raw("PatientBirthDate", b"1970-01-31"), "PatientBirthDate", "19700131"),
    "study-date-nonsense": (_raw("StudyDate", b"unknown"), "StudyDate", ""),
    "study-time-with-colons": (_raw("StudyTime", b"10:30:00"), "StudyTime", "103000"),
    "age-without-unit": (_raw("PatientAge", b"54"), "PatientAge", "054Y"),
    # No Specific Character Set, Latin-1 bytes (read as such): declared UTF-8 in our objects.
    "undeclared-latin1": (lambda ds: (delattr(ds, "SpecificCharacterSet"),
                                      _raw("PatientName", b"M\xfcller^J\xfcrgen")(ds)), "PatientName", "Müller^Jürgen"),
}


@pytest.mark.parametrize("case", sorted(INVALID_SOURCES))
def test_values_invalid_in_the_source_are_repaired_not_copied(case: str, require_tool) -> None:
    edit, keyword, expected = INVALID_SOURCES[case]
    volume = _volume(lambda ds: (ds.setdefault("PatientAge", "054Y"), edit(ds)))
    before = volume.datasets[0][keyword].value
    objects = _objects(volume)
    check_before_sending(objects, "dciodvfy" if require_tool("dciodvfy") else "roundtrip")
    for ds in objects:
        assert str(roundtrip(ds)[keyword].value) == expected, ds.Modality
    assert volume.datasets[0][keyword].value == before, "the source itself is left as it was"


@pytest.mark.parametrize("keyword,value,tag", [("AccessionNumber", "A" * 20, "(0x0008,0x0050)"),
                                               ("PatientID", "P\tI" + "D" * 70, "(0x0010,0x0020)")],
                         ids=["long-accession", "patient-id-with-tab"])
def test_identifiers_are_copied_exactly_even_when_they_break_their_vr(keyword: str, value: str, tag: str,
                                                                      require_tool) -> None:
    """A cut or cleaned Patient ID or Accession Number would file the result under an ID
    nobody issued: it is copied as it is, and the check before sending refuses the object,
    naming the attribute (the job FAILS with that reason, nothing is sent)."""
    volume = _volume(_set(**{keyword: value}))
    objects = _objects(volume)
    for ds in objects:
        assert str(roundtrip(ds)[keyword].value) == value, ds.Modality
    if require_tool("dciodvfy"):
        with pytest.raises(ReportError, match=re.escape(tag)):
            check_before_sending(objects, "dciodvfy")


def _undeclared(ds: Dataset) -> None:
    del ds.SpecificCharacterSet


@pytest.mark.parametrize("edit", [_undeclared, _names("ISO_IR 100", "Müller^Jürgen"),
                                  _names(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎")],
                         ids=["no-charset", "latin1", "japanese"])
def test_text_the_objects_add_is_covered_by_their_character_set(edit, require_tool) -> None:
    """A label from a model card, or a vendor's segment label, tracking ID and code meaning in
    the seg-qc SR, may hold characters the source's character set has not: the objects then
    declare UTF-8 rather than fail to be written (or be written invalid)."""
    from pacs_sentinel.dicom_io.seg_masks import map_segments
    from pacs_sentinel.qc.segqc import judge_segmentation
    from pacs_sentinel.reports.resultset import build_seg_qc_result_set
    from pacs_sentinel.results import Code, SegmentLabel
    from tests.conftest import make_third_party_seg
    from tests.reports.conftest import sphere_mask

    volume = _volume(edit)
    name = str(volume.datasets[0].PatientName)
    leber = SegmentLabel(name="Leber (Lebergewebe) ü", property_category=LIVER.property_category,
                         property_type=Code("10200004", "SCT", "Leber 肝臓"), tracking_id="organ-seg Leber ü")
    result = make_result(volume, [leber])
    qc = make_qc(volume, result, Verdict.NEEDS_REVIEW, [], 0.3)
    objects = _objects_of(build_result_set(volume, result, qc).datasets())

    # The vendor writes UTF-8 whatever the images say (highdicom 0.28 cannot write "\\ISO 2022 IR 87").
    vendor_sources = [copy.deepcopy(ds) for ds in volume.datasets]
    for ds in vendor_sources:
        ds.SpecificCharacterSet = "ISO_IR 192"
    vendor = make_third_party_seg(vendor_sources, [sphere_mask(*volume.array.shape)], [("10200004", "SCT", "Liver")])
    vendor.SpecificCharacterSet = "ISO_IR 192"
    segment = vendor.SegmentSequence[0]
    segment.SegmentLabel, segment.TrackingID = "Leber 肝臓", "Leber-ü-1"
    segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning = "Leber 肝臓"
    segment.SegmentAlgorithmName = "VendorSeg™"
    mapped = map_segments(roundtrip(vendor), volume)
    judged, vendor_qc, _ = judge_segmentation(volume, mapped, [], accept_threshold=0.5)
    objects += _objects_of(build_seg_qc_result_set(volume, mapped.dataset, judged, vendor_qc).datasets())

    check_before_sending(objects, "dciodvfy" if require_tool("dciodvfy") else "roundtrip")
    for ds in objects:
        again = roundtrip(ds)
        assert str(again.PatientName) == name, ds.Modality
        if ds.Modality in ("SEG", "SR"):
            assert again.SpecificCharacterSet == "ISO_IR 192", ds.Modality
    seg_again = roundtrip(objects[0])
    assert seg_again.SegmentSequence[0].SegmentLabel == "Leber (Lebergewebe) ü"
    vendor_sr = roundtrip(objects[3])
    texts = {str(element.value) for element in vendor_sr.iterall() if element.VR in ("UT", "LO")}
    assert {"Leber-ü-1", "Leber 肝臓", "VendorSeg™"} <= texts


def _objects_of(datasets: list[Dataset]) -> list[Dataset]:
    """Each object as it is sent (Part 10 bytes), so that writing it is part of the test."""
    return [roundtrip(ds) for ds in datasets]


def test_sequences_taken_over_are_written_in_the_objects_character_set() -> None:
    """When an object declares another character set than the source (UTF-8 for a label the
    source's cannot hold), text inside the sequences it copies (Procedure Code Sequence of the
    General Study module) is encoded again too, not written as the source's bytes."""
    from pacs_sentinel.results import SegmentLabel

    def edit(ds: Dataset) -> None:
        _names("ISO_IR 100", "Müller^Jürgen")(ds)
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "X1", "99LOCAL", "CT Bauch Übersicht"
        ds.ProcedureCodeSequence = [code]

    volume = _volume(edit)
    leber = SegmentLabel(name="Leber 肝臓", property_category=LIVER.property_category,
                         property_type=LIVER.property_type, tracking_id="organ-seg Leber")
    result = make_result(volume, [leber])
    seg = roundtrip(build_result_set(volume, result, make_qc(volume, result, Verdict.ACCEPTED, [], 0.9)).segmentation)
    assert seg.SpecificCharacterSet == "ISO_IR 192"
    assert str(seg.PatientName) == "Müller^Jürgen"
    assert seg.ProcedureCodeSequence[0].CodeMeaning == "CT Bauch Übersicht"
