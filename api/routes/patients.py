"""Patient identity over HTTP (IHE PIR, issue 17): FHIR ``Patient`` update and ``$merge``,
and the review API of identity changes.

* ``PUT /fhir/Patient/{id}`` (FHIR R4 http.html#update): the Patient's demographics
  (name, birthDate, gender) and, when its identifier differs, a Patient ID change
  (as HL7 A47). Patient ids are index rows: no update-as-create.
* ``POST /fhir/Patient/$merge`` (FHIR R5 Patient-merge, answered in R4 terms):
  ``source-patient`` / ``source-patient-identifier`` becomes ``target-patient`` /
  ``target-patient-identifier``; ``result-patient`` carries the survivor's
  demographics; ``preview`` changes nothing. The answer is a Parameters with
  ``input``, ``outcome`` and ``result`` (the surviving Patient); the source Patient
  then reads ``active: false`` with ``link`` ``replaced-by`` the target.
* ``GET /admin/patients/changes`` (newest first), ``GET /admin/patients/changes/{id}``
  (with every row's before/after values) and ``POST .../{id}/undo``, scope ``admin``
  like every ``/admin`` route; the security middleware logs each request.

Routes only translate; the use cases are :class:`services.patients.PatientIdentityService`
(``app.state.patients``), which audits every change with before/after.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.conditional import if_match_version
from api.deps import IndexDep
from api.fhir import check_accept, fhir_base, fhir_response, operation_outcome, parse_reference
from api.fhir._input import MalformedResourceError, expect, read_resource
from api.fhir.imaging import issuer_for_system, patient
from core.errors import InvalidQueryError, NotFoundError
from core.patients import (
    ChangePatientIdentifier,
    Demographics,
    MergePatients,
    PatientRef,
    UpdatePatient,
)
from services.patients import PatientIdentityService, PatientLinks
from storage.index.queries import Query as IndexQuery
from storage.index.sql import SqlIndex

__all__ = ["admin_router", "etag", "fhir_router", "patient_pk", "with_links"]

fhir_router = APIRouter(prefix="/fhir", tags=["fhir"])
admin_router = APIRouter(prefix="/admin", tags=["admin"])

_GENDER = {"male": "M", "female": "F", "other": "O", "unknown": ""}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_MAX_PART = 64  # one PN component group (PS3.5 Table 6.2-1)
_CHANGE_ID = re.compile(r"[0-9a-f]{32}")
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def _service(request: Request) -> PatientIdentityService:
    svc: PatientIdentityService = request.app.state.patients
    return svc


def _who(request: Request) -> str:
    principal = getattr(request.state, "principal", None)
    return str(getattr(principal, "subject", "") or "anonymous")


def patient_pk(ident: str) -> int:
    """The ``patients`` row a Patient id names (ids are row keys); NotFoundError for an
    id that cannot be one: ASCII digits only (``str.isdigit`` also accepts superscripts,
    which ``int()`` refuses), at most 18 of them (a 64-bit key)."""
    if not (ident.isascii() and ident.isdigit()) or len(ident) > 18:
        raise NotFoundError("no such Patient")
    return int(ident)


def with_links(request: Request, resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` with ``active`` and ``link`` from the merges (FHIR R4
    Patient.link: ``replaced-by`` on the obsolete record, ``replaces`` on the survivor)."""
    return with_links_many(request, [resource])[0]


