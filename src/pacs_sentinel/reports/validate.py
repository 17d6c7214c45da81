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


def run_dciodvfy(ds: Dataset, *, executable: str | None = None) -> ValidationReport | None:
    """Write ``ds`` to a temporary Part 10 file and run ``dciodvfy`` on it.

    Args:
        ds: The object to check; it must have file meta information (highdicom objects do).
        executable: Path of dciodvfy; default: found on ``PATH``.

    Returns:
        The validator's findings, or None when dciodvfy is not installed.

    Raises:
        ReportError: The dataset cannot be written as a DICOM file.
    """
    executable = executable or dciodvfy_path()
    if executable is None:
        return None
    with tempfile.TemporaryDirectory(prefix="sentinel-dciodvfy-") as tmp:
        path = Path(tmp) / "object.dcm"
        try:
            ds.save_as(path, enforce_file_format=True)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ReportError(f"cannot write {ds.get('SOPInstanceUID', '?')} for validation: {exc}") from exc
        try:
            completed = subprocess.run(
                [executable, str(path)], capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False
            )
        except subprocess.TimeoutExpired:
            message = f"Error - dciodvfy did not finish in {TIMEOUT_SECONDS:.0f} s"
            return ValidationReport(iod="", errors=[message], warnings=[])
    lines = [line.rstrip() for line in (completed.stderr + completed.stdout).splitlines() if line.strip()]
    iod = lines[0] if lines and " - " not in lines[0] else ""
    return ValidationReport(
        iod=iod,
        errors=[line for line in lines if "Error" in line],
        warnings=[line for line in lines if line.startswith("Warning")],
    )


def validate(ds: Dataset, *, strict: bool = False, executable: str | None = None) -> list[str] | None:
    """Return the ``dciodvfy`` error lines of ``ds`` (empty when it is valid).

    Args:
        ds: The object to check.
        strict: Raise instead of returning when there are errors.
        executable: Path of dciodvfy; default: found on ``PATH``.

    Complaints that only say the validator predates the object's IOD
    (:func:`outdated_validator_complaints`) are not counted.

    Returns:
        The error lines, or None when dciodvfy is not installed (validation skipped).

    Raises:
        ReportError: ``strict`` is true and dciodvfy reported errors, or ``ds`` cannot be
            written.
    """
    report = run_dciodvfy(ds, executable=executable)
    if report is not None:
        known = outdated_validator_complaints(ds)
        if known:
            errors = [e for e in report.errors if not any(k in e for k in known)]
            log.debug("dciodvfy predates this IOD; its known complaints are ignored",
                      sop_class_uid=str(ds.SOPClassUID), ignored=len(report.errors) - len(errors))
            report = ValidationReport(iod=report.iod, errors=errors, warnings=report.warnings)
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


def read_back(ds: Dataset) -> Dataset:
    """Encode ``ds`` as a Part 10 file, read it back and parse it as highdicom does.

    Segmentations and images also decode their pixel data (a compressed frame that cannot
    be decoded fails here, not in the viewer); structured reports rebuild their content tree.

    Returns:
        The highdicom object read back from the bytes.

    Raises:
        ReportError: The object cannot be encoded, read back or parsed.
    """
    uid = str(ds.get("SOPInstanceUID", "?"))
    try:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        again = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        modality = str(again.get("Modality", ""))
        if modality == "SEG":
            parsed = hd.seg.Segmentation.from_dataset(again, copy=False)
            _ = parsed.pixel_array
        elif modality == "SR":
            parsed = hd.sr.srread(io.BytesIO(buffer.getvalue()))
        else:
            parsed = hd.Image.from_dataset(again, copy=False)
            _ = parsed.pixel_array
    except Exception as exc:  # any failure to read our own object back is a reason not to send it
        raise ReportError(f"{ds.get('Modality', 'object')} {uid} does not read back: {type(exc).__name__}: {exc}") from exc
    return parsed


def check_before_sending(datasets: Sequence[Dataset], mode: ValidationMode) -> None:
    """Check every object of a result set; raise on the first that must not be sent.

    Args:
        datasets: The objects about to be sent.
        mode: ``[reports] validate``: ``"dciodvfy"`` (read-back + IOD validator when
            installed), ``"roundtrip"`` (read-back only) or ``"off"``.

    Raises:
        ReportError: An object fails; the message names it and quotes the validator.
    """
    if mode == "off" or not datasets:
        return
    executable = dciodvfy_path() if mode == "dciodvfy" else None
    if mode == "dciodvfy" and executable is None:
        log.warning("dciodvfy is not installed; result objects checked by read-back only")
    # dciodvfy runs as one process per object, side by side, while this thread reads back.
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="dciodvfy") as pool:
        pending = [] if executable is None else [
            (ds, pool.submit(validate, ds, executable=executable)) for ds in datasets
        ]
        for ds in datasets:
            read_back(ds)
        for ds, future in pending:
            errors = future.result()
            if errors:
                raise ReportError(
                    f"{ds.get('Modality', 'object')} {ds.get('SOPInstanceUID', '?')} fails dciodvfy: "
                    + "; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "")
                )
