"""``GET /fhir/AuditEvent``: the action log as FHIR R4 AuditEvent resources (scope ``admin``).

Search parameters (FHIR R4 AuditEvent search): ``patient`` (a patient key, a Patient ID,
or ``issuer|id``), ``agent`` (subject, API key id ``apikey:…`` or AE title), ``date``
with the ``ge``/``gt``/``le``/``lt`` prefixes (or a day), ``_count`` and ``_offset``.
Each entry's chain position and hashes are exported as ``AuditEvent.entity.detail``,
so a copy can be checked against the log.
"""

from __future__ import annotations

import re
from datetime import date, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from core.audit import ChainedEntry, patient_key
from core.errors import InvalidQueryError
from storage.audit import AuditStore

__all__ = ["audit_event", "router"]

router = APIRouter(prefix="/fhir", tags=["fhir"])

_TYPES = {
    # DICOM PS3.15 A.5.3 / DCM event IDs; FHIR "rest" for HTTP interactions.
    "rest": ("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "RESTful Operation"),
    "dicom.c-store": ("http://dicom.nema.org/resources/ontology/DCM", "110104",
                      "DICOM Instances Transferred"),
    "dicom.c-find": ("http://dicom.nema.org/resources/ontology/DCM", "110112", "Query"),
    # MPPS reports a procedure step's progress: a Procedure Record event, not an
    # access to instances (DCM 110103 is for instances created, read or deleted).
    "dicom.mpps": ("http://dicom.nema.org/resources/ontology/DCM", "110111",
                   "Procedure Record"),
    # Issue 16: retrieves, forwarding (instances sent to another AE).
    **{kind: ("http://dicom.nema.org/resources/ontology/DCM", "110104",
              "DICOM Instances Transferred")
       for kind in ("dicom.c-move", "dicom.c-get", "dicom.move-send", "dicom.get-send",
                    "dicom.forward")},
    "lab.file": ("http://dicom.nema.org/resources/ontology/DCM", "110107", "Import"),
    "hl7.order": ("http://dicom.nema.org/resources/ontology/DCM", "110109", "Order Record"),
    "sign": ("http://dicom.nema.org/resources/ontology/DCM", "110110", "Patient Record"),
}
_AGENT_TYPE = {
    "user": ("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "AUT", "author"),
    "apikey": ("http://dicom.nema.org/resources/ontology/DCM", "110150", "Application"),
    "ae": ("http://dicom.nema.org/resources/ontology/DCM", "110153", "Source Role ID"),
    "system": ("http://dicom.nema.org/resources/ontology/DCM", "110150", "Application"),
    "anonymous": ("http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "UNK", "unknown"),
}


def audit_event(e: ChainedEntry) -> dict[str, Any]:
    """One log entry as a FHIR R4 ``AuditEvent`` (patient only as its keyed reference)."""
    system, code, display = _TYPES.get(e.event_type, (
        "urn:pacslab:audit-event-type", e.event_type, e.event_type))
    a_system, a_code, a_display = _AGENT_TYPE.get(e.agent_type, _AGENT_TYPE["anonymous"])
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": a_system, "code": a_code, "display": a_display}]},
        "who": {"identifier": {"value": e.agent}},
        "requestor": e.agent_type in ("user", "apikey", "ae"),
    }
    if e.source:
        agent["network"] = {"address": e.source, "type": "2"}
    entities: list[dict[str, Any]] = [{
        "what": {"identifier": {"value": e.resource}},
        "detail": [
            {"type": "seq", "valueString": str(e.seq)},
            {"type": "prev_hash", "valueString": e.prev_hash},
            {"type": "hash", "valueString": e.hash},
            {"type": "detail", "valueString": e.detail},
        ],
    }]
    if e.patient_key:
        entities.append({
            "what": {"identifier": {"system": "urn:pacslab:patient-key", "value": e.patient_key}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                     "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role",
                     "code": "1", "display": "Patient"},
        })
    return {
        "resourceType": "AuditEvent",
        "id": str(e.seq),
        "type": {"system": system, "code": code, "display": display},
        "action": e.action,
        "recorded": e.recorded,
        "outcome": e.outcome,
        "outcomeDesc": e.outcome_desc or None,
        "agent": [agent],
        "source": {"observer": {"display": "pacslab"}},
        "entity": entities,
    }


def _bounds(values: list[str]) -> tuple[str | None, str | None]:
    since = until = None
    for value in values:
        m = re.fullmatch(r"(ge|gt|le|lt|eq)?(\d{4}-\d{2}-\d{2})(T[0-9:.]+Z?)?", value)
        if not m:
            raise InvalidQueryError("date must be [ge|gt|le|lt]YYYY-MM-DD[Thh:mm:ssZ]")
        prefix, day, clock = m.group(1) or "eq", m.group(2), m.group(3) or ""
        if clock:
            point = day + clock.rstrip("Z")
            after = point + "\uffff" if prefix in ("gt", "le") else point
            if prefix in ("ge", "gt"):
                since = after
            elif prefix in ("le", "lt"):
                until = after
            else:
                since, until = point, point + "\uffff"
            continue
        try:
            next_day = (date.fromisoformat(day) + timedelta(days=1)).isoformat()
        except ValueError as exc:  # 2026-13-45 matches the pattern but is no date
            raise InvalidQueryError(f"date {day} is not a calendar date") from exc
        if prefix == "ge":
            since = day
        elif prefix == "gt":
            since = next_day
        elif prefix == "le":
            until = next_day
        elif prefix == "lt":
            until = day
        else:
            since, until = day, next_day
    return since, until


_FHIR_JSON: dict[str, Any] = {"application/fhir+json": {}}


@router.get("/AuditEvent", response_class=JSONResponse, responses={
    200: {"description": "FHIR R4 searchset Bundle of AuditEvent", "content": _FHIR_JSON},
    400: {"description": "OperationOutcome: a malformed search parameter",
          "content": _FHIR_JSON},
})
def search_audit_events(
    request: Request,
    patient: str | None = None,
    agent: str | None = None,
    date_: Annotated[list[str] | None, Query(alias="date")] = None,
    count: Annotated[int, Query(alias="_count", ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(alias="_offset", ge=0, le=2**31 - 1)] = 0,
) -> JSONResponse:
    """Search the action log; a FHIR ``searchset`` Bundle, newest first."""
    store: AuditStore = request.app.state.audit
    key = None
    if patient:
        if re.fullmatch(r"[0-9a-f]{32}", patient):
            key = patient
        else:
            issuer, _, ident = patient.rpartition("|")
            key = patient_key(request.app.state.patient_secret, ident.removeprefix("Patient/"),
                              issuer)
    since, until = _bounds(date_ or [])
    rows = store.search(patient_key=key, agent=agent, since=since, until=until, limit=count,
                        offset=offset)
    base = str(request.base_url).rstrip("/")
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"fullUrl": f"{base}/fhir/AuditEvent/{e.seq}", "resource": audit_event(e),
             "search": {"mode": "match"}}
            for e in rows
        ],
    }
    return JSONResponse(bundle, media_type="application/fhir+json")
