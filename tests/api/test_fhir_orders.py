"""FHIR R4 ServiceRequest orders over HTTP, validated with fhir.resources (R4B models).

R4B's ServiceRequest, Patient and Bundle are R4's (R4B changed other resources), so
``fhir.resources.R4B`` checks that what we emit is valid R4.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.state import services_of
from core.orders import SpsStatus
from core.settings import Settings
from pacslab.wiring import build_index

R4 = pytest.importorskip("fhir.resources.R4B")
from fhir.resources.R4B.bundle import Bundle  # noqa: E402
from fhir.resources.R4B.servicerequest import ServiceRequest  # noqa: E402


def service_request(
    placer: str = "HIS-1001",
    *,
    status: str = "active",
    family: str = "NGUYỄN",
    modality: str = "CT",
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "contained": [
            {
                "resourceType": "Patient",
                "id": "p",
                "identifier": [{"system": "urn:oid:1.2.3.4", "value": "PID77"}],
                "name": [{"family": family, "given": ["VĂN", "AN"]}],
                "gender": "male",
                "birthDate": "1980-01-02",
            }
        ],
        "identifier": [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}
                    ]
                },
                "system": "urn:his",
                "value": placer,
            }
        ],
        "status": status,
        "intent": "order",
        "priority": "stat",
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}],
            "text": "CT chest",
        },
        "orderDetail": [
            {
                "coding": [
                    {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": modality}
                ]
            }
        ],
        "locationCode": [{"coding": [{"system": "urn:pacslab:ae-title", "code": "CT1"}]}],
        "subject": {"reference": "#p"},
        "occurrenceDateTime": "2026-11-25T09:30:00+07:00",
        "note": [{"text": "contrast allergy"}],
    }
    R4.servicerequest.ServiceRequest.model_validate(body)  # our fixtures are valid R4 too
    return body


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    build_index(settings, migrate=True).close()
    with TestClient(create_app(settings)) as c:
        yield c


def test_post_get_round_trip_is_valid_r4(client: TestClient) -> None:
    r = client.post("/fhir/ServiceRequest", json=service_request())
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    created = ServiceRequest.model_validate(r.json())
    assert created.status == "active" and created.meta.versionId == "1"
    assert r.headers["Location"].endswith(f"/fhir/ServiceRequest/{created.id}/_history/1")
    got = client.get(f"/fhir/ServiceRequest/{created.id}")
    assert got.status_code == 200
    sr = ServiceRequest.model_validate(got.json())
    body = got.json()
    patient = body["contained"][0]
    assert patient["name"] == [{"family": "NGUYỄN", "given": ["VĂN", "AN"]}]
    assert patient["birthDate"] == "1980-01-02" and patient["gender"] == "male"
    values = {
        i.get("type", {}).get("coding", [{}])[0].get("code"): i["value"] for i in body["identifier"]
    }
    assert values["PLAC"] == "HIS-1001"
    assert values["ACSN"] == "A00000001"
    assert values[None].startswith("urn:oid:")  # Study Instance UID, generated at scheduling
    assert sr.occurrenceDateTime == datetime.fromisoformat("2026-11-25T09:30:00+07:00")
    assert body["orderDetail"][0]["coding"][0]["code"] == "CT"
    assert body["priority"] == "stat" and sr.intent == "order"


def test_put_updates_and_revoked_cancels(client: TestClient) -> None:
    sr_id = client.post("/fhir/ServiceRequest", json=service_request()).json()["id"]
    changed = service_request(modality="MR") | {"id": sr_id}
    r = client.put(f"/fhir/ServiceRequest/{sr_id}", json=changed)
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["versionId"] == "2"
    assert r.json()["orderDetail"][0]["coding"][0]["code"] == "MR"
    r = client.put(
        f"/fhir/ServiceRequest/{sr_id}", json=service_request(status="revoked") | {"id": sr_id}
    )
    assert r.status_code == 200
    assert ServiceRequest.model_validate(r.json()).status == "revoked"
    # Update-as-create with a client id.
    r = client.put(
        "/fhir/ServiceRequest/his-2002", json=service_request("HIS-2002") | {"id": "his-2002"}
    )
    assert r.status_code == 201 and r.json()["id"] == "his-2002"


def test_put_with_if_match_is_version_aware(client: TestClient) -> None:
    """FHIR R4 http.html#concurrency: ``If-Match: W/"n"`` updates only version n; a stale,
    malformed or wildcard If-Match, or one on a missing order, is 412 and changes nothing."""
    sr_id = client.post("/fhir/ServiceRequest", json=service_request()).json()["id"]
    mr = service_request(modality="MR") | {"id": sr_id}
    for stale in ('W/"2"', '"0"', "*", "garbage"):
        r = client.put(f"/fhir/ServiceRequest/{sr_id}", json=mr, headers={"If-Match": stale})
        assert r.status_code == 412, (stale, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"
    got = client.get(f"/fhir/ServiceRequest/{sr_id}").json()
    assert got["meta"]["versionId"] == "1"
    assert got["orderDetail"][0]["coding"][0]["code"] == "CT"

    r = client.put(f"/fhir/ServiceRequest/{sr_id}", json=mr, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == 'W/"2"' and r.json()["meta"]["versionId"] == "2"
    # The same If-Match again is a lost update: refused, MR stays.
    us = service_request(modality="US") | {"id": sr_id}
    r = client.put(f"/fhir/ServiceRequest/{sr_id}", json=us, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412
    revoked = service_request(status="revoked") | {"id": sr_id}
    r = client.put(f"/fhir/ServiceRequest/{sr_id}", json=revoked, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412
    got = client.get(f"/fhir/ServiceRequest/{sr_id}").json()
    assert got["status"] == "active" and got["orderDetail"][0]["coding"][0]["code"] == "MR"
    r = client.put(f"/fhir/ServiceRequest/{sr_id}", json=revoked, headers={"If-Match": 'W/"2"'})
    assert r.status_code == 200 and r.json()["status"] == "revoked"

    # No order to match: no update-as-create under If-Match.
    new = service_request("HIS-3003") | {"id": "his-3003"}
    r = client.put("/fhir/ServiceRequest/his-3003", json=new, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412
    assert client.get("/fhir/ServiceRequest/his-3003").status_code == 404


def test_search_by_status_identifier_and_last_updated(
    client: TestClient, settings: Settings
) -> None:
    first = client.post("/fhir/ServiceRequest", json=service_request("HIS-1")).json()
    time.sleep(0.01)
    second = client.post("/fhir/ServiceRequest", json=service_request("HIS-2")).json()
    r = client.get("/fhir/ServiceRequest", params={"identifier": "urn:his|HIS-2"})
    bundle = Bundle.model_validate(r.json())
    assert bundle.type == "searchset" and [e.resource.id for e in bundle.entry] == [second["id"]]
    since = first["meta"]["lastUpdated"]
    r = client.get("/fhir/ServiceRequest", params={"_lastUpdated": f"gt{since}"})
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [second["id"]]
    # An MPPS start changes the order: it comes back in the change feed.
    service = services_of(client.app).orders
    service.step_status(
        accession="A00000001", procedure_id="", step_id="", status=SpsStatus.STARTED
    )
    since2 = second["meta"]["lastUpdated"]
    feed = client.get("/fhir/ServiceRequest", params={"_lastUpdated": f"gt{since2}"}).json()
    (entry,) = feed["entry"]
    assert entry["resource"]["id"] == first["id"]
    assert entry["resource"]["status"] == "active"
    assert entry["resource"]["extension"][0]["valueCode"] == "in-progress"
    assert client.get("/fhir/ServiceRequest", params={"status": "completed"}).json()["total"] == 0
    assert client.get("/fhir/ServiceRequest", params={"status": "active"}).json()["total"] == 2


def test_invalid_requests_get_operation_outcomes(client: TestClient) -> None:
    r = client.post("/fhir/ServiceRequest", json={"resourceType": "Patient"})
    assert r.status_code == 422
    assert r.json()["resourceType"] == "OperationOutcome"
    assert r.json()["issue"][0]["code"] == "invalid"
    no_patient = service_request()
    no_patient["contained"] = []
    assert client.post("/fhir/ServiceRequest", json=no_patient).status_code == 422
    assert client.get("/fhir/ServiceRequest/nope").status_code == 404
    completed = service_request(status="completed")
    assert client.post("/fhir/ServiceRequest", json=completed).status_code == 422
    client.post("/fhir/ServiceRequest", json=service_request("HIS-9"))
    other = service_request("HIS-9", family="OTHER")
    assert client.post("/fhir/ServiceRequest", json=other).status_code == 409


def test_unmatched_list_and_link(client: TestClient) -> None:
    assert client.get("/orders/unmatched").json() == []
    r = client.post("/orders/unmatched/1.2.3/link", json={"order": "nope"})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
