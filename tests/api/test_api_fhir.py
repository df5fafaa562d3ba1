"""FHIR R4 routes, every resource validated with fhir.resources (R4B models: the
ImagingStudy, Patient, Endpoint, Bundle and OperationOutcome elements used here are
the same in R4 and R4B)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient

from tests.api._support import Stored

FHIR = "application/fhir+json"


def get(client: TestClient, url: str, **params: Any) -> dict[str, Any]:
    r = client.get(url, params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == FHIR
    body: dict[str, Any] = r.json()
    return body


def search_ids(client: TestClient, **params: Any) -> set[str]:
    bundle = get(client, "/fhir/ImagingStudy", **params)
    Bundle.model_validate(bundle)
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


def test_imaging_study_read(client: TestClient, ct: Stored) -> None:
    res = get(client, f"/fhir/ImagingStudy/{ct.study}")
    study = ImagingStudy.model_validate(res)
    assert study.numberOfSeries == 1 and study.numberOfInstances == 4
    assert study.identifier[0].system == "urn:dicom:uid"
    assert study.identifier[0].value == f"urn:oid:{ct.study}"
    assert study.identifier[1].value == "ACC0001"
    assert study.identifier[1].type.coding[0].code == "ACSN"
    assert study.modality[0].code == "CT"
    assert study.endpoint[0].reference == "Endpoint/dicomweb"
    (series,) = study.series
    assert series.uid == ct.series and series.numberOfInstances == 4
    assert [i.uid for i in series.instance] == ct.sops
    assert series.instance[0].sopClass.code == "urn:oid:1.2.840.10008.5.1.4.1.1.2"
    patient = Patient.model_validate(get(client, f"/fhir/{study.subject.reference}"))
    assert patient.identifier[0].value == "SYN0001"
    assert patient.name[0].family == "NGUYEN" and patient.name[0].given == ["VAN", "AN"]
    assert str(patient.birthDate) == "1970-01-01" and patient.gender == "male"
    endpoint = Endpoint.model_validate(get(client, "/fhir/Endpoint/dicomweb"))
    assert endpoint.address.endswith("/dicomweb")


def test_capability_statement(client: TestClient) -> None:
    cap = CapabilityStatement.model_validate(get(client, "/fhir/metadata"))
    types = {r.type for r in cap.rest[0].resource}
    assert {"ImagingStudy", "Patient", "Endpoint"} <= types


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, {"a", "b", "c"}),
        ({"patient:identifier": "P1"}, {"a", "c"}),
        ({"subject:Patient.identifier": "|P2"}, {"b"}),
        ({"identifier": "urn:pacslab:accession|ACC-B"}, {"b"}),
        ({"identifier": "ACC-A"}, {"a"}),
        ({"started": "2024"}, {"a", "b"}),
        ({"started": "ge2024-02"}, {"b"}),
        ({"started": "lt2024-01-05"}, {"c"}),
        ({"started": "le2024-01-05"}, {"a", "c"}),
        ({"started": "gt2024-01-05"}, {"b"}),
        ({"started": "eq2023-12-31"}, {"c"}),
        ({"modality": "MR"}, {"b"}),
        ({"modality": "http://dicom.nema.org/resources/ontology/DCM|CT"}, {"a", "c"}),
        ({"modality": "CT,MR"}, {"a", "b", "c"}),
        ({"_lastUpdated": "gt2000-01-01"}, {"a", "b", "c"}),
        ({"_lastUpdated": "lt2000-01-01"}, set()),
    ],
)
def test_imaging_study_search(
    client: TestClient, catalogue: dict[str, str], params: dict[str, str], expected: set[str]
) -> None:
    assert search_ids(client, **params) == {catalogue[k] for k in expected}


def test_unknown_parameter_strict_by_default_lenient_on_request(
    client: TestClient, catalogue: dict[str, str]
) -> None:
    # Strict (FHIR R4 3.1.1.4 default here): 400 naming the parameter.
    r = client.get("/fhir/ImagingStudy", params={"unknown-param": "x"})
    assert r.status_code == 400 and r.headers["content-type"] == FHIR
    assert "unknown-param" in OperationOutcome.model_validate(r.json()).issue[0].diagnostics
    # Lenient: ignored, and absent from the self link.
    r = client.get(
        "/fhir/ImagingStudy",
        params={"unknown-param": "x", "modality": "MR"},
        headers={"Prefer": "handling=lenient"},
    )
    assert r.status_code == 200
    assert {e["resource"]["id"] for e in r.json()["entry"]} == {catalogue["b"]}
    self_url = next(link["url"] for link in r.json()["link"] if link["relation"] == "self")
    assert "unknown-param" not in self_url and "modality=MR" in self_url


def test_search_by_uid_and_patient(client: TestClient, catalogue: dict[str, str]) -> None:
    uid = catalogue["b"]
    assert search_ids(client, identifier=f"urn:dicom:uid|urn:oid:{uid}") == {uid}
    study = get(client, f"/fhir/ImagingStudy/{uid}")
    assert search_ids(client, patient=study["subject"]["reference"]) == {uid}
    assert search_ids(client, patient="Patient/999999") == set()


def test_bundle_paging(client: TestClient, catalogue: dict[str, str]) -> None:
    first = get(client, "/fhir/ImagingStudy", _count=2, modality="CT,MR")
    Bundle.model_validate(first)
    assert first["total"] == 3 and len(first["entry"]) == 2
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert "modality=CT%2CMR" in links["self"] and "previous" not in links
    nxt = client.get(links["next"].replace("http://testserver", "")).json()
    assert len(nxt["entry"]) == 1 and nxt["total"] == 3
    ids = {e["resource"]["id"] for e in first["entry"] + nxt["entry"]}
    assert ids == set(catalogue.values())
    assert "previous" in {link["relation"] for link in nxt["link"]}
    counted = get(client, "/fhir/ImagingStudy", _count=0)
    assert (counted["total"] == 3 and "entry" not in counted) or counted["entry"] == []


def test_include_subject(client: TestClient, catalogue: dict[str, str]) -> None:
    bundle = get(client, "/fhir/ImagingStudy", _include="ImagingStudy:subject")
    Bundle.model_validate(bundle)
    modes = [e["search"]["mode"] for e in bundle["entry"]]
    assert modes.count("include") == 2  # two patients


def test_patient_search(client: TestClient, catalogue: dict[str, str]) -> None:
    bundle = get(client, "/fhir/Patient", name="tran")
    Bundle.model_validate(bundle)
    assert bundle["total"] == 1
    Patient.model_validate(bundle["entry"][0]["resource"])
    assert get(client, "/fhir/Patient", identifier="P1")["total"] == 1
    assert get(client, "/fhir/Patient", birthdate="1970")["total"] == 2


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("/fhir/ImagingStudy/1.2.3", 404, "not-found"),
        ("/fhir/Patient/abc", 404, "not-found"),
        ("/fhir/ImagingStudy?started=sa2024", 400, "invalid"),
        ("/fhir/ImagingStudy?started=yesterday", 400, "invalid"),
        ("/fhir/ImagingStudy?_count=x", 400, "invalid"),
        ("/fhir/ImagingStudy?patient=Group/1", 400, "invalid"),
        ("/fhir/Nothing", 404, "not-found"),
    ],
)
def test_errors_are_operation_outcomes(
    client: TestClient, url: str, status: int, code: str
) -> None:
    r = client.get(url)
    assert r.status_code == status
    assert r.headers["content-type"] == FHIR
    outcome = OperationOutcome.model_validate(r.json())
    assert outcome.issue[0].code == code


def test_xml_is_not_acceptable(client: TestClient) -> None:
    r = client.get("/fhir/metadata", headers={"Accept": "application/fhir+xml"})
    assert r.status_code == 406
    OperationOutcome.model_validate(r.json())


def test_a_patient_id_of_non_ascii_digits_is_404_not_500(client: TestClient) -> None:
    # str.isdigit() accepts "³" and "²", which int() refuses (schemathesis found it).
    for ident in ("³", "1²"):
        assert client.get(f"/fhir/Patient/{ident}").status_code == 404
        assert client.put(f"/fhir/Patient/{ident}", json={"resourceType": "Patient"},
                          headers={"Content-Type": "application/fhir+json"}
                          ).status_code in (401, 403, 404)
    r = client.get("/fhir/ImagingStudy", params={"patient": "Patient/³"})
    assert r.status_code == 400 or (r.status_code == 200 and r.json().get("total", 0) == 0)
