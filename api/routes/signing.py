"""Signing lab and imaging reports (issue 7 §3): FHIR operations on DiagnosticReport.

- ``POST /fhir/DiagnosticReport/$sign`` — body: a DiagnosticReport (status ``final``);
  stores version 1 with its detached JWS, answers 201 with the signed ``Provenance``.
- ``POST /fhir/DiagnosticReport/{id}/$amend`` — body: the new content (status
  ``amended``, ``corrected`` or ``appended``); stores the next version, whose
  Provenance names the old one (``entity.role = revision``). The old one is kept.
- ``GET /fhir/DiagnosticReport/{id}/_history/{vid}`` — the signed bytes exactly.
- ``GET /fhir/Provenance?target=DiagnosticReport/{id}`` — every signature.

A signed version is never changed: re-signing an id answers 409 (SignedResultError).
Both operations need ``results.sign`` (see :mod:`core.auth`).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from api.audit import set_audit_patient
from api.auth import PrincipalDep
from api.signing import cert_sha256, provenance, sign_detached
from core.audit import AuditEntry, patient_key
from core.canonical import canonicalize
from core.errors import InvalidDatasetError, NotFoundError, SignedResultError
from core.logging import correlation_id
from core.retention import RetentionFacts
from storage.results import SignedResult, SignedResultStore

__all__ = ["router"]

router = APIRouter(prefix="/fhir", tags=["fhir"])

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 id datatype
_TYPE = "DiagnosticReport"
ReportBody = Annotated[dict[str, Any], Body()]


def _patient(report: dict[str, Any]) -> tuple[str, str] | None:
    subject = report.get("subject") or {}
    ident = subject.get("identifier") or {}
    if ident.get("value"):
        return str(ident["value"]), str(ident.get("system", ""))
    ref = str(subject.get("reference", ""))
    return (ref.removeprefix("Patient/"), "") if ref else None


def _codes(report: dict[str, Any]) -> frozenset[str]:
    out: set[str] = set()
    for concept in [report.get("code") or {}, *(report.get("category") or [])]:
        for coding in concept.get("coding", []) if isinstance(concept, dict) else []:
            if coding.get("code"):
                out.add(str(coding["code"]))
    return frozenset(out)


def _reference_date(report: dict[str, Any]) -> date:
    for key in ("effectiveDateTime", "issued"):
        value = report.get(key)
        if isinstance(value, str) and len(value) >= 10:
            try:
                return date.fromisoformat(value[:10])
            except ValueError:
                pass
    return datetime.now(UTC).date()


def _sign(request: Request, principal_subject: str, report: dict[str, Any], *,
          version: int, replaces: int | None) -> JSONResponse:
    app = request.app
    store: SignedResultStore = app.state.signed_results
    rid = str(report["id"])
    now = datetime.now(UTC)
    meta = dict(report.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = now.isoformat().replace("+00:00", "Z")
    report = {**report, "meta": meta}
    payload = canonicalize(report)
    cert, key = app.state.signing_cert, app.state.signing_key
    jws = sign_detached(payload, key, cert, when=now)
    patient = _patient(report)
    pkey = patient_key(app.state.patient_secret, patient[0], patient[1]) if patient else ""
    if patient:
        set_audit_patient(request, patient[0], patient[1])
    store.add(SignedResult(
        resource_type=_TYPE, resource_id=rid, version=version, status=str(report["status"]),
        canonical_json=payload.decode(), jws=jws, cert_sha256=cert_sha256(cert),
        signer=principal_subject, signed_at=now, replaces_version=replaces, patient_key=pkey,
    ))
    app.state.retention.assign_result(f"{_TYPE}/{rid}", RetentionFacts(
        kind="result", reference_date=_reference_date(report), codes=_codes(report),
        departments=frozenset(p.get("display", "") for p in report.get("performer", [])
                              if isinstance(p, dict)) - {""},
        deceased=bool(report.get("extension") and any(
            e.get("url", "").endswith("patient-deceased") and e.get("valueBoolean")
            for e in report["extension"])),
    ))
    app.state.audit.record(AuditEntry(
        action="E", event_type="sign", outcome="0", agent=principal_subject[:128],
        agent_type="user", resource=f"{_TYPE}/{rid}/_history/{version}", patient_key=pkey,
        correlation_id=correlation_id.get()[:32],
        detail=AuditEntry.details({"replaces": replaces or 0, "status": report["status"]}),
    ))
    target = f"{_TYPE}/{rid}/_history/{version}"
    prov = provenance(
        target=target, recorded=now, signer=principal_subject, signature=jws,
        organization=app.state.settings.signing.organization,
        replaces=f"{_TYPE}/{rid}/_history/{replaces}" if replaces else None,
    )
    prov["id"] = f"{rid}-{version}"
    return JSONResponse(prov, status_code=201, media_type="application/fhir+json",
                        headers={"Location": f"/fhir/{target}", "ETag": f'W/"{version}"'})


def _check_report(report: Any, statuses: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(report, dict) or report.get("resourceType") != _TYPE:
        raise InvalidDatasetError("body must be a DiagnosticReport")
    if report.get("status") not in statuses:
        raise InvalidDatasetError(f"status must be one of {', '.join(statuses)}")
    return report


@router.post("/DiagnosticReport/$sign", status_code=201)
def sign_report(request: Request, principal: PrincipalDep,
                report: ReportBody) -> JSONResponse:
    """Sign a final DiagnosticReport (first version)."""
    report = _check_report(report, ("final",))
    rid = str(report.get("id") or uuid.uuid4())
    if not _ID.match(rid):
        raise InvalidDatasetError("id is not a FHIR id")
    if request.app.state.signed_results.latest(_TYPE, rid) is not None:
        raise SignedResultError(f"{_TYPE}/{rid} is already signed: use $amend")
    return _sign(request, principal.subject, {**report, "id": rid}, version=1, replaces=None)


@router.post("/DiagnosticReport/{rid}/$sign", status_code=201)
def sign_report_id(request: Request, rid: str, principal: PrincipalDep,
                   report: ReportBody) -> JSONResponse:
    """Sign a final DiagnosticReport with this id (first version)."""
    if report.get("id", rid) != rid:
        raise InvalidDatasetError("id in the body differs from the URL")
    return sign_report(request, principal, {**report, "id": rid})


@router.post("/DiagnosticReport/{rid}/$amend", status_code=201)
def amend_report(request: Request, rid: str, principal: PrincipalDep,
                 report: ReportBody) -> JSONResponse:
    """Sign a new version replacing the latest; the earlier versions stay as they are."""
    report = _check_report(report, ("amended", "corrected", "appended", "cancelled",
                                    "entered-in-error"))
    if report.get("id", rid) != rid:
        raise InvalidDatasetError("id in the body differs from the URL")
    latest = request.app.state.signed_results.latest(_TYPE, rid)
    if latest is None:
        raise NotFoundError(f"no signed {_TYPE}/{rid} to amend")
    return _sign(request, principal.subject, {**report, "id": rid},
                 version=latest.version + 1, replaces=latest.version)


@router.get("/DiagnosticReport/{rid}/_history/{vid}")
def read_signed_version(request: Request, rid: str, vid: int) -> Response:
    """The signed bytes of one version (RFC 8785 canonical JSON), unchanged."""
    for v in request.app.state.signed_results.versions(_TYPE, rid):
        if v.version == vid:
            if v.patient_key:
                request.state.audit_patient_key = v.patient_key
            return Response(v.canonical_json.encode(), media_type="application/fhir+json",
                            headers={"ETag": f'W/"{vid}"', "X-Signature": v.jws})
    raise NotFoundError(f"no {_TYPE}/{rid}/_history/{vid}")


@router.get("/Provenance")
def search_provenance(request: Request, target: str) -> JSONResponse:
    """Signatures of a signed report: ``target=DiagnosticReport/{id}``."""
    kind, _, rid = target.partition("/")
    rid = rid.split("/_history/")[0]
    if kind != _TYPE or not rid:
        raise NotFoundError("only DiagnosticReport provenance is kept here")
    entries = []
    org = request.app.state.settings.signing.organization
    for v in request.app.state.signed_results.versions(_TYPE, rid):
        prov = provenance(
            target=f"{_TYPE}/{rid}/_history/{v.version}", recorded=v.signed_at, signer=v.signer,
            signature=v.jws, organization=org,
            replaces=f"{_TYPE}/{rid}/_history/{v.replaces_version}" if v.replaces_version
            else None)
        prov["id"] = f"{rid}-{v.version}"
        entries.append({"resource": prov, "search": {"mode": "match"}})
    return JSONResponse({"resourceType": "Bundle", "type": "searchset", "entry": entries},
                        media_type="application/fhir+json")
