"""Key Object Selection document that tells the PACS a study's AI result needs review.

With ``[review] send_kos = true`` a result whose verdict is *Needs review* is sent with a KOS
(highdicom :class:`~highdicom.ko.KeyObjectSelectionDocument`, TID 2010) titled
(113010, DCM, "Quality Issue"): it references the source instances the AI ran on, so that a
PACS worklist or viewer that shows key objects flags the study. The description says the
score and the reasons in words; the observer is this device, as in our SRs.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.identity import creation_times, equipment_attributes
from pacs_sentinel.reports.source import character_set, patient_study_source, text_values
from pacs_sentinel.reports.sr import device_observer
from pacs_sentinel.results import QCResult

#: Document title (CID 7010 Key Object Selection Document Title).
QUALITY_ISSUE = CodedConcept(value="113010", scheme_designator="DCM", meaning="Quality Issue")
#: Series Description of the KOS series.
KOS_SERIES_DESCRIPTION = "AI result needs review"
#: Key Object Description (TEXT) is limited to 1024 characters by its VR (UT allows more; viewers do not).
DESCRIPTION_MAX = 1024


def quality_issue_description(qc: QCResult, model_name: str) -> str:
    """``"PACS Sentinel QC: the organ-seg result needs review (quality score 0.12): Fragmentation; ..."``."""
    reasons = "; ".join(reason.label for reason in qc.reasons) or "no finding recorded"
    text = (f"PACS Sentinel QC: the {model_name} result needs review "
            f"(quality score {qc.quality_score:.2f}, QC {qc.qc_version}): {reasons}")
    return text[:DESCRIPTION_MAX]


def build_quality_issue_kos(
    sources: Sequence[Dataset],
    qc: QCResult,
    *,
    model_name: str,
    series_number: int,
) -> hd.ko.KeyObjectSelectionDocument:
    """Build the KOS that flags a study whose AI result needs review.

    Args:
        sources: The source instances the AI ran on (headers are enough; each needs SOP
            Class/Instance, Study/Series UIDs and the patient and study attributes). An
            enhanced multi-frame instance repeated once per frame is referenced once.
        qc: The QC judgement (its score and reasons go into the description).
        model_name: The model that made the result.
        series_number: Series Number of the KOS series.

    Returns:
        The document; nothing is written or sent.

    Raises:
        ReportError: No source instance, sources of several studies, or highdicom refuses
            the content.
    """
    unique: dict[str, Dataset] = {}
    for ds in sources:
        unique.setdefault(str(ds.SOPInstanceUID), ds)
    evidence = list(unique.values())
    if not evidence:
        raise ReportError("cannot build KOS: no source instance to reference")
    studies = {str(ds.StudyInstanceUID) for ds in evidence}
    if len(studies) > 1:
        raise ReportError(f"cannot build KOS: sources belong to {len(studies)} studies")
    times = creation_times()
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=QUALITY_ISSUE,
            referenced_objects=evidence,
            observer_device_context=device_observer(model_name),
            description=quality_issue_description(qc, model_name),
        )
        charset = character_set(evidence[0], text_values(content[0]))
        source = patient_study_source(evidence[0], written_in=charset)
        document = hd.ko.KeyObjectSelectionDocument(
            # highdicom takes patient and study from the first item (reports/source.py)
            evidence=[source, *evidence[1:]],
            specific_character_set=charset,
            content=content,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            series_description=KOS_SERIES_DESCRIPTION,
            series_date=times["series_date"],
            series_time=times["series_time"],
            content_date=times["content_date"],
            content_time=times["content_time"],
            **equipment_attributes(),
        )
        # The whole Patient and General Study modules, as the SEG and SR carry them.
        document.copy_patient_and_study_information(source)
        return document
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"cannot build KOS: {exc}") from exc
