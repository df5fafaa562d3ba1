"""FHIR search conformance: every resource × every advertised parameter (with its
modifiers and prefixes) over a data set of two patients, each row naming exactly the
resources that must match, so a parameter that is ignored fails its row.

The table is checked against the registry the routes and the CapabilityStatement use
(:mod:`api.fhir.registry`): every advertised parameter has at least one row.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome

from api.fhir.registry import RESOURCES
from tests.api.fhir_dataset import dataset

FHIR = "application/fhir+json"
YEAR = str(datetime.now(UTC).year)
DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOINC = "http://loinc.org"
ALL = {
    "Patient": {"p1", "p2"},
    "ImagingStudy": {"a", "b", "c"},
    "ServiceRequest": {"o1", "o2", "o3"},
    "Observation": {"g1", "k1", "g2"},
    "DiagnosticReport": {"r1", "r2"},
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, dict[str, str]]]:
    with dataset(tmp_path_factory.mktemp("fhir")) as (app, ids, _settings):
        yield app, ids


@pytest.fixture(scope="module")
def client(loaded: tuple[FastAPI, dict[str, str]]) -> TestClient:
    return TestClient(loaded[0])


def _resolve(value: str, ids: dict[str, str]) -> str:
    """``{p1}``-style placeholders in a row's value become the loaded ids."""
    for name, ident in ids.items():
        value = value.replace("{" + name + "}", ident)
    return value


