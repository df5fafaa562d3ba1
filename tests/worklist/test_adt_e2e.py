"""IHE PIR end to end: ADT A08/A40/A47 by python-hl7's ``mllp_send`` and the order inbox.

The receiver (DICOM C-STORE, C-FIND and the worklist) runs as ``run_receiver`` in this
process, the order intake as ``pacslab serve`` starts it (``start_orders``: MLLP
listener and inbox thread, with the patient identity service), the API over the same
data directory. A temporary patient (emergency registration) gets images by DCMTK
``storescu``, an order by ORM^O01 over MLLP and a lab result by an ORU^R01 file; the
record system then sends A40 merging it into the real record. DCMTK ``findscu``
(study root and ``-W``), QIDO-RS and FHIR must all answer with the surviving patient,
lab result included, and undoing the merge brings every answer back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset

from api.app import create_app
from core.settings import Settings
from core.synthetic import ct_series
from pacslab.background import start_orders
from pacslab.labs import build_lab_watcher
from pacslab.worker_process import build_worker
from storage.audit import AuditStore
from tests.support import Receiver, free_port, run_dcmtk, wait_until
from tests.worklist.adt_messages import a08, a40, a47
from tests.worklist.dcmtk import HAVE_DCMTK, findscu, write_query
from tests.worklist.order_requests import mwl_query

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK not installed"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR"),
]

ISSUER = "BVTW"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The conftest settings plus the order intake on a free port and the lab inbox."""
    for key in list(os.environ):
        if key.startswith("PACSLAB_"):
            monkeypatch.delenv(key)
    return Settings(
        data_dir=tmp_path / "data",
        dicom={"port": 0, "host": "127.0.0.1"},
        auth={"enabled": False},
        lab={"profiles": {"auto": {}}, "patient_issuer": ISSUER},
        # the worker is run by hand right after a transfer: no deferral (issue 19)
        processing={"instance_defer_s": 0.0},
        orders={
            "mllp_port": free_port(),
            "mllp_host": "127.0.0.1",
            "stable_s": 0.0,
            "rescan_s": 0.2,
            "station_by_modality": {"CT": "CT1"},
        },
    )


@pytest.fixture
def intake(receiver: Receiver) -> Iterator[Settings]:
    stop = start_orders(receiver.settings)
    yield receiver.settings
    stop()


def _mllp_send() -> str:
    found = shutil.which("mllp_send") or str(Path(sys.executable).parent / "mllp_send")
    if not Path(found).exists():
        pytest.skip("python-hl7's mllp_send is not installed (pip install hl7)")
    return found


