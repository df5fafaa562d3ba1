"""FHIR R4 ServiceRequest for imaging orders, and the unmatched-studies list.

Routes (``router``; :func:`include` adds it to an app):

* ``POST /fhir/ServiceRequest``: a new order. The Patient comes *contained*
  (``subject.reference = "#<id>"``, FHIR R4 3.1.5 contained resources), so one
  request carries the order and the demographics as ordered.
* ``PUT /fhir/ServiceRequest/{id}``: update, or create with that id (R4 3.1.0.4.1
  update as create). ``status = revoked`` cancels the order.
* ``GET /fhir/ServiceRequest/{id}`` and ``GET /fhir/ServiceRequest?…`` with
  ``_lastUpdated`` (``ge``/``gt``/``le``/``lt``/``eq`` prefixes, R4 3.1.1.5.7),
  ``status`` and ``identifier`` (``[system|]value``), ``_count``: a ``searchset``
  Bundle, oldest change first, so polling ``_lastUpdated=gt<last seen>`` is the
  change feed.
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

The API may not import ``worklist`` (STYLE.md §1), so it uses
:class:`storage.orders.OrderService` directly.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from core.errors import InvalidDatasetError, ServiceError
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
from storage.index.orders import SqlOrderStore, StudyLink
from storage.orders import OrderService

__all__ = ["include", "record_to_resource", "resource_to_placed", "router"]

router = APIRouter(tags=["fhir"])

FHIR_JSON = "application/fhir+json"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
AE_SYSTEM = "urn:pacslab:ae-title"
ACCESSION_SYSTEM = "urn:pacslab:accession"
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


class InvalidResourceError(InvalidDatasetError):
    """A ServiceRequest we cannot take (FHIR R4 ``invalid``, HTTP 422)."""

    title = "Invalid resource"
    http_status = 422


# ------------------------------------------------------------------ mapping (pure)


def _coding(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    codings = concept.get("coding") or []
    return [c for c in codings if isinstance(c, dict)]


def _person_name(name: dict[str, Any]) -> str:
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
    ref = str((resource.get("subject") or {}).get("reference") or "")
    if not ref.startswith("#"):
        raise InvalidResourceError("subject must reference a contained Patient (#id)")
    patient = next(
        (
            c
            for c in resource.get("contained") or []
            if isinstance(c, dict) and c.get("resourceType") == "Patient" and c.get("id") == ref[1:]
        ),
        None,
    )
    if patient is None:
        raise InvalidResourceError(f"contained Patient {ref} not found")
    ids = [i for i in patient.get("identifier") or [] if isinstance(i, dict) and i.get("value")]
    if not ids:
        raise InvalidResourceError("Patient.identifier with a value is required")
    names = [n for n in patient.get("name") or [] if isinstance(n, dict)]
    birth = patient.get("birthDate")
    try:
        birth_date = datetime.strptime(str(birth), "%Y-%m-%d").date() if birth else None
    except ValueError:
        raise InvalidResourceError("Patient.birthDate must be YYYY-MM-DD") from None
    issuer = str(ids[0].get("system") or "").removeprefix("urn:oid:")
    return Patient(
        name=_person_name(names[0]) if names else "",
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
    status = resource.get("status")
    if status not in ("active", "draft", "on-hold", "revoked"):
        raise InvalidResourceError(f"status {status!r} cannot be set by the placer")
    if resource.get("intent") not in ("order", "original-order", "instance-order"):
        raise InvalidResourceError("intent must be order")
    placer = accession = ""
    for ident in resource.get("identifier") or []:
        if not isinstance(ident, dict):
            continue
        codes = {c.get("code") for c in _coding(ident.get("type"))}
        if "PLAC" in codes:
            placer = str(ident.get("value") or "")
        elif "ACSN" in codes:
            accession = str(ident.get("value") or "")
    code_concept = resource.get("code") or {}
    codings = _coding(code_concept)
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
            for d in resource.get("orderDetail") or []
            for c in _coding(d)
            if c.get("system") == DCM and c.get("code")
        ),
        "",
    )
    station = next(
        (
            str(c.get("code"))
            for d in resource.get("locationCode") or []
            for c in _coding(d)
            if c.get("system") == AE_SYSTEM and c.get("code")
        ),
        "",
    )
    occurrence = resource.get("occurrenceDateTime")
    notes = " ".join(str(n.get("text")) for n in resource.get("note") or [] if isinstance(n, dict))
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
    requester = resource.get("requester") or {}
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
        "identifier": [{"value": p.id, **({"system": p.issuer} if p.issuer else {})}],
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


def _outcome(exc: ServiceError) -> JSONResponse:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": exc.fhir_code, "diagnostics": str(exc) or exc.title}
        ],
    }
    return JSONResponse(body, status_code=exc.http_status, media_type=FHIR_JSON)


def _fhir(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def _last_updated(values: list[str]) -> tuple[datetime | None, datetime | None]:
    lo: datetime | None = None
    hi: datetime | None = None
    for raw in values:
        prefix = raw[:2] if raw[:2] in ("ge", "gt", "le", "lt", "eq") else "eq"
        text = raw[2:] if raw[:2] == prefix else raw
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidResourceError(f"_lastUpdated {raw!r} is not a dateTime") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        tick = timedelta(microseconds=1)
        if prefix in ("ge", "eq"):
            lo = when
        if prefix == "gt":
            lo = when + tick
        if prefix == "le":
            hi = when + tick
        if prefix == "lt":
            hi = when
        if prefix == "eq" and len(text) <= 10:  # a day: the whole day (3.1.1.5.7 precision)
            hi = when + timedelta(days=1)
    return lo, hi


# ------------------------------------------------------------------------- routes


def _service(request: Request) -> OrderService:
    state = request.app.state
    service: OrderService | None = getattr(state, "order_service", None)
    if service is None:
        settings = state.settings
        store = SqlOrderStore(state.index, webhook=bool(settings.orders.webhook_url))
        service = OrderService(store, settings.orders)
        state.order_service = service
    return service


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidResourceError("body is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidResourceError("body must be a JSON object")
    return body


@router.post("/fhir/ServiceRequest")
async def create_service_request(request: Request) -> Response:
    try:
        placed = resource_to_placed(await _body(request))
        service = _service(request)
        if placed.action is OrderAction.CANCEL:
            raise InvalidResourceError("a new ServiceRequest cannot be revoked")
        rec = service.place(placed)
    except ServiceError as exc:
        return _outcome(exc)
    location = f"{request.base_url}fhir/ServiceRequest/{rec.id}/_history/{rec.version}"
    return _fhir(record_to_resource(rec), 201, {"Location": location, "ETag": f'W/"{rec.version}"'})


@router.put("/fhir/ServiceRequest/{order_id}")
async def update_service_request(order_id: str, request: Request) -> Response:
    try:
        body = await _body(request)
        if body.get("id") not in (None, order_id):
            raise InvalidResourceError("id in the body differs from the URL")
        rec, created = _service(request).put(order_id, resource_to_placed(body))
    except ServiceError as exc:
        return _outcome(exc)
    return _fhir(record_to_resource(rec), 201 if created else 200, {"ETag": f'W/"{rec.version}"'})


@router.get("/fhir/ServiceRequest/{order_id}")
def read_service_request(order_id: str, request: Request) -> Response:
    try:
        rec = _service(request).get(order_id)
    except ServiceError as exc:
        return _outcome(exc)
    return _fhir(record_to_resource(rec), headers={"ETag": f'W/"{rec.version}"'})


@router.get("/fhir/ServiceRequest")
def search_service_requests(request: Request) -> Response:
    params = request.query_params
    try:
        lo, hi = _last_updated(params.getlist("_lastUpdated"))
        statuses = []
        for value in ",".join(params.getlist("status")).split(","):
            if not value:
                continue
            if value not in _STATUS_SEARCH:
                raise InvalidResourceError(f"status {value!r} is not a RequestStatus we hold")
            statuses.extend(_STATUS_SEARCH[value])
        identifier = params.get("identifier")
        if identifier is not None and "|" in identifier:
            identifier = identifier.split("|", 1)[1]
        if identifier and identifier.startswith("urn:oid:"):
            identifier = identifier.removeprefix("urn:oid:")
        try:
            count = max(1, min(int(params.get("_count", "100")), 1000))
        except ValueError:
            raise InvalidResourceError("_count must be an integer") from None
        records = _service(request).search(
            status=statuses,
            updated_from=lo,
            updated_before=hi,
            identifier=identifier or None,
            limit=count,
        )
        if identifier and not records:
            records = [
                r
                for r in _service(request).search(
                    status=statuses, updated_from=lo, updated_before=hi, limit=count
                )
                if r.study_instance_uid == identifier
            ]
    except ServiceError as exc:
        return _outcome(exc)
    base = f"{request.base_url}fhir/ServiceRequest"
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(records),
        "link": [{"relation": "self", "url": str(request.url)}],
        "entry": [
            {
                "fullUrl": f"{base}/{r.id}",
                "resource": record_to_resource(r),
                "search": {"mode": "match"},
            }
            for r in records
        ],
    }
    return _fhir(bundle)


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


def _problem(exc: ServiceError, request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "type": "about:blank",
            "title": exc.title,
            "status": exc.http_status,
            "detail": str(exc),
            "instance": str(request.url.path),
        },
        status_code=exc.http_status,
        media_type="application/problem+json",
    )


@router.get("/orders/unmatched", tags=["orders"])
def list_unmatched(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> list[dict[str, Any]]:
    """Received studies that match no order (reconciliation), oldest first."""
    return [_link_json(x) for x in _service(request).unmatched(limit=limit, offset=offset)]


@router.post("/orders/unmatched/{study_uid}/link", tags=["orders"])
def link_unmatched(study_uid: str, body: LinkRequest, request: Request) -> Response:
    """Link a received study to an order; the order's demographics then apply."""
    try:
        link = _service(request).link(study_uid, body.order)
    except ServiceError as exc:
        return _problem(exc, request)
    return JSONResponse(_link_json(link))


def include(app: FastAPI) -> None:
    """Add these routes to ``app`` (``create_app`` calls it)."""
    app.include_router(router)
