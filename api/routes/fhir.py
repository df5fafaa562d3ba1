"""FHIR R4 under ``/fhir``: ImagingStudy, Patient, Endpoint, the CapabilityStatement
and the SMART configuration.

Search follows FHIR R4 3.1.1 (http://hl7.org/fhir/R4/search.html) through the shared
machinery of :mod:`api.fhir` (strict handling of unknown parameters unless
``Prefer: handling=lenient``). Every error is an OperationOutcome (rendered in
:mod:`api.errors`). Resources are built by :mod:`api.fhir.imaging` from index rows;
queries reuse the QIDO-RS query builder (:mod:`storage.index.queries`), so
``started`` is DICOM range matching on StudyDate.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import IndexDep, SettingsDep, base_url
from api.fhir import (
    FHIR_JSON,
    FHIR_PREFIX,
    Search,
    capability_statement,
    check_accept,
    fhir_base,
    fhir_response,
    last_updated_bounds,
    page_total,
    parse_date_param,
    parse_reference,
    parse_token,
    search_bundle,
    search_request,
    smart_configuration,
    split_or,
)
from api.fhir.imaging import (
    ACCESSION_SYSTEM,
    DCM_SYSTEM,
    DICOM_UID_SYSTEM,
    ENDPOINT_ID,
    dicomweb_endpoint,
    imaging_study,
    issuer_for_system,
    patient,
)
from api.fhir.registry import IMAGING_STUDY, PATIENT, RESOURCES
from api.routes.dicomweb import PREFIX as DICOMWEB_PREFIX
from api.routes.ohif import deep_link as ohif_deep_link
from api.routes.patients import etag, patient_pk, with_links, with_links_many
from core import __version__
from core.errors import InvalidQueryError, NotFoundError
from storage.index.queries import Match, NameSearch, Query
from storage.index.sql import SqlIndex

__all__ = ["PREFIX", "patient_identifiers", "patient_pks", "router"]

PREFIX = FHIR_PREFIX
router = APIRouter(prefix=PREFIX, tags=["fhir"])

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_FHIR_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {FHIR_JSON: {}}, "description": "A FHIR resource"},
    400: {"description": "OperationOutcome: invalid search"},
    404: {"description": "OperationOutcome: unknown resource"},
}
#: FHIR R4 ValueSet imagingstudy-status.
_STUDY_STATUSES = frozenset({"registered", "available", "cancelled", "entered-in-error", "unknown"})
#: Matches no row: the pk of a Patient reference that cannot exist.
_NO_PATIENT = -1


def _fhir(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return fhir_response(body, status)


@router.get("/metadata", summary="CapabilityStatement", responses=_FHIR_RESPONSES)
def metadata(request: Request, settings: SettingsDep) -> JSONResponse:
    """The server's CapabilityStatement (FHIR R4 http.html#capabilities), generated
    from the registry the search routes use."""
    check_accept(request)
    return _fhir(
        capability_statement(
            fhir_base(request), RESOURCES, software_version=__version__, auth=settings.auth
        )
    )


@router.get("/.well-known/smart-configuration", summary="SMART App Launch configuration")
def smart_config(settings: SettingsDep) -> JSONResponse:
    """SMART App Launch 2.0 discovery (public: read before a client holds a token)."""
    return JSONResponse(smart_configuration(settings.auth))


@router.get(f"/Endpoint/{ENDPOINT_ID}", summary="The DICOMweb Endpoint", responses=_FHIR_RESPONSES)
def read_endpoint(request: Request) -> JSONResponse:
    check_accept(request)
    return _fhir(dicomweb_endpoint(base_url(request, DICOMWEB_PREFIX)))


# -- patients, shared by the resources that reference them ------------------------------


def pk_of_patient(ident: str) -> int:
    """The ``patients`` row a Patient id names (:func:`patient_pk`); an id that cannot
    be one names no patient."""
    try:
        return patient_pk(ident)
    except NotFoundError:
        return _NO_PATIENT


def _identifier_matches(raw: str) -> list[Match]:
    token = parse_token(raw)
    out = [Match("PatientID", _exact(token.code))]
    if token.system is not None:
        out.append(Match("IssuerOfPatientID", _exact(issuer_for_system(token.system))))
    return out


def _exact(value: str) -> str:
    # DICOM wildcards would turn a FHIR exact token into a pattern (PS3.4 C.2.2.2.4).
    if any(c in value for c in "*?\\"):
        raise InvalidQueryError("identifier values must not contain * ? or \\")
    return value


def patient_pks(index: SqlIndex, request: Request, value: str, modifier: str | None) -> set[int]:
    """Patient pks one ``patient``/``subject`` value names (commas ORed): a reference,
    or with ``:identifier`` a ``[system]|[value]`` token of the Patient ID."""
    out: set[int] = set()
    for item in split_or(value):
        if modifier == "identifier":
            rows = index.find(Query(level="patient", matches=tuple(_identifier_matches(item))))
            out |= {int(r["patient_pk"]) for r in rows}
        else:
            out.add(pk_of_patient(parse_reference(item, target="Patient", base=fhir_base(request))))
    return out


def patient_identifiers(
    index: SqlIndex, request: Request, value: str, modifier: str | None
) -> set[tuple[str, str | None]]:
    """``(Patient ID, issuer or None for any)`` pairs a ``patient``/``subject`` value names,
    for resources that keep the patient by identifier (orders, lab results)."""
    out: set[tuple[str, str | None]] = set()
    for item in split_or(value):
        if modifier == "identifier":
            token = parse_token(item)
            issuer = None if token.system is None else issuer_for_system(token.system)
            out.add((token.code, issuer))
            continue
        pk = pk_of_patient(parse_reference(item, target="Patient", base=fhir_base(request)))
        for row in index.find(Query(level="patient", patient_pk=pk)):
            out.add((str(row["PatientID"] or ""), str(row.get("IssuerOfPatientID") or "")))
    return out


# -- ImagingStudy ---------------------------------------------------------------------


def _study_query(index: SqlIndex, request: Request, search: Search) -> Query | None:
    """The index query of an ImagingStudy search; None when it can match nothing."""
    matches: list[Match] = []
    patient_pk: int | None = None
    last_updated: list[str] = []
    for c in search.criteria:
        if c.name in ("patient", "subject"):
            pks = patient_pks(index, request, c.value, c.modifier)
            if patient_pk is not None:
                pks &= {patient_pk}
            if len(pks) != 1:
                if not pks:
                    return None
                raise InvalidQueryError("one patient per search (several are not supported)")
            patient_pk = pks.pop()
        elif c.name == "identifier":
            uids: list[str] = []
            accessions: list[str] = []
            for item in split_or(c.value):
                token = parse_token(item)
                if token.system == DICOM_UID_SYSTEM or (
                    token.system is None and token.code.startswith("urn:oid:")
                ):
                    uids.append(_exact(token.code.removeprefix("urn:oid:")))
                elif token.system in (None, ACCESSION_SYSTEM):
                    accessions.append(_exact(token.code))
                else:
                    return None  # a system our studies never carry
            if uids and accessions:
                raise InvalidQueryError("identifier: UIDs and Accession Numbers in one OR")
            if uids:
                matches.append(Match("StudyInstanceUID", "\\".join(uids)))
            else:
                if len(accessions) > 1:
                    raise InvalidQueryError("one Accession Number per identifier value")
                matches.append(Match("AccessionNumber", accessions[0]))
        elif c.name == "_id":
            ids = split_or(c.value)
            if not all(_ID.fullmatch(i) for i in ids):
                raise InvalidQueryError("_id is not a FHIR id")
            matches.append(Match("StudyInstanceUID", "\\".join(ids)))
        elif c.name == "started":
            matches.append(Match("StudyDate", parse_date_param(c.value).da_range()))
        elif c.name == "modality":
            codes = []
            for item in split_or(c.value):
                token = parse_token(item)
                if token.system not in (None, DCM_SYSTEM):
                    raise InvalidQueryError(f"modality system must be {DCM_SYSTEM}")
                codes.append(_exact(token.code))
            matches.append(Match("ModalitiesInStudy", "\\".join(codes)))
        elif c.name == "status":
            statuses = {parse_token(v).code for v in split_or(c.value)}
            if not statuses <= _STUDY_STATUSES:
                raise InvalidQueryError("status is an ImagingStudyStatus code")
            if "available" not in statuses:
                return None  # every stored study is available (api.fhir.imaging)
        elif c.name == "_lastUpdated":
            last_updated.append(c.value)
    after, after_incl, before, before_incl = last_updated_bounds(last_updated)
    return Query(
        level="study",
        matches=tuple(matches),
        limit=search.paging.count,
        offset=search.paging.offset,
        patient_pk=patient_pk,
        updated_after=after,
        updated_after_inclusive=after_incl,
        updated_before=before,
        updated_before_inclusive=before_incl,
    )


def _viewer_url(request: Request) -> Callable[[str], str] | None:
    """The diagnostic viewer's page for a study (OHIF deep link), when /ohif is on."""
    if not request.app.state.settings.ohif.enabled:
        return None
    root = base_url(request, "")
    return lambda uid: root + ohif_deep_link(uid)


