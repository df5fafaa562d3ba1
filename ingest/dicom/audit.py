"""Action-log hooks for the DIMSE services pynetdicom serves (C-FIND, C-GET/MOVE, N-CREATE/N-SET).

Notification handlers (``EVT_DIMSE_RECV``/``EVT_DIMSE_SENT``), so they observe the
worklist and MPPS handlers without changing them, whichever module provides those:
the request is remembered when it arrives (with the Patient ID of its identifier or
attribute list, reduced at once to the keyed patient reference) and one entry is
recorded when the final response leaves (PS3.15 A.5.3.12 Query, A.5.3.4 Procedure
Record). C-STORE is logged by :class:`ingest.service.IngestService` instead. Like
every notification handler, they log their own errors and carry on (STYLE.md §5).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.dsutils import decode

from core.audit import AuditEntry, outcome_for_dimse, patient_key
from core.logging import correlation_id
from storage.audit import AuditLog

if TYPE_CHECKING:
    from pynetdicom.events import Event

__all__ = ["dimse_audit_handlers"]

logger = logging.getLogger(__name__)

#: request class name → (event type, FHIR action, response class name)
_WATCHED = {
    "C_FIND_RQ": ("dicom.c-find", "E", "C_FIND_RSP"),
    "C_GET_RQ": ("dicom.c-get", "R", "C_GET_RSP"),
    "C_MOVE_RQ": ("dicom.c-move", "R", "C_MOVE_RSP"),
    "N_CREATE_RQ": ("dicom.mpps", "C", "N_CREATE_RSP"),
    "N_SET_RQ": ("dicom.mpps", "U", "N_SET_RSP"),
}
_PENDING = (0xFF00, 0xFF01)


class _DimseAudit:
    def __init__(self, log: AuditLog, secret: bytes) -> None:
        self.log = log
        self.secret = secret
        self.open: dict[tuple[int, int], tuple[str, str, str, str]] = {}
        self.lock = threading.Lock()

    def _patient(self, event: Event, message: Any) -> str:
        data = getattr(message, "data_set", None)
        if data is None:
            return ""
        contexts = {cx.context_id: cx for cx in event.assoc.accepted_contexts}
        cx = contexts.get(message.context_id)
        if cx is None:
            return ""
        ts = cx.transfer_syntax[0]
        data.seek(0)
        ds = decode(data, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        data.seek(0)
        pid = str(ds.get("PatientID", "") or "")
        issuer = str(ds.get("IssuerOfPatientID", "") or "")
        return patient_key(self.secret, pid, issuer)

    def on_recv(self, event: Event) -> None:
        try:
            message = event.message
            kind = type(message).__name__
            if kind not in _WATCHED:
                return
            cmd = message.command_set
            uid = str(cmd.get("AffectedSOPInstanceUID", "") or
                      cmd.get("RequestedSOPInstanceUID", "") or "")
            sop_class = str(cmd.get("AffectedSOPClassUID", "") or
                            cmd.get("RequestedSOPClassUID", "") or "")
            resource = f"SOPInstance/{uid}" if uid else f"SOPClass/{sop_class}"
            key = self._patient(event, message)
            with self.lock:
                self.open[(id(event.assoc), int(cmd.MessageID))] = (kind, resource, key,
                                                                    sop_class)
        except Exception:
            logger.error("DIMSE audit: request not noted", exc_info=True)

    def on_sent(self, event: Event) -> None:
        try:
            message = event.message
            kind = type(message).__name__
            if not kind.endswith("_RSP"):
                return
            cmd = message.command_set
            status = int(cmd.get("Status", 0))
            if status in _PENDING:
                return
            with self.lock:
                noted = self.open.pop((id(event.assoc), int(cmd.MessageIDBeingRespondedTo)),
                                      None)
            if noted is None or _WATCHED[noted[0]][2] != kind:
                return
            event_type, action, _ = _WATCHED[noted[0]]
            requestor = event.assoc.requestor
            self.log.record(AuditEntry(
                action=action, event_type=event_type, outcome=outcome_for_dimse(status),
                outcome_desc=f"0x{status:04X}", agent=str(requestor.ae_title)[:128],
                agent_type="ae", source=str(requestor.address)[:64], resource=noted[1][:256],
                patient_key=noted[2], correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details({"sop_class_uid": noted[3]}),
            ))
        except Exception:
            logger.error("DIMSE audit: response not recorded", exc_info=True)


def dimse_audit_handlers(log: AuditLog, secret: bytes) -> list[tuple[Any, ...]]:
    """``evt_handlers`` entries that log C-FIND/C-GET/C-MOVE/N-CREATE/N-SET outcomes."""
    hooks = _DimseAudit(log, secret)
    return [(evt.EVT_DIMSE_RECV, hooks.on_recv), (evt.EVT_DIMSE_SENT, hooks.on_sent)]
