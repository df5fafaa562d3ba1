"""One data set for the FHIR search tests: two patients with studies, orders and lab
results, loaded through the real intake paths (Archive.accept for images, FHIR POST/PUT
for orders, the lab inbox watcher for HL7 v2 ORU^R01 files).

:func:`load` returns every resource's id by a short name, so tests assert exactly
which resources a search matches:

* Patients ``p1`` (PatientID P1, NGUYEN^VAN AN, male, 1970-01-01) and ``p2`` (P2,
  Trần^Thị Bình, female, 1970-01-01);
* ImagingStudy ``a`` (P1, CT, 2024-01-05, ACC-A), ``b`` (P2, MR, 2024-02-20, ACC-B),
  ``c`` (P1, CT, 2023-12-31, ACC-C);
* ServiceRequest ``o1`` (P1, LOINC 24627-2, active, placer HIS-1), ``o2`` (P2, LOINC
  24590-2, active, HIS-2), ``o3`` (P1, LOINC 24590-2, revoked, HIS-3);
* Observation ``g1`` (P1 glucose 5.4, specimen S1, order ORD-1), ``k1`` (P1
  potassium 4.1, S1, ORD-1: no such order), ``g2`` (P2 glucose 6.6, S2, order HIS-2,
  i.e. linked to ``o2``, 2024-03-02); DiagnosticReport ``r1`` (S1) and ``r2`` (S2,
  based on ``o2``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom import dcmread

from core.settings import Settings
from tests.api._support import make_study, running_app, store_files

_ORU = (
    "MSH|^~\\&|LIS|LAB|PACSLAB|HOSP|{day}080000||ORU^R01^ORU_R01|{msg}|P|2.5.1\r"
    "PID|1||{pid}^^^^MR||{name}||19700101|M\r"
    "ORC|RE|{order}|F{order}\r"
    "OBR|1|{order}|F{order}|24323-8^Metabolic panel^LN|||{day}073000\r"
    "{obx}"
    "SPM|1|{specimen}||BLD\r"
)
_OBX = "OBX|{n}|NM|{code}^{name}^LN||{value}|mmol/L|3.5-6.5|N|||F|||{day}073000\r"


def fhir_settings(tmp: Path, *, auth: bool) -> Settings:
    """Settings for a data set in ``tmp`` (the developer's PACSLAB_ variables ignored)."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PACSLAB_")}
    try:
        return Settings(
            data_dir=tmp / "data",
            dicom={"port": 0, "host": "127.0.0.1"},
            auth={"enabled": auth},
            lab={"profiles": {"auto": {}}},
        )
    finally:
        os.environ.update(saved)


def service_request(pid: str, placer: str, code: str, *, family: str = "NGUYEN") -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "contained": [
            {
                "resourceType": "Patient",
                "id": "p",
                "identifier": [{"value": pid}],
                "name": [{"family": family, "given": ["AN"]}],
                "gender": "male",
                "birthDate": "1970-01-01",
            }
        ],
        "identifier": [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}
                    ]
                },
                "value": placer,
            }
        ],
        "status": "active",
        "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": code},
        "orderDetail": [
            {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]}
        ],
        "subject": {"reference": "#p"},
        "occurrenceDateTime": "2026-11-25T09:30:00+07:00",
    }


def _lab_files(settings: Settings) -> None:
    from pacslab.labs import build_lab_watcher

    files = {
        "p1.hl7": dict(
            day="20240301", msg="M1", pid="P1", name="NGUYEN^VAN AN", order="ORD-1",
            specimen="S1", obx=[("2345-7", "Glucose", "5.4"), ("2823-3", "Potassium", "4.1")],
        ),
        "p2.hl7": dict(
            day="20240302", msg="M2", pid="P2", name="TRAN^THI BINH", order="HIS-2",
            specimen="S2", obx=[("2345-7", "Glucose", "6.6")],
        ),
    }
    inbox = settings.lab_inbox / "auto"
    inbox.mkdir(parents=True, exist_ok=True)
    watcher, release = build_lab_watcher(settings, use_events=False)
    try:
        for name, f in files.items():
            obx = "".join(
                _OBX.format(n=i + 1, code=c, name=n, value=v, day=f["day"])
                for i, (c, n, v) in enumerate(f["obx"])
            )
            text = _ORU.format(**{**f, "obx": obx})
            (inbox / name).write_bytes(text.encode())
        watcher.run_until_idle()
    finally:
        watcher.stop()
        release()


