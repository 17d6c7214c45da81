"""PACS Sentinel: a DICOM AI node that knows when not to trust the AI."""

__version__ = "0.1.0"
