"""Check written objects with dicom3tools' IOD validator, ``dciodvfy``.

Every SEG, SR and SC the node writes must pass ``dciodvfy`` without errors (DESIGN.md). The
validator is an optional system tool (Debian package ``dicom3tools``): when it is not
installed, validation is skipped and the functions return ``None``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom.dataset import Dataset

from pacs_sentinel.errors import ReportError

log = structlog.get_logger(__name__)

#: Seconds one dciodvfy run may take before it counts as an error.
TIMEOUT_SECONDS = 60.0


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

    Returns:
        The error lines, or None when dciodvfy is not installed (validation skipped).

    Raises:
        ReportError: ``strict`` is true and dciodvfy reported errors, or ``ds`` cannot be
            written.
    """
    report = run_dciodvfy(ds, executable=executable)
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
