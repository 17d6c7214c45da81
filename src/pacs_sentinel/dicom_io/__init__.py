"""DICOM networking and files: SCP, SCU, spool, series -> volume."""