def _studies(
    index: SqlIndex, study_rows: list[dict[str, Any]], request: Request
) -> list[dict[str, Any]]:
    if not study_rows:
        return []
    uids = "\\".join(r["StudyInstanceUID"] for r in study_rows)
    series_rows = index.find(Query(level="series", matches=(Match("StudyInstanceUID", uids),)))
    instance_rows = index.find(Query(level="instance", matches=(Match("StudyInstanceUID", uids),)))
    out = []
    viewer = _viewer_url(request)
    for st in study_rows:
        uid = st["StudyInstanceUID"]
        out.append(
            imaging_study(
                st,
                [s for s in series_rows if s["StudyInstanceUID"] == uid],
                [i for i in instance_rows if i["StudyInstanceUID"] == uid],
                viewer_url=viewer(uid) if viewer else None,
            )
        )
    return out


def _total(index: SqlIndex, query: Query | None, rows: Sequence[object],
           search: Search) -> int | None:
    """Bundle.total: known from the page itself when the page is not full (and is not
    past the end); a full page counts its matches only as far as ``_total`` asks
    (:func:`api.fhir._search.total_bound`: every match for ``accurate`` only; issue
    21: the count read every match's index entry, the page only ``count`` of them)."""
    if query is None:
        return page_total(search, 0, lambda _bound: 0)
    return page_total(search, len(rows), lambda bound: index.count(query, at_most=bound))