# (resource, parameters, expected names). Placeholders: {name} → id of that resource.
ROWS: list[tuple[str, list[tuple[str, str]], set[str]]] = [
    # -- Patient
    ("Patient", [], {"p1", "p2"}),
    ("Patient", [("_id", "{p1}")], {"p1"}),
    ("Patient", [("_id", "999999")], set()),
    ("Patient", [("identifier", "P1")], {"p1"}),
    ("Patient", [("identifier", "urn:other|P1")], set()),
    ("Patient", [("name", "tran")], {"p2"}),  # accent- and case-insensitive (3.1.1.5.3)
    ("Patient", [("name", "TRẦN")], {"p2"}),
    ("Patient", [("name", "bình")], {"p2"}),
    ("Patient", [("name", "nguyễn")], {"p1"}),
    ("Patient", [("name", "tran,nguyen")], {"p1", "p2"}),
    ("Patient", [("name", "ran")], set()),  # starts-with, not contains
    ("Patient", [("name", "AN")], {"p1"}),
    ("Patient", [("name", "nguy"), ("name", "van")], {"p1"}),
    ("Patient", [("name", "nguy"), ("name", "thi")], set()),
    ("Patient", [("family", "tran")], {"p2"}),
    ("Patient", [("family", "THI")], set()),
    ("Patient", [("family", "van")], set()),
    ("Patient", [("birthdate", "1970")], {"p1", "p2"}),
    ("Patient", [("birthdate", "1970-01-01")], {"p1", "p2"}),
    ("Patient", [("birthdate", "lt1970-01-01")], set()),
    ("Patient", [("birthdate", "ge1970-01-02")], set()),
    ("Patient", [("gender", "female")], {"p2"}),
    ("Patient", [("gender", "http://hl7.org/fhir/administrative-gender|male")], {"p1"}),
    ("Patient", [("gender", "male,female")], {"p1", "p2"}),
    ("Patient", [("_lastUpdated", "ge2000-01-01")], {"p1", "p2"}),
    ("Patient", [("_lastUpdated", YEAR)], {"p1", "p2"}),
    ("Patient", [("_lastUpdated", "lt2000")], set()),
    # -- ImagingStudy
    ("ImagingStudy", [], {"a", "b", "c"}),
    ("ImagingStudy", [("patient", "Patient/{p1}")], {"a", "c"}),
    ("ImagingStudy", [("patient", "{p2}")], {"b"}),
    ("ImagingStudy", [("patient", "http://testserver/fhir/Patient/{p2}")], {"b"}),
    ("ImagingStudy", [("patient", "Patient/999999")], set()),
    ("ImagingStudy", [("subject", "Patient/{p1}")], {"a", "c"}),
    ("ImagingStudy", [("subject:identifier", "P2")], {"b"}),
    ("ImagingStudy", [("patient:identifier", "P1")], {"a", "c"}),
    ("ImagingStudy", [("patient.identifier", "P2")], {"b"}),
    ("ImagingStudy", [("identifier", "ACC-A")], {"a"}),
    ("ImagingStudy", [("identifier", "urn:pacslab:accession|ACC-B")], {"b"}),
    ("ImagingStudy", [("identifier", "urn:other|ACC-B")], set()),
    ("ImagingStudy", [("identifier", "urn:dicom:uid|urn:oid:{c}")], {"c"}),
    ("ImagingStudy", [("_id", "{a},{b}")], {"a", "b"}),
    ("ImagingStudy", [("started", "2024")], {"a", "b"}),
    ("ImagingStudy", [("started", "2024-01")], {"a"}),
    ("ImagingStudy", [("started", "eq2023-12-31")], {"c"}),
    ("ImagingStudy", [("started", "gt2024-01-05")], {"b"}),
    ("ImagingStudy", [("started", "ge2024-01-05"), ("started", "lt2024-02")], {"a"}),
    ("ImagingStudy", [("started", "le2024-01-05")], {"a", "c"}),
    ("ImagingStudy", [("modality", "MR")], {"b"}),
    ("ImagingStudy", [("modality", f"{DCM}|CT")], {"a", "c"}),
    ("ImagingStudy", [("status", "available")], {"a", "b", "c"}),
    ("ImagingStudy", [("status", "cancelled,registered")], set()),
    ("ImagingStudy", [("_lastUpdated", "gt2000-01-01")], {"a", "b", "c"}),
    ("ImagingStudy", [("_lastUpdated", "lt2000-01-01")], set()),
    ("ImagingStudy", [("patient", "Patient/{p1}"), ("started", "2024")], {"a"}),
    # -- ServiceRequest
    ("ServiceRequest", [], {"o1", "o2", "o3"}),
    ("ServiceRequest", [("patient", "Patient/{p1}")], {"o1", "o3"}),
    ("ServiceRequest", [("subject", "{p2}")], {"o2"}),
    ("ServiceRequest", [("patient", "Patient/999999")], set()),
    ("ServiceRequest", [("patient:identifier", "P2")], {"o2"}),
    ("ServiceRequest", [("subject:identifier", "urn:other|P2")], set()),
    ("ServiceRequest", [("code", "24590-2")], {"o2", "o3"}),
    ("ServiceRequest", [("code", f"{LOINC}|24627-2")], {"o1"}),
    ("ServiceRequest", [("code", "http://snomed.info/sct|24627-2")], set()),
    ("ServiceRequest", [("code", "24627-2,24590-2")], {"o1", "o2", "o3"}),
    ("ServiceRequest", [("status", "active")], {"o1", "o2"}),
    ("ServiceRequest", [("status", "revoked")], {"o3"}),
    ("ServiceRequest", [("status", "draft")], set()),
    ("ServiceRequest", [("status", "active,revoked")], {"o1", "o2", "o3"}),
    ("ServiceRequest", [("identifier", "HIS-2")], {"o2"}),
    ("ServiceRequest", [("identifier", "urn:his|HIS-1")], {"o1"}),
    ("ServiceRequest", [("identifier", "urn:pacslab:accession|HIS-1")], set()),
    ("ServiceRequest", [("_id", "{o3}")], {"o3"}),
    ("ServiceRequest", [("authored", YEAR)], {"o1", "o2", "o3"}),
    ("ServiceRequest", [("authored", "2024-03")], set()),
    ("ServiceRequest", [("authored", "lt2000")], set()),
    ("ServiceRequest", [("_lastUpdated", f"eq{YEAR}")], {"o1", "o2", "o3"}),
    ("ServiceRequest", [("_lastUpdated", "2024-03")], set()),
    ("ServiceRequest", [("_lastUpdated", "ge2000-01-01T00:00:00Z")], {"o1", "o2", "o3"}),
    ("ServiceRequest", [("patient", "Patient/{p1}"), ("status", "active")], {"o1"}),
    ("ServiceRequest", [("patient", "Patient/{p1}"), ("code", "24590-2")], {"o3"}),
    # -- Observation
    ("Observation", [], {"g1", "k1", "g2"}),
    ("Observation", [("patient", "Patient/{p1}")], {"g1", "k1"}),
    ("Observation", [("subject", "Patient/{p2}")], {"g2"}),
    ("Observation", [("patient", "Patient/999999")], set()),
    ("Observation", [("patient:identifier", "P2")], {"g2"}),
    ("Observation", [("subject.identifier", "P1")], {"g1", "k1"}),
    ("Observation", [("category", "laboratory")], {"g1", "k1", "g2"}),
    (
        "Observation",
        [("category", "http://terminology.hl7.org/CodeSystem/observation-category|laboratory")],
        {"g1", "k1", "g2"},
    ),
    ("Observation", [("category", "vital-signs")], set()),
    ("Observation", [("code", "2345-7")], {"g1", "g2"}),
    ("Observation", [("code", f"{LOINC}|2823-3")], {"k1"}),
    ("Observation", [("date", "2024-03-01")], {"g1", "k1"}),
    ("Observation", [("date", "ge2024-03-02")], {"g2"}),
    ("Observation", [("date", "lt2024-03-02")], {"g1", "k1"}),
    ("Observation", [("date", "2024")], {"g1", "k1", "g2"}),
    ("Observation", [("status", "final")], {"g1", "k1", "g2"}),
    ("Observation", [("status", "preliminary")], set()),
    ("Observation", [("based-on:identifier", "HIS-2")], {"g2"}),
    ("Observation", [("based-on:identifier", "ORD-1")], {"g1", "k1"}),
    ("Observation", [("based-on", "ServiceRequest/{o2}")], {"g2"}),
    ("Observation", [("based-on", "ServiceRequest/{o1}")], set()),
    ("Observation", [("identifier", "urn:pacslab:lab-result|{g1}")], {"g1"}),
    ("Observation", [("identifier", "urn:other|{g1}")], set()),
    ("Observation", [("_id", "{g2}")], {"g2"}),
    ("Observation", [("specimen:identifier", "S2")], {"g2"}),
    ("Observation", [("specimen", "Specimen/S1")], {"g1", "k1"}),
    ("Observation", [("_lastUpdated", "ge2000")], {"g1", "k1", "g2"}),
    ("Observation", [("_lastUpdated", "lt2000")], set()),
    ("Observation", [("_tag", "urn:pacslab:lab-tag|critical")], set()),
    ("Observation", [("patient", "Patient/{p1}"), ("code", "2345-7")], {"g1"}),
    # -- DiagnosticReport
    ("DiagnosticReport", [], {"r1", "r2"}),
    ("DiagnosticReport", [("patient", "Patient/{p1}")], {"r1"}),
    ("DiagnosticReport", [("subject:identifier", "P2")], {"r2"}),
    ("DiagnosticReport", [("subject", "Patient/999999")], set()),
    ("DiagnosticReport", [("category", "LAB")], {"r1", "r2"}),
    ("DiagnosticReport", [("category", "RAD")], set()),
    ("DiagnosticReport", [("code", "2823-3")], {"r1"}),
    ("DiagnosticReport", [("date", "2024-03-02")], {"r2"}),
    ("DiagnosticReport", [("identifier", "S1")], {"r1"}),
    ("DiagnosticReport", [("identifier", "HIS-2")], {"r2"}),
    ("DiagnosticReport", [("based-on", "ServiceRequest/{o2}")], {"r2"}),
    ("DiagnosticReport", [("based-on", "ServiceRequest/{o1}")], set()),
    ("DiagnosticReport", [("status", "final")], {"r1", "r2"}),
    ("DiagnosticReport", [("status", "preliminary")], set()),
    ("DiagnosticReport", [("specimen:identifier", "S1")], {"r1"}),
    ("DiagnosticReport", [("_id", "{r2}")], {"r2"}),
    ("DiagnosticReport", [("_lastUpdated", "lt2000")], set()),
    ("DiagnosticReport", [("_lastUpdated", YEAR)], {"r1", "r2"}),
    ("DiagnosticReport", [("_tag", "qc")], set()),
]


