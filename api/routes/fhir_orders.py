"""FHIR R4 ServiceRequest for imaging orders, and the unmatched-studies list.

Routes (``router``; :func:`include` adds it to an app):

* ``POST /fhir/ServiceRequest``: a new order. The Patient comes *contained*
  (``subject.reference = "#<id>"``, FHIR R4 3.1.5 contained resources), so one
  request carries the order and the demographics as ordered.
* ``PUT /fhir/ServiceRequest/{id}``: update, or create with that id (R4 3.1.0.4.1
  update as create). ``status = revoked`` cancels the order.
* ``GET /fhir/ServiceRequest/{id}`` and ``GET /fhir/ServiceRequest?…`` with the
  parameters of :data:`api.fhir.registry.SERVICE_REQUEST` (``patient``/``subject``,
  ``code``, ``status``, ``identifier``, ``authored``, ``_id``, ``_lastUpdated``;
  partial dates are ranges), ``_count``/``_offset``: a ``searchset`` Bundle with
  ``total`` and paging links, in creation order; with ``_sort=_lastUpdated`` oldest
  change first, so polling ``_lastUpdated=gt<last seen>`` is the change feed.
* Received resources are bounded (:mod:`api.fhir._input`): 1 MiB, nesting, string
  lengths, no control characters, JSON types per element; 400/413 OperationOutcome.
* ``GET /orders/unmatched`` and ``POST /orders/unmatched/{study_uid}/link``
  (``{"order": "<ServiceRequest id>"}``): received studies no order claims.

Mapping (FHIR R4 ServiceRequest ↔ DICOM MWL, as in IHE RAD TF-2 4.4 and the
FHIR ImagingStudy/ServiceRequest pattern):

* ``identifier`` of type PLAC (v2-0203) is the placer order number; we add the
  Accession Number (type ACSN) and the Study Instance UID (``urn:dicom:uid``).
* ``code.coding[0]`` → Requested Procedure Code Sequence; ``code.text`` →
  description. ``orderDetail`` coding in the DICOM DCM system → Modality;
  ``locationCode`` coding in ``urn:pacslab:ae-title`` → Scheduled Station AE Title.
* ``occurrenceDateTime`` → step start in this server's local time (DICOM DA/TM
  carry no offset; FHIR needs one, so we emit the local one); ``priority``
  routine/urgent/asap/stat → ROUTINE/HIGH/HIGH/STAT.
* ``status``: scheduled and in-progress orders are ``active`` (R4 RequestStatus has
  no in-progress; the extension ``procedure-status`` carries it), completed is
  ``completed``, cancelled and discontinued are ``revoked``.
* Once images are linked, ``supportingInfo`` holds a logical reference to the
  ImagingStudy (identifier ``urn:dicom:uid``).

The API may not import ``worklist`` (STYLE.md §1): it uses the order service
:class:`services.orders.OrderService` (``OrdersDep``) that the worklist uses too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from api.conditional import if_match_version
from api.deps import OrdersDep
from api.fhir import (
    Search,
    Token,
    TooCostlyError,
    check_accept,
    fhir_base,
    fhir_response,
    page_total,
    parse_date_param,
    parse_token,
    reported_total,
    search_bundle,
    search_request,
    split_or,
)
from api.fhir._input import MalformedResourceError, check_strings, expect, read_resource
from api.fhir.imaging import issuer_for_system, patient_system
from api.fhir.registry import SERVICE_REQUEST
from api.routes.fhir import patient_identifiers
from api.state import services_of
from core.errors import InvalidDatasetError, InvalidQueryError, NotFoundError
from core.orders import (
    Code,
    Order,
    OrderAction,
    OrderRecord,
    OrderStatus,
    Patient,
    PlacedOrder,
    ScheduledProcedureStep,
)
from storage.index.orders import StudyLink

__all__ = ["include", "record_to_resource", "resource_to_placed", "router"]

router = APIRouter(tags=["fhir"])

FHIR_JSON = "application/fhir+json"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
AE_SYSTEM = "urn:pacslab:ae-title"
ACCESSION_SYSTEM = "urn:pacslab:accession"
DICOM_UID_SYSTEM = "urn:dicom:uid"
STATUS_EXT = "https://pacslab.example/fhir/StructureDefinition/procedure-status"
_SCHEMES = {
    "http://loinc.org": "LN",
    "http://snomed.info/sct": "SCT",
    "http://www.radlex.org": "RADLEX",
    DCM: "DCM",
}
_SYSTEMS = {v: k for k, v in _SCHEMES.items()}
_PRIORITY_IN = {"routine": "ROUTINE", "urgent": "HIGH", "asap": "HIGH", "stat": "STAT"}
_PRIORITY_OUT = {"ROUTINE": "routine", "HIGH": "urgent", "MEDIUM": "routine", "STAT": "stat"}
_GENDER_IN = {"male": "M", "female": "F", "other": "O"}
_GENDER_OUT = {"M": "male", "F": "female", "O": "other"}
_STATUS_OUT = {
    OrderStatus.SCHEDULED: "active",
    OrderStatus.IN_PROGRESS: "active",
    OrderStatus.COMPLETED: "completed",
    OrderStatus.DISCONTINUED: "revoked",
    OrderStatus.CANCELLED: "revoked",
}
_STATUS_SEARCH = {
    "active": [OrderStatus.SCHEDULED, OrderStatus.IN_PROGRESS],
    "completed": [OrderStatus.COMPLETED],
    "revoked": [OrderStatus.CANCELLED, OrderStatus.DISCONTINUED],
}
#: FHIR R4 ValueSet request-status: the codes a search may name.
_REQUEST_STATUSES = frozenset(
    {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
)
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: Bounds of received elements (PS3.5 6.2: PN components and LO are 64 characters).
_MAX_NAME = 64
_MAX_ID = 64
_MAX_CODE_TEXT = 1024
#: Orders read from JSON when code/identifier filters cannot be done by the store.
_MAX_SCAN = 20_000


class InvalidResourceError(InvalidDatasetError):
    """A ServiceRequest we cannot take (FHIR R4 ``invalid``, HTTP 422)."""

    title = "Invalid resource"
    http_status = 422


# ------------------------------------------------------------------ mapping (pure)


def _coding(concept: Any, path: str) -> list[dict[str, Any]]:
    """The codings of a CodeableConcept, each checked to be an object of strings."""
    if concept is None:
        return []
    expect(concept, dict, path)
    codings = expect(concept.get("coding"), list, f"{path}.coding") or []
    for i, c in enumerate(codings):
        expect(c, dict, f"{path}.coding[{i}]")
        for key in ("system", "code", "display"):
            expect(c.get(key), str, f"{path}.coding[{i}].{key}", max_length=_MAX_CODE_TEXT)
    expect(concept.get("text"), str, f"{path}.text", max_length=_MAX_CODE_TEXT)
    return list(codings)


def _list(value: Any, path: str) -> list[Any]:
    return list(expect(value, list, path) or [])


def _person_name(name: dict[str, Any], path: str) -> str:
    # DICOM PN components are at most 64 characters each (PS3.5 6.2, VR PN).
    expect(name.get("family"), str, f"{path}.family", max_length=_MAX_NAME)
    for key in ("given", "prefix", "suffix"):
        for i, part in enumerate(_list(name.get(key), f"{path}.{key}")):
            expect(part, str, f"{path}.{key}[{i}]", max_length=_MAX_NAME)
    given = [str(g) for g in name.get("given") or []]
    parts = [
        str(name.get("family") or ""),
        given[0] if given else "",
        " ".join(given[1:]),
        " ".join(str(p) for p in name.get("prefix") or []),
        " ".join(str(s) for s in name.get("suffix") or []),
    ]
    return "^".join(parts).rstrip("^")


def _patient(resource: dict[str, Any]) -> Patient:
    subject = expect(resource.get("subject"), dict, "ServiceRequest.subject") or {}
    ref = expect(subject.get("reference"), str, "ServiceRequest.subject.reference") or ""
    if not ref.startswith("#"):
        raise InvalidResourceError("subject must reference a contained Patient (#id)")
    contained = _list(resource.get("contained"), "ServiceRequest.contained")
    index = next(
        (
            i
            for i, c in enumerate(contained)
            if isinstance(c, dict) and c.get("resourceType") == "Patient" and c.get("id") == ref[1:]
        ),
        None,
    )
    if index is None:
        raise InvalidResourceError(f"contained Patient {ref} not found")
    patient: dict[str, Any] = contained[index]
    where = f"ServiceRequest.contained[{index}]"
    ids = _list(patient.get("identifier"), f"{where}.identifier")
    for i, ident in enumerate(ids):
        expect(ident, dict, f"{where}.identifier[{i}]")
        # PS3.3 C.7.1.1: Patient ID and its issuer are LO, 64 characters at most.
        expect(ident.get("value"), str, f"{where}.identifier[{i}].value", max_length=_MAX_ID)
        expect(ident.get("system"), str, f"{where}.identifier[{i}].system", max_length=_MAX_ID + 8)
    ids = [i for i in ids if i.get("value")]
    if not ids:
        raise InvalidResourceError("Patient.identifier with a value is required")
    names = _list(patient.get("name"), f"{where}.name")
    for i, n in enumerate(names):
        expect(n, dict, f"{where}.name[{i}]")
    expect(patient.get("gender"), str, f"{where}.gender")
    birth = expect(patient.get("birthDate"), str, f"{where}.birthDate")
    try:
        birth_date = datetime.strptime(str(birth), "%Y-%m-%d").date() if birth else None
    except ValueError:
        raise InvalidResourceError("Patient.birthDate must be YYYY-MM-DD") from None
    # The issuer as imaging and lab keep it (api.fhir.imaging.issuer_for_system), so
    # that an order's patient is the same patient row everywhere (issue 17 merges).
    system = str(ids[0].get("system") or "")
    issuer = issuer_for_system(system) if system else ""
    return Patient(
        name=_person_name(names[0], f"{where}.name[0]") if names else "",
        id=str(ids[0]["value"])[:64],
        issuer=issuer[:64],
        birth_date=birth_date,
        sex=_GENDER_IN.get(str(patient.get("gender") or ""), ""),
    )


def _start(value: Any) -> datetime:
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise InvalidResourceError("occurrenceDateTime is not a dateTime") from None
    # DICOM DA/TM are local wall-clock time (PS3.3 C.4.10 has no offset unless
    # Timezone Offset From UTC is sent): keep the instant, in this server's zone.
    if dt.tzinfo is not None:
        dt = dt.astimezone()
    return dt.replace(tzinfo=None, microsecond=0)


def resource_to_placed(resource: dict[str, Any], *, source: str = "fhir") -> PlacedOrder:
    """A ServiceRequest (with its contained Patient) as a :class:`PlacedOrder`.

    Raises
    ------
    InvalidResourceError
        Not a ServiceRequest, no contained Patient, a status the placer may not set,
        an unreadable date.
    """
    if not isinstance(resource, dict) or resource.get("resourceType") != "ServiceRequest":
        raise InvalidResourceError("resourceType must be ServiceRequest")
    check_strings(resource, "ServiceRequest")
    for key in ("status", "intent", "priority", "occurrenceDateTime", "id"):
        expect(resource.get(key), str, f"ServiceRequest.{key}", max_length=_MAX_ID)
    status = resource.get("status")
    if status not in ("active", "draft", "on-hold", "revoked"):
        raise InvalidResourceError(f"status {status!r} cannot be set by the placer")
    if resource.get("intent") not in ("order", "original-order", "instance-order"):
        raise InvalidResourceError("intent must be order")
    placer = accession = ""
    for i, ident in enumerate(_list(resource.get("identifier"), "ServiceRequest.identifier")):
        path = f"ServiceRequest.identifier[{i}]"
        expect(ident, dict, path)
        value = expect(ident.get("value"), str, f"{path}.value", max_length=_MAX_ID) or ""
        codes = {c.get("code") for c in _coding(ident.get("type"), f"{path}.type")}
        if "PLAC" in codes:
            placer = value
        elif "ACSN" in codes:
            # PS3.3 C.4.10: Accession Number is SH, 16 characters at most.
            if len(value) > 16:
                raise MalformedResourceError(f"{path}.value: an Accession Number is 16 at most")
            accession = value
    code_concept = resource.get("code") or {}
    codings = _coding(code_concept, "ServiceRequest.code")
    code = None
    if codings and codings[0].get("code"):
        c = codings[0]
        system = str(c.get("system") or "")
        code = Code(
            str(c["code"])[:16],
            _SCHEMES.get(system, system[:16] or "99LOCAL"),
            str(c.get("display") or code_concept.get("text") or "")[:64],
        )
    description = str(code_concept.get("text") or (code.meaning if code else ""))[:64]
    modality = next(
        (
            str(c.get("code"))
            for i, d in enumerate(_list(resource.get("orderDetail"), "ServiceRequest.orderDetail"))
            for c in _coding(d, f"ServiceRequest.orderDetail[{i}]")
            if c.get("system") == DCM and c.get("code")
        ),
        "",
    )
    station = next(
        (
            str(c.get("code"))
            for i, d in enumerate(
                _list(resource.get("locationCode"), "ServiceRequest.locationCode")
            )
            for c in _coding(d, f"ServiceRequest.locationCode[{i}]")
            if c.get("system") == AE_SYSTEM and c.get("code")
        ),
        "",
    )
    occurrence = resource.get("occurrenceDateTime")
    note_items = _list(resource.get("note"), "ServiceRequest.note")
    for i, n in enumerate(note_items):
        expect(n, dict, f"ServiceRequest.note[{i}]")
        expect(n.get("text"), str, f"ServiceRequest.note[{i}].text")
    notes = " ".join(str(n.get("text")) for n in note_items if n.get("text"))
    steps: tuple[ScheduledProcedureStep, ...] = ()
    if occurrence or modality or station:
        steps = (
            ScheduledProcedureStep(
                step_id="",
                station_ae_title=station[:16],
                modality=modality[:16],
                start=_start(occurrence) if occurrence else datetime.now().replace(microsecond=0),
                description=description,
                comments=notes,
            ),
        )
    requester = expect(resource.get("requester"), dict, "ServiceRequest.requester") or {}
    expect(requester.get("display"), str, "ServiceRequest.requester.display", max_length=_MAX_NAME)
    order = Order(
        accession_number=accession[:16],
        requested_procedure_id="",
        requested_procedure_description=description,
        requested_procedure_code=code,
        requesting_physician=str(requester.get("display") or "")[:64],
        priority=_PRIORITY_IN.get(str(resource.get("priority") or ""), ""),
    )
    return PlacedOrder(
        action=OrderAction.CANCEL if status == "revoked" else OrderAction.NEW,
        placer_order_number=placer[:64],
        patient=_patient(resource),
        order=order,
        steps=steps,
        source=source,
    )


def _iso(dt: datetime) -> str:
    # Microseconds: a poller passes lastUpdated back as `gt`, and must not see it again.
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def record_to_resource(rec: OrderRecord) -> dict[str, Any]:
    """The ServiceRequest (with contained Patient) of an order."""
    item = rec.item
    p, o = item.patient, item.order
    system = patient_system(p.issuer) if p.issuer else None
    pn = p.name.split("^") + [""] * 5
    name: dict[str, Any] = {}
    if pn[0]:
        name["family"] = pn[0]
    given = [g for g in (pn[1], pn[2]) if g]
    if given:
        name["given"] = given
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "patient",
        "identifier": [{"value": p.id, **({"system": system} if system else {})}],
    }
    if name:
        patient["name"] = [name]
    if p.sex in _GENDER_OUT:
        patient["gender"] = _GENDER_OUT[p.sex]
    if p.birth_date:
        patient["birthDate"] = p.birth_date.isoformat()
    identifiers: list[dict[str, Any]] = []
    if rec.placer_order_number:
        identifiers.append(
            {
                "type": {"coding": [{"system": V2_0203, "code": "PLAC"}]},
                "value": rec.placer_order_number,
            }
        )
    identifiers.append(
        {
            "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
            "system": ACCESSION_SYSTEM,
            "value": o.accession_number,
        }
    )
    identifiers.append({"system": "urn:dicom:uid", "value": f"urn:oid:{o.study_instance_uid}"})
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": rec.id,
        "meta": {"versionId": str(rec.version), "lastUpdated": _iso(rec.updated_at)},
        "extension": [{"url": STATUS_EXT, "valueCode": str(rec.status)}],
        "contained": [patient],
        "identifier": identifiers,
        "status": _STATUS_OUT[rec.status],
        "intent": "order",
        "subject": {"reference": "#patient"},
        "authoredOn": _iso(rec.created_at),
    }
    if o.priority in _PRIORITY_OUT:
        resource["priority"] = _PRIORITY_OUT[o.priority]
    code: dict[str, Any] = {}
    if o.requested_procedure_code is not None:
        c = o.requested_procedure_code
        coding = {
            "system": _SYSTEMS.get(c.scheme, f"urn:pacslab:scheme:{c.scheme}"),
            "code": c.value,
        }
        if c.meaning:
            coding["display"] = c.meaning
        code["coding"] = [coding]
    if o.requested_procedure_description:
        code["text"] = o.requested_procedure_description
    if code:
        resource["code"] = code
    modalities = sorted({s.modality for s in item.steps if s.modality})
    if modalities:
        resource["orderDetail"] = [{"coding": [{"system": DCM, "code": m}]} for m in modalities]
    stations = sorted({s.station_ae_title for s in item.steps if s.station_ae_title})
    if stations:
        resource["locationCode"] = [
            {"coding": [{"system": AE_SYSTEM, "code": s}]} for s in stations
        ]
    first = min(item.steps, key=lambda s: s.start)
    # FHIR dateTime with a time needs an offset (R4 2.24.0.1): local wall clock.
    resource["occurrenceDateTime"] = first.start.astimezone().isoformat()
    if o.requesting_physician:
        resource["requester"] = {"display": o.requesting_physician}
    notes = [s.comments for s in item.steps if s.comments]
    if notes:
        resource["note"] = [{"text": n} for n in notes]
    if rec.linked_study_uid:
        resource["supportingInfo"] = [
            {
                "type": "ImagingStudy",
                "identifier": {
                    "system": "urn:dicom:uid",
                    "value": f"urn:oid:{rec.linked_study_uid}",
                },
                "display": "Received study",
            }
        ]
    return resource


# ------------------------------------------------------------------------- routes


def _fhir(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    return fhir_response(body, status, headers)


@router.post("/fhir/ServiceRequest")
async def create_service_request(request: Request, orders: OrdersDep) -> Response:
    """Create (FHIR R4 3.1.0.6); errors are OperationOutcomes (api/errors.py)."""
    placed = resource_to_placed(await read_resource(request))
    if placed.action is OrderAction.CANCEL:
        raise InvalidResourceError("a new ServiceRequest cannot be revoked")
    rec = orders.place(placed)
    location = f"{fhir_base(request)}/ServiceRequest/{rec.id}/_history/{rec.version}"
    return _fhir(record_to_resource(rec), 201, {"Location": location, "ETag": f'W/"{rec.version}"'})


@router.put("/fhir/ServiceRequest/{order_id}")
async def update_service_request(
    order_id: str, request: Request, orders: OrdersDep
) -> Response:
    """Update, or create with the client's id (R4 3.1.0.4.1).

    Version-aware (http.html#concurrency): with ``If-Match: W/"n"`` the update applies
    only while the order is at version ``n``, else 412 and nothing changes."""
    if not _ID.fullmatch(order_id):
        raise MalformedResourceError("ServiceRequest id must be a FHIR id (64 characters at most)")
    expected = if_match_version(request)
    body = await read_resource(request)
    if body.get("id") not in (None, order_id):
        raise InvalidResourceError("id in the body differs from the URL")
    rec, created = orders.put(order_id, resource_to_placed(body), expected_version=expected)
    return _fhir(record_to_resource(rec), 201 if created else 200, {"ETag": f'W/"{rec.version}"'})


@router.get("/fhir/ServiceRequest/{order_id}")
def read_service_request(order_id: str, request: Request, orders: OrdersDep) -> Response:
    check_accept(request)
    if not _ID.fullmatch(order_id):
        raise NotFoundError("no such ServiceRequest")
    rec = orders.get(order_id)
    return _fhir(record_to_resource(rec), headers={"ETag": f'W/"{rec.version}"'})


def _dates(values: list[str]) -> tuple[datetime | None, datetime | None]:
    """``[from, before)`` of repeated date values (each a range, R4 3.1.1.5.2)."""
    lo: datetime | None = None
    hi: datetime | None = None
    for raw in values:
        a, a_incl, b, b_incl = parse_date_param(raw).bounds()
        tick = timedelta(microseconds=1)
        if a is not None:
            a = a if a_incl else a + tick
            lo = a if lo is None else max(lo, a)
        if b is not None:
            b = b + tick if b_incl else b
            hi = b if hi is None else min(hi, b)
    return lo, hi


@dataclass
class _OrderFilter:
    """An order search: criteria the store evaluates, and the ones checked on records."""

    sql: dict[str, Any] = field(default_factory=dict)
    #: Each a list of alternatives (OR); all lists must hold (AND).
    codes: list[list[Token]] = field(default_factory=list)
    identifiers: list[list[Token]] = field(default_factory=list)
    empty: bool = False


def _order_filter(request: Request, search: Search) -> _OrderFilter:
    f = _OrderFilter()
    statuses: set[OrderStatus] | None = None
    patients: set[tuple[str, str | None]] | None = None
    ids: set[str] | None = None
    for c in search.criteria:
        if c.name == "status":
            wanted: set[OrderStatus] = set()
            for item in split_or(c.value):
                token = parse_token(item)
                if token.code not in _STATUS_SEARCH:
                    # A RequestStatus no order of ours is in (draft, on-hold...): no match.
                    if token.code in _REQUEST_STATUSES:
                        continue
                    raise InvalidQueryError(f"status {token.code!r} is not a RequestStatus")
                wanted.update(_STATUS_SEARCH[token.code])
            statuses = wanted if statuses is None else statuses & wanted
        elif c.name in ("patient", "subject"):
            named = patient_identifiers(request.app.state.index, request, c.value, c.modifier)
            patients = named if patients is None else patients & named
        elif c.name == "_id":
            named_ids = set(split_or(c.value))
            ids = named_ids if ids is None else ids & named_ids
        elif c.name == "code":
            f.codes.append([parse_token(v) for v in split_or(c.value)])
        elif c.name == "identifier":
            f.identifiers.append([parse_token(v) for v in split_or(c.value)])
    if statuses is not None:
        if not statuses:
            f.empty = True
        f.sql["status"] = sorted(statuses)
    if ids is not None:
        f.sql["public_ids"] = sorted(ids)
    if patients is not None:
        if len(patients) != 1:
            if not patients:
                f.empty = True
            else:
                raise InvalidQueryError("one patient per search (several are not supported)")
        else:
            ((pid, issuer),) = patients
            f.sql["patient_id"] = pid
            if issuer is not None:
                f.sql["issuer"] = issuer.removeprefix("urn:oid:")
    f.sql["updated_from"], f.sql["updated_before"] = _dates(
        [c.value for c in search.all("_lastUpdated")]
    )
    f.sql["created_from"], f.sql["created_before"] = _dates(
        [c.value for c in search.all("authored")]
    )
    if len(f.identifiers) == 1 and len(f.identifiers[0]) == 1:
        # One identifier: the store narrows on it (placer, accession, id, no system
        # check); _matches below still checks the system.
        token = f.identifiers[0][0]
        if token.system != DICOM_UID_SYSTEM and not token.code.startswith("urn:oid:"):
            f.sql["identifier"] = token.code
    return f


def _code_matches(rec: OrderRecord, token: Token) -> bool:
    code = rec.item.order.requested_procedure_code
    if code is None or code.value != token.code:
        return False
    if token.system is None:
        return True
    return _SYSTEMS.get(code.scheme, f"urn:pacslab:scheme:{code.scheme}") == token.system


def _identifier_matches(rec: OrderRecord, token: Token) -> bool:
    o = rec.item.order
    if token.system == DICOM_UID_SYSTEM or (
        token.system is None and token.code.startswith("urn:oid:")
    ):
        return f"urn:oid:{o.study_instance_uid}" == token.code
    if token.system == ACCESSION_SYSTEM:
        return o.accession_number == token.code
    if token.system is None:
        return token.code in (rec.placer_order_number, o.accession_number)
    # The placer's system is not kept: any other system names the placer order number.
    return bool(rec.placer_order_number) and rec.placer_order_number == token.code


def _matches(rec: OrderRecord, f: _OrderFilter) -> bool:
    return all(any(_code_matches(rec, t) for t in alts) for alts in f.codes) and all(
        any(_identifier_matches(rec, t) for t in alts) for alts in f.identifiers
    )


@router.get("/fhir/ServiceRequest")
def search_service_requests(request: Request, orders: OrdersDep) -> Response:
    """Search (R4 servicerequest.html#search): in creation order (a key updates do not
    move, so paging sees each order once), or with ``_sort=_lastUpdated`` oldest change
    first, so ``_lastUpdated=gt<last seen>&_sort=_lastUpdated`` is the change feed."""
    search = search_request(request, SERVICE_REQUEST)
    f = _order_filter(request, search)
    paging = search.paging
    if len(search.sort) > 1:
        raise InvalidQueryError("_sort: one key, _id (default) or _lastUpdated")
    # _id: creation order, which updates do not move (stable pages); _lastUpdated:
    # oldest change first (the change feed).
    f.sql["order"] = "updated" if search.sort == ("_lastUpdated",) else "id"
    if f.empty:
        records: list[OrderRecord] = []
        total = reported_total(search, 0)
    elif not f.codes and not f.identifiers:
        records = orders.search(**f.sql, limit=paging.count, offset=paging.offset)
        criteria = {k: v for k, v in f.sql.items() if k != "order"}
        total = page_total(search, len(records),
                           lambda bound: orders.store.count(at_most=bound, **criteria))
    else:
        # code and system-checked identifiers are read from each order's JSON: scan
        # what the store narrowed to, in its stable order, up to a bound.
        candidates = orders.search(**f.sql, limit=_MAX_SCAN + 1, offset=0)
        if len(candidates) > _MAX_SCAN:
            raise TooCostlyError(
                f"more than {_MAX_SCAN} orders to check: narrow with patient, "
                "status or _lastUpdated"
            )
        matched = [r for r in candidates if _matches(r, f)]
        total = reported_total(search, len(matched))
        records = matched[paging.offset : paging.offset + paging.count]
    entries = [record_to_resource(r) for r in records]
    return _fhir(search_bundle(request, search, entries, total))


def order_numbers(request: Request, order_id: str) -> set[str]:
    """The placer order number and Accession Number of ``ServiceRequest/[order_id]``
    (what lab results and studies quote of it); empty if there is no such order."""
    try:
        rec = services_of(request.app).orders.get(order_id)
    except NotFoundError:
        return set()
    return {n for n in (rec.placer_order_number, rec.item.order.accession_number) if n}


class LinkRequest(BaseModel):
    """Body of ``POST /orders/unmatched/{study_uid}/link``."""

    order: str


def _link_json(link: StudyLink) -> dict[str, Any]:
    return {
        "study_instance_uid": link.study_instance_uid,
        "order": link.order_id or None,
        "matched_by": link.matched_by or None,
        "accession_number": link.accession_number,
        "requested_procedure_id": link.requested_procedure_id,
        "first_seen_at": _iso(link.first_seen_at),
        "linked_at": _iso(link.linked_at) if link.linked_at else None,
    }


@router.get("/orders/unmatched", tags=["orders"])
def list_unmatched(
    orders: OrdersDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> list[dict[str, Any]]:
    """Received studies that match no order (reconciliation), oldest first."""
    return [_link_json(x) for x in orders.unmatched(limit=limit, offset=offset)]


@router.post("/orders/unmatched/{study_uid}/link", tags=["orders"])
def link_unmatched(study_uid: str, body: LinkRequest, orders: OrdersDep) -> Response:
    """Link a received study to an order; the order's demographics then apply."""
    link = orders.link(study_uid, body.order)
    return JSONResponse(_link_json(link))


def include(app: FastAPI) -> None:
    """Add these routes to ``app`` (``create_app`` calls it)."""
    app.include_router(router)
