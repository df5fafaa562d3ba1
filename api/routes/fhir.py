"""FHIR R4 under ``/fhir``: ImagingStudy, Patient, Endpoint and the CapabilityStatement.

Search follows FHIR R4 3.1.1 (http://hl7.org/fhir/R4/search.html) with lenient
handling: unknown parameters are ignored and left out of the ``self`` link. Every
error is an OperationOutcome (rendered in :mod:`api.errors`). Resources are built by
:mod:`api.fhir.imaging` from index rows; queries reuse the QIDO-RS query builder
(:mod:`storage.index.queries`), so ``started`` is DICOM range matching on StudyDate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from api.deps import IndexDep, base_url
from api.dicomweb import parse_accept
from api.fhir import (
    FHIR_JSON,
    ResourceCapability,
    capability_statement,
    last_updated_bounds,
    parse_date_param,
    parse_paging,
    parse_token,
    searchset_bundle,
)
from api.fhir.imaging import (
    DCM_SYSTEM,
    DICOM_UID_SYSTEM,
    ENDPOINT_ID,
    dicomweb_endpoint,
    imaging_study,
    issuer_for_system,
    patient,
)
from api.routes.dicomweb import PREFIX as DICOMWEB_PREFIX
from core.errors import InvalidQueryError, NotFoundError
from storage.index.queries import Match, Query
from storage.index.sql import SqlIndex

__all__ = ["PREFIX", "router"]

PREFIX = "/fhir"
router = APIRouter(prefix=PREFIX, tags=["fhir"])

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_FHIR_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {FHIR_JSON: {}}, "description": "A FHIR resource"},
    400: {"description": "OperationOutcome: invalid search"},
    404: {"description": "OperationOutcome: unknown resource"},
}

_IMAGING_PARAMS = (
    ("patient", "reference", "Patient/[id] of the subject"),
    ("subject", "reference", "Patient/[id] of the subject"),
    ("patient:identifier", "token", "Patient ID of the subject: [issuer system]|[id]"),
    ("identifier", "token", "Accession Number, or urn:dicom:uid|urn:oid:[Study UID]"),
    ("started", "date", "Study Date, with prefixes eq, ge, gt, le, lt"),
    ("modality", "token", f"{DCM_SYSTEM}|[code], or the code alone"),
    ("_id", "token", "Study Instance UID"),
    ("_lastUpdated", "date", "When the index last changed the study"),
)
_PATIENT_PARAMS = (
    ("identifier", "token", "Patient ID: [issuer system]|[id]"),
    ("name", "string", "Case-insensitive prefix of any name part"),
    ("birthdate", "date", "Patient's Birth Date"),
    ("_id", "token", "Logical id"),
)


def _fhir(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def _check_accept(request: Request) -> None:
    fmt = request.query_params.get("_format")
    if fmt and fmt not in ("json", "application/json", FHIR_JSON):
        raise HTTPException(406, detail="only JSON is supported")
    for rng in parse_accept(request.headers.get("accept")):
        if rng.matches(FHIR_JSON) or rng.matches("application/json"):
            return
    raise HTTPException(406, detail="only application/fhir+json is supported")


def _base(request: Request) -> str:
    return base_url(request, PREFIX)


@router.get("/metadata", summary="CapabilityStatement", responses=_FHIR_RESPONSES)
def metadata(request: Request) -> JSONResponse:
    """The server's CapabilityStatement (FHIR R4 http.html#capabilities)."""
    _check_accept(request)
    resources = [
        ResourceCapability("Endpoint", ("read",)),
        ResourceCapability("ImagingStudy", ("read", "search-type"), _IMAGING_PARAMS),
        ResourceCapability("Patient", ("read", "search-type"), _PATIENT_PARAMS),
    ]
    return _fhir(capability_statement(_base(request), resources, software_version="0.1.0"))


@router.get(f"/Endpoint/{ENDPOINT_ID}", summary="The DICOMweb Endpoint", responses=_FHIR_RESPONSES)
def read_endpoint(request: Request) -> JSONResponse:
    _check_accept(request)
    return _fhir(dicomweb_endpoint(base_url(request, DICOMWEB_PREFIX)))


# -- ImagingStudy ---------------------------------------------------------------------


def _patient_pk(reference: str) -> int:
    """The pk of ``Patient/[id]`` (or a bare id); -1 (matches nothing) for other ids."""
    parts = reference.rstrip("/").split("/")
    if len(parts) > 1 and parts[-2] != "Patient":
        raise InvalidQueryError("patient reference must be Patient/[id]")
    ident = parts[-1]
    return int(ident) if ident.isdigit() and len(ident) <= 18 else -1


def _identifier_matches(raw: str) -> list[Match]:
    token = parse_token(raw)
    out = [Match("PatientID", token.code)]
    if token.system is not None:
        out.append(Match("IssuerOfPatientID", issuer_for_system(token.system)))
    return out


