"""Storage Commitment Push Model SCP (PS3.4 J.3): N-ACTION in, N-EVENT-REPORT out.

The N-ACTION is answered at once (0x0000 once the request is well formed); the
decision (:class:`services.commitment.CommitmentService`) and the N-EVENT-REPORT
follow in a thread of their own, after the N-ACTION response has left (PS3.4 J.3.3:
the report comes after the response). The report goes on the same association
while the SCU keeps it open, otherwise on a new association to the SCU's AE title
as configured in ``qr.destinations``, where we propose the SCP role (PS3.4 J.3.3,
PS3.7 D.3.3.4). Delivery is tried a few times here; the request was kept in the
index before the N-ACTION was answered (:class:`services.commitment.CommitmentQueue`),
so a report this process could not deliver (the SCU not listening yet, a restart)
is sent later by the worker's ``commit`` job. Logs carry UIDs and AE titles only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from core.audit import AuditEntry
from core.errors import ServiceError
from core.logging import correlation_id
from services.commitment import (
    CommitmentQueue,
    CommitmentService,
    CommitRequest,
    CommitResult,
    parse_request,
    send_event_report,
    send_report,
)

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.dimse_primitives import N_ACTION
    from pynetdicom.events import Event

    from core.settings import RemoteAE
    from storage.audit import AuditLog

__all__ = ["CommitmentReporter", "handlers", "presentation_contexts"]

logger = logging.getLogger(__name__)

_NO_SUCH_ACTION = 0x0123
_INVALID_INSTANCE = 0x0117
_MISSING_ATTRIBUTE = 0x0120
_PROCESSING_FAILURE = 0x0110
_TRIES = 3


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class CommitmentReporter:
    """Sends the N-EVENT-REPORTs of accepted commitment requests."""

    def __init__(
        self,
        service: CommitmentService,
        destinations: Callable[[str], RemoteAE | None],
        *,
        ae_title: str,
        timeout_s: float = 10.0,
        audit: AuditLog | None = None,
        queue: CommitmentQueue | None = None,
    ) -> None:
        self.queue = queue
        self.service = service
        self.destinations = destinations
        self.ae_title = ae_title
        self.timeout_s = timeout_s
        self.audit = audit
        self._responded: dict[tuple[int, int], threading.Event] = {}
        self._lock = threading.Lock()

    # -- handlers -------------------------------------------------------------------

    def handle_n_action(self, event: Event) -> tuple[int | Dataset, Dataset | None]:
        """EVT_N_ACTION: Request Storage Commitment (PS3.4 J.3.2.1, Action Type ID 1)."""
        req = cast("N_ACTION", event.request)
        if str(req.RequestedSOPClassUID) != StorageCommitmentPushModel:
            return _status(0x0122, "SOP Class not supported"), None
        if int(req.ActionTypeID or 0) != 1:
            return _status(_NO_SUCH_ACTION, "Only Action Type ID 1 is defined"), None
        if str(req.RequestedSOPInstanceUID) != StorageCommitmentPushModelInstance:
            return _status(_INVALID_INSTANCE, "Use the well-known SOP Instance"), None
        try:
            request = parse_request(event.action_information)
        except ServiceError as exc:
            return _status(_MISSING_ATTRIBUTE, str(exc) or exc.title), None
        calling = str(event.assoc.requestor.ae_title)
        cid = correlation_id.get()
        if self.queue is not None:
            # Kept before we answer: an accepted request is owed its report (J.3.3).
            try:
                self.queue.remember(request, calling, correlation_id=cid)
            except Exception:
                logger.error("storage commitment %s not kept", request.transaction_uid,
                             exc_info=True)
                return _status(_PROCESSING_FAILURE, "Request not kept; try again"), None
        responded = threading.Event()
        key = (id(event.assoc), int(req.MessageID or 0))
        with self._lock:
            self._responded[key] = responded
        threading.Thread(
            target=self._deliver,
            args=(event.assoc, calling, request, responded, key, cid),
            name=f"commit-{request.transaction_uid[-12:]}",
            daemon=True,
        ).start()
        logger.info(
            "storage commitment %s from %s: %d references",
            request.transaction_uid, calling, len(request.references),
        )
        return 0x0000, None

    def on_sent(self, event: Event) -> None:
        """EVT_DIMSE_SENT: the N-ACTION response left; its report may follow."""
        try:
            if type(event.message).__name__ != "N_ACTION_RSP":
                return
            cmd = event.message.command_set
            key = (id(event.assoc), int(cmd.MessageIDBeingRespondedTo))
            with self._lock:
                responded = self._responded.pop(key, None)
            if responded is not None:
                responded.set()
        except Exception:
            logger.error("storage commitment: response not noted", exc_info=True)

    # -- delivery -------------------------------------------------------------------

    def _deliver(
        self,
        assoc: Association,
        calling: str,
        request: CommitRequest,
        responded: threading.Event,
        key: tuple[int, int],
        cid: str,
    ) -> None:
        correlation_id.set(cid)
        try:
            responded.wait(self.timeout_s)
            with self._lock:
                self._responded.pop(key, None)
            result = self.service.check(request)
            for attempt in range(_TRIES):
                if attempt:
                    time.sleep(min(2.0 ** (attempt - 1), 10.0))
                how = ""
                if assoc.is_established and self._send(assoc, result):
                    how = "same association"
                elif self._send_new(calling, result):
                    how = "new association"
                if how:
                    self._record(calling, result, how)
                    if self.queue is not None:
                        self.queue.delivered(request.transaction_uid, how)
                    return
            logger.warning(
                "storage commitment %s: report to %s not delivered%s",
                request.transaction_uid, calling,
                "; the worker will try again" if self.queue is not None else "",
            )
            if self.queue is not None:
                self.queue.undelivered(
                    request.transaction_uid,
                    f"receiver: {calling} took no report in {_TRIES} tries",
                )
        except Exception:
            logger.error("storage commitment report failed", exc_info=True)

    def _send(self, assoc: Association, result: CommitResult) -> bool:
        return send_event_report(assoc, result, "the same association")

    def _send_new(self, calling: str, result: CommitResult) -> bool:
        remote = self.destinations(calling)
        if remote is None:
            return False
        return send_report(result, remote, ae_title=self.ae_title, calling=calling,
                           timeout_s=self.timeout_s)

    def _record(self, calling: str, result: CommitResult, how: str) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record(AuditEntry(
                action="E", event_type="dicom.storage-commitment",
                outcome="0" if not result.failed else "4",
                outcome_desc=f"event type {result.event_type_id}", agent=calling[:128],
                agent_type="ae", source="", resource=f"Transaction/{result.transaction_uid}",
                patient_key="", correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details({
                    "committed": len(result.committed), "failed": len(result.failed),
                    "delivered": how,
                }),
            ))
        except Exception:
            logger.error("storage commitment not recorded in the action log", exc_info=True)


def presentation_contexts() -> list[PresentationContext]:
    return [build_context(StorageCommitmentPushModel)]


def handlers(reporter: CommitmentReporter) -> list[tuple[Any, ...]]:
    return [
        (evt.EVT_N_ACTION, reporter.handle_n_action),
        (evt.EVT_DIMSE_SENT, reporter.on_sent),
    ]
