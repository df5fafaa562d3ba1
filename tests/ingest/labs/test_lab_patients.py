"""Lab results belong to the right patient (issues 13.5 and 14.1), through the inbox.

Real captures (tests/data/lab/SOURCES.md) are dropped into the watched inbox and read
back over HTTP: lab patients are the ``/fhir/Patient`` resources imaging serves,
``Observation?patient=Patient/<id>`` separates two patients, DiagnosticReport.code is
the ordered panel (OBR-4) and ``basedOn`` names the ServiceRequest only when the
order is the same patient's. A result for a specimen and test already reported for
another patient is held (listed, audited, announced), never made current over the
first patient's result, and only an explicit, audited resolution moves it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from lab_support import LAB_DATA, LabRig, lab_settings, open_rig, webhook_receiver

from api.app import create_app
from core.settings import Settings
from services.orders import OrderService
from storage.audit import AuditStore
from storage.index.orders import SqlOrderStore
from storage.lab import LabResultQuery
from tests.support import wait_until
from worklist.orders.hl7v2 import parse_message, placed_orders, split_batch

#: ORU^R01 for patient 1300974 of "Baptist East" (PID-3.4), placer 4560411583,
#: OBR-4 57128-1; and the ORM^O01 that placed that order. Real captures (CDC).
RESULT = "hl7/cdc_oru_r01_v251_result_linked.hl7"
ORDER = "hl7/cdc_orm_o01_v251_order_linked.hl7"
#: ORU^R01 for patient 80008836, PID-3.4 "&NPI" (universal ID only), OBR-4 54089-8.
OTHER = "hl7/cdc_oru_r01_v251_utf8_micro_lf.hl7"
BAPTIST = "urn:pacslab:issuer:" + quote("Baptist East", safe="")


def _other_patient(raw: bytes, patient: str = "7700001") -> bytes:
    """The real result as it would arrive for another patient (PID-3 and name changed)."""
    out = raw.replace(b"1300974^^^Baptist East^MR", f"{patient}^^^Baptist East^MR".encode())
    out = out.replace(b"ONE^TESTCASE", b"TWO^TESTCASE")
    assert out != raw
    return out


@pytest.fixture
def hook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    with webhook_receiver() as receiver:
        yield receiver


def _search(client: TestClient, path: str, **params: str) -> list[dict[str, Any]]:
    r = client.get(f"/fhir/{path}", params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    Bundle.model_validate(body)
    return [e["resource"] for e in body.get("entry", [])]


def _drop_bytes(rig: LabRig, name: str, data: bytes) -> None:
    (rig.inbox() / name).write_bytes(data)


def _audit_entries(rig: LabRig) -> list[Any]:
    for inbox in rig.watcher.inboxes.values():
        if inbox.service.audit is not None:
            inbox.service.audit.flush()
    return list(AuditStore(rig.index.engine).entries())


@pytest.mark.network
def test_same_specimen_other_patient_is_held_listed_audited_announced(
    settings: Settings, hook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = hook
    with open_rig(lab_settings(settings, critical_webhook_url=url)) as rig:
        rig.drop(RESULT)
        assert [o.status for o in rig.run()] == ["ingested"]
        raw = (LAB_DATA / RESULT).read_bytes()
        _drop_bytes(rig, "other_patient.hl7", _other_patient(raw))
        assert [o.status for o in rig.run()] == ["ingested"]

        summary = json.loads(
            (rig.inbox() / "processed" / "other_patient.hl7.summary.json").read_text()
        )
        assert summary["held_for_review"] == 1
        results, total = rig.store.search_results(LabResultQuery())
        assert total == 2  # nothing lost: both stored
        by_patient = {r.patient_id: r for r in results}
        first, held = by_patient["1300974"], by_patient["7700001"]
        assert (first.review, first.version, first.is_current) == ("", 1, True)
        assert (held.review, held.conflict_with) == ("conflict", first.observation_id)
        assert held.patient_pk != first.patient_pk and held.specimen_id == first.specimen_id

        # The webhook heard of the held result, id-only.
        wait_until(lambda: received, interval=0.02, message="the webhook heard nothing")
        (notice,) = received
        assert notice["event"] == "lab-result.conflict"
        assert notice["id"] == held.observation_id
        assert notice["conflictsWith"] == f"Observation/{first.observation_id}"
        assert "7700001" not in json.dumps(notice) and "TESTCASE" not in json.dumps(notice)

        # The action log has the hold: outcome 4, the held Observation, no identifier.
        entries = _audit_entries(rig)
        (hold,) = [e for e in entries if e.outcome_desc.startswith("held")]
        assert hold.outcome == "4" and hold.event_type == "lab.file"
        assert held.observation_id in hold.detail and "7700001" not in hold.detail
        assert hold.patient_key and "7700001" not in hold.patient_key

        with TestClient(create_app(rig.settings)) as client:
            # The first patient's result stays theirs, final, in their search.
            mine = _search(client, "Observation", patient=f"Patient/{first.patient_pk}")
            assert [o["id"] for o in mine] == [first.observation_id]
            assert mine[0]["status"] == "final" and "meta" in mine[0]
            assert "tag" not in mine[0]["meta"]
            theirs = _search(client, "Observation", patient=f"Patient/{held.patient_pk}")
            assert [o["id"] for o in theirs] == [held.observation_id]
            Observation.model_validate(theirs[0])
            assert theirs[0]["status"] == "preliminary"
            assert [t["code"] for t in theirs[0]["meta"]["tag"]] == ["needs-review"]
            flagged = _search(client, "Observation", _tag="needs-review")
            assert [o["id"] for o in flagged] == [held.observation_id]
            held_reports = _search(client, "DiagnosticReport", status="preliminary")
            assert [r["subject"]["reference"] for r in held_reports] == [
                f"Patient/{held.patient_pk}"
            ]
            # The first patient's DiagnosticReport does not include the held result.
            (report,) = _search(client, "DiagnosticReport", patient=f"Patient/{first.patient_pk}")
            assert [r["reference"] for r in report["result"]] == [
                f"Observation/{first.observation_id}"
            ]

            listed = client.get("/lab/conflicts").json()
            assert listed["total"] == 1
            (item,) = listed["items"]
            assert item["observation"] == f"Observation/{held.observation_id}"
            assert item["other_patient"] == f"Patient/{first.patient_pk}"

            # Only an explicit resolution moves the specimen; it is audited before/after.
            bad = client.post(f"/lab/conflicts/{held.observation_id}/resolve", json={"choice": "x"})
            assert bad.status_code == 400  # the API answers validation errors with 400
            r = client.post(
                f"/lab/conflicts/{held.observation_id}/resolve", json={"choice": "accept"}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["held"]["before"]["review"] == "conflict"
            assert body["held"]["after"]["review"] == "accepted"
            assert body["other"]["after"]["status"] == "entered-in-error"
            assert client.get("/lab/conflicts").json()["total"] == 0
            again = client.post(
                f"/lab/conflicts/{held.observation_id}/resolve", json={"choice": "accept"}
            )
            assert again.status_code == 404
            withdrawn = client.get(f"/fhir/Observation/{first.observation_id}").json()
            Observation.model_validate(withdrawn)
            assert (withdrawn["status"], withdrawn["meta"]["versionId"]) == (
                "entered-in-error",
                "2",
            )
            accepted = client.get(f"/fhir/Observation/{held.observation_id}").json()
            assert accepted["status"] == "final" and "tag" not in accepted["meta"]
            client.app.state.audit.flush()  # type: ignore[attr-defined]
        (resolved,) = [e for e in _audit_entries(rig) if e.event_type == "lab.resolve"]
        detail = json.loads(resolved.detail)
        assert detail["choice"] == "accept"
        assert detail["held"]["before"]["review"] == "conflict"
        assert detail["other"]["after"]["status"] == "entered-in-error"
        assert resolved.resource == f"Observation/{held.observation_id}"
        assert "7700001" not in resolved.detail


def test_lab_patients_are_the_fhir_patients_imaging_serves(settings: Settings) -> None:
    custom = lab_settings(settings, patient_issuer="urn:oid:1.2.3.4.5")
    with open_rig(custom) as rig:
        rig.drop(RESULT)
        rig.drop(OTHER)
        rig.drop("hl7/python_hl7_oru_r01_v24_sn_value.hl7")  # PID-3 without PID-3.4
        assert [o.status for o in rig.run()] == ["ingested"] * 3
        with TestClient(create_app(rig.settings)) as client:
            ids = {}
            for system, value in (
                (BAPTIST, "1300974"),
                ("urn:pacslab:issuer:NPI", "80008836"),
                ("urn:oid:1.2.3.4.5", "555-44-4444"),  # the hospital's default issuer
            ):
                (patient,) = _search(client, "Patient", identifier=f"{system}|{value}")
                Patient.model_validate(patient)
                assert patient["identifier"][0]["system"] == system
                ids[value] = patient["id"]
            assert _search(client, "Patient", identifier=f"urn:oid:9.9|{'1300974'}") == []
            (named,) = _search(client, "Patient", identifier=f"{BAPTIST}|1300974")
            assert named["name"][0]["family"] == "ONE"  # demographics of the new row

            seen: dict[str, set[str]] = {}
            for value, pid in ids.items():
                found = _search(client, "Observation", patient=f"Patient/{pid}")
                assert found, value
                for obs in found:
                    Observation.model_validate(obs)
                    assert obs["subject"]["reference"] == f"Patient/{pid}"
                    assert obs["subject"]["identifier"]["value"] == value
                seen[value] = {o["id"] for o in found}
            assert not seen["1300974"] & seen["80008836"]
            by_identifier = _search(
                client, "Observation", **{"subject:identifier": f"{BAPTIST}|1300974"}
            )
            assert {o["id"] for o in by_identifier} == seen["1300974"]
            assert (
                _search(client, "Observation", **{"patient:identifier": "urn:oid:9|1300974"}) == []
            )
            assert _search(client, "Observation", patient="Patient/999999") == []
            both = _search(
                client, "Observation", patient=f"Patient/{ids['1300974']},{ids['80008836']}"
            )
            assert {o["id"] for o in both} == seen["1300974"] | seen["80008836"]
            assert len(_search(client, "Observation", category="laboratory")) == sum(
                map(len, seen.values())
            )
            assert _search(client, "Observation", category="vital-signs") == []

            (report,) = _search(client, "DiagnosticReport", patient=f"Patient/{ids['1300974']}")
            DiagnosticReport.model_validate(report)
            # OBR-4 of the real message, not the generic 11502-2.
            assert report["code"]["coding"] == [
                {
                    "system": "http://loinc.org",
                    "code": "57128-1",
                    "display": "Newborn Screening Report summary panel",
                }
            ]
            assert report["subject"]["reference"] == f"Patient/{ids['1300974']}"
            assert "basedOn" not in report  # no order was placed
            assert all("basedOn" not in o for o in _search(client, "Observation"))


def test_based_on_names_the_same_patients_order(settings: Settings) -> None:
    with open_rig(lab_settings(settings)) as rig:
        (raw,) = split_batch((LAB_DATA / ORDER).read_bytes())
        (placed,) = placed_orders(parse_message(raw))
        order = OrderService(SqlOrderStore(rig.index), rig.settings.orders).submit(placed)
        rig.drop(RESULT)
        # Same order number, another patient: no link (and no other patient's result yet).
        other = _other_patient((LAB_DATA / RESULT).read_bytes()).replace(
            b"20231561137", b"20231561138"
        )
        _drop_bytes(rig, "same_order_other_patient.hl7", other)
        assert [o.status for o in rig.run()] == ["ingested", "ingested"]
        with TestClient(create_app(rig.settings)) as client:
            ref = f"ServiceRequest/{order.id}"
            linked = _search(client, "Observation", **{"based-on": ref})
            assert len(linked) == 1
            assert linked[0]["basedOn"] == [{"reference": ref, "type": "ServiceRequest"}]
            Observation.model_validate(linked[0])
            assert client.get(f"/fhir/{ref}").status_code == 200  # the reference resolves
            reports = _search(client, "DiagnosticReport", **{"based-on": ref})
            assert len(reports) == 1 and reports[0]["basedOn"] == linked[0]["basedOn"]
            DiagnosticReport.model_validate(reports[0])
            unlinked = [o for o in _search(client, "Observation") if o["id"] != linked[0]["id"]]
            assert len(unlinked) == 1 and "basedOn" not in unlinked[0]


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("Observation", {"patient": "Device/1"}, 400),
        ("Observation", {"subject": "Patient/1/_history/1"}, 400),
        ("Observation", {"patient": "Patient/abc"}, 200),
        ("Observation", {"patient": "Patient/" + "9" * 40}, 200),
        # Different parameters AND (FHIR R4 3.1.1.4): two patients at once match nothing.
        ("Observation", {"patient": "Patient/1", "subject": "Patient/2"}, 200),
        ("Observation", {"patient:identifier": "|"}, 400),
        ("Observation", {"patient:identifier": "a|b", "subject:identifier": "c|d"}, 200),
        ("Observation", {"category": ""}, 400),
        ("Observation", {"based-on": "ServiceRequest/" + "x" * 5000}, 400),  # over the bound
        ("Observation", {"_tag": "needs-review,qc"}, 200),
        ("DiagnosticReport", {"_tag": "needs-review"}, 400),
        ("DiagnosticReport", {"category": "LAB", "based-on": "ServiceRequest/1"}, 200),
    ],
)
def test_hostile_patient_and_review_parameters_are_4xx_never_500(
    settings: Settings, path: str, params: dict[str, str], status: int
) -> None:
    with open_rig(lab_settings(settings)) as rig, TestClient(create_app(rig.settings)) as client:
        r = client.get(f"/fhir/{path}", params=params)
        assert r.status_code == status, r.text
        if status == 200:
            assert r.json()["total"] == 0
        else:
            assert r.json()["resourceType"] == "OperationOutcome"


def test_hostile_resolve_requests(settings: Settings) -> None:
    with open_rig(lab_settings(settings)) as rig, TestClient(create_app(rig.settings)) as client:
        for body, expected in (
            (b"not json", 400),
            (b'{"choice": "accept", "extra": "' + b"x" * 100_000 + b'"}', 404),
            (b'{"choice": ["accept"]}', 400),
        ):
            r = client.post(
                "/lab/conflicts/abc/resolve",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code == expected, r.text
        long_id = "a" * 10_000
        r = client.post(f"/lab/conflicts/{long_id}/resolve", json={"choice": "discard"})
        assert r.status_code == 404
        assert client.get("/lab/conflicts", params={"limit": 0}).status_code == 400
        assert client.get("/lab/conflicts", params={"offset": -1}).status_code == 400


def test_the_review_routes_need_the_admin_scope() -> None:
    from core.auth import required_scopes

    assert tuple(required_scopes("GET", "/lab/conflicts")) == ("admin",)
    assert tuple(required_scopes("POST", "/lab/conflicts/x/resolve")) == ("admin",)


def test_astm_patients_take_the_profiles_issuer_and_keep_their_first_name(
    settings: Settings,
) -> None:
    """Bio-Rad IH-Com capture: two P records, one Patient ID, two spellings of the name."""
    from lab_support import PROFILES

    profiles = {**PROFILES, "biorad": {"format": "astm", "patient_issuer": "BIORAD-LIS"}}
    with open_rig(lab_settings(settings, profiles=profiles)) as rig:
        rig.drop("astm/biorad_ihcom_bloodtype_two_patients.astm", profile="biorad")
        assert [o.status for o in rig.run()] == ["ingested"]
        assert rig.store.conflicts()[1] == 0  # the same patient twice is no conflict
        with TestClient(create_app(rig.settings)) as client:
            system = "urn:pacslab:issuer:BIORAD-LIS"
            (patient,) = _search(client, "Patient", identifier=f"{system}|1010868845")
            assert patient["name"][0]["family"] == "Testus"  # the first P record's
            assert _search(client, "Patient", identifier="1010868845") == [patient]
            found = _search(client, "Observation", patient=f"Patient/{patient['id']}")
            _results, total = rig.store.search_results(LabResultQuery())
            assert len(found) == total and total > 1
            assert {o["subject"]["identifier"]["system"] for o in found} == {system}
            (report,) = _search(client, "DiagnosticReport", patient=f"Patient/{patient['id']}")
            DiagnosticReport.model_validate(report)
            # O.5 ``^^^MO10^^28343^`` names the one ordered test (the manufacturer's code).
            assert report["code"]["coding"] == [
                {"system": "urn:pacslab:lab-code:local", "code": "MO10"}
            ]


@pytest.mark.parametrize(
    ("name", "issuers", "panels"),
    [
        (RESULT, {"Baptist East"}, {("57128-1", "LN")}),
        (OTHER, {"NPI"}, {("54089-8", "local")}),  # PID-3.4 "&NPI": universal ID only
        # CX ``12345^5^M10^Memphis_Hosp^PI``: PID-3.4's namespace; ``14^^^^HC-HCE``: none.
        ("hl7/hapi_oml_o21_oul_r22_multi_v251.hl7", {"Memphis_Hosp", ""}, None),
        ("hl7/python_hl7_oru_r01_v24_sn_value.hl7", {""}, {("1554-5", "local")}),
    ],
)
def test_parsers_keep_the_assigning_authority_and_the_ordered_panel(
    name: str, issuers: set[str], panels: set[tuple[str, str]] | None
) -> None:
    from ingest.labs.parsers import hl7v2

    parsed = hl7v2.parse((LAB_DATA / name).read_bytes(), skip_non_results=True)
    assert {p.issuer for m in parsed.messages for p in m.patients} == issuers
    found = {(o.panel.code, o.panel.system) for m in parsed.messages for o in m.orders if o.panel}
    if panels is not None:
        assert found == panels