def with_links_many(request: Request, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`with_links` of a page of Patients, their merges and versions read in one
    go (a round trip per row made a 50-patient page 150-400 ms on PostgreSQL, issue 21)."""
    svc: PatientIdentityService | None = getattr(request.app.state, "patients", None)
    pks = [int(i) for i in (str(r.get("id", "")) for r in resources)
           if i.isascii() and i.isdigit()]
    if svc is None or not pks:
        return resources
    states = svc.link_states(pks)
    for resource in resources:
        ident = str(resource.get("id", ""))
        if ident.isascii() and ident.isdigit() and int(ident) in states:
            _apply_links(resource, *states[int(ident)])
    return resources


def _apply_links(resource: dict[str, Any], links: PatientLinks, version: int) -> None:
    # FHIR R4 version-aware updates (http.html#concurrency): the version If-Match names.
    resource.setdefault("meta", {})["versionId"] = str(version)
    out: list[dict[str, Any]] = []
    if links.replaced_by is not None:
        resource["active"] = False
        out.append({"other": {"reference": f"Patient/{links.replaced_by}"}, "type": "replaced-by"})
    for pk in links.replaces:
        out.append({"other": {"reference": f"Patient/{pk}"}, "type": "replaces"})
    if links.replaces and links.replaced_by is None:
        resource["active"] = True
    if out:
        resource["link"] = out


def etag(resource: dict[str, Any]) -> dict[str, str]:
    """The ``ETag`` header of a Patient: ``W/"versionId"`` (FHIR R4 http.html#read)."""
    version = resource.get("meta", {}).get("versionId")
    return {"ETag": f'W/"{version}"'} if version else {}


def _patient_resource(request: Request, index: SqlIndex, pk: int) -> dict[str, Any]:
    rows = index.find(IndexQuery(level="patient", patient_pk=pk))
    if not rows:
        raise NotFoundError("no such Patient")
    return with_links(request, patient(rows[0]))


# -- FHIR Patient → command values ----------------------------------------------------


def _pn(names: Any) -> str:
    """The official (else first) HumanName as a DICOM PN: ``family^given words^^prefix^suffix``
    (the inverse of :func:`api.fhir.imaging._human_name` for names it wrote)."""
    items = expect(names, list, "Patient.name") or []
    if not items:
        return ""
    for i, item in enumerate(items):
        expect(item, dict, f"Patient.name[{i}]")
    chosen = next((n for n in items if n.get("use") == "official"), items[0])
    family = expect(chosen.get("family"), str, "Patient.name.family", max_length=_MAX_PART) or ""
    parts: dict[str, list[str]] = {}
    for key in ("given", "prefix", "suffix"):
        values = expect(chosen.get(key), list, f"Patient.name.{key}") or []
        parts[key] = [expect(v, str, f"Patient.name.{key}", max_length=_MAX_PART) for v in values]
    if not family and not parts["given"]:
        text = expect(chosen.get("text"), str, "Patient.name.text", max_length=_MAX_PART) or ""
        family = text
    comps = [
        family,
        " ".join(parts["given"]),
        "",
        " ".join(parts["prefix"]),
        " ".join(parts["suffix"]),
    ]
    for c in comps:
        if any(ch in c for ch in "^=\\"):
            raise MalformedResourceError("Patient.name: ^ = and \\ are not allowed in a name")
    return "^".join(comps).rstrip("^")


def _demographics(resource: dict[str, Any]) -> Demographics:
    """A Patient's name, birthDate and gender as DICOM values (absent: sent empty,
    FHIR update replaces the whole resource)."""
    birth = expect(resource.get("birthDate"), str, "Patient.birthDate") or ""
    if birth and not _DATE.fullmatch(birth):
        raise MalformedResourceError("Patient.birthDate must be a full date (YYYY-MM-DD)")
    gender = expect(resource.get("gender"), str, "Patient.gender") or "unknown"
    if gender not in _GENDER:
        raise MalformedResourceError("Patient.gender is male, female, other or unknown")
    return Demographics(
        name=_pn(resource.get("name")), birth_date=birth.replace("-", ""), sex=_GENDER[gender]
    )


def _identifier(value: Any, path: str) -> PatientRef:
    expect(value, dict, path)
    ident = expect(value.get("value"), str, f"{path}.value", max_length=64) or ""
    if not ident.strip():
        raise MalformedResourceError(f"{path}.value is required")
    system = expect(value.get("system"), str, f"{path}.system", max_length=255) or ""
    issuer = issuer_for_system(system) if system else ""
    if len(issuer) > 64:
        raise MalformedResourceError(f"{path}.system is too long for an Issuer of Patient ID")
    return PatientRef(ident, issuer)


def _body_identifier(resource: dict[str, Any]) -> PatientRef | None:
    """The MR identifier of a Patient body (else its first), None if it has none."""
    items = expect(resource.get("identifier"), list, "Patient.identifier") or []
    if not items:
        return None
    for i, item in enumerate(items):
        expect(item, dict, f"Patient.identifier[{i}]")
    chosen = next(
        (
            it
            for it in items
            if any(
                isinstance(c, dict) and c.get("code") == "MR"
                for c in ((it.get("type") or {}).get("coding") or [])
                if isinstance(it.get("type"), dict)
            )
        ),
        items[0],
    )
    return _identifier(chosen, "Patient.identifier")


def _row_ref(svc: PatientIdentityService, pk: int) -> PatientRef:
    row = svc.patient(pk)
    if row is None:
        raise NotFoundError("no such Patient")
    if not row.patient_id or row.issuer.startswith("study:"):
        raise InvalidQueryError("this Patient has no Patient ID to change or merge")
    return PatientRef(row.patient_id, row.issuer)


# -- routes ---------------------------------------------------------------------------


@fhir_router.put("/Patient/{id}", summary="Update Patient (demographics, identifier)")
async def update_patient(request: Request, index: IndexDep, id: str) -> JSONResponse:
    """FHIR R4 update of a Patient (http.html#update): every store follows (see
    :mod:`services.patients`); 404 for an unknown id (no update-as-create).

    Version-aware (http.html#concurrency): with ``If-Match: W/"n"`` the update is
    applied only while the Patient is at version ``n`` (checked in the change's
    transaction), else 412 and nothing changes. The answer carries the new ``ETag``
    and ``meta.versionId``."""
    check_accept(request)
    pk = patient_pk(id)
    expected = if_match_version(request)
    body = await read_resource(request)
    if body.get("resourceType") != "Patient":
        raise MalformedResourceError("the body must be a Patient")
    if str(body.get("id", "")) != id:
        raise MalformedResourceError("Patient.id must be the id of the URL")
    svc = _service(request)
    current = _row_ref(svc, pk)
    demo = _demographics(body)
    wanted = _body_identifier(body)
    agent = _who(request)
    # Blocking work (one transaction each) off the event loop.
    if wanted is not None:
        # No system in the body: the same assigning authority (only the ID compared).
        same = wanted.patient_id == current.patient_id and (
            not wanted.issuer or wanted.issuer == current.issuer
        )
        if not same:
            new = PatientRef(wanted.patient_id, wanted.issuer)
            await run_in_threadpool(
                svc.apply,
                ChangePatientIdentifier(old=current, new=new),
                source="fhir",
                agent=agent,
                expected_version=expected,
            )
            row = svc.patient(pk)
            assert row is not None
            current = PatientRef(row.patient_id, row.issuer)
            if expected is not None:
                expected += 1  # the identifier change is this update's first version
    await run_in_threadpool(
        svc.apply,
        UpdatePatient(current, demo),
        source="fhir",
        agent=agent,
        expected_version=expected,
    )
    resource = _patient_resource(request, index, pk)
    return fhir_response(resource, headers=etag(resource))


def _merge_ref(
    svc: PatientIdentityService, request: Request, params: dict[str, list[Any]], role: str
) -> tuple[PatientRef, int | None]:
    refs = params.get(f"{role}-patient", [])
    idents = params.get(f"{role}-patient-identifier", [])
    if len(refs) > 1 or len(idents) > 1 or not (refs or idents):
        raise MalformedResourceError(
            f"exactly one {role}-patient or {role}-patient-identifier is required"
        )
    if refs:
        ref = expect(refs[0].get("valueReference"), dict, f"{role}-patient.valueReference") or {}
        text = expect(ref.get("reference"), str, f"{role}-patient.valueReference.reference") or ""
        pk = patient_pk(parse_reference(text, target="Patient", base=fhir_base(request)))
        found = _row_ref(svc, pk)
        if idents:
            given = _identifier(idents[0].get("valueIdentifier"), f"{role}-patient-identifier")
            if given.patient_id != found.patient_id:
                raise InvalidQueryError(f"{role}-patient and its identifier disagree")
        return found, pk
    return _identifier(idents[0].get("valueIdentifier"), f"{role}-patient-identifier"), None


@fhir_router.post("/Patient/$merge", summary="Merge two Patients (IHE PIR, R5 $merge)")
async def merge_patients(request: Request, index: IndexDep) -> JSONResponse:
    """FHIR ``Patient/$merge`` (R5 patient-operation-merge): everything of the source
    patient (images, orders and worklist items, lab results) becomes the target's."""
    check_accept(request)
    body = await read_resource(request)
    if body.get("resourceType") != "Parameters":
        raise MalformedResourceError("the body must be a Parameters resource")
    params: dict[str, list[Any]] = {}
    for i, p in enumerate(expect(body.get("parameter"), list, "Parameters.parameter") or []):
        expect(p, dict, f"Parameters.parameter[{i}]")
        name = expect(p.get("name"), str, f"Parameters.parameter[{i}].name", max_length=64)
        params.setdefault(str(name), []).append(p)
    svc = _service(request)
    source, _source_pk = _merge_ref(svc, request, params, "source")
    target, target_pk = _merge_ref(svc, request, params, "target")
    demo: Demographics | None = None
    results = params.get("result-patient", [])
    if len(results) > 1:
        raise MalformedResourceError("at most one result-patient")
    if results:
        res = expect(results[0].get("resource"), dict, "result-patient.resource") or {}
        if res.get("resourceType") != "Patient":
            raise MalformedResourceError("result-patient must be a Patient")
        if target_pk is not None and "id" in res and str(res["id"]) != str(target_pk):
            raise InvalidQueryError("result-patient must have the target patient's id")
        demo = _demographics(res)
    preview = False
    for p in params.get("preview", []):
        preview = bool(expect(p.get("valueBoolean"), bool, "preview.valueBoolean"))
    command = MergePatients(surviving=target, obsolete=source, demographics=demo)
    if preview:
        outcome = operation_outcome("information", "informational", "preview: nothing changed")
    else:
        change = await run_in_threadpool(svc.apply, command, source="fhir", agent=_who(request))
        outcome = operation_outcome(
            "information",
            "informational",
            f"merged: change {change.change_id} ({change.studies} studies, "
            f"{change.orders} orders, {change.lab_results} lab results)",
        )
    out: list[dict[str, Any]] = [
        {"name": "input", "resource": body},
        {"name": "outcome", "resource": outcome},
    ]
    row = svc.find(target) if target_pk is None else None
    pk = target_pk if target_pk is not None else (row.pk if row is not None else None)
    if pk is not None:
        out.append({"name": "result", "resource": _patient_resource(request, index, pk)})
    return fhir_response({"resourceType": "Parameters", "parameter": out})


# -- review API -------------------------------------------------------------------------


def _change_json(c: Any, *, rows: bool) -> dict[str, Any]:
    out = {
        "change_id": c.change_id,
        "kind": c.kind,
        "source": c.source,
        "agent": c.agent,
        "patients": [f"Patient/{p}" for p in c.patient_pks],
        "summary": c.summary,
        "undoes": c.undoes or None,
        "undone_by": c.undone_by or None,
        "created_at": c.created_at.isoformat(),
    }
    if rows:
        out["rows"] = c.rows
    return out


@admin_router.get("/patients/changes", summary="Patient identity changes, newest first")
def list_changes(
    request: Request,
    patient: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> list[dict[str, Any]]:
    changes = _service(request).changes(patient_pk=patient, limit=limit, offset=offset)
    return [_change_json(c, rows=False) for c in changes]


@admin_router.get("/patients/changes/{change_id}", summary="One change with before/after rows")
def show_change(request: Request, change_id: str) -> dict[str, Any]:
    if not _CHANGE_ID.fullmatch(change_id):
        raise NotFoundError("no such patient change")
    return _change_json(_service(request).change(change_id), rows=True)


@admin_router.post("/patients/changes/{change_id}/undo", summary="Undo one change")
def undo_change(request: Request, change_id: str) -> dict[str, Any]:
    """Restore the rows as they were before ``change_id`` (409 if a later change touched
    them: undo that first, or if it is undone already)."""
    if not _CHANGE_ID.fullmatch(change_id):
        raise NotFoundError("no such patient change")
    change = _service(request).undo(change_id, source="api", agent=_who(request))
    return {
        "change_id": change.change_id,
        "kind": change.kind,
        "undoes": change_id,
        "studies": change.studies,
        "orders": change.orders,
        "lab_results": change.lab_results,
    }
