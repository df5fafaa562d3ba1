"""Action-log hooks for the DIMSE services pynetdicom serves (C-FIND, C-GET/MOVE, N-CREATE/N-SET).

Notification handlers (``EVT_DIMSE_RECV``/``EVT_DIMSE_SENT``), so they observe the
worklist and MPPS handlers without changing them, whichever module provides those:
the request is remembered when it arrives (with the Patient ID of its identifier or
attribute list, reduced at once to the keyed patient reference) and one entry is
recorded when the final response leaves (PS3.15 A.5.3.12 Query, A.5.3.4 Procedure
Record), with the number of matches of a query (its pending responses). An N-SET
names no patient of its own, so the entry takes the patient of the step it updates
(``mpps_patient``, read after the response is sent). C-STORE is logged by
:class:`ingest.service.IngestService` instead. Like every notification handler, they
log their own errors and carry on (STYLE.md §5).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.dsutils import decode

from core.audit import AuditEntry, outcome_for_dimse, patient_key
from core.logging import correlation_id
from storage.audit import AuditLog

if TYPE_CHECKING:
    from pynetdicom.events import Event

__all__ = ["PatientLookup", "dimse_audit_handlers", "identifier_patient_key", "record_dimse"]

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


#: Patient ID and issuer of a stored procedure step, by SOP Instance UID (or None).
PatientLookup = Callable[[str], "tuple[str, str] | None"]


def identifier_patient_key(secret: bytes, ds: Any) -> str:
    """The keyed patient reference of a request identifier; empty for a wildcard
    Patient ID, which names no one patient (PS3.4 C.2.2.2.4)."""
    pid = str(ds.get("PatientID", "") or "")
    if "*" in pid or "?" in pid:
        return ""
    issuer = str(ds.get("IssuerOfPatientID", "") or "")
    return patient_key(secret, pid, issuer)


def record_dimse(
    log: AuditLog,
    *,
    event_type: str,
    action: str,
    status: int,
    calling_ae: str,
    address: str,
    resource: str,
    patient_key: str,
    detail: dict[str, Any],
) -> None:
    """One action-log entry for a DIMSE request at its final response (PS3.15
    A.5.3.12 Query, A.5.3.4 Procedure Record); both transports call it. Raises what
    the log raises (callers are notification handlers: they log and carry on)."""
    log.record(
        AuditEntry(
            action=action,
            event_type=event_type,
            outcome=outcome_for_dimse(status),
            outcome_desc=f"0x{status:04X}",
            agent=calling_ae[:128],
            agent_type="ae",
            source=address[:64],
            resource=resource[:256],
            patient_key=patient_key,
            correlation_id=correlation_id.get()[:32],
            detail=AuditEntry.details(detail),
        )
    )


@dataclass(slots=True)
class _Noted:
    """A request seen arriving, until its final response leaves."""

    kind: str
    resource: str
    patient_key: str
    sop_class_uid: str
    uid: str
    matches: int = 0


class _DimseAudit:
    def __init__(
        self, log: AuditLog, secret: bytes, mpps_patient: PatientLookup | None = None
    ) -> None:
        self.log = log
        self.secret = secret
        self.mpps_patient = mpps_patient
        self.open: dict[tuple[int, int], _Noted] = {}
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
        return identifier_patient_key(self.secret, ds)

    def _step_patient(self, uid: str) -> str:
        # An N-SET's modification list rarely repeats the Patient ID (PS3.4 F.7.2.2:
        # only the attributes that change); the step it updates names the patient.
        if self.mpps_patient is None or not uid:
            return ""
        found = self.mpps_patient(uid)
        return patient_key(self.secret, found[0], found[1]) if found else ""

    def on_recv(self, event: Event) -> None:
        try:
            message = event.message
            kind = type(message).__name__
            if kind not in _WATCHED:
                return
            cmd = message.command_set
            uid = str(
                cmd.get("AffectedSOPInstanceUID", "")
                or cmd.get("RequestedSOPInstanceUID", "")
                or ""
            )
            sop_class = str(
                cmd.get("AffectedSOPClassUID", "") or cmd.get("RequestedSOPClassUID", "") or ""
            )
            resource = f"SOPInstance/{uid}" if uid else f"SOPClass/{sop_class}"
            noted = _Noted(kind, resource, self._patient(event, message), sop_class, uid)
            with self.lock:
                self.open[(id(event.assoc), int(cmd.MessageID))] = noted
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
            key = (id(event.assoc), int(cmd.MessageIDBeingRespondedTo))
            with self.lock:
                if status in _PENDING:  # one pending response per match (PS3.4 C.4.1.1.4)
                    pending = self.open.get(key)
                    if pending is not None:
                        pending.matches += 1
                    return
                noted = self.open.pop(key, None)
            if noted is None or _WATCHED[noted.kind][2] != kind:
                return
            event_type, action, _ = _WATCHED[noted.kind]
            detail: dict[str, Any] = {"sop_class_uid": noted.sop_class_uid}
            resource, pkey = noted.resource, noted.patient_key
            if noted.kind in ("C_FIND_RQ", "C_GET_RQ", "C_MOVE_RQ"):
                detail["matches"] = noted.matches
            else:
                # PS3.7 10.1.5.1.4: the SCP assigns the UID of an N-CREATE without one.
                uid = noted.uid or str(cmd.get("AffectedSOPInstanceUID", "") or "")
                resource = f"SOPInstance/{uid}" if uid else resource
                if not pkey:
                    pkey = self._step_patient(uid)
            requestor = event.assoc.requestor
            record_dimse(
                self.log,
                event_type=event_type,
                action=action,
                status=status,
                calling_ae=str(requestor.ae_title),
                address=str(requestor.address),
                resource=resource,
                patient_key=pkey,
                detail=detail,
            )
        except Exception:
            logger.error("DIMSE audit: response not recorded", exc_info=True)


def dimse_audit_handlers(
    log: AuditLog, secret: bytes, *, mpps_patient: PatientLookup | None = None
) -> list[tuple[Any, ...]]:
    """``evt_handlers`` entries that log C-FIND/C-GET/C-MOVE/N-CREATE/N-SET outcomes.

    ``mpps_patient`` finds the patient of a stored procedure step, for N-SETs whose
    modification list does not carry the Patient ID.
    """
    hooks = _DimseAudit(log, secret, mpps_patient)
    return [(evt.EVT_DIMSE_RECV, hooks.on_recv), (evt.EVT_DIMSE_SENT, hooks.on_sent)]
