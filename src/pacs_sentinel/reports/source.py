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

:func:`patient_study_source` gives highdicom a source with the missing type 2 attributes
present and empty (the source itself is not changed); :func:`character_set` the value our
objects declare: the source's own, with an empty first value written out as ISO 2022 IR 6,
or ISO_IR 192 (UTF-8) when highdicom cannot write the source's — the copied text is decoded
already (pydicom), and UTF-8 holds any of it.
"""

from __future__ import annotations

from highdicom.enum import SpecificCharacterSetValues
from pydicom.dataset import Dataset

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
#: The first value of a multi-valued Specific Character Set when the source leaves it empty.
DEFAULT_REPERTOIRE_WITH_EXTENSIONS = "ISO 2022 IR 6"
#: What our objects declare when highdicom cannot write the source's character set.
UTF8 = "ISO_IR 192"
_WRITABLE = frozenset(value.value for value in SpecificCharacterSetValues)


def character_set(source: Dataset) -> str | list[str] | None:
    """Return the Specific Character Set our objects declare for text copied from ``source``.

    Returns:
        None when the source declares none (or an empty one: the default repertoire); the
        source's value, an empty first value of several written as ``"ISO 2022 IR 6"``; or
        ``"ISO_IR 192"`` when highdicom cannot write that value.
    """
    value = source.get("SpecificCharacterSet")
    values = [] if value is None else [value] if isinstance(value, str) else list(value)
    values = [str(v).strip() for v in values]
    if not any(values):
        return None
    if len(values) > 1 and not values[0]:
        values[0] = DEFAULT_REPERTOIRE_WITH_EXTENSIONS
    if not all(v in _WRITABLE for v in values):
        return UTF8
    return values[0] if len(values) == 1 else values


def patient_study_source(source: Dataset) -> Dataset:
    """Return ``source``, or when it lacks type 2 Patient / Study attributes
    (:data:`TYPE2_PATIENT_STUDY`), a dataset holding the same elements plus those, empty.

    The elements are shared, not copied (pixel data included); ``source`` is not changed.
    """
    missing = [keyword for keyword in TYPE2_PATIENT_STUDY if keyword not in source]
    if not missing:
        return source
    completed = Dataset()
    completed.update(source)
    if hasattr(source, "file_meta"):
        completed.file_meta = source.file_meta
    for keyword in missing:
        setattr(completed, keyword, None)
    return completed
