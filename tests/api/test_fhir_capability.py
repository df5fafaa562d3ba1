"""The CapabilityStatement against the registry and the routes, the SMART configuration,
OperationOutcome for 401/403 under /fhir, and bounds on received ServiceRequests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome

from api.fhir.registry import RESOURCES
from core.settings import Settings
from tests.api._support import running_app
from tests.api.fhir_dataset import service_request

FHIR = "application/fhir+json"

#: A value of each type (and for references, of the right target) a route must accept.
_SAMPLES = {"token": "x", "date": "2024", "string": "x", "reference": "Patient/1"}
_REFERENCE_SAMPLES = {
    "based-on": "ServiceRequest/x1",
    "specimen": "Specimen/x1",
    # tokens with a closed value set
    "_tag": "qc",
    "gender": "male",
    "status": "completed",
}
_STATUS_SAMPLES = {"ImagingStudy": "available"}


def _sample(resource: str, name: str, kind: str) -> str:
    if resource == "AuditEvent" and kind == "reference":
        return "x"  # the action log names agents and patients by identifier
    if name == "_id" and resource == "Patient":
        return "1"
    if name == "status" and resource in _STATUS_SAMPLES:
        return _STATUS_SAMPLES[resource]
    return _REFERENCE_SAMPLES.get(name, _SAMPLES[kind])


def test_capability_statement_lists_the_registry(client: TestClient) -> None:
    r = client.get("/fhir/metadata")
    assert r.status_code == 200 and r.headers["content-type"] == FHIR
    cap = CapabilityStatement.model_validate(r.json())
    rest = r.json()["rest"][0]
    served = {res["type"]: res for res in rest["resource"]}
    assert set(served) == {
        "AuditEvent", "DiagnosticReport", "Endpoint", "ImagingStudy", "Observation",
        "Patient", "ServiceRequest",
    }
    for spec in RESOURCES:
        entry = served[spec.type]
        assert [i["code"] for i in entry["interaction"]] == list(spec.interactions)
        advertised = {(p["name"], p["type"], p["definition"]) for p in entry.get("searchParam", [])}
        assert advertised == {(p.name, p.type, p.definition) for p in spec.params}
    assert cap.rest is not None and cap.rest[0].security is not None
    coding = rest["security"]["service"][0]["coding"][0]
    assert coding["code"] == "SMART-on-FHIR"
    assert "Bearer" in rest["security"]["description"] or "switched off" in rest[
        "security"]["description"]


def test_every_advertised_parameter_is_accepted(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").json()
    checked = 0
    for res in statement["rest"][0]["resource"]:
        for param in res.get("searchParam", []):
            value = _sample(res["type"], param["name"], param["type"])
            r = client.get(f"/fhir/{res['type']}", params={param["name"]: value})
            assert r.status_code == 200, (res["type"], param["name"], r.text)
            assert r.json()["resourceType"] == "Bundle"
            checked += 1
        for include in res.get("searchInclude", []):
            assert client.get(f"/fhir/{res['type']}", params={"_include": include}).status_code \
                == 200
    assert checked >= 40
    for spec in RESOURCES:  # every declared _sort value (listed in the documentation)
        for key in spec.sorts:
            assert key in served_docs(statement, spec.type)
            r = client.get(f"/fhir/{spec.type}", params={"_sort": key})
            assert r.status_code == 200, (spec.type, key, r.text)


def served_docs(statement: dict[str, Any], resource: str) -> str:
    entry = next(r for r in statement["rest"][0]["resource"] if r["type"] == resource)
    return str(entry.get("documentation", ""))


# -- authentication under /fhir ------------------------------------------------------


@pytest.fixture
def secure_app(settings: Settings) -> Iterator[FastAPI]:
    auth = settings.auth.model_copy(
        update={"enabled": True, "token_endpoint": "https://idp.example/oauth2/token"}
    )
    with running_app(settings.model_copy(update={"auth": auth})) as app:
        yield app


def _token(app: FastAPI, *scopes: str) -> dict[str, str]:
    from api.keys import issue_token

    token = issue_token(app.state.settings.auth, subject="tester", scopes=list(scopes))
    return {"Authorization": f"Bearer {token}"}


def test_smart_configuration_is_public_and_honest(secure_app: FastAPI) -> None:
    client = TestClient(secure_app)
    r = client.get("/fhir/.well-known/smart-configuration")
    assert r.status_code == 200
    smart = r.json()
    assert smart["token_endpoint"] == "https://idp.example/oauth2/token"
    assert "authorization_endpoint" not in smart  # none configured: none advertised
    assert isinstance(smart["capabilities"], list) and "lab.read" in smart["scopes_supported"]
    statement = client.get("/fhir/metadata").json()  # public as well
    oauth = statement["rest"][0]["security"]["extension"][0]
    assert {e["url"]: e["valueUri"] for e in oauth["extension"]} == {
        "token": "https://idp.example/oauth2/token"
    }


def test_smart_configuration_without_an_identity_provider(client: TestClient) -> None:
    smart = client.get("/fhir/.well-known/smart-configuration").json()
    assert "token_endpoint" not in smart and "authorization_endpoint" not in smart


@pytest.mark.parametrize(
    ("path", "scopes", "status", "code"),
    [
        ("/fhir/Patient", (), 401, "login"),
        ("/fhir/ImagingStudy", ("lab.read",), 403, "forbidden"),
        ("/fhir/AuditEvent", ("imaging.read",), 403, "forbidden"),
        ("/fhir/Observation", ("imaging.read",), 403, "forbidden"),
    ],
)
def test_auth_refusals_under_fhir_are_operation_outcomes(
    secure_app: FastAPI, path: str, scopes: tuple[str, ...], status: int, code: str
) -> None:
    client = TestClient(secure_app)
    r = client.get(path, headers=_token(secure_app, *scopes) if scopes else {})
    assert r.status_code == status
    assert r.headers["content-type"] == FHIR
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert OperationOutcome.model_validate(r.json()).issue[0].code == code
    # Outside /fhir the same refusal stays RFC 9457 problem+json.
    assert client.get("/dicomweb/studies").headers["content-type"] == "application/problem+json"


# -- hostile ServiceRequests ----------------------------------------------------------


def _family(value: str) -> dict[str, Any]:
    body = service_request("P9", "HIS-9", "24627-2")
    body["contained"][0]["name"][0]["family"] = value
    return body


def _post_raw(client: TestClient, raw: bytes) -> Any:
    return client.post("/fhir/ServiceRequest", content=raw,
                       headers={"Content-Type": FHIR})


@pytest.mark.parametrize(
    ("name", "body", "status", "element"),
    [
        ("10 MB family name", _family("A" * 10_000_000), 413, ""),
        ("family name of 65", _family("A" * 65), 400, "contained[0].name[0].family"),
        ("NUL in a name", _family("NGU\x00YEN"), 400, "contained[0].name[0].family"),
        ("ESC in a name", _family("\x1b[31mRED"), 400, "contained[0].name[0].family"),
        ("subject a string", service_request("P9", "H", "1") | {"subject": "#p"}, 400,
         "ServiceRequest.subject"),
        ("code an array", service_request("P9", "H", "1") | {"code": [1]}, 400,
         "ServiceRequest.code"),
        ("coding of numbers", service_request("P9", "H", "1") | {"code": {"coding": [1]}}, 400,
         "ServiceRequest.code.coding[0]"),
        ("identifier an object", service_request("P9", "H", "1") | {"identifier": {"v": 1}},
         400, "ServiceRequest.identifier"),
        ("contained a string", service_request("P9", "H", "1") | {"contained": "x"}, 400,
         "ServiceRequest.contained"),
        ("status a number", service_request("P9", "H", "1") | {"status": 1}, 400,
         "ServiceRequest.status"),
        ("placer of 65", service_request("P9", "H" * 65, "1"), 400, "identifier[0].value"),
        ("patient id of 65", service_request("P" * 65, "H", "1"), 400,
         "contained[0].identifier[0].value"),
    ],
)
def test_hostile_service_requests_are_refused(
    client: TestClient, name: str, body: dict[str, Any], status: int, element: str
) -> None:
    r = _post_raw(client, json.dumps(body).encode())
    assert r.status_code == status, (name, r.text[:300])
    assert r.headers["content-type"] == FHIR
    outcome = OperationOutcome.model_validate(r.json())
    assert element in (outcome.issue[0].diagnostics or "")
    assert client.get("/fhir/ServiceRequest").json()["total"] == 0  # nothing was stored


def test_deep_and_broken_json_is_400(client: TestClient) -> None:
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                b"\xff\xfe", b'"just a string"', b"{"):
        r = _post_raw(client, raw)
        assert r.status_code == 400, raw[:20]
        OperationOutcome.model_validate(r.json())
    r = client.put("/fhir/ServiceRequest/x1", content=b"[" * 100_000,
                   headers={"Content-Type": FHIR})
    assert r.status_code == 400


def test_tab_and_newline_are_allowed_where_text_is(client: TestClient) -> None:
    body = service_request("P9", "HIS-9", "24627-2") | {"note": [{"text": "line 1\n\tline 2"}]}
    r = _post_raw(client, json.dumps(body).encode())
    assert r.status_code == 201, r.text


def test_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"resourceType": "ServiceRequest", "note": [{"text": "'
        for _ in range(40):
            yield b"A" * 65536  # 2.5 MiB in all, no Content-Length
        yield b'"}]}'

    r = client.post("/fhir/ServiceRequest", content=chunks(), headers={"Content-Type": FHIR})
    assert r.status_code == 413
    assert OperationOutcome.model_validate(r.json()).issue[0].code == "too-costly"