def _studies(app: FastAPI, tmp: Path) -> dict[str, str]:
    studies = {
        "a": ("P1", "NGUYEN^VAN AN", "M", "CT", "20240105", "ACC-A"),
        "b": ("P2", "Trần^Thị Bình", "F", "MR", "20240220", "ACC-B"),
        "c": ("P1", "NGUYEN^VAN AN", "M", "CT", "20231231", "ACC-C"),
    }
    out = {}
    for name, (pid, pname, sex, modality, day, accession) in studies.items():
        paths = make_study(
            tmp / name,
            modality=modality,
            PatientID=pid,
            PatientName=pname,
            PatientSex=sex,
            StudyDate=day,
            AccessionNumber=accession,
            SpecificCharacterSet="ISO_IR 192",  # UTF-8 (PS3.3 C.12.1.1.2)
        )
        store_files(app.state.archive, paths)
        out[name] = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    return out


def load(app: FastAPI, settings: Settings, tmp: Path, client: TestClient) -> dict[str, str]:
    """Store the data set; its ids by name (see the module docstring)."""
    ids = _studies(app, tmp / "studies")
    for name, pid in (("p1", "P1"), ("p2", "P2")):
        bundle = client.get("/fhir/Patient", params={"identifier": pid}).json()
        (entry,) = bundle["entry"]
        ids[name] = entry["resource"]["id"]
    for name, args in (
        ("o1", ("P1", "HIS-1", "24627-2")),
        ("o2", ("P2", "HIS-2", "24590-2")),
        ("o3", ("P1", "HIS-3", "24590-2")),
    ):
        r = client.post("/fhir/ServiceRequest", json=service_request(*args))
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    revoked = service_request("P1", "HIS-3", "24590-2") | {"id": ids["o3"], "status": "revoked"}
    assert client.put(f"/fhir/ServiceRequest/{ids['o3']}", json=revoked).status_code == 200
    _lab_files(settings)
    observations = client.get("/fhir/Observation", params={"_count": "100"}).json()
    by_value = {5.4: "g1", 4.1: "k1", 6.6: "g2"}
    for e in observations.get("entry", []):
        ids[by_value[e["resource"]["valueQuantity"]["value"]]] = e["resource"]["id"]
    assert {"g1", "k1", "g2"} <= ids.keys(), observations
    reports = client.get("/fhir/DiagnosticReport", params={"_count": "100"}).json()
    for e in reports.get("entry", []):
        members = {ref["reference"].split("/")[1] for ref in e["resource"]["result"]}
        ids["r1" if ids["g1"] in members else "r2"] = e["resource"]["id"]
    assert {"r1", "r2"} <= ids.keys(), reports
    return ids


@contextmanager
def dataset(tmp: Path, *, auth: bool = False) -> Iterator[tuple[FastAPI, dict[str, str], Settings]]:
    """A running app over the data set (authentication off unless ``auth``)."""
    settings = fhir_settings(tmp, auth=auth)
    with running_app(settings) as app:
        if auth:
            from api.keys import issue_token

            token = issue_token(settings.auth, subject="loader", scopes=["admin",
                                "imaging.read", "lab.read", "orders.read", "orders.write"])
            client = TestClient(app, headers={"Authorization": f"Bearer {token}"})
        else:
            client = TestClient(app)
        ids = load(app, settings, tmp, client)
        yield app, ids, settings
