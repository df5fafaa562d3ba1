"""FHIR R4 read and search of lab results: ``/fhir/Observation``, ``/fhir/DiagnosticReport``.

Only fetching and wrapping lives here; the mapping and the parameter rules are in
:mod:`api.fhir_lab`. Search (R4 §3.1.1, ``GET [base]/[type]?...``) answers a
``searchset`` Bundle. Parameters repeated are ANDed, comma-separated values ORed
(R4 §3.1.1.4). An unknown parameter is refused with 400 rather than ignored: a
typo in ``patient:identifier`` must not return every patient's results.

The parameters are declared once in :mod:`api.fhir.registry` (and so advertised in
the CapabilityStatement): ``patient``/``subject`` (``Patient/[id]``, the Patient
resource lab and imaging share, or ``:identifier`` ``[system]|[value]``, the system
naming the issuer), ``specimen`` (``Specimen/[id]`` or ``:identifier``), ``code``,
``date``, ``_lastUpdated``, ``_tag`` (``critical``, ``qc``, ``needs-review``; QC
results only when asked for), ``_id``, ``category`` (every result is ``laboratory``,
every report ``LAB``: another category matches nothing), ``status``, ``based-on``
(``ServiceRequest/[id]``: the order a result is linked to, only ever one of the same
patient; on Observation also ``:identifier``, the placer/filler order number); on
Observation also ``identifier``; on DiagnosticReport ``identifier`` (specimen ID,
placer or filler order number) and ``_include=DiagnosticReport:result``. ``_sort``,
``_count``, ``_offset`` page.
Unknown parameters: strict unless ``Prefer: handling=lenient``.

Change feed: ``GET /fhir/Observation?_tag=critical&_lastUpdated=gt<instant>&_sort=_lastUpdated``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import LabResultsDep
from api.fhir import (
    Search,
    check_accept,
    fhir_base,
    fhir_response,
    parse_reference,
    reported_total,
    search_bundle,
    search_request,
    split_or,
    total_bound,
)
from api.fhir import parse_token as parse_fhir_token
from api.fhir.imaging import issuer_for_system
from api.fhir.registry import DIAGNOSTIC_REPORT, OBSERVATION
from api.fhir_lab import (
    RESULT_ID_SYSTEM,
    diagnostic_report,
    history_bundle,
    observation,
    parse_date,
    parse_token,
)
from api.routes.fhir import pk_of_patient
from core.errors import InvalidQueryError, NotFoundError
from storage.lab import DateBound, LabReportQuery, LabResultQuery

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/fhir", tags=["fhir"])

DEFAULT_COUNT = 100
_OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_TAG_SYSTEM = "urn:pacslab:lab-tag"


class _NoMatch(Exception):
    """A criterion no lab result can meet (the answer is an empty Bundle)."""


def _fhir(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return fhir_response(body, status)


_T = TypeVar("_T")


def _and(current: set[_T] | None, values: set[_T]) -> set[_T]:
    """AND of a repeated parameter: the intersection of each occurrence's OR set."""
    out = values if current is None else current & values
    if not out:
        raise _NoMatch
    return out


def _ids(search: Search, name: str, read: Any = None) -> tuple[str, ...]:
    """Values of ``name`` (ORed by commas, ANDed when repeated), as the store's tuple."""
    found: set[str] | None = None
    for c in search.all(name):
        found = _and(found, {read(c, v) if read else v for v in split_or(c.value)})
    return tuple(sorted(found)) if found is not None else ()


_Identifier = tuple[str | None, str]


def _patients(
    request: Request, search: Search
) -> tuple[tuple[int, ...], tuple[_Identifier, ...]]:
    """``patient``/``subject``: ``Patient/[id]`` as ``patients`` rows (lab results point
    at the Patient resource imaging uses), ``:identifier`` ``[system]|[value]`` as
    ``(issuer, Patient ID)`` with the issuer from the system (None: any issuer)."""
    pks: set[int] | None = None
    identifiers: set[_Identifier] | None = None
    for c in search.all("patient") + search.all("subject"):
        if c.modifier == "identifier":
            found: set[_Identifier] = set()
            for v in split_or(c.value):
                token = parse_fhir_token(v)
                system = token.system
                found.add((None if system is None else issuer_for_system(system), token.code))
            identifiers = _and(identifiers, found)
        else:
            base = fhir_base(request)
            pks = _and(pks, {pk_of_patient(parse_reference(v, target="Patient", base=base))
                             for v in split_or(c.value)})
    return (tuple(sorted(pks)) if pks is not None else (),
            tuple(sorted(identifiers, key=str)) if identifiers is not None else ())


def _specimen(request: Request, search: Search) -> tuple[str, ...]:
    def read(c: Any, value: str) -> str:
        if c.modifier == "identifier":
            return parse_fhir_token(value).code
        return parse_reference(value, target="Specimen", base=fhir_base(request))

    return _ids(search, "specimen", read)


