"""The one exception hierarchy of PACS Sentinel.

Errors are raised as one of these classes and translated at the edges: into DIMSE
statuses in :mod:`pacs_sentinel.dicom_io`, into job states in :mod:`pacs_sentinel.daemon`
and into one-line messages in the command line.
"""

from __future__ import annotations


class SentinelError(Exception):
    """Base class of every error the product raises on purpose."""


class ConfigError(SentinelError):
    """The configuration file is missing, unreadable or invalid.

    Attributes:
        problems: One line per problem, each naming the dotted key it concerns.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class StorageError(SentinelError):
    """An instance could not be written to the spool or indexed (out of resources)."""


class DecodeError(SentinelError):
    """A received payload is not a DICOM dataset we can understand."""


class SeriesError(SentinelError):
    """A series cannot be turned into a volume (gaps, mixed geometry, too few slices...)."""


class ModelError(SentinelError):
    """A model cannot be found, loaded or run."""


class ReportError(SentinelError):
    """A result object (SEG, SR, SC) could not be built."""


class DeliveryError(SentinelError):
    """A result could not be delivered to a destination (refused or unreachable).

    ``permanent`` is True when retrying cannot help: the destination supports none of the
    SOP classes / transfer syntaxes proposed.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
