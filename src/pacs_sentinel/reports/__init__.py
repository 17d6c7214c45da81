"""DICOM writers: SEG, TID 1500 SR with the QC contract, secondary-capture overlays."""

from pacs_sentinel.reports.highdicom_speedups import install as _install_highdicom_speedups

_install_highdicom_speedups()
