"""Patient identity from the record system (IHE PIR, issue 17), end to end with real peers.

One archive in a data dir: images stored over C-STORE (pynetdicom SCU) into the
in-process receiver, an order placed as a FHIR ServiceRequest, and a real lab capture
(CDC ORU^R01 for patient 1300974 of "Baptist East") dropped in the lab inbox. The
obsolete patient 1300974 has a CT study, the order and the lab results; the surviving
patient SURV-77 has an MR study. After ``POST /fhir/Patient/$merge`` (httpx against
uvicorn), DCMTK ``findscu`` (Q/R and ``-W`` worklist), QIDO-RS, FHIR and lab
searches all answer with the surviving patient; WADO-RS ``/metadata``, a WADO-RS
instance and a DCMTK ``getscu`` C-GET carry the surviving patient's name while the
stored original's SHA-256 is unchanged; the audit log has the change with keyed
before/after references and no identifier; undo restores every answer.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fhir.resources.R4B.parameters import Parameters
from fhir.resources.R4B.patient import Patient
from pydicom import dcmread
from pydicom.dataset import Dataset

from api.dicomweb._multipart import content_type_params
from core.settings import Settings
from storage.audit import AuditStore
from tests.api._support import dataset_bytes, running_app
from tests.ingest.dicom.qr_data import CT, MR, Study, build, store
from tests.support import Receiver, run_dcmtk, serving

pytestmark = pytest.mark.network

OLD_ID, SURV_ID, ISSUER = "1300974", "SURV-77", "Baptist East"
SYSTEM = "urn:pacslab:issuer:" + quote(ISSUER, safe="")
OLD_NAME, SURV_NAME = "ONE^TESTCASE", "TRẦN^THỊ LAN"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The receiver's settings with the lab inbox ready and no quiet period."""
    from tests.ingest.labs.lab_support import lab_settings

    return lab_settings(settings)


def _study(
    patient_id: str, name: str, modality: str, sop: str, accession: str
) -> tuple[Study, list[Dataset]]:
    study = Study(patient_id, name, "20261120", accession, [(modality, sop, 2)])
    datasets = build(study)
    for ds in datasets:
        ds.IssuerOfPatientID = ISSUER
    return study, datasets