def _ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def _search(client: TestClient, resource: str, params: list[tuple[str, str]],
            **headers: str) -> dict[str, Any]:
    r = client.get(f"/fhir/{resource}", params=params, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == FHIR
    body: dict[str, Any] = r.json()
    Bundle.model_validate(body)
    return body


@pytest.mark.parametrize(("resource", "params", "expected"), ROWS,
                         ids=[f"{r}?{'&'.join(f'{k}={v}' for k, v in p)}" for r, p, _ in ROWS])
def test_search_row(client: TestClient, loaded: tuple[FastAPI, dict[str, str]], resource: str,
                    params: list[tuple[str, str]], expected: set[str]) -> None:
    ids = loaded[1]
    resolved = [(k, _resolve(v, ids)) for k, v in params]
    bundle = _search(client, resource, [*resolved, ("_count", "100")])
    names = {v: k for k, v in ids.items()}
    got = {names.get(i, i) for i in _ids(bundle)}
    assert got == expected
    assert bundle["total"] == len(expected)
    self_url = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    for key, _value in resolved:
        assert key in self_url.replace("%3A", ":")


def test_every_advertised_parameter_has_a_row() -> None:
    covered = {(r, k.split(":")[0].split(".")[0]) for r, params, _ in ROWS for k, _ in params}
    for spec in RESOURCES:
        if spec.type in ALL:
            for param in spec.params:
                assert (spec.type, param.name) in covered, (spec.type, param.name)


@pytest.mark.parametrize("resource", sorted(ALL))
def test_unknown_parameter_strict_and_lenient(client: TestClient, resource: str) -> None:
    r = client.get(f"/fhir/{resource}", params={"family-name": "x"})
    assert r.status_code == 400 and r.headers["content-type"] == FHIR
    outcome = OperationOutcome.model_validate(r.json())
    assert "family-name" in (outcome.issue[0].diagnostics or "")
    # _summary, _elements... are not supported: refused, never silently ignored.
    assert client.get(f"/fhir/{resource}", params={"_summary": "true"}).status_code == 400
    lenient = _search(client, resource, [("family-name", "x"), ("_summary", "true")],
                      Prefer="handling=lenient")
    assert lenient["total"] == len(ALL[resource])
    self_url = next(link["url"] for link in lenient["link"] if link["relation"] == "self")
    assert "family-name" not in self_url and "_summary" not in self_url


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("/fhir/Patient?name:exact=NGUYEN", 400),  # modifier not advertised
        ("/fhir/Observation?code:text=glucose", 400),
        ("/fhir/ImagingStudy?patient=Group/1", 400),
        ("/fhir/ServiceRequest?patient=https://elsewhere.example/fhir/Patient/1", 400),
        ("/fhir/ServiceRequest?_count=abc", 400),
        ("/fhir/ServiceRequest?_lastUpdated=ne2024", 400),
        ("/fhir/Observation?_sort=code", 400),
        ("/fhir/Observation?_sort=-_id", 400),
        ("/fhir/ImagingStudy?status=bogus", 400),
        ("/fhir/ImagingStudy?_format=xml", 406),
        ("/fhir/Patient?name=" + "x" * 2000, 400),
        ("/fhir/Patient?name=a%00b", 400),
    ],
)
def test_bad_searches_are_operation_outcomes(client: TestClient, url: str, status: int) -> None:
    r = client.get(url)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == FHIR
    OperationOutcome.model_validate(r.json())