@router.get("/ImagingStudy", summary="Search ImagingStudy", responses=_FHIR_RESPONSES)
def search_imaging_study(request: Request, index: IndexDep) -> JSONResponse:
    """Search ImagingStudy (FHIR R4 imagingstudy.html#search), a searchset Bundle."""
    search = search_request(request, IMAGING_STUDY)
    query = _study_query(index, request, search)
    rows = index.find(query) if query is not None and search.paging.count else []
    total = _total(index, query, rows, search)
    included = []
    if search.includes:
        pks = sorted({r["patient_pk"] for r in rows})
        for pk in pks:
            included += [patient(p) for p in index.find(Query(level="patient", patient_pk=pk))]
    bundle = search_bundle(request, search, _studies(index, rows, request), total, included)
    return _fhir(bundle)


@router.get("/ImagingStudy/{id}", summary="Read ImagingStudy", responses=_FHIR_RESPONSES)
def read_imaging_study(request: Request, index: IndexDep, id: str) -> JSONResponse:
    """Read an ImagingStudy; its id is the Study Instance UID."""
    check_accept(request)
    if not _ID.fullmatch(id):
        raise NotFoundError("no such ImagingStudy")
    rows = index.find(Query(level="study", matches=(Match("StudyInstanceUID", id),)))
    if not rows:
        raise NotFoundError("no such ImagingStudy")
    return _fhir(_studies(index, rows, request)[0])


