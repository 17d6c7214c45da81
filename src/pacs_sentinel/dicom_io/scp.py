"""The storage and verification SCP: receive instances, persist, index, then answer.

The C-STORE handler runs inside the association, so it only persists and indexes: no
inference, no network calls. It answers 0x0000 only once the instance is on disk and
indexed; every failure has its own status so the sender knows to keep its copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.events import Event
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from pacs_sentinel.dicom_io.spool import Spool, StoreOutcome, instance_info
from pacs_sentinel.errors import DecodeError, StorageError

log = structlog.get_logger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

#: Transfer syntaxes accepted, in order of preference when a sender offers several:
#: explicit VR first (it keeps the value representations of private attributes).
ACCEPTED_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian] + [ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian]

#: Called after an instance is on disk and indexed, with the sender's AE title.
StoredCallback = Callable[[StoreOutcome, str], None]


@dataclass(frozen=True)
class ScpSettings:
    """Network identity and limits of the SCP."""

    ae_title: str
    host: str
    port: int
    max_associations: int = 10
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0


class StorageScp:
    """A storage + verification SCP writing into a :class:`Spool`."""

    def __init__(self, settings: ScpSettings, spool: Spool, on_stored: StoredCallback | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.on_stored = on_stored
        self._server: ThreadedAssociationServer | None = None

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.acse_timeout = self.settings.acse_timeout
        ae.dimse_timeout = self.settings.dimse_timeout
        ae.network_timeout = self.settings.network_timeout
        ae.require_called_aet = True
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    def handle_store(self, event: Event) -> int:
        """EVT_C_STORE handler: persist and index, then return the DIMSE status."""
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            dataset = event.dataset
            info = instance_info(dataset, str(event.context.transfer_syntax))
        except DecodeError as exc:
            log.warning("instance refused: cannot understand", calling_ae=calling_ae, error=str(exc))
            return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:  # the lazy decoder raises whatever the parser raised
            log.warning("instance refused: cannot decode", calling_ae=calling_ae, error=str(exc))
            return STATUS_CANNOT_UNDERSTAND
        bound = log.bind(study_uid=info.study_uid, sop_instance_uid=info.sop_instance_uid, calling_ae=calling_ae)
        if info.sop_class_uid != str(event.context.abstract_syntax):
            bound.warning("instance refused: SOP class does not match the presentation context",
                          sop_class_uid=info.sop_class_uid, context=str(event.context.abstract_syntax))
            return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
        try:
            outcome = self.spool.store(event.encoded_dataset(), info, calling_ae=calling_ae)
        except StorageError as exc:
            bound.error("instance refused: cannot store", error=str(exc))
            return STATUS_OUT_OF_RESOURCES
        except Exception:  # never answer success for an instance that is not stored
            bound.exception("instance refused: unexpected error while storing")
            return STATUS_OUT_OF_RESOURCES
        bound.debug("instance stored", duplicate=outcome.duplicate)
        if self.on_stored is not None:
            try:
                self.on_stored(outcome, calling_ae)
            except Exception:  # the instance is durable; start-up reconciliation picks it up
                bound.exception("post-store notification failed")
        return STATUS_SUCCESS

    def start(self) -> None:
        """Start serving in background threads (returns at once)."""
        ae = self._make_ae()
        handlers = [(evt.EVT_C_STORE, self.handle_store)]
        self._server = ae.start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
        )
        log.info("SCP listening", ae_title=self.settings.ae_title, host=self.settings.host, port=self.port)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop accepting associations and close the server."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
