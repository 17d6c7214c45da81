"""What every result object takes over from its source image: patient and study identity, and
the character set that identity is written in.

highdicom copies the Patient and General Study modules from the first source image, but reads
the type 2 attributes among them (Patient's Birth Date and Sex, Study ID, Accession Number,
Study Date and Time, ...) by attribute access: a source that leaves one out — type 2 means
"present, may be empty", and senders omit them anyway — fails the object. It also checks
Specific Character Set against the defined terms it knows, which refuses values that are
correct and common: an empty first value of a multi-valued set (``\\ISO 2022 IR 87``, the
usual Japanese declaration; PS3.3 C.12.1.1.2 reads it as ISO 2022 IR 6), ISO 2022 IR 149
(Korean), or a wrong but harmless ``ISO_IR 6``.

It parses Patient's Sex, Birth Date and Study Date/Time and refuses what senders often write
(``U``, ``Male``, ``1970-01-31``, ``10:30:00``). And it copies other values as they are: a
value the PACS stored although it breaks its VR's rules (a 90-character Study Description, a
TAB, a backslash that makes two values of one) makes our object fail dciodvfy, and the whole
result set is then not sent.

:func:`patient_study_source` gives highdicom a source with the missing type 2 attributes
present and empty, and such values repaired (the source itself is not changed);
:func:`character_set` the value our objects declare: the source's own, with an empty first
value written out as ISO 2022 IR 6, or ISO_IR 192 (UTF-8) when highdicom cannot write the
source's, or when the source declares none but holds text outside the default repertoire —
the copied text is decoded already (pydicom), and UTF-8 holds any of it.
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Iterable

from highdicom.enum import SpecificCharacterSetValues
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

#: Type 2 attributes of the Patient and General Study modules that highdicom reads from the
#: source by name; each is written empty when the source has none.
TYPE2_PATIENT_STUDY: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
#: Identifiers a PACS, RIS or worklist matches our objects to the patient and the order by:
#: copied exactly, never repaired. One that breaks its VR fails the check before sending
#: (the job FAILS, saying which), rather than file the result under an ID nobody issued.
IDENTIFIERS: frozenset[str] = frozenset({
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "AccessionNumber",
    "StudyID",
})
#: The first value of a multi-valued Specific Character Set when the source leaves it empty.
DEFAULT_REPERTOIRE_WITH_EXTENSIONS = "ISO 2022 IR 6"
#: What our objects declare when highdicom cannot write the source's character set.
UTF8 = "ISO_IR 192"
_WRITABLE = frozenset(value.value for value in SpecificCharacterSetValues)
#: Longest value of the text VRs whose values are repaired (PS3.5 6.2; PN: each component group).
MAX_LENGTH: dict[str, int] = {"LO": 64, "SH": 16, "PN": 64}
#: Control characters, which none of those VRs may hold (decoded text has no ESC left).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Text VRs whose values are searched for characters outside the default repertoire.
_TEXT_VRS = frozenset({"LO", "SH", "PN", "LT", "ST", "UT", "UC"})


def character_set(source: Dataset, added_text: Iterable[str] = ()) -> str | list[str] | None:
    """Return the Specific Character Set of an object holding text copied from ``source``
    and ``added_text`` (what the object adds: labels and names from a model card or a
    third-party SEG, see :func:`text_values`).

    Returns:
        None when the source declares none (or an empty one: the default repertoire); the
        source's value, an empty first value of several written as ``"ISO 2022 IR 6"``; or
        ``"ISO_IR 192"`` when highdicom cannot write that value, or when that value cannot
        encode some of ``added_text``.
    """
    declared = _source_character_set(source)
    if declared != UTF8 and not all(_encodes(text, declared) for text in added_text):
        return UTF8
    return declared


def _encodes(text: str, declared: str | list[str] | None) -> bool:
    """Whether ``text`` can be written in the character set ``declared`` (None: default repertoire)."""
    if text.isascii():
        return True
    terms = [] if declared is None else [declared] if isinstance(declared, str) else declared
    for term in terms:
        if term == DEFAULT_REPERTOIRE_WITH_EXTENSIONS:
            continue  # ASCII (pydicom reads it as Latin-1, which it is not)
        try:
            text.encode(python_encoding[term])
            return True
        except (KeyError, LookupError, UnicodeError):
            continue
    return False


def text_values(*datasets: Dataset) -> list[str]:
    """Every text value in ``datasets`` and their sequences, for :func:`character_set`."""
    found = []
    for dataset in datasets:
        for element in dataset.iterall():
            if element.VR in _TEXT_VRS:
                found += [str(v) for v in _values(element.value)]
    return found


def _source_character_set(source: Dataset) -> str | list[str] | None:
    value = source.get("SpecificCharacterSet")
    values = [] if value is None else [value] if isinstance(value, str) else list(value)
    values = [str(v).strip() for v in values]
    if not any(values):
        # Undeclared, so read as the default repertoire (pydicom: as Latin-1); text outside
        # it would be invalid as it is: UTF-8 holds what was read.
        return UTF8 if _has_non_ascii_text(source) else None
    if len(values) > 1 and not values[0]:
        values[0] = DEFAULT_REPERTOIRE_WITH_EXTENSIONS
    if not all(v in _WRITABLE for v in values):
        return UTF8
    return values[0] if len(values) == 1 else values


def _has_non_ascii_text(source: Dataset) -> bool:
    for element in source:
        if element.VR in _TEXT_VRS and any(not str(v).isascii() for v in _values(element.value)):
            return True
    return False


def _values(value: object) -> list[object]:
    if value is None:
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def repaired_value(keyword: str, vr: str, value: object) -> str | None:
    """Return the value of a LO, SH or PN element made valid, or None when it is valid.

    Repairs, in this order: several values where the data dictionary allows one (a backslash
    in the text) are joined with ``/``; control characters (TAB, CR, LF, ...) become
    spaces; a value longer than :data:`MAX_LENGTH` (for PN: a component group) is cut.
    Text is never added; trailing spaces are dropped.
    """
    values = _values(value)
    text_values = [str(v) for v in values]
    single = dictionary_VM(keyword) == "1" if keyword else True
    if single and len(text_values) > 1:
        text_values = ["/".join(text_values)]
    limit = MAX_LENGTH[vr]
    repaired = []
    for text in text_values:
        text = _CONTROL.sub(" ", text)
        if vr == "PN":
            text = "=".join(_cut_name(group, limit) for group in text.split("="))
        else:
            text = text[:limit].rstrip()
        repaired.append(text)
    if repaired == [str(v) for v in values]:
        return None
    return "\\".join(repaired)


def _cut_name(group: str, limit: int) -> str:
    """A PN component group cut to ``limit`` characters: its longest component loses the end,
    one character at a time, so that family and given names both stay."""
    components = group.split("^")
    while len("^".join(components)) > limit:
        longest = max(range(len(components)), key=lambda i: len(components[i]))
        components[longest] = components[longest][:-1]
    return "^".join(c.rstrip() for c in components)


#: Patient's Sex as senders write it -> the enumerated value (M, F, O); anything else is
#: unknown, which the type 2 attribute says by being empty.
_SEXES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}


def _sex(text: str) -> str:
    return _SEXES.get(text.strip().upper(), "")


def _date(text: str) -> str:
    """A DA value (YYYYMMDD); ``1970-01-31``, ``1970.01.31`` and ``1970/01/31`` are read too;
    anything else is unknown (empty)."""
    text = text.strip()
    if re.fullmatch(r"\d{4}([-./])\d{2}\1\d{2}", text):
        text = re.sub(r"[-./]", "", text)
    try:
        datetime.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return ""
    return text


def _time(text: str) -> str:
    """A TM value (HH[MM[SS[.F]]]); ``10:30:00`` (the old ACR-NEMA form) is read too;
    anything else is unknown (empty)."""
    text = text.strip()
    if re.fullmatch(r"\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?", text):
        text = text.replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", text)
    if match is None or (match.group(4) and not match.group(3)):
        return ""
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups()[:3])
    return text if hours < 24 and minutes < 60 and seconds <= 60 else ""


def _age(text: str) -> str:
    """An AS value (nnnD/W/M/Y); a bare number of up to three digits is read as years."""
    text = text.strip().upper()
    if re.fullmatch(r"\d{3}[DWMY]", text):
        return text
    return f"{int(text):03d}Y" if re.fullmatch(r"\d{1,3}", text) else ""


#: Attributes the objects take over whose values highdicom parses (and refuses when they break
#: the rules), or that dciodvfy checks by format: keyword -> the value made valid.
_FORMATTED = {
    "PatientSex": _sex,
    "PatientBirthDate": _date,
    "PatientBirthTime": _time,
    "StudyDate": _date,
    "StudyTime": _time,
    "PatientAge": _age,
}


def _repairs(source: Dataset) -> dict[str, object]:
    """keyword -> repaired value of every top-level LO, SH and PN element of ``source`` that
    breaks its VR's rules (but :data:`IDENTIFIERS`), and of the :data:`_FORMATTED` attributes
    whose value is not valid."""
    found: dict[str, object] = {}
    for element in source:
        if element.VR in MAX_LENGTH and element.keyword and element.keyword not in IDENTIFIERS:
            repaired = repaired_value(element.keyword, element.VR, element.value)
            if repaired is not None:
                found[element.keyword] = repaired
    for keyword, valid in _FORMATTED.items():
        if keyword in source and source[keyword].value not in (None, ""):
            text = str(source[keyword].value)
            if valid(text) != text:
                found[keyword] = valid(text)
    return found


def _declared(source: Dataset) -> str | list[str] | None:
    value = source.get("SpecificCharacterSet")
    if value is None or isinstance(value, str):
        return value or None
    return list(value)


def _decoded_text(source: Dataset) -> dict[str, object]:
    """keyword -> the value of every top-level element holding non-ASCII text, as read with
    the source's character set (to be encoded again in ours): a text element's text, or a
    copy of a sequence whose items hold such text (decoded: a sequence item keeps the bytes
    it was read with until a value is asked for)."""
    found: dict[str, object] = {}
    for element in source:
        if not element.keyword:
            continue
        if element.VR in _TEXT_VRS and not all(str(v).isascii() for v in _values(element.value)):
            found[element.keyword] = "\\".join(str(v) for v in _values(element.value))
        elif element.VR == "SQ" and not all(text.isascii() for text in text_values(*element.value)):
            found[element.keyword] = copy.deepcopy(element.value)  # text_values decoded every item
    return found


def patient_study_source(source: Dataset, *, written_in: str | list[str] | None) -> Dataset:
    """Return ``source``, or a dataset holding the same elements made fit to copy: type 2
    Patient / Study attributes the source lacks (:data:`TYPE2_PATIENT_STUDY`) present and
    empty, every LO, SH and PN value that breaks its VR's rules repaired
    (:func:`repaired_value`), and Patient's Sex, Age, Birth Date/Time and Study Date/Time in a
    form highdicom or dciodvfy refuses rewritten (empty when unreadable) — highdicom copies
    or parses them as they are, and one invalid value fails the object, so nothing is sent.

    ``written_in`` is the character set the object declares (:func:`character_set`); when it
    is not the source's, the source's text goes in as decoded text, to be encoded again.

    The elements are shared, not copied (pixel data included); ``source`` is not changed.
    """
    missing = [keyword for keyword in TYPE2_PATIENT_STUDY if keyword not in source]
    repairs = _repairs(source)
    if written_in != _declared(source):
        # Written in another character set than read: the text goes in as text, not as the
        # source's bytes.
        repairs = {**_decoded_text(source), **repairs}
    if not missing and not repairs:
        return source
    completed = Dataset()
    completed.update(source)
    if hasattr(source, "file_meta"):
        completed.file_meta = source.file_meta
    for keyword in missing:
        setattr(completed, keyword, None)
    for keyword, value in repairs.items():
        # A new element: setting the value of the shared one would change the source.
        element = source[keyword]
        completed[element.tag] = DataElement(element.tag, element.VR, value)
    return completed