# -- Patient --------------------------------------------------------------------------

_GENDER = {"male": "M", "female": "F", "other": "O"}
_NAME_FORBIDDEN = re.compile(r"[*?\\^=]")


def _name_value(value: str) -> str:
    if _NAME_FORBIDDEN.search(value):
        raise InvalidQueryError("name search values must not contain * ? \\ ^ =")
    return value.strip()


def _patient_query(search: Search) -> Query | None:
    """The index query of a Patient search (None: matches nothing). ``name`` and
    ``family`` are searches of the indexed name key and words (issue 21): folded by
    the service's one PN rule, they are index range scans, never a scan of patients."""
    matches: list[Match] = []
    names: list[NameSearch] = []
    pks: set[int] | None = None
    last_updated: list[str] = []
    for c in search.criteria:
        if c.name == "identifier":
            items = split_or(c.value)
            if len(items) > 1:
                raise InvalidQueryError("one identifier per value (repeat the parameter)")
            matches += _identifier_matches(items[0])
        elif c.name in ("name", "family"):
            alternatives = tuple(_name_value(v) for v in split_or(c.value))
            names.append(NameSearch(alternatives, family_only=c.name == "family"))
        elif c.name == "birthdate":
            matches.append(Match("PatientBirthDate", parse_date_param(c.value).da_range()))
        elif c.name == "gender":
            codes = []
            for item in split_or(c.value):
                token = parse_token(item)
                if token.code not in (*_GENDER, "unknown"):
                    raise InvalidQueryError("gender is male, female, other or unknown")
                codes.append(_GENDER.get(token.code, "U"))
            matches.append(Match("PatientSex", "\\".join(codes)))
        elif c.name == "_id":
            ids = {pk_of_patient(i) for i in split_or(c.value)}
            pks = ids if pks is None else pks & ids
        elif c.name == "_lastUpdated":
            last_updated.append(c.value)
    patient_pk: int | None = None
    if pks is not None:
        pks.discard(_NO_PATIENT)
        if not pks:
            return None
        if len(pks) > 1:
            raise InvalidQueryError("one _id per search (several are not supported)")
        patient_pk = pks.pop()
    after, after_incl, before, before_incl = last_updated_bounds(last_updated)
    return Query(
        level="patient",
        matches=tuple(matches),
        names=tuple(names),
        patient_pk=patient_pk,
        updated_after=after,
        updated_after_inclusive=after_incl,
        updated_before=before,
        updated_before_inclusive=before_incl,
    )


@router.get("/Patient", summary="Search Patient", responses=_FHIR_RESPONSES)
def search_patient(request: Request, index: IndexDep) -> JSONResponse:
    """Search Patient (FHIR R4 patient.html#search): identifier, name, family,
    birthdate, gender, _id, _lastUpdated. ``name``/``family`` match the start of a
    name part, case- and accent-insensitively (R4 3.1.1.5.3)."""
    search = search_request(request, PATIENT)
    query = _patient_query(search)
    paging = search.paging
    rows: list[dict[str, Any]] = []
    if query is not None and paging.count:
        rows = index.find(replace(query, limit=paging.count, offset=paging.offset))
    total = _total(index, query, rows, search)
    found = with_links_many(request, [patient(r) for r in rows])  # merges (issue 17)
    return _fhir(search_bundle(request, search, found, total))


@router.get("/Patient/{id}", summary="Read Patient", responses=_FHIR_RESPONSES)
def read_patient(request: Request, index: IndexDep, id: str) -> JSONResponse:
    check_accept(request)
    rows = index.find(Query(level="patient", patient_pk=patient_pk(id)))
    if not rows:
        raise NotFoundError("no such Patient")
    resource = with_links(request, patient(rows[0]))  # merges (issue 17)
    return fhir_response(resource, headers=etag(resource))