def send(port: int, message: bytes, tmp_path: Path) -> dict[str, list[str]]:
    """Send one message with ``mllp_send``; its ACK's segments by id."""
    path = tmp_path / "message.hl7"  # mllp_send reads stdin as text: give it a file
    path.write_bytes(message)
    proc = subprocess.run(
        [_mllp_send(), "--loose", "-f", str(path), "-p", str(port), "127.0.0.1"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode().strip("\x0b\x1c\r\n")
    return {s[:3]: s.split("|") for s in text.replace("\n", "\r").split("\r") if s}


def orm(placer: str, patient_id: str, name: str) -> bytes:
    """ORM^O01 v2.5.1 new order for a CT on 2026-11-25 (IHE RAD TF-2 4.4)."""
    orc = ["ORC", "NW", f"{placer}^HIS", "", "", "", "", "^^^20261125093000^^R"]
    obr = ["OBR", "1", f"{placer}^HIS", "", "24627-2^CT Chest^LN"] + [""] * 19 + ["CT"]
    obr += ["", "", "^^^20261125093000^^R"]  # OBR-24 modality, OBR-27 quantity/timing
    segments = [
        f"MSH|^~\\&|HIS|BVTW|PACSLAB|BVTW|20261125080000||ORM^O01^ORM_O01|ORM{placer}|P|2.5.1"
        "|||AL|NE|VNM|UNICODE UTF-8",
        f"PID|1||{patient_id}^^^{ISSUER}^MR||{name}||19800102|M",
        "PV1|1|E|CC^^^BVTW",
        "|".join(orc),
        "|".join(obr),
    ]
    return ("\r".join(segments) + "\r").encode()


def oru(patient_id: str, name: str) -> bytes:
    """ORU^R01 v2.5.1 glucose result, as a lab analyzer middleware drops it."""
    return (
        "MSH|^~\\&|LIS|LAB|PACSLAB|BVTW|20261125100000||ORU^R01^ORU_R01|LAB1|P|2.5.1\r"
        f"PID|1||{patient_id}^^^{ISSUER}^MR||{name}||19800102|M\r"
        "ORC|RE|LABORD1|FLAB1\r"
        "OBR|1|LABORD1|FLAB1|24323-8^Metabolic panel^LN|||20261125073000\r"
        "OBX|1|NM|2345-7^Glucose^LN||5.4|mmol/L|3.5-6.5|N|||F|||20261125073000\r"
        "SPM|1|S1||BLD\r"
    ).encode()


def _store_images(receiver: Receiver, tmp_path: Path, patient_id: str, name: str) -> str:
    folder = tmp_path / f"ct-{patient_id}"
    folder.mkdir()
    study_uid = ""
    for n, ds in enumerate(
        ct_series(2, 32, 32, patient_id=patient_id, patient_name=name, accession_number="")
    ):
        ds.IssuerOfPatientID = ISSUER
        ds.save_as(folder / f"CT{n}.dcm", enforce_file_format=True)
        study_uid = str(ds.StudyInstanceUID)
    sent = run_dcmtk(["storescu", "+sd", "127.0.0.1", str(receiver.port), str(folder)])
    assert sent.returncode == 0, sent.stderr
    worker = build_worker(receiver.settings)
    try:
        while worker.run_once():
            pass
    finally:
        worker.index.close()
    return study_uid


def _drop_lab_result(settings: Settings, patient_id: str, name: str) -> None:
    inbox = settings.lab_inbox / "auto"
    inbox.mkdir(parents=True, exist_ok=True)
    watcher, release = build_lab_watcher(settings, use_events=False)
    try:
        (inbox / "result.hl7").write_bytes(oru(patient_id, name))
        watcher.run_until_idle()
    finally:
        watcher.stop()
        release()


def _study_find(port: int, patient_id: str, tmp_path: Path) -> list[Dataset]:
    """DCMTK ``findscu -S`` at STUDY level by Patient ID; the responses."""
    out = tmp_path / f"find-{patient_id}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    proc = run_dcmtk(
        ["findscu", "-S", "-aet", "VIEWER", "-aec", "PACSLAB", "-X", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={patient_id}",
         "-k", "PatientName", "-k", "IssuerOfPatientID", "-k", "StudyInstanceUID",
         "127.0.0.1", str(port)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _mwl(port: int, patient_id: str, tmp_path: Path) -> list[Dataset]:
    query = write_query(mwl_query(PatientID=patient_id), tmp_path / f"mwl-{patient_id}.dcm")
    found = findscu(port, query, tmp_path / f"mwl-{patient_id}")
    assert found.returncode == 0, found.stderr
    return found.responses


def _fhir_patient(client: TestClient, patient_id: str) -> dict[str, Any] | None:
    bundle = client.get("/fhir/Patient", params={"identifier": patient_id}).json()
    entries = bundle.get("entry", [])
    active = [e["resource"] for e in entries if e["resource"].get("active", True)]
    return active[0] if active else None


def _answers(
    receiver: Receiver, client: TestClient, patient_id: str, tmp_path: Path
) -> dict[str, Any]:
    """What every interface answers for ``patient_id``."""
    port = receiver.port
    qido = client.get("/dicomweb/studies", params={"PatientID": patient_id})
    assert qido.status_code in (200, 204), qido.text
    patient = _fhir_patient(client, patient_id)
    studies: list[str] = []
    observations: list[float] = []
    if patient is not None:
        ref = f"Patient/{patient['id']}"
        bundle = client.get("/fhir/ImagingStudy", params={"patient": ref}).json()
        studies = [e["resource"]["identifier"][0]["value"] for e in bundle.get("entry", [])]
        obs = client.get("/fhir/Observation", params={"patient": ref}).json()
        observations = [e["resource"]["valueQuantity"]["value"] for e in obs.get("entry", [])]
    return {
        "cfind": [(str(d.PatientName), str(d.StudyInstanceUID)) for d in
                  _study_find(port, patient_id, tmp_path)],
        "qido": [s["0020000D"]["Value"][0] for s in (qido.json() if qido.status_code == 200
                                                      else [])],
        "fhir_name": patient["name"][0].get("family") if patient else None,
        "fhir_studies": [s.removeprefix("urn:oid:") for s in studies],
        "observations": observations,
        "mwl": [str(d.PatientName) for d in _mwl(port, patient_id, tmp_path)],
    }  # fmt: skip


def test_a40_over_mllp_moves_everything_and_undo_restores(
    receiver: Receiver, intake: Settings, tmp_path: Path
) -> None:
    settings = intake
    port = settings.orders.mllp_port
    # An emergency patient under a temporary identity: images, an order, a lab result.
    study = _store_images(receiver, tmp_path, "TMP0001", "CAP CUU^NAM")
    assert send(port, orm("E1", "TMP0001", "CAP CUU^NAM"), tmp_path)["MSA"][1] == "AA"
    _drop_lab_result(settings, "TMP0001", "CAP CUU^NAM")
    with TestClient(create_app(settings)) as client:
        before = _answers(receiver, client, "TMP0001", tmp_path)
        assert before["cfind"] == [("CAP CUU^NAM", study)]
        assert before["qido"] == [study] and before["fhir_studies"] == [study]
        assert before["observations"] == [5.4] and before["mwl"] == ["CAP CUU^NAM"]

        # The real record, registered by A08, then the merge by A40.
        ack = send(port, a08("BN0001", name="NGUYỄN^VĂN^NAM", sex="M"), tmp_path)
        assert ack["MSA"][1:3] == ["AA", "ADT0008"], ack
        ack = send(port, a40([("BN0001", "TMP0001")]), tmp_path)
        assert ack["MSA"][1:3] == ["AA", "ADT0040"], ack
        assert ack["MSH"][8] == "ACK^A40^ACK"

        after = _answers(receiver, client, "BN0001", tmp_path)
        assert after == {
            "cfind": [("NGUYỄN^VĂN^NAM", study)],
            "qido": [study],
            "fhir_name": "NGUYỄN",
            "fhir_studies": [study],
            "observations": [5.4],
            "mwl": ["NGUYỄN^VĂN^NAM"],
        }
        gone = _answers(receiver, client, "TMP0001", tmp_path)
        assert gone["cfind"] == [] and gone["qido"] == [] and gone["mwl"] == []
        assert gone["fhir_studies"] == [] and gone["observations"] == []

        # An unknown obsolete patient: AE with ERR 204 at the MRG.
        ack = send(port, a40([("BN0001", "NOBODY")], control_id="ADT0041"), tmp_path)
        assert ack["MSA"][1] == "AE" and ack["ERR"][2] == "MRG^1^1"
        assert ack["ERR"][3].startswith("204^")

        # The merge is reviewed and undone through the admin API: the former state
        # comes back everywhere.
        changes = client.get("/admin/patients/changes").json()
        (merge,) = [c for c in changes if c["kind"] == "merge"]
        assert (merge["source"], merge["agent"]) == ("hl7-mllp", "HIS")
        assert merge["summary"]["studies"] == 1 and merge["summary"]["lab_results"] == 1
        undone = client.post(f"/admin/patients/changes/{merge['change_id']}/undo")
        assert undone.status_code == 200, undone.text
        assert _answers(receiver, client, "TMP0001", tmp_path) == before
        assert _answers(receiver, client, "BN0001", tmp_path)["cfind"] == []


def test_a47_and_a08_through_the_order_inbox(
    receiver: Receiver, intake: Settings, tmp_path: Path
) -> None:
    settings = intake
    study = _store_images(receiver, tmp_path, "TMP0002", "BE^GAI")
    inbox = settings.orders_inbox
    inbox.mkdir(parents=True, exist_ok=True)

    def drop(name: str, message: bytes) -> None:
        (inbox / f"{name}.tmp").write_bytes(message)
        os.replace(inbox / f"{name}.tmp", inbox / name)
        wait_until(lambda: (inbox / "processed" / name).exists(), timeout=60,
                   message=f"{name} not processed")  # fmt: skip

    # An A40 naming a patient we never saw: rejected/ with its reason, nothing applied.
    unknown = a40([("BN0002", "NOBODY")], control_id="ADT0099")
    (inbox / "unknown.hl7.tmp").write_bytes(unknown)
    os.replace(inbox / "unknown.hl7.tmp", inbox / "unknown.hl7")
    reports = inbox / "rejected"
    wait_until(lambda: list(reports.glob("*.error.json")) if reports.is_dir() else [],
               timeout=60, message="unknown.hl7 not rejected")  # fmt: skip
    (report,) = [json.loads(p.read_text()) for p in reports.glob("*.error.json")]
    (message,) = report["messages"]
    assert (message["ack"], message["hl7_error_code"], message["where"]) == ("AE", 204, "MRG^1^1")
    assert message["changes"] == []

    drop("a47.hl7", a47("TMP0002", "BN0002"))
    drop("a08.hl7", a08("BN0002", name="TRẦN^THỊ^MAI", birth="20261201", sex="F"))
    found = _study_find(receiver.port, "BN0002", tmp_path)
    assert [(str(d.PatientName), d.IssuerOfPatientID, d.StudyInstanceUID) for d in found] == [
        ("TRẦN^THỊ^MAI", ISSUER, study)
    ]
    assert _study_find(receiver.port, "TMP0002", tmp_path) == []
    with TestClient(create_app(settings)) as client:
        qido = client.get("/dicomweb/studies", params={"PatientID": "BN0002"}).json()
        assert [s["00100010"]["Value"][0]["Alphabetic"] for s in qido] == ["TRẦN^THỊ^MAI"]
        patient = _fhir_patient(client, "BN0002")
        assert patient is not None
        assert (patient["gender"], patient["birthDate"]) == ("female", "2026-12-01")


def _patient_find(port: int, tmp_path: Path, tag: str, **keys: str) -> list[Dataset]:
    """DCMTK ``findscu -P`` (Patient Root) at PATIENT level; the responses."""
    out = tmp_path / f"pfind-{tag}"
    out.mkdir()
    args = ["findscu", "-P", "-aet", "VIEWER", "-aec", "PACSLAB", "-X", "-od", str(out),
            "-k", "QueryRetrieveLevel=PATIENT"]  # fmt: skip
    for key in ("PatientID", "PatientName", "IssuerOfPatientID", "PatientBirthDate"):
        args += ["-k", f"{key}={keys[key]}" if key in keys else key]
    proc = run_dcmtk([*args, "127.0.0.1", str(port)])
    assert proc.returncode == 0, proc.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_after_a40_the_obsolete_patient_is_gone_and_late_orders_follow_the_survivor(
    receiver: Receiver, intake: Settings, tmp_path: Path
) -> None:
    """Issue 17 gaps: after an A40, C-FIND at PATIENT level and FHIR Patient search list
    the survivor only (with its demographics), not the merged-away record; an ORM sent
    later under the obsolete identifier schedules the survivor (and is audited); an A47
    onto an identifier in use is refused AE 205 (duplicate key identifier) at PID-3."""
    settings = intake
    port = settings.orders.mllp_port
    study = _store_images(receiver, tmp_path, "TMP0003", "CAP CUU^BA")
    assert send(port, a08("BN0003", name="LÊ^VĂN^BA", sex="M"), tmp_path)["MSA"][1] == "AA"
    ack = send(port, a40([("BN0003", "TMP0003")]), tmp_path)
    assert ack["MSA"][1] == "AA", ack

    # C-FIND PATIENT level (Patient Root), DCMTK findscu: the survivor only.
    everyone = _patient_find(receiver.port, tmp_path, "all", PatientName="*")
    assert [(str(d.PatientID), str(d.PatientName)) for d in everyone] == [
        ("BN0003", "LÊ^VĂN^BA")
    ]
    assert _patient_find(receiver.port, tmp_path, "old", PatientID="TMP0003") == []
    by_old_name = _patient_find(receiver.port, tmp_path, "old-name", PatientName="CAP CUU*")
    assert by_old_name == []
    # Its studies are the survivor's (Patient Root, STUDY level under it).
    assert _study_find(receiver.port, "BN0003", tmp_path)[0].StudyInstanceUID == study

    with TestClient(create_app(settings)) as client:
        # FHIR Patient search: nothing under the old identifier or name; a read of the
        # obsolete record still answers (inactive, replaced-by).
        old = client.get("/fhir/Patient", params={"identifier": "TMP0003"}).json()
        assert old["total"] == 0, old
        assert client.get("/fhir/Patient", params={"name": "cap cuu"}).json()["total"] == 0
        (entry,) = client.get("/fhir/Patient", params={"name": "lê"}).json()["entry"]
        assert entry["resource"]["identifier"][0]["value"] == "BN0003"
        # QIDO-RS: nothing under the obsolete patient's identifier or name either.
        for params in ({"PatientID": "TMP0003"}, {"PatientName": "CAP CUU*"}):
            assert client.get("/dicomweb/studies", params=params).status_code == 204

        # An order arriving later under the merged-away identifier: AA, scheduled for
        # the survivor (identifier and demographics), nothing under the old one.
        ack = send(port, orm("LATE1", "TMP0003", "CAP CUU^BA"), tmp_path)
        assert ack["MSA"][1] == "AA", ack
        assert _mwl(receiver.port, "BN0003", tmp_path) != []
        assert [str(d.PatientName) for d in _mwl(receiver.port, "BN0003", tmp_path)] == [
            "LÊ^VĂN^BA"
        ]
        assert _mwl(receiver.port, "TMP0003", tmp_path) == []
        assert client.get("/fhir/Patient", params={"identifier": "TMP0003"}).json()["total"] == 0
        orders = client.get("/fhir/ServiceRequest", params={"patient:identifier": "BN0003"})
        assert orders.status_code == 200 and orders.json()["total"] == 1, orders.text
        # ... and audited, with keyed references only.
        state = client.app.state  # type: ignore[attr-defined]
        state.audit.flush()

        def merged_entries() -> list[Any]:
            return [
                e
                for e in AuditStore(state.index.engine).entries()
                if e.event_type == "order.patient-merged"
            ]

        # The order intake writes this entry through its own action log (its own
        # writer thread, 0.2 s batches): the API's flush above does not cover it, and
        # one CI run read the log before that batch was written.
        entries = wait_until(merged_entries, message="no order.patient-merged entry")
        assert len(entries) == 1
        detail = json.loads(entries[0].detail)
        assert detail["before"]["patient"] != detail["after"]["patient"]
        assert "TMP0003" not in entries[0].detail and "BN0003" not in entries[0].detail

    # A47 onto an identifier another patient holds: a merge, not a change; AE 205.
    assert send(port, a08("BN0004", name="PHAM^AN", control_id="ADT0009"), tmp_path)[
        "MSA"
    ][1] == "AA"
    ack = send(port, a47("BN0004", "BN0003", control_id="ADT0048"), tmp_path)
    assert (ack["MSA"][1], ack["ERR"][2]) == ("AE", "PID^1^3"), ack
    assert ack["ERR"][3].startswith("205^"), ack
    names = {str(d.PatientID) for d in _patient_find(receiver.port, tmp_path, "end",
                                                      PatientName="*")}  # fmt: skip
    assert names == {"BN0003", "BN0004"}
