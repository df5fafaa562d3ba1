"""``GET /fhir/AuditEvent``: the action log as FHIR R4 AuditEvent resources (scope ``admin``).

Search parameters (FHIR R4 AuditEvent search, declared in :mod:`api.fhir.registry`):
``patient`` (a patient key, a Patient ID, or ``issuer|id``), ``agent`` (subject, API
key id ``apikey:…`` or AE title), ``date`` with the ``ge``/``gt``/``le``/``lt``
prefixes (or a day), ``_sort`` (``date``/``-date``), ``_count`` and ``_offset``;
the Bundle has ``total`` and self/next/previous links.
Each entry's chain position and hashes are exported as ``AuditEvent.entity.detail``,
so a copy can be checked against the log.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.fhir import page_total, parse_date_param, search_bundle, search_request, split_or
from api.fhir.registry import AUDIT_EVENT
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
    # Issue 17: an ADT message (A01/A04/A08/A40/A47) changes a patient (PS3.15 A.5.3.10).
    "hl7.adt": ("http://dicom.nema.org/resources/ontology/DCM", "110110", "Patient Record"),
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
    """``[since, until)`` as ``recorded`` text (UTC, fixed width, so text order is time
    order) of repeated FHIR date values (ANDed; partial dates are ranges, R4 3.1.1.5.2)."""
    since = until = None
    for value in values:
        after, _after_incl, before, _before_incl = parse_date_param(value).bounds()
        # bounds() gives inclusive lower and exclusive upper ends for every prefix.
        if after is not None:
            text = _recorded(after)
            since = text if since is None else max(since, text)
        if before is not None:
            text = _recorded(before)
            until = text if until is None else min(until, text)
    return since, until


def _recorded(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@router.get("/AuditEvent", response_class=JSONResponse)
def search_audit_events(request: Request) -> JSONResponse:
    """Search the action log: a FHIR ``searchset`` Bundle with ``total`` and paging links.

    Oldest first by default (``_sort=-date`` for newest first): the log only grows at
    its end, so offsets stay valid while a client pages through ``next`` links.
    """
    search = search_request(request, AUDIT_EVENT)
    store: AuditStore = request.app.state.audit
    key: str | None = None
    for c in search.all("patient"):
        items = split_or(c.value)
        if len(items) > 1 or (key is not None and key != items[0]):
            raise InvalidQueryError("one patient per search")
        patient = items[0]
        if re.fullmatch(r"[0-9a-f]{32}", patient):
            key = patient
        else:
            issuer, _, ident = patient.rpartition("|")
            key = patient_key(request.app.state.patient_secret, ident.removeprefix("Patient/"),
                              issuer)
    agents = {v for c in search.all("agent") for v in split_or(c.value)}
    if len(agents) > 1:
        raise InvalidQueryError("one agent per search")
    agent = agents.pop() if agents else None
    since, until = _bounds([c.value for c in search.all("date")])
    newest_first = bool(search.sort) and search.sort[0].startswith("-")
    criteria: dict[str, Any] = {"patient_key": key, "agent": agent, "since": since,
                                "until": until}
    rows = store.search(**criteria, limit=search.paging.count, offset=search.paging.offset,
                        oldest_first=not newest_first) if search.paging.count else []
    total = page_total(search, len(rows), lambda bound: store.count(**criteria, at_most=bound))
    bundle = search_bundle(request, search, [audit_event(e) for e in rows], total)
    return JSONResponse(bundle, media_type="application/fhir+json")
