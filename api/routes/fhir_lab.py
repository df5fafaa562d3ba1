"""FHIR R4 read and search of lab results: ``/fhir/Observation``, ``/fhir/DiagnosticReport``.

Only fetching and wrapping lives here; the mapping and the parameter rules are in
:mod:`api.fhir_lab`. Search (R4 §3.1.1, ``GET [base]/[type]?...``) answers a
``searchset`` Bundle. Parameters repeated are ANDed, comma-separated values ORed
(R4 §3.1.1.4). An unknown parameter is refused with 400 rather than ignored: a
typo in ``patient:identifier`` must not return every patient's results.

Observation parameters: ``patient``/``subject`` (``Patient/<id>``, the Patient
resource shared with imaging), ``patient:identifier`` (``[system|]value``, the system
naming the issuer; also ``subject:identifier``, ``patient.identifier``,
``subject.identifier``), ``specimen:identifier`` (also ``specimen.identifier``,
``specimen``), ``based-on`` (``ServiceRequest/<id>``), ``based-on:identifier``
(placer/filler order number, i.e. the accession), ``category`` (``laboratory``),
``identifier``, ``code``, ``date``, ``_lastUpdated``, ``status``,
``_tag`` (``critical``, ``qc``, ``needs-review``; QC results are only returned when asked for),
``_id``, ``_sort`` (``_lastUpdated``, ``-_lastUpdated``, ``date``, ``-date``),
``_count``, ``_offset``.

DiagnosticReport parameters: the patient and specimen ones, ``based-on``,
``category`` (``LAB``), ``status``, ``identifier`` (specimen ID, placer or filler order number),
``code`` (the ordered panel, or a result's), ``date``,
``_lastUpdated``, ``_tag=qc``, ``_id``, ``_include=DiagnosticReport:result``,
``_sort``, ``_count``, ``_offset``.

Change feed: ``GET /fhir/Observation?_tag=critical&_lastUpdated=gt<instant>&_sort=_lastUpdated``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.fhir.imaging import issuer_for_system
from api.fhir_lab import (
    bundle,
    diagnostic_report,
    history_bundle,
    observation,
    operation_outcome,
    parse_date,
    parse_token,
)
from core.errors import InvalidQueryError, NotFoundError, ServiceError
from storage.index.lab import SqlLabStore
from storage.lab import DateBound, LabReportQuery, LabResultQuery

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/fhir", tags=["fhir"])

FHIR_JSON = "application/fhir+json"
MAX_COUNT = 1000
MAX_OFFSET = 2**31 - 1

_PATIENT = {
    "patient:identifier",
    "subject:identifier",
    "patient.identifier",
    "subject.identifier",
}
#: References: ``Patient/<id>`` (the Patient resource imaging and lab share).
_PATIENT_REF = {"patient", "subject"}
_SPECIMEN = {"specimen", "specimen:identifier", "specimen.identifier"}
_COMMON = (
    {"code", "date", "_lastUpdated", "_tag", "_id", "_sort", "_count", "_offset", "_format"}
    | _PATIENT
    | _PATIENT_REF
    | _SPECIMEN
    | {"category", "based-on"}
)
_OBSERVATION_PARAMS = _COMMON | {"based-on:identifier", "identifier", "status"}
_REPORT_PARAMS = _COMMON | {"identifier", "_include", "status"}


def _store(request: Request) -> SqlLabStore:
    store: SqlLabStore | None = getattr(request.app.state, "lab_store", None)
    if store is None:
        store = SqlLabStore(request.app.state.index)
        request.app.state.lab_store = store
    return store


def _fhir(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def _problem(exc: ServiceError) -> JSONResponse:
    return _fhir(operation_outcome(exc.fhir_code, str(exc)), exc.http_status)


def _guard(handler: Callable[[], dict[str, Any]]) -> JSONResponse:
    try:
        return _fhir(handler())
    except ServiceError as exc:
        if exc.http_status >= 500:
            logger.error("FHIR lab request failed: %s", exc.title)
        return _problem(exc)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _values(request: Request, allowed: set[str]) -> dict[str, list[str]]:
    """Parameters as name → list of occurrences; unknown names refused."""
    params: dict[str, list[str]] = defaultdict(list)
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise InvalidQueryError(
                f"unsupported search parameter {name!r}; supported: {', '.join(sorted(allowed))}"
            )
        params[name].append(value)
    return params


def _any_of(values: list[str]) -> tuple[str, ...]:
    """One parameter given once (AND of several occurrences is not supported)."""
    if len(values) > 1:
        raise InvalidQueryError("repeat the value with commas, not the parameter")
    out = []
    for item in values[0].split(","):
        # "[system|]value": identifiers are matched on their value.
        _system, bar, value = item.partition("|")
        out.append(value if bar else item)
    if not all(out):
        raise InvalidQueryError("empty search value")
    return tuple(out)


def _identifiers(params: dict[str, list[str]], names: set[str]) -> tuple[str, ...]:
    found = [v for n in names for v in params.get(n, [])]
    return _any_of(found) if found else ()


def _dates(values: list[str]) -> tuple[DateBound, ...]:
    bounds: list[DateBound] = []
    for value in values:
        if "," in value:
            raise InvalidQueryError("several dates in one parameter (OR) are not supported")
        bounds.extend(parse_date(value))
    return tuple(bounds)


def _codes(params: dict[str, list[str]]) -> tuple[tuple[str | None, str], ...]:
    if "code" not in params:
        return ()
    if len(params["code"]) > 1:
        raise InvalidQueryError("repeat the code with commas, not the parameter")
    return tuple(parse_token(v) for v in params["code"][0].split(","))


def _paging(params: dict[str, list[str]]) -> tuple[int, int]:
    try:
        count = int(params.get("_count", ["100"])[-1])
        offset = int(params.get("_offset", ["0"])[-1])
    except ValueError as exc:
        raise InvalidQueryError("_count and _offset must be integers") from exc
    if count < 0 or offset < 0:
        raise InvalidQueryError("_count and _offset must not be negative")
    if offset > MAX_OFFSET:  # beyond any result set; SQL integers are 64-bit at most
        raise InvalidQueryError(f"_offset must not exceed {MAX_OFFSET}")
    return min(count, MAX_COUNT), offset


def _patient_refs(params: dict[str, list[str]]) -> tuple[int, ...]:
    """``patient``/``subject`` = ``Patient/<id>`` or ``<id>``; another id matches nothing."""
    out = []
    for ref in _any_of([v for n in _PATIENT_REF for v in params.get(n, [])] or [""]):
        kind, _slash, ident = ref.rpartition("/")
        if kind not in ("", "Patient"):
            raise InvalidQueryError("patient reference must be Patient/[id]")
        out.append(int(ident) if ident.isdigit() and len(ident) <= 18 else -1)
    return tuple(out)


def _patient_identifiers(params: dict[str, list[str]]) -> tuple[tuple[str | None, str], ...]:
    """``[system|]value`` tokens: the system names the issuer (``issuer_for_system``)."""
    found = [v for n in _PATIENT for v in params.get(n, [])]
    if len(found) > 1:
        raise InvalidQueryError("repeat the value with commas, not the parameter")
    out: list[tuple[str | None, str]] = []
    for item in found[0].split(",") if found else []:
        system, bar, value = item.partition("|")
        if not (value if bar else item):
            raise InvalidQueryError("empty search value")
        out.append((issuer_for_system(system), value) if bar else (None, item))
    return tuple(out)


def _tokens(params: dict[str, list[str]], name: str) -> tuple[str, ...]:
    """Codes of a token parameter, any system (``category``)."""
    return tuple(v.rpartition("|")[2] for v in _any_of(params[name])) if name in params else ()


def _tags(params: dict[str, list[str]]) -> set[str]:
    tags = set()
    for value in params.get("_tag", []):
        for item in value.split(","):
            _system, _bar, code = item.rpartition("|")
            if code not in {"critical", "qc", "needs-review"}:
                raise InvalidQueryError(f"unknown _tag {item!r}: critical, qc or needs-review")
            tags.add(code)
    return tags


def _links(request: Request, offset: int, count: int, total: int) -> tuple[str, str | None]:
    items = [(k, v) for k, v in request.query_params.multi_items() if k != "_offset"]
    url = f"{_base(request)}{request.url.path.removeprefix('/fhir')}"
    self_url = f"{url}?{urlencode([*items, ('_offset', str(offset))])}"
    next_url = None
    if count and offset + count < total:
        next_url = f"{url}?{urlencode([*items, ('_offset', str(offset + count))])}"
    return self_url, next_url


def _result_query(params: dict[str, list[str]]) -> LabResultQuery:
    count, offset = _paging(params)
    tags = _tags(params)
    sorts = {
        "_lastUpdated": "updated",
        "-_lastUpdated": "-updated",
        "date": "performed",
        "-date": "-performed",
    }
    sort = params.get("_sort", ["_id"])[-1]
    if sort not in sorts and sort != "_id":
        raise InvalidQueryError(f"_sort {sort!r} not supported: {', '.join(sorts)}")
    return LabResultQuery(
        observation_ids=_identifiers(params, {"_id", "identifier"}),
        patient_pks=_patient_refs(params) if _PATIENT_REF & params.keys() else (),
        patient_identifiers=_patient_identifiers(params),
        specimen_ids=_identifiers(params, _SPECIMEN),
        order_ids=_identifiers(params, {"based-on:identifier"}),
        based_on=_identifiers(params, {"based-on"}),
        categories=_tokens(params, "category"),
        reviews=("conflict",) if "needs-review" in tags else (),
        codes=_codes(params),
        statuses=_identifiers(params, {"status"}),
        performed=_dates(params.get("date", [])),
        updated=_dates(params.get("_lastUpdated", [])),
        critical=True if "critical" in tags else None,
        qc="qc" in tags,
        sort=sorts.get(sort, "id"),  # type: ignore[arg-type]
        offset=offset,
        limit=count,
    )


@router.get("/Observation", summary="Search lab results (FHIR R4 Observation)")
def search_observations(request: Request) -> JSONResponse:
    def run() -> dict[str, Any]:
        params = _values(request, _OBSERVATION_PARAMS)
        query = _result_query(params)
        results, total = _store(request).search_results(query)
        self_url, next_url = _links(request, query.offset, query.limit, total)
        return bundle(
            [observation(r) for r in results],
            base=_base(request),
            total=total,
            self_url=self_url,
            next_url=next_url,
        )

    return _guard(run)


@router.get("/Observation/{observation_id}", summary="Read a lab result (current version)")
def read_observation(request: Request, observation_id: str) -> JSONResponse:
    def run() -> dict[str, Any]:
        versions = _store(request).result_history(observation_id)
        if not versions:
            raise NotFoundError(f"no Observation/{observation_id}")
        return observation(versions[0])

    return _guard(run)


@router.get("/Observation/{observation_id}/_history", summary="Every version of a lab result")
def observation_history(request: Request, observation_id: str) -> JSONResponse:
    def run() -> dict[str, Any]:
        versions = _store(request).result_history(observation_id)
        if not versions:
            raise NotFoundError(f"no Observation/{observation_id}")
        return history_bundle(versions, base=_base(request))

    return _guard(run)


@router.get(
    "/Observation/{observation_id}/_history/{version_id}", summary="One version of a lab result"
)
def read_observation_version(
    request: Request, observation_id: str, version_id: str
) -> JSONResponse:
    def run() -> dict[str, Any]:
        for version in _store(request).result_history(observation_id):
            if str(version.version) == version_id:
                return observation(version)
        raise NotFoundError(f"no Observation/{observation_id}/_history/{version_id}")

    return _guard(run)


def _reports(request: Request, params: dict[str, list[str]]) -> dict[str, Any]:
    count, offset = _paging(params)
    tags = _tags(params)
    if tags & {"critical", "needs-review"}:
        raise InvalidQueryError("_tag=critical and _tag=needs-review are searched on Observation")
    sorts = {"_lastUpdated": "updated", "-_lastUpdated": "-updated", "_id": "id"}
    sort = params.get("_sort", ["_id"])[-1]
    if sort not in sorts:
        raise InvalidQueryError(f"_sort {sort!r} not supported: {', '.join(sorts)}")
    include = params.get("_include", [])
    if any(v != "DiagnosticReport:result" for v in include):
        raise InvalidQueryError("only _include=DiagnosticReport:result is supported")
    query = LabReportQuery(
        report_ids=_identifiers(params, {"_id"}),
        patient_pks=_patient_refs(params) if _PATIENT_REF & params.keys() else (),
        patient_identifiers=_patient_identifiers(params),
        specimen_ids=_identifiers(params, _SPECIMEN),
        identifiers=_identifiers(params, {"identifier"}),
        based_on=_identifiers(params, {"based-on"}),
        categories=_tokens(params, "category"),
        statuses=_identifiers(params, {"status"}),
        codes=_codes(params),
        performed=_dates(params.get("date", [])),
        updated=_dates(params.get("_lastUpdated", [])),
        qc="qc" in tags,
        sort=sorts[sort],  # type: ignore[arg-type]
        offset=offset,
        limit=count,
    )
    store = _store(request)
    reports, total = store.search_reports(query)
    members: dict[str, list[Any]] = defaultdict(list)
    if reports:
        results, _ = store.search_results(
            LabResultQuery(report_ids=tuple(r.report_id for r in reports), qc=None, limit=100_000)
        )
        for result in results:
            members[result.report_id].append(result)
    resources = [diagnostic_report(r, members[r.report_id]) for r in reports]
    included = [observation(m) for r in reports for m in members[r.report_id]] if include else []
    self_url, next_url = _links(request, offset, count, total)
    return bundle(
        resources,
        base=_base(request),
        total=total,
        self_url=self_url,
        next_url=next_url,
        included=included,
    )


@router.get("/DiagnosticReport", summary="Search lab reports (FHIR R4 DiagnosticReport)")
def search_reports(request: Request) -> JSONResponse:
    return _guard(lambda: _reports(request, _values(request, _REPORT_PARAMS)))


@router.get("/DiagnosticReport/{report_id}", summary="Read a lab report")
def read_report(request: Request, report_id: str) -> JSONResponse:
    def run() -> dict[str, Any]:
        store = _store(request)
        reports, _ = store.search_reports(LabReportQuery(report_ids=(report_id,), qc=None))
        if not reports:
            raise NotFoundError(f"no DiagnosticReport/{report_id}")
        results, _ = store.search_results(
            LabResultQuery(report_ids=(report_id,), qc=None, limit=100_000)
        )
        return diagnostic_report(reports[0], results)

    return _guard(run)