def _study_query(
    items: Sequence[tuple[str, str]], count: int | None = None, offset: int = 0
) -> tuple[Query, list[tuple[str, str]]]:
    matches: list[Match] = []
    used: list[tuple[str, str]] = []
    patient_pk: int | None = None
    last_updated: list[str] = []
    for name, value in items:
        if name in ("patient", "subject"):
            patient_pk = _patient_pk(value)
        elif name in ("patient:identifier", "subject:Patient.identifier", "subject:identifier"):
            matches += _identifier_matches(value)
        elif name == "identifier":
            token = parse_token(value)
            if token.system == DICOM_UID_SYSTEM or (
                token.system is None and token.code.startswith("urn:oid:")
            ):
                matches.append(Match("StudyInstanceUID", token.code.removeprefix("urn:oid:")))
            else:
                matches.append(Match("AccessionNumber", token.code))
        elif name == "_id":
            if not _ID.fullmatch(value):
                raise InvalidQueryError("_id is not a FHIR id")
            matches.append(Match("StudyInstanceUID", value))
        elif name == "started":
            matches.append(Match("StudyDate", parse_date_param(value).da_range()))
        elif name == "modality":
            codes = []
            for item in value.split(","):
                token = parse_token(item)
                if token.system not in (None, DCM_SYSTEM):
                    raise InvalidQueryError(f"modality system must be {DCM_SYSTEM}")
                codes.append(token.code)
            matches.append(Match("ModalitiesInStudy", "\\".join(codes)))
        elif name == "_lastUpdated":
            last_updated.append(value)
        else:
            continue  # lenient: unknown parameters are ignored (FHIR R4 3.1.1.4)
        used.append((name, value))
    after, after_incl, before, before_incl = last_updated_bounds(last_updated)
    query = Query(
        level="study",
        matches=tuple(matches),
        limit=count,
        offset=offset,
        patient_pk=patient_pk,
        updated_after=after,
        updated_after_inclusive=after_incl,
        updated_before=before,
        updated_before_inclusive=before_incl,
    )
    return query, used


def _studies(index: SqlIndex, study_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not study_rows:
        return []
    uids = "\\".join(r["StudyInstanceUID"] for r in study_rows)
    series_rows = index.find(Query(level="series", matches=(Match("StudyInstanceUID", uids),)))
    instance_rows = index.find(Query(level="instance", matches=(Match("StudyInstanceUID", uids),)))
    out = []
    for st in study_rows:
        uid = st["StudyInstanceUID"]
        out.append(
            imaging_study(
                st,
                [s for s in series_rows if s["StudyInstanceUID"] == uid],
                [i for i in instance_rows if i["StudyInstanceUID"] == uid],
            )
        )
    return out


@router.get("/ImagingStudy", summary="Search ImagingStudy", responses=_FHIR_RESPONSES)
def search_imaging_study(request: Request, index: IndexDep) -> JSONResponse:
    """Search ImagingStudy (FHIR R4 imagingstudy.html#search), a searchset Bundle."""
    _check_accept(request)
    items = list(request.query_params.multi_items())
    paging = parse_paging(dict(items))
    query, used = _study_query(items, paging.count, paging.offset)
    total = index.count(query)
    rows = index.find(query) if paging.count else []
    included = []
    if ("_include", "ImagingStudy:subject") in items or (
        "_include",
        "ImagingStudy:patient",
    ) in items:
        pks = sorted({r["patient_pk"] for r in rows})
        for pk in pks:
            included += [patient(p) for p in index.find(Query(level="patient", patient_pk=pk))]
        used.append(("_include", "ImagingStudy:subject"))
    bundle = searchset_bundle(
        base=_base(request),
        path="ImagingStudy",
        params=used,
        entries=_studies(index, rows),
        total=total,
        paging=paging,
        included=included,
    )
    return _fhir(bundle)


@router.get("/ImagingStudy/{id}", summary="Read ImagingStudy", responses=_FHIR_RESPONSES)
def read_imaging_study(request: Request, index: IndexDep, id: str) -> JSONResponse:
    """Read an ImagingStudy; its id is the Study Instance UID."""
    _check_accept(request)
    if not _ID.fullmatch(id):
        raise NotFoundError("no such ImagingStudy")
    rows = index.find(Query(level="study", matches=(Match("StudyInstanceUID", id),)))
    if not rows:
        raise NotFoundError("no such ImagingStudy")
    return _fhir(_studies(index, rows)[0])


# -- Patient --------------------------------------------------------------------------


@router.get("/Patient", summary="Search Patient", responses=_FHIR_RESPONSES)
def search_patient(request: Request, index: IndexDep) -> JSONResponse:
    """Search Patient by identifier, name, birthdate or _id (FHIR R4 patient.html#search)."""
    _check_accept(request)
    items = list(request.query_params.multi_items())
    paging = parse_paging(dict(items))
    matches: list[Match] = []
    used: list[tuple[str, str]] = []
    patient_pk: int | None = None
    fuzzy = False
    for name, value in items:
        if name == "identifier":
            matches += _identifier_matches(value)
        elif name == "name":
            matches.append(Match("PatientName", value))
            fuzzy = True
        elif name == "birthdate":
            matches.append(Match("PatientBirthDate", parse_date_param(value).da_range()))
        elif name == "_id":
            patient_pk = _patient_pk(value)
        else:
            continue
        used.append((name, value))
    query = Query(
        level="patient",
        matches=tuple(matches),
        fuzzy=fuzzy,
        limit=paging.count,
        offset=paging.offset,
        patient_pk=patient_pk,
    )
    total = index.count(query)
    rows = index.find(query) if paging.count else []
    bundle = searchset_bundle(
        base=_base(request),
        path="Patient",
        params=used,
        entries=[patient(r) for r in rows],
        total=total,
        paging=paging,
    )
    return _fhir(bundle)


@router.get("/Patient/{id}", summary="Read Patient", responses=_FHIR_RESPONSES)
def read_patient(request: Request, index: IndexDep, id: str) -> JSONResponse:
    _check_accept(request)
    if not id.isdigit() or len(id) > 18:
        raise NotFoundError("no such Patient")
    rows = index.find(Query(level="patient", patient_pk=int(id)))
    if not rows:
        raise NotFoundError("no such Patient")
    return _fhir(patient(rows[0]))