@pytest.mark.parametrize("resource", sorted(ALL))
def test_paging_sees_every_resource_once(client: TestClient, resource: str) -> None:
    seen: list[str] = []
    bundle = _search(client, resource, [("_count", "1")])
    total = bundle["total"]
    pages = 0
    while True:
        seen += _ids(bundle)
        pages += 1
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        if "next" not in links:
            break
        assert pages <= total
        bundle = client.get(links["next"].replace("http://testserver", "")).json()
        assert bundle["total"] == total
    assert len(seen) == len(set(seen)) == total == len(ALL[resource])
    assert pages == total


def test_audit_events_page_with_total_and_next(client: TestClient,
                                               loaded: tuple[FastAPI, dict[str, str]]) -> None:
    app = loaded[0]
    assert app.state.audit.flush()
    first = _search(client, "AuditEvent", [("_count", "5")])
    total = first["total"]
    assert total >= 10  # the data set's loading requests were logged
    seen = _ids(first)
    bundle = first
    while (nxt := {lk["relation"]: lk["url"] for lk in bundle["link"]}.get("next")):
        bundle = client.get(nxt.replace("http://testserver", "")).json()
        seen += _ids(bundle)
    # Every entry that existed at the first page, each once (new ones may follow).
    assert len(seen) == len(set(seen)) and {str(i) for i in range(1, total + 1)} <= set(seen)
    assert _search(client, "AuditEvent", [("date", "lt2000")])["total"] == 0
    assert _search(client, "AuditEvent", [("agent", "nobody")])["total"] == 0
    assert _search(client, "AuditEvent", [("date", f"ge{YEAR}-01-01")])["total"] >= total
    newest = _search(client, "AuditEvent", [("_sort", "-date"), ("_count", "1")])
    assert int(_ids(newest)[0]) >= total