def _result_ids(search: Search) -> tuple[str, ...]:
    def read(c: Any, value: str) -> str:
        if c.name == "_id":
            return value
        token = parse_fhir_token(value)
        if token.system not in (None, RESULT_ID_SYSTEM):
            raise _NoMatch
        return token.code

    found: set[str] | None = None
    for c in search.all("_id") + search.all("identifier"):
        found = _and(found, {read(c, v) for v in split_or(c.value)})
    return tuple(sorted(found)) if found is not None else ()


def _orders(request: Request, search: Search) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``based-on``: (ServiceRequest ids a result is linked to, from
    ``ServiceRequest/[id]``; order numbers, from ``:identifier``). A result is linked
    only to an order of its own patient, so a reference never reaches another
    patient's results that merely quote the same order number."""
    linked: set[str] | None = None
    numbers: set[str] | None = None
    for c in search.all("based-on"):
        if c.modifier == "identifier":
            numbers = _and(numbers, {parse_fhir_token(v).code for v in split_or(c.value)})
        else:
            base = fhir_base(request)
            linked = _and(linked, {parse_reference(v, target="ServiceRequest", base=base)
                                   for v in split_or(c.value)})
    return (tuple(sorted(linked)) if linked is not None else (),
            tuple(sorted(numbers)) if numbers is not None else ())


def _category(search: Search, system: str, code: str) -> None:
    """Every lab result has one category; any other value matches nothing."""
    for c in search.all("category"):
        tokens = [parse_fhir_token(v) for v in split_or(c.value)]
        if not any(t.code == code and t.system in (None, system) for t in tokens):
            raise _NoMatch


def _codes(search: Search) -> tuple[tuple[str | None, str], ...]:
    occurrences = search.all("code")
    if len(occurrences) > 1:
        raise InvalidQueryError("repeat the code with commas, not the parameter")
    return tuple(parse_token(v) for c in occurrences for v in split_or(c.value))


def _dates(search: Search, name: str) -> tuple[DateBound, ...]:
    bounds: list[DateBound] = []
    for c in search.all(name):
        if "," in c.value:
            raise InvalidQueryError("several dates in one parameter (OR) are not supported")
        bounds.extend(parse_date(c.value))
    return tuple(bounds)


_TAGS = frozenset({"critical", "qc", "needs-review"})


def _statuses(search: Search) -> tuple[str, ...]:
    statuses: set[str] | None = None
    for c in search.all("status"):
        statuses = _and(statuses, {parse_fhir_token(v).code for v in split_or(c.value)})
    return tuple(sorted(statuses)) if statuses is not None else ()


def _tags(search: Search) -> set[str]:
    tags = set()
    for c in search.all("_tag"):
        for item in split_or(c.value):
            token = parse_fhir_token(item)
            if token.system not in (None, _TAG_SYSTEM) or token.code not in _TAGS:
                raise InvalidQueryError(
                    f"unknown _tag {item!r}: {_TAG_SYSTEM}|critical, |qc or |needs-review")
            tags.add(token.code)
    return tags


_RESULT_SORTS = {
    "_lastUpdated": "updated",
    "-_lastUpdated": "-updated",
    "date": "performed",
    "-date": "-performed",
    "_id": "id",
}


def _sort(search: Search, table: dict[str, str]) -> str:
    if len(search.sort) > 1:
        raise InvalidQueryError("one _sort key is supported")
    key = search.sort[0] if search.sort else "_id"
    if key not in table:
        raise InvalidQueryError(f"_sort {key!r} is not supported: {', '.join(table)}")
    return table[key]


def _result_query(request: Request, search: Search) -> LabResultQuery:
    _category(search, _OBSERVATION_CATEGORY, "laboratory")
    tags = _tags(search)
    pks, identifiers = _patients(request, search)
    based_on, order_numbers = _orders(request, search)
    return LabResultQuery(
        observation_ids=_result_ids(search),
        patient_pks=pks,
        patient_identifiers=identifiers,
        specimen_ids=_specimen(request, search),
        order_ids=order_numbers,
        based_on=based_on,
        reviews=("conflict",) if "needs-review" in tags else (),
        codes=_codes(search),
        statuses=_statuses(search),
        performed=_dates(search, "date"),
        updated=_dates(search, "_lastUpdated"),
        critical=True if "critical" in tags else None,
        qc="qc" in tags,
        sort=_sort(search, _RESULT_SORTS),  # type: ignore[arg-type]
        offset=search.paging.offset,
        limit=search.paging.count,
        total_at_most=total_bound(search),
    )


def _empty(request: Request, search: Search) -> JSONResponse:
    return _fhir(search_bundle(request, search, [], reported_total(search, 0)))


