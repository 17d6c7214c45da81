"""Check result objects before they leave: a highdicom read-back and dicom3tools' ``dciodvfy``.

Every SEG, SR and SC the node writes must pass ``dciodvfy`` without errors (DESIGN.md).
:func:`check_before_sending` is what the worker calls on every object of a result set
(``[reports] validate``): ``"roundtrip"`` encodes each object, reads it back with pydicom and
highdicom and decodes its pixels; ``"dciodvfy"`` does that and also runs the IOD validator
when it is installed (Debian package ``dicom3tools``; without it, the read-back alone
decides and a warning says so); ``"off"`` checks nothing. An object that fails raises
:class:`~pacs_sentinel.errors.ReportError` with the validator's words, so the job fails
instead of sending it.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import highdicom as hd
import pydicom
import structlog
from pydicom.dataset import Dataset

from pacs_sentinel.errors import ReportError

log = structlog.get_logger(__name__)

#: Seconds one dciodvfy run may take before it counts as an error.
TIMEOUT_SECONDS = 60.0

#: ``[reports] validate``: what is checked before an object is sent.
ValidationMode = Literal["dciodvfy", "roundtrip", "off"]

LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"

#: What a dciodvfy older than the Label Map Segmentation IOD (Sup 243, DICOM 2024b) says of
#: objects that are correct today. Every dicom3tools Debian ships (bookworm's 2022-06 and
#: trixie's 2024-01 builds) predates it: of a label map it reports the SOP class as not found
#: and applies the BINARY rule "segment numbers from 1" to the Background segment 0 that
#: highdicom writes first; of an SR it says a segment number may only reference a
#: "segmentation", which to it a label map is not. These lines are no verdict on the object;
#: any other error still is.
OUTDATED_LABEL_MAP_ERRORS = (
    "Information Object Not found",
    "SegmentNumber not monotonically increasing from one by one - have SegmentSequence item number 1 "
    "(from one) with SegmentNumber of 0",
)
OUTDATED_LABEL_MAP_REFERENCE_ERRORS = (
    "Shall not be present for Referenced SOP Class that is not segmentation - attribute <ReferencedSegmentNumber>",
)


def _references_label_map(ds: Dataset) -> bool:
    """Whether any item of ``ds`` (an SR's content tree) references a Label Map Segmentation."""
    for element in ds.iterall():
        if element.keyword == "ReferencedSOPClassUID" and str(element.value) == LABEL_MAP_SEGMENTATION:
            return True
    return False


def outdated_validator_complaints(ds: Dataset) -> tuple[str, ...]:
    """The dciodvfy error texts that only show the validator predates ``ds``'s IOD."""
    if str(ds.get("SOPClassUID", "")) == LABEL_MAP_SEGMENTATION:
        return OUTDATED_LABEL_MAP_ERRORS
    if str(ds.get("Modality", "")) == "SR" and _references_label_map(ds):
        return OUTDATED_LABEL_MAP_REFERENCE_ERRORS
    return ()


@dataclass(frozen=True)
class ValidationReport:
    """What ``dciodvfy`` said about one object.

    Attributes:
        iod: The IOD dciodvfy recognised (its first output line, e.g. ``"Segmentation"``).
        errors: Lines that contain ``"Error"``.
        warnings: Lines that start with ``"Warning"``.
    """

    iod: str
    errors: list[str]
    warnings: list[str]


def dciodvfy_path() -> str | None:
    """Return the path of ``dciodvfy``, or None when dicom3tools is not installed."""
    return shutil.which("dciodvfy")


def run_dciodvfy(ds: Dataset | Path, *, executable: str | None = None) -> ValidationReport | None:
    """Run ``dciodvfy`` on a Part 10 file, or on ``ds`` written to a temporary one.

    Args:
        ds: The object to check (it must have file meta information; highdicom objects do),
            or the path of a DICOM file.
        executable: Path of dciodvfy; default: found on ``PATH``.

    Returns:
        The validator's findings, or None when dciodvfy is not installed.

    Raises:
        ReportError: The dataset cannot be written as a DICOM file.
    """
    executable = executable or dciodvfy_path()
    if executable is None:
        return None
    if isinstance(ds, Path):
        completed = _dciodvfy(executable, ds)
    else:
        with tempfile.TemporaryDirectory(prefix="sentinel-dciodvfy-") as tmp:
            path = Path(tmp) / "object.dcm"
            try:
                ds.save_as(path, enforce_file_format=True)
            except (ValueError, TypeError, AttributeError) as exc:
                raise ReportError(f"cannot write {ds.get('SOPInstanceUID', '?')} for validation: {exc}") from exc
            completed = _dciodvfy(executable, path)
    if completed is None:
        message = f"Error - dciodvfy did not finish in {TIMEOUT_SECONDS:.0f} s"
        return ValidationReport(iod="", errors=[message], warnings=[])
    lines = [line.rstrip() for line in (completed.stderr + completed.stdout).splitlines() if line.strip()]
    iod = lines[0] if lines and " - " not in lines[0] else ""
    return ValidationReport(
        iod=iod,
        errors=[line for line in lines if "Error" in line],
        warnings=[line for line in lines if line.startswith("Warning")],
    )


def _dciodvfy(executable: str, path: Path) -> subprocess.CompletedProcess[str] | None:
    """Run dciodvfy on one file; None when it does not finish in time.

    dciodvfy quotes the values it complains about in the object's own bytes (ISO_IR 100,
    GB18030, ...): bytes that are no UTF-8 are replaced (U+FFFD), so that the report is read.
    """
    try:
        return subprocess.run(
            [executable, str(path)], capture_output=True, text=True, errors="replace", timeout=TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None


def _counted_errors(ds: Dataset, report: ValidationReport | None) -> list[str]:
    """The errors of a dciodvfy report that count: not the ones of an outdated validator."""
    if report is None or not report.errors:
        return []  # nothing to excuse: the SR's content tree need not be searched
    known = outdated_validator_complaints(ds)
    errors = [e for e in report.errors if not any(k in e for k in known)]
    if len(errors) < len(report.errors):
        log.debug("dciodvfy predates this IOD; its known complaints are ignored",
                  sop_class_uid=str(ds.get("SOPClassUID", "")), ignored=len(report.errors) - len(errors))
    return errors


def validate(
    ds: Dataset, *, strict: bool = False, executable: str | None = None, path: Path | None = None
) -> list[str] | None:
    """Return the ``dciodvfy`` error lines of ``ds`` (empty when it is valid).

    Args:
        ds: The object to check.
        strict: Raise instead of returning when there are errors.
        executable: Path of dciodvfy; default: found on ``PATH``.
        path: A Part 10 file that holds ``ds``: checked as it is, instead of writing ``ds``
            to a temporary file.

    Complaints that only say the validator predates the object's IOD
    (:func:`outdated_validator_complaints`) are not counted.

    Returns:
        The error lines, or None when dciodvfy is not installed (validation skipped).

    Raises:
        ReportError: ``strict`` is true and dciodvfy reported errors, or ``ds`` cannot be
            written.
    """
    report = run_dciodvfy(ds if path is None else path, executable=executable)
    if report is not None:
        report = ValidationReport(iod=report.iod, errors=_counted_errors(ds, report), warnings=report.warnings)
    if report is None:
        log.debug("dciodvfy not installed; validation skipped", sop_instance_uid=str(ds.get("SOPInstanceUID", "")))
        return None
    if report.errors:
        log.warning(
            "dciodvfy reported errors",
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            iod=report.iod,
            errors=report.errors,
        )
        if strict:
            raise ReportError(
                f"{report.iod or 'object'} {ds.get('SOPInstanceUID', '?')} fails dciodvfy: " + "; ".join(report.errors)
            )
    return report.errors


def read_back(source: Dataset | Path) -> Dataset:
    """Read an object back as a receiver would and parse it as highdicom does.

    A dataset is encoded as a Part 10 file first; a path is read as written. Segmentations and
    images also decode their pixel data (a compressed frame that cannot be decoded fails
    here, not in the viewer); structured reports and key object selections rebuild their
    content tree.

    Returns:
        The highdicom object read back from the bytes.

    Raises:
        ReportError: The object cannot be encoded, read back or parsed.
    """
    name = str(source) if isinstance(source, Path) else f"{source.get('Modality', 'object')} {source.get('SOPInstanceUID', '?')}"
    try:
        if isinstance(source, Path):
            data = source.read_bytes()
        else:
            buffer = io.BytesIO()
            source.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
        again = pydicom.dcmread(io.BytesIO(data))
        name = f"{again.get('Modality', 'object')} {again.get('SOPInstanceUID', '?')}"
        modality = str(again.get("Modality", ""))
        if modality == "SEG":
            parsed = hd.seg.Segmentation.from_dataset(again, copy=False)
            _ = parsed.pixel_array
        elif modality == "SR":
            parsed = hd.sr.srread(io.BytesIO(data))
        elif modality == "KO":
            parsed = hd.ko.KeyObjectSelectionDocument.from_dataset(again)
        else:
            parsed = hd.Image.from_dataset(again, copy=False)
            _ = parsed.pixel_array
    except Exception as exc:  # any failure to read our own object back is a reason not to send it
        raise ReportError(f"{name} does not read back: {type(exc).__name__}: {exc}") from exc
    return parsed


def check_before_sending(objects: Sequence[Dataset | Path], mode: ValidationMode) -> None:
    """Check every object of a result set; raise on the first that must not be sent.

    Args:
        objects: The objects about to be sent, as datasets or as the Part 10 files written
            from them (checked as they are: nothing is encoded twice).
        mode: ``[reports] validate``: ``"dciodvfy"`` (read-back + IOD validator when
            installed), ``"roundtrip"`` (read-back only) or ``"off"``.

    Raises:
        ReportError: An object fails; the message names it and quotes the validator.
    """
    if mode == "off" or not objects:
        return
    executable = dciodvfy_path() if mode == "dciodvfy" else None
    if mode == "dciodvfy" and executable is None:
        log.warning("dciodvfy is not installed; result objects checked by read-back only")
    # dciodvfy runs as one process per object, side by side, while this thread reads back:
    # every run is started first, so that all of them overlap the read-backs.
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="dciodvfy") as pool:
        reports = [None if executable is None else pool.submit(run_dciodvfy, item, executable=executable)
                   for item in objects]
        pending = [(read_back(item), item, report) for item, report in zip(objects, reports, strict=True)]
        for ds, item, report in pending:
            if report is None:
                continue
            errors = _counted_errors(ds, report.result())
            if errors:
                raise ReportError(
                    f"{ds.get('Modality', 'object')} {ds.get('SOPInstanceUID', '?')} fails dciodvfy: "
                    + "; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "")
                )