def test_name_search_pages_in_the_index(client: TestClient) -> None:
    """A name search is answered by the index (issue 21): its total and pages come
    from the same query, with no row-by-row check that would cap it."""
    first = _search(client, "Patient", [("name", "tran,nguyen"), ("_count", "1")])
    assert first["total"] == 2 and len(first["entry"]) == 1
    nxt = {lk["relation"]: lk["url"] for lk in first["link"]}["next"]
    second = client.get(nxt.replace("http://testserver", "")).json()
    assert second["total"] == 2 and len(second["entry"]) == 1
    assert _ids(first) != _ids(second)


HOSTILE = ["", ",", "|", "||", "a|", "|a", "Patient/", "Patient/../1", "Patient/1/_history/1",
           "http://testserver/fhir/Patient/", "ge", "eq9999-99-99", "2024-13", "2024-02-30",
           "gt2024-01-01T25:00", "99999999999999999999", "\u202e", "%", "*", "?", "\\",
           "'; DROP TABLE patients; --", "a" * 1000, "x:y", "T", "-1", "a,,b", "Ω" * 300]


def test_hostile_values_never_500(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").json()
    tried = 0
    for res in statement["rest"][0]["resource"]:
        if {"code": "search-type"} not in res["interaction"]:
            continue
        names = [p["name"] for p in res.get("searchParam", [])] + ["_count", "_offset", "_sort"]
        for name in names:
            for value in HOSTILE:
                r = client.get(f"/fhir/{res['type']}", params={name: value})
                assert r.status_code in (200, 400), (res["type"], name, value, r.status_code)
                assert r.headers["content-type"] == FHIR
                tried += 1
    assert tried > 1000


def test_service_request_pages_stay_stable_when_an_order_changes(
    client: TestClient, loaded: tuple[FastAPI, dict[str, str]]
) -> None:
    from tests.api.fhir_dataset import service_request

    ids = loaded[1]
    first = _search(client, "ServiceRequest", [("_count", "1")])
    (seen,) = _ids(first)
    assert seen == ids["o1"]  # creation order
    body = service_request("P1", "HIS-1", "24627-2") | {"id": ids["o1"]}
    assert client.put(f"/fhir/ServiceRequest/{ids['o1']}", json=body).status_code == 200
    pages = [seen]
    bundle = first
    while (nxt := {lk["relation"]: lk["url"] for lk in bundle["link"]}.get("next")):
        bundle = client.get(nxt.replace("http://testserver", "")).json()
        pages += _ids(bundle)
    assert pages == [ids["o1"], ids["o2"], ids["o3"]]  # each once, none skipped
    # The change feed order puts the changed order last.
    feed = _search(client, "ServiceRequest", [("_sort", "_lastUpdated")])
    assert _ids(feed)[-1] == ids["o1"]
    assert client.get("/fhir/ServiceRequest", params={"_sort": "status"}).status_code == 400


@pytest.mark.parametrize("resource", sorted(ALL))
def test_total_is_honoured(client: TestClient, resource: str,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``_total`` (FHIR R4 search.html#total): ``accurate`` counts every match,
    ``none`` leaves Bundle.total (and the ``last`` link) out while ``next`` still
    pages, and the default (``estimate``) counts only a bounded way past the page
    (issue 21): past the bound the total is left out, not counted on."""
    n = len(ALL[resource])

    def links(bundle: dict[str, Any]) -> dict[str, str]:
        return {lk["relation"]: lk["url"].replace("http://testserver", "")
                for lk in bundle["link"]}

    for mode in ("accurate", "estimate"):
        bundle = _search(client, resource, [("_total", mode), ("_count", "1")])
        assert bundle["total"] == n and {"next", "last"} <= set(links(bundle)), mode
    bundle = _search(client, resource, [("_total", "none"), ("_count", "1")])
    assert "total" not in bundle and "last" not in links(bundle)
    seen = _ids(bundle)
    while nxt := links(bundle).get("next"):
        assert "_total=none" in nxt
        bundle = client.get(nxt).json()
        assert "total" not in bundle
        seen += _ids(bundle)
    assert sorted(seen) == sorted(set(seen)) and len(seen) == n
    # A bound of 0 past the page: a full first page no longer knows its total.
    monkeypatch.setattr("api.fhir._search.TOTAL_ESTIMATE_BOUND", 0)
    first = _search(client, resource, [("_count", "1")])
    assert "total" not in first and "next" in links(first)
    assert _search(client, resource, [("_count", "1"), ("_total", "accurate")])["total"] == n
    assert _search(client, resource, [("_count", str(n))])["total"] == n  # page not full
    for bad in ([("_total", "bogus")], [("_total", "ACCURATE")],
                [("_total", "none"), ("_total", "accurate")]):
        for prefer in ("handling=strict", "handling=lenient"):
            r = client.get(f"/fhir/{resource}", params=bad, headers={"Prefer": prefer})
            assert r.status_code == 400 and r.headers["content-type"] == FHIR, (bad, prefer)
            OperationOutcome.model_validate(r.json())


def test_audit_event_total_is_honoured(client: TestClient,
                                       loaded: tuple[FastAPI, dict[str, str]]) -> None:
    assert loaded[0].state.audit.flush()
    accurate = _search(client, "AuditEvent", [("_count", "1"), ("_total", "accurate")])
    assert accurate["total"] >= 10
    assert "total" not in _search(client, "AuditEvent", [("_count", "1"), ("_total", "none")])
    assert client.get("/fhir/AuditEvent", params={"_total": "x"}).status_code == 400