@pytest.fixture
def world(receiver: Receiver, settings: Settings, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The archive of both patients, the API on uvicorn, and the lab rig."""
    from tests.ingest.labs.lab_support import open_rig

    old, old_datasets = _study(OLD_ID, OLD_NAME, "CT", CT, "PIR1")
    surv, surv_datasets = _study(SURV_ID, SURV_NAME, "MR", MR, "PIR2")
    store(receiver.port, old_datasets + surv_datasets)
    with open_rig(settings) as rig:
        rig.drop("hl7/cdc_oru_r01_v251_result_linked.hl7")
        outcomes = rig.run()
        assert outcomes and all(o.status == "ingested" for o in outcomes), outcomes
        with (
            running_app(settings) as app,
            serving(app) as base,
            httpx.Client(base_url=base, timeout=60) as http,
        ):
            order = _service_request("PIR-ORDER-1")
            r = http.post("/fhir/ServiceRequest", json=order)
            assert r.status_code == 201, r.text
            yield {
                "http": http,
                "old": old,
                "surv": surv,
                "app": app,
                "port": receiver.port,
                "tmp": tmp_path,
                "rig": rig,
            }


def _service_request(placer: str) -> dict[str, Any]:
    from tests.worklist.order_requests import service_request

    body = service_request(placer, "ONE", patient_id=OLD_ID)
    body["contained"][0]["identifier"] = [{"system": SYSTEM, "value": OLD_ID}]
    body["contained"][0]["name"] = [{"family": "ONE", "given": ["TESTCASE"]}]
    return body


def _findscu(port: int, out: Path, *keys: str, worklist: bool = False) -> list[Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    model = ["-W"] if worklist else ["-S"]
    args = ["findscu", "-v", *model, "-X", "-od", str(out), "-aec", "PACSLAB", "-aet", "CT1"]
    for key in keys:
        args += ["-k", key]
    result = run_dcmtk([*args, "127.0.0.1", str(port)], nodelay=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _study_find(w: dict[str, Any], tag: str, patient_id: str) -> list[Dataset]:
    return _findscu(
        w["port"],
        w["tmp"] / tag,
        "QueryRetrieveLevel=STUDY",
        f"PatientID={patient_id}",
        "StudyInstanceUID",
        "PatientName",
        "IssuerOfPatientID",
    )


def _worklist(w: dict[str, Any], tag: str, patient_id: str) -> list[Dataset]:
    return _findscu(
        w["port"],
        w["tmp"] / tag,
        f"PatientID={patient_id}",
        "PatientName",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT1",
        "ScheduledProcedureStepSequence[0].Modality",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
        worklist=True,
    )


def _qido(http: httpx.Client, **params: str) -> list[dict[str, Any]]:
    r = http.get("/dicomweb/studies", params=params, headers={"Accept": "application/dicom+json"})
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 else []


def _patient_pk(http: httpx.Client, patient_id: str) -> str:
    bundle = http.get("/fhir/Patient", params={"identifier": f"{SYSTEM}|{patient_id}"}).json()
    assert bundle["total"] == 1, bundle
    return str(bundle["entry"][0]["resource"]["id"])


def _search(http: httpx.Client, resource: str, patient_pk: str) -> list[dict[str, Any]]:
    r = http.get(f"/fhir/{resource}", params={"patient": f"Patient/{patient_pk}"})
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])]


def _pn(value: Any) -> str:
    return str(value).rstrip("^")


def _multipart_parts(r: httpx.Response) -> list[bytes]:
    boundary = content_type_params(r.headers["content-type"])[1]["boundary"]
    chunks = r.content.split(b"--" + boundary.encode())
    parts = []
    for chunk in chunks[1:-1]:
        _head, _sep, body = chunk.partition(b"\r\n\r\n")
        parts.append(body.removesuffix(b"\r\n"))
    return parts


def test_merge_then_every_answer_is_the_surviving_patient_and_undo_restores(
    world: dict[str, Any],
) -> None:
    http: httpx.Client = world["http"]
    old: Study = world["old"]
    surv: Study = world["surv"]
    old_pk, surv_pk = _patient_pk(http, OLD_ID), _patient_pk(http, SURV_ID)
    # Before: each patient answers for its own things.
    assert {r.StudyInstanceUID for r in _study_find(world, "f0", OLD_ID)} == {old.study_uid}
    assert [str(r.PatientID) for r in _worklist(world, "w0", OLD_ID)] == [OLD_ID]
    assert _search(http, "Observation", old_pk)
    assert not _search(http, "Observation", surv_pk)
    index = world["app"].state.index
    row = index.instance_metadata(old.study_uid)[0]
    original_sha = hashlib.sha256(
        world["app"].state.archive.originals.path(row.blob_key).read_bytes()
    ).hexdigest()

    # -- merge through FHIR $merge (R5 Parameters) --------------------------------
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "source-patient", "valueReference": {"reference": f"Patient/{old_pk}"}},
            {
                "name": "target-patient-identifier",
                "valueIdentifier": {"system": SYSTEM, "value": SURV_ID},
            },
        ],
    }
    r = http.post("/fhir/Patient/$merge", json=body)
    assert r.status_code == 200, r.text
    params = Parameters.model_validate(r.json())
    by_name = {p.name: p for p in params.parameter}
    assert by_name["result"].resource.id == surv_pk
    change_id = by_name["outcome"].resource.issue[0].diagnostics.split()[2]

    # DCMTK findscu (Q/R): both studies under the survivor, nothing under the old ID.
    found = _study_find(world, "f1", SURV_ID)
    assert {r.StudyInstanceUID for r in found} == {old.study_uid, surv.study_uid}
    assert {_pn(r.PatientName) for r in found} == {SURV_NAME}
    assert _study_find(world, "f2", OLD_ID) == []
    # DCMTK findscu -W (worklist): the order's item is the survivor's.
    items = _worklist(world, "w1", SURV_ID)
    assert [(str(i.PatientID), _pn(i.PatientName)) for i in items] == [(SURV_ID, SURV_NAME)]
    assert _worklist(world, "w2", OLD_ID) == []
    # QIDO-RS
    qido = _qido(http, PatientID=SURV_ID)
    assert {s["0020000D"]["Value"][0] for s in qido} == {old.study_uid, surv.study_uid}
    assert _qido(http, PatientID=OLD_ID) == []
    # FHIR: the obsolete Patient is inactive and replaced-by the survivor.
    obsolete = Patient.model_validate(http.get(f"/fhir/Patient/{old_pk}").json())
    assert obsolete.active is False
    assert [(lk.type, lk.other.reference) for lk in obsolete.link] == [
        ("replaced-by", f"Patient/{surv_pk}")
    ]
    studies = _search(http, "ImagingStudy", surv_pk)
    assert {s["id"] for s in studies} == {old.study_uid, surv.study_uid}
    # Lab results followed: the survivor's, with the survivor's identifier.
    observations = _search(http, "Observation", surv_pk)
    assert observations and not _search(http, "Observation", old_pk)
    assert {o["subject"]["identifier"]["value"] for o in observations} == {SURV_ID}
    assert _search(http, "DiagnosticReport", surv_pk)

    # WADO-RS /metadata and a retrieved instance carry the survivor; the original not.
    meta = http.get(
        f"/dicomweb/studies/{old.study_uid}/metadata", headers={"Accept": "application/dicom+json"}
    ).json()
    for item in meta:
        assert item["00100010"]["Value"][0]["Alphabetic"] == SURV_NAME
        assert item["00100020"]["Value"] == [SURV_ID]
        previous = item["04000561"]["Value"][0]["04000550"]["Value"][0]
        assert previous["00100020"]["Value"] == [OLD_ID]
    sop = old.sop_uids[0][0]
    r = http.get(
        f"/dicomweb/studies/{old.study_uid}/series/{old.series_uids[0]}/instances/{sop}",
        headers={"Accept": "multipart/related; type=application/dicom"},
    )
    assert r.status_code == 200, r.text
    [part] = _multipart_parts(r)
    sent = dcmread(io.BytesIO(part))
    assert (_pn(sent.PatientName), sent.PatientID) == (SURV_NAME, SURV_ID)
    assert sent.OriginalAttributesSequence[0].ReasonForTheAttributeModification == "COERCE"
    original = world["app"].state.archive.originals.path(row.blob_key).read_bytes()
    assert hashlib.sha256(original).hexdigest() == original_sha
    assert hashlib.sha256(dataset_bytes(original)).hexdigest() == row.blob_key
    assert dcmread(io.BytesIO(original)).PatientID == OLD_ID
    # DCMTK getscu (C-GET): what is sent is coerced too.
    out = world["tmp"] / "get"
    out.mkdir()
    result = run_dcmtk(
        [
            "getscu",
            "-v",
            "-S",
            "-aec",
            "PACSLAB",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={old.study_uid}",
            "127.0.0.1",
            str(world["port"]),
        ],
        nodelay=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    got = [dcmread(p) for p in out.iterdir()]
    assert len(got) == 2
    assert {(_pn(d.PatientName), d.PatientID) for d in got} == {(SURV_NAME, SURV_ID)}
    assert all(
        d.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].PatientID == OLD_ID
        for d in got
    )

    # Review: the change is listed, shown with its rows, and audited without PHI.
    listed = http.get("/admin/patients/changes").json()
    assert listed[0]["change_id"] == change_id and listed[0]["kind"] == "merge"
    shown = http.get(f"/admin/patients/changes/{change_id}").json()
    assert len(shown["rows"]["rows"]["studies"]) == 1
    assert shown["summary"]["orders"] == 1 and shown["summary"]["lab_results"] >= 1
    world["app"].state.audit.flush()
    entries = [e for e in AuditStore(index.engine).entries() if e.event_type == "patient.merge"]
    assert len(entries) == 1
    detail = json.loads(entries[0].detail)
    assert detail["change"] == change_id
    assert detail["before"]["obsolete"] and detail["before"]["surviving"]
    assert detail["before"]["obsolete"] != detail["after"]["patient"]
    text = json.dumps(entries[0].as_dict(), ensure_ascii=False)
    for phi in (OLD_ID, SURV_ID, "TESTCASE", "TRẦN", ISSUER):
        assert phi not in text

    # -- undo --------------------------------------------------------------------------
    r = http.post(f"/admin/patients/changes/{change_id}/undo")
    assert r.status_code == 200, r.text
    assert {r.StudyInstanceUID for r in _study_find(world, "f3", OLD_ID)} == {old.study_uid}
    assert {_pn(r.PatientName) for r in _study_find(world, "f4", OLD_ID)} == {OLD_NAME}
    assert [str(i.PatientID) for i in _worklist(world, "w3", OLD_ID)] == [OLD_ID]
    assert _worklist(world, "w4", SURV_ID) == []
    assert _search(http, "Observation", old_pk) and not _search(http, "Observation", surv_pk)
    restored = http.get(f"/fhir/Patient/{old_pk}").json()
    assert "link" not in restored and restored.get("active") is not False
    meta = http.get(
        f"/dicomweb/studies/{old.study_uid}/metadata", headers={"Accept": "application/dicom+json"}
    ).json()
    assert all("04000561" not in m and m["00100020"]["Value"] == [OLD_ID] for m in meta)
    # Undone once; a second undo is refused with an OperationOutcome-free 409.
    again = http.post(f"/admin/patients/changes/{change_id}/undo")
    assert again.status_code == 409


def test_identifier_change_and_demographics_update_through_fhir_put(
    world: dict[str, Any],
) -> None:
    http: httpx.Client = world["http"]
    old: Study = world["old"]
    pk = _patient_pk(http, OLD_ID)
    body = {
        "resourceType": "Patient",
        "id": pk,
        "identifier": [{"system": SYSTEM, "value": "NEW-ID-9"}],
        "name": [{"use": "official", "family": "PHẠM", "given": ["VĂN", "ĐỨC"]}],
        "gender": "male",
        "birthDate": "1971-02-03",
    }
    r = http.put(f"/fhir/Patient/{pk}", json=body)
    assert r.status_code == 200, r.text
    updated = Patient.model_validate(r.json())
    assert updated.identifier[0].value == "NEW-ID-9" and updated.name[0].family == "PHẠM"
    assert str(updated.birthDate) == "1971-02-03"
    # As an A47 then an A08: two changes, each audited.
    kinds = [c["kind"] for c in http.get("/admin/patients/changes").json()]
    assert kinds == ["update", "change-identifier"]

    # C-FIND by the new identifier finds the study with the new name; the old ID nothing.
    found = _study_find(world, "a1", "NEW-ID-9")
    assert [(r.StudyInstanceUID, _pn(r.PatientName)) for r in found] == [
        (old.study_uid, "PHẠM^VĂN ĐỨC")
    ]
    assert _study_find(world, "a2", OLD_ID) == []
    # Name search (QIDO-RS, case- and accent-insensitive; FHIR name=) finds the new
    # name, not the old one.
    assert [s["0020000D"]["Value"][0] for s in _qido(http, PatientName="pham*")] == [old.study_uid]
    assert _qido(http, PatientName="ONE*") == []
    assert [
        s["0020000D"]["Value"][0] for s in _qido(http, PatientName="duc", fuzzymatching="true")
    ] == [old.study_uid]
    by_name = http.get("/fhir/Patient", params={"name": "đức"}).json()
    assert [e["resource"]["id"] for e in by_name.get("entry", [])] == [pk]
    assert http.get("/fhir/Patient", params={"name": "testcase"}).json()["total"] == 0
    # The worklist item and the lab results follow.
    items = _worklist(world, "a3", "NEW-ID-9")
    assert [(_pn(i.PatientName), str(i.PatientBirthDate)) for i in items] == [
        ("PHẠM^VĂN ĐỨC", "19710203")
    ]
    observations = _search(http, "Observation", pk)
    assert observations
    assert {o["subject"]["identifier"]["value"] for o in observations} == {"NEW-ID-9"}
    # Audit: before/after as keyed references (they differ for the identifier change).
    world["app"].state.audit.flush()
    index = world["app"].state.index
    entries = {
        e.event_type: json.loads(e.detail)
        for e in AuditStore(index.engine).entries()
        if e.event_type.startswith("patient.")
    }
    change = entries["patient.change-identifier"]
    assert change["before"]["patient"] != change["after"]["patient"]
    assert entries["patient.update"]["fields"] == ["birth_date", "name", "sex"]

    # A modality still sending the old name does not undo the record system's update.
    late, late_datasets = _study("NEW-ID-9", OLD_NAME, "CT", CT, "PIR4")
    store(world["port"], late_datasets)
    found = _study_find(world, "a6", "NEW-ID-9")
    assert {(r.StudyInstanceUID, _pn(r.PatientName)) for r in found} == {
        (old.study_uid, "PHẠM^VĂN ĐỨC"),
        (late.study_uid, "PHẠM^VĂN ĐỨC"),
    }
    assert _qido(http, PatientName="ONE*") == []

    # Undo both (newest first): the former identity and demographics are back.
    for c in http.get("/admin/patients/changes").json():
        r = http.post(f"/admin/patients/changes/{c['change_id']}/undo")
        assert r.status_code == 200, r.text
    found = _study_find(world, "a4", OLD_ID)
    assert {(r.StudyInstanceUID, _pn(r.PatientName)) for r in found} == {
        (old.study_uid, OLD_NAME),
        (late.study_uid, OLD_NAME),
    }
    assert _qido(http, PatientName="pham*") == []
    assert [str(i.PatientID) for i in _worklist(world, "a5", OLD_ID)] == [OLD_ID]


def test_bad_requests_are_4xx_operation_outcomes(world: dict[str, Any]) -> None:
    http: httpx.Client = world["http"]
    old_pk, surv_pk = _patient_pk(http, OLD_ID), _patient_pk(http, SURV_ID)

    def merge(*parameters: dict[str, Any]) -> httpx.Response:
        return http.post(
            "/fhir/Patient/$merge",
            json={"resourceType": "Parameters", "parameter": list(parameters)},
        )

    def ref(role: str, pk: str) -> dict[str, Any]:
        return {"name": f"{role}-patient", "valueReference": {"reference": f"Patient/{pk}"}}

    cases = [
        (http.post("/fhir/Patient/$merge", content=b"{not json"), 400),
        (http.post("/fhir/Patient/$merge", json={"resourceType": "Patient"}), 400),
        (merge(ref("target", surv_pk)), 400),  # no source
        (merge(ref("source", old_pk), ref("target", old_pk)), 400),  # into itself
        (merge(ref("source", "999999"), ref("target", surv_pk)), 404),
        (merge(ref("source", old_pk), ref("target", surv_pk), ref("target", old_pk)), 400),
        (merge(ref("source", old_pk), {"name": "target-patient", "valueReference": "x"}), 400),
        (http.put("/fhir/Patient/abc", json={"resourceType": "Patient", "id": "abc"}), 404),
        (
            http.put(f"/fhir/Patient/{old_pk}", json={"resourceType": "Patient", "id": "999999"}),
            400,
        ),
        (
            http.put(
                f"/fhir/Patient/{old_pk}",
                json={"resourceType": "Patient", "id": old_pk, "birthDate": "1971"},
            ),
            400,
        ),
        (
            http.put(
                f"/fhir/Patient/{old_pk}",
                json={"resourceType": "Patient", "id": old_pk, "gender": "x"},
            ),
            400,
        ),
        (
            http.put(
                f"/fhir/Patient/{old_pk}",
                json={"resourceType": "Patient", "id": old_pk, "name": [{"family": "A^B"}]},
            ),
            400,
        ),
        (http.put(f"/fhir/Patient/{old_pk}", json={"resourceType": "Observation"}), 400),
        # A47 onto an identifier in use is a merge, not a change: a duplicate key.
        (
            http.put(
                f"/fhir/Patient/{old_pk}",
                json={
                    "resourceType": "Patient",
                    "id": old_pk,
                    "identifier": [{"system": SYSTEM, "value": SURV_ID}],
                },
            ),
            409,
        ),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    assert http.post("/admin/patients/changes/" + "0" * 32 + "/undo").status_code == 404
    assert http.post("/admin/patients/changes/..%2Fx/undo").status_code == 404
    assert http.get("/admin/patients/changes", params={"limit": 0}).status_code == 400
    # Nothing was changed by any of them.
    assert http.get("/admin/patients/changes").json() == []
    # A merge of an already merged patient, or into one, is refused.
    assert merge(ref("source", old_pk), ref("target", surv_pk)).status_code == 200
    assert merge(ref("source", old_pk), ref("target", surv_pk)).status_code == 400
    assert merge(ref("source", surv_pk), ref("target", old_pk)).status_code == 400
    # Images sent later under the obsolete identifier belong to the survivor.
    late, late_datasets = _study(OLD_ID, OLD_NAME, "CT", CT, "PIR3")
    store(world["port"], late_datasets)
    found = {r.StudyInstanceUID for r in _study_find(world, "late", SURV_ID)}
    assert found == {world["old"].study_uid, world["surv"].study_uid, late.study_uid}
    assert _study_find(world, "late-old", OLD_ID) == []
    # So are lab results sent later under it (the same capture, re-sent as a correction).
    rig = world["rig"]
    from tests.ingest.labs.lab_support import LAB_DATA

    capture = (LAB_DATA / "hl7/cdc_oru_r01_v251_result_linked.hl7").read_bytes()
    (rig.inbox() / "resent.hl7").write_bytes(capture + b"\r")
    assert [o.status for o in rig.run()] == ["ingested"]
    observations = _search(http, "Observation", surv_pk)
    assert observations and not _search(http, "Observation", old_pk)
    assert {o["subject"]["identifier"]["value"] for o in observations} == {SURV_ID}


JS = Path(__file__).resolve().parents[1] / "js"
MERGE_SCRIPT = r"""
import { Client } from 'fhir-kit-client';
import fhirPkg from 'fhir';
const { Fhir } = fhirPkg;
const [base, system, source, target] = process.argv.slice(1);
const client = new Client({ baseUrl: base });
const fhir = new Fhir();
const problems = [];
const check = (r) => {
  for (const m of fhir.validate(r).messages) {
    if (m.severity === 'error') problems.push(`${r.resourceType}: ${m.location} ${m.message}`);
  }
  return r;
};
const find = async (value) => {
  const searchParams = { identifier: `${system}|${value}` };
  return (await client.search({ resourceType: 'Patient', searchParams })).entry[0].resource;
};
const obsolete = await find(source);
const input = {
  resourceType: 'Parameters',
  parameter: [
    { name: 'source-patient', valueReference: { reference: `Patient/${obsolete.id}` } },
    { name: 'target-patient-identifier', valueIdentifier: { system, value: target } },
  ],
};
const out = check(await client.operation({ name: '$merge', resourceType: 'Patient', input }));
const replaced = check(await client.read({ resourceType: 'Patient', id: obsolete.id }));
const survivor = check(await client.resolve({ reference: replaced.link[0].other.reference }));
const searchParams = { patient: `Patient/${survivor.id}` };
const studies = await client.search({ resourceType: 'ImagingStudy', searchParams });
console.log(JSON.stringify({ out, replaced, survivor, studies: studies.total, problems }));
"""


@pytest.mark.skipif(
    shutil.which("node") is None
    or not (JS / "node_modules" / "fhir-kit-client").is_dir()
    or not (JS / "node_modules" / "fhir").is_dir(),
    reason="node, fhir-kit-client or fhir not installed (./run test installs them)",
)
def test_fhir_kit_client_merges_and_follows_the_link(world: dict[str, Any]) -> None:
    """npm fhir-kit-client (nobody on the team wrote it) calls $merge, reads the
    obsolete Patient and resolves its replaced-by link; npm ``fhir`` validates each."""
    base = str(world["http"].base_url).rstrip("/") + "/fhir"
    done = subprocess.run(
        [
            shutil.which("node") or "node",
            "--input-type=module",
            "-e",
            MERGE_SCRIPT,
            base,
            SYSTEM,
            OLD_ID,
            SURV_ID,
        ],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["problems"] == []
    assert [p["name"] for p in got["out"]["parameter"]] == ["input", "outcome", "result"]
    assert got["replaced"]["active"] is False
    assert got["replaced"]["link"][0]["type"] == "replaced-by"
    assert got["survivor"]["identifier"][0]["value"] == SURV_ID
    assert got["survivor"]["link"] == [
        {"other": {"reference": f"Patient/{got['replaced']['id']}"}, "type": "replaces"}
    ]
    assert got["studies"] == 2


def test_fhir_put_patient_is_version_aware(world: dict[str, Any]) -> None:
    """FHIR R4 http.html#concurrency: read gives ``ETag: W/"n"`` and meta.versionId; a PUT
    with ``If-Match`` naming another version is 412 and changes nothing; with the current
    one it is applied and the answer names the next version."""
    http: httpx.Client = world["http"]
    pk = _patient_pk(http, OLD_ID)
    read = http.get(f"/fhir/Patient/{pk}")
    assert read.headers["etag"] == 'W/"1"' and read.json()["meta"]["versionId"] == "1"
    body = {"resourceType": "Patient", "id": pk, "name": [{"family": "HAI", "given": ["MOT"]}]}
    for stale in ('W/"2"', 'W/"0"', '"x"'):
        r = http.put(f"/fhir/Patient/{pk}", json=body, headers={"If-Match": stale})
        assert r.status_code == 412, (stale, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"
    assert http.get("/admin/patients/changes").json() == []
    r = http.put(f"/fhir/Patient/{pk}", json=body, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == 'W/"2"' and r.json()["meta"]["versionId"] == "2"
    # The same If-Match again (a lost update): refused, the name stays.
    body2 = {**body, "name": [{"family": "BA"}]}
    r = http.put(f"/fhir/Patient/{pk}", json=body2, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412
    assert http.get(f"/fhir/Patient/{pk}").json()["name"][0]["family"] == "HAI"
    # An identifier change and an update in one PUT: two versions.
    body3 = {**body2, "identifier": [{"system": SYSTEM, "value": "NEW-ID-7"}]}
    r = http.put(f"/fhir/Patient/{pk}", json=body3, headers={"If-Match": 'W/"2"'})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == 'W/"4"'
    # Without If-Match an update is applied as before (no precondition).
    assert http.put(f"/fhir/Patient/{pk}", json=body3).headers["etag"] == 'W/"5"'
    searched = http.get("/fhir/Patient", params={"_id": pk}).json()["entry"][0]["resource"]
    assert searched["meta"]["versionId"] == "5"
    # ... and says so in its CapabilityStatement.
    rest = http.get("/fhir/metadata").json()["rest"][0]
    (spec,) = [r for r in rest["resource"] if r["type"] == "Patient"]
    assert spec["versioning"] == "versioned-update"


def test_after_a_merge_orders_and_exports_carry_the_survivor(world: dict[str, Any]) -> None:
    """A FHIR ServiceRequest placed later under the merged-away identifier schedules the
    survivor (findscu -W); an export of the merged study carries the survivor's Patient
    module (as WADO-RS and C-GET do) with the Original Attributes Sequence, the DICOMDIR
    too, DCMTK ``dcmftest`` accepts each file; a de-identified export is unaffected."""
    import zipfile

    http: httpx.Client = world["http"]
    old: Study = world["old"]
    old_pk, surv_pk = _patient_pk(http, OLD_ID), _patient_pk(http, SURV_ID)
    r = http.post(
        "/fhir/Patient/$merge",
        json={
            "resourceType": "Parameters",
            "parameter": [
                {"name": "source-patient", "valueReference": {"reference": f"Patient/{old_pk}"}},
                {"name": "target-patient", "valueReference": {"reference": f"Patient/{surv_pk}"}},
            ],
        },
    )
    assert r.status_code == 200, r.text
    r = http.post("/fhir/ServiceRequest", json=_service_request("PIR-ORDER-LATE"))
    assert r.status_code == 201, r.text
    contained = r.json()["contained"][0]
    assert contained["identifier"][0]["value"] == SURV_ID
    items = _worklist(world, "late-w", SURV_ID)
    assert len(items) == 2 and {_pn(i.PatientName) for i in items} == {SURV_NAME}
    assert _worklist(world, "late-w-old", OLD_ID) == []
    world["app"].state.audit.flush()
    index = world["app"].state.index
    moved = [e for e in AuditStore(index.engine).entries()
             if e.event_type == "order.patient-merged"]  # fmt: skip
    assert len(moved) == 1 and OLD_ID not in moved[0].detail

    # Export of the merged study: the survivor's demographics, the original untouched.
    r = http.get(f"/export/studies/{old.study_uid}")
    assert r.status_code == 200, r.text
    out = world["tmp"] / "export"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        zf.extractall(out)
    files = sorted(p for p in (out / "DICOM").rglob("*") if p.is_file())
    assert len(files) == 2
    for path in files:
        ds = dcmread(path)
        assert (_pn(ds.PatientName), ds.PatientID) == (SURV_NAME, SURV_ID)
        item = ds.OriginalAttributesSequence[-1]
        assert item.ReasonForTheAttributeModification == "COERCE"
        assert item.ModifiedAttributesSequence[0].PatientID == OLD_ID
        if shutil.which("dcmftest"):
            assert "yes" in run_dcmtk(["dcmftest", str(path)]).stdout
    dicomdir = dcmread(out / "DICOMDIR")
    patients = [r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT"]
    assert [(str(p.PatientID), _pn(p.PatientName)) for p in patients] == [(SURV_ID, SURV_NAME)]
    world["app"].state.audit.flush()
    (entry,) = [e for e in AuditStore(index.engine).entries() if e.event_type == "export"]
    assert json.loads(entry.detail)["coerced"] == 2
    # De-identified: neither identifier (the profile replaces the Patient module).
    r = http.get(f"/export/studies/{old.study_uid}", params={"deidentify": "true"})
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        for name in zf.namelist():
            if name.startswith("DICOM/"):
                ds = dcmread(io.BytesIO(zf.read(name)))
                assert str(ds.PatientID) not in (OLD_ID, SURV_ID)
                assert "OriginalAttributesSequence" not in ds