@router.get("/Observation", summary="Search lab results (FHIR R4 Observation)")
def search_observations(request: Request, lab: LabResultsDep) -> JSONResponse:
    search = search_request(request, OBSERVATION, default_count=DEFAULT_COUNT)
    try:
        query = _result_query(request, search)
    except _NoMatch:
        return _empty(request, search)
    results, total = lab.search_results(query)
    return _fhir(search_bundle(request, search, [observation(r) for r in results],
                               reported_total(search, total)))


@router.get("/Observation/{observation_id}", summary="Read a lab result (current version)")
def read_observation(request: Request, observation_id: str, lab: LabResultsDep) -> JSONResponse:
    def run() -> dict[str, Any]:
        versions = lab.history(observation_id)
        if not versions:
            raise NotFoundError(f"no Observation/{observation_id}")
        return observation(versions[0])

    check_accept(request)
    return _fhir(run())


@router.get("/Observation/{observation_id}/_history", summary="Every version of a lab result")
def observation_history(request: Request, observation_id: str, lab: LabResultsDep) -> JSONResponse:
    def run() -> dict[str, Any]:
        versions = lab.history(observation_id)
        if not versions:
            raise NotFoundError(f"no Observation/{observation_id}")
        return history_bundle(versions, base=fhir_base(request))

    check_accept(request)
    return _fhir(run())


@router.get(
    "/Observation/{observation_id}/_history/{version_id}", summary="One version of a lab result"
)
def read_observation_version(
    request: Request, observation_id: str, version_id: str, lab: LabResultsDep
) -> JSONResponse:
    def run() -> dict[str, Any]:
        for version in lab.history(observation_id):
            if str(version.version) == version_id:
                return observation(version)
        raise NotFoundError(f"no Observation/{observation_id}/_history/{version_id}")

    check_accept(request)
    return _fhir(run())


_REPORT_SORTS = {"_lastUpdated": "updated", "-_lastUpdated": "-updated", "_id": "id"}


def _report_query(request: Request, search: Search) -> LabReportQuery:
    _category(search, _V2_0074, "LAB")
    tags = _tags(search)
    if tags & {"critical", "needs-review"}:
        raise InvalidQueryError("_tag=critical and _tag=needs-review are searched on Observation")
    pks, identifiers = _patients(request, search)
    based_on, order_numbers = _orders(request, search)
    if order_numbers:  # a report's identifiers are its specimen and order numbers
        raise InvalidQueryError("on DiagnosticReport, search order numbers with identifier")
    return LabReportQuery(
        report_ids=_ids(search, "_id"),
        patient_pks=pks,
        patient_identifiers=identifiers,
        specimen_ids=_specimen(request, search),
        identifiers=_ids(search, "identifier", lambda c, v: parse_fhir_token(v).code),
        based_on=based_on,
        statuses=_statuses(search),
        codes=_codes(search),
        performed=_dates(search, "date"),
        updated=_dates(search, "_lastUpdated"),
        qc="qc" in tags,
        sort=_sort(search, _REPORT_SORTS),  # type: ignore[arg-type]
        offset=search.paging.offset,
        limit=search.paging.count,
        total_at_most=total_bound(search),
    )


@router.get("/DiagnosticReport", summary="Search lab reports (FHIR R4 DiagnosticReport)")
def search_reports(request: Request, lab: LabResultsDep) -> JSONResponse:
    search = search_request(request, DIAGNOSTIC_REPORT, default_count=DEFAULT_COUNT)
    try:
        query = _report_query(request, search)
    except _NoMatch:
        return _empty(request, search)
    reports, total = lab.search_reports(query)
    members: dict[str, list[Any]] = defaultdict(list)
    if reports:
        results, _ = lab.search_results(
            LabResultQuery(report_ids=tuple(r.report_id for r in reports), qc=None, limit=100_000)
        )
        for result in results:
            members[result.report_id].append(result)
    resources = [diagnostic_report(r, members[r.report_id]) for r in reports]
    included = (
        [observation(m) for r in reports for m in members[r.report_id]] if search.includes else []
    )
    return _fhir(search_bundle(request, search, resources, reported_total(search, total),
                               included))


@router.get("/DiagnosticReport/{report_id}", summary="Read a lab report")
def read_report(request: Request, report_id: str, lab: LabResultsDep) -> JSONResponse:
    def run() -> dict[str, Any]:
        reports, _ = lab.search_reports(LabReportQuery(report_ids=(report_id,), qc=None))
        if not reports:
            raise NotFoundError(f"no DiagnosticReport/{report_id}")
        results, _ = lab.search_results(
            LabResultQuery(report_ids=(report_id,), qc=None, limit=100_000)
        )
        return diagnostic_report(reports[0], results)

    check_accept(request)
    return _fhir(run())
