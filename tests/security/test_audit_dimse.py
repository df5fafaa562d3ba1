"""Worklist C-FIND and MPPS N-CREATE/N-SET on the real receiver land in the action log.

The ``receiver`` fixture runs ``pacslab.dicom_process.run_receiver`` in this process,
so the worklist, MPPS and their audit hooks are wired exactly as ``pacslab serve``
wires them. The modality is DCMTK ``findscu -W`` for the query and a pynetdicom SCU
for MPPS (issue 7 §2: every read and write of patient data, DICOM included).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from api.app import create_app
from api.routes.audit import audit_event
from core.audit import ChainedEntry, patient_key
from tests.support import Receiver
from tests.worklist.dcmtk import HAVE_DCMTK, findscu, write_query
from tests.worklist.mpps_requests import create_dataset
from tests.worklist.order_requests import mwl_query, service_request
from worklist.mpps import StepRef

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK not installed"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR"),
]

PLACER = "AUD-7"
PATIENT_ID = f"PID-{PLACER}"  # what _service_request gives the patient
_BIRTH_YEAR = re.compile(r"(?<![0-9])1980(?:0102)?(?![0-9])")


def _entries(receiver: Receiver, event_type: str) -> list[ChainedEntry]:
    audit = receiver.service.audit  # type: ignore[attr-defined]
    assert audit.flush()
    return [e for e in audit.entries() if e.event_type == event_type]


def _no_phi(entry: ChainedEntry) -> None:
    text = json.dumps(entry.as_dict(), ensure_ascii=False)
    for plain in (PATIENT_ID, "NGUYỄN", "NGUYEN", "VĂN AN"):
        assert plain not in text, f"{plain!r} in audit entry {entry.seq}"
    # The birth year in any date form (19800102, 1980-01-02, 02.01.1980, alone), but not
    # four digits inside the long random numbers of the UIDs an entry rightly carries
    # (one such UID, ...1321980981329, failed CI).
    assert not _BIRTH_YEAR.search(text), f"birth year in audit entry {entry.seq}"


def _order(receiver: Receiver) -> None:
    pytest.importorskip("fhir.resources.R4B.servicerequest")
    with TestClient(create_app(receiver.settings)) as client:
        r = client.post("/fhir/ServiceRequest", json=service_request(PLACER))
        assert r.status_code == 201, r.text


def _verify_cli(receiver: Receiver) -> subprocess.CompletedProcess[str]:
    env = {"PACSLAB_DATA_DIR": str(receiver.settings.data_dir), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "pacslab", "audit", "verify"], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).parents[2],
                          check=False)


def test_worklist_query_is_logged(receiver: Receiver, tmp_path: Path) -> None:
    _order(receiver)
    secret: bytes = receiver.service.patient_secret  # type: ignore[attr-defined]
    # One query naming the patient (one match), one for a station with no work.
    named = write_query(mwl_query(PatientID=PATIENT_ID), tmp_path / "named.dcm")
    found = findscu(receiver.port, named, tmp_path / "rsp1")
    assert found.returncode == 0, found.stderr
    assert [r.PatientID for r in found.responses] == [PATIENT_ID]
    empty_q = mwl_query()
    empty_q.ScheduledProcedureStepSequence[0].ScheduledStationAETitle = "NOWHERE"
    empty = findscu(receiver.port, write_query(empty_q, tmp_path / "empty.dcm"), tmp_path / "r2")
    assert empty.returncode == 0 and empty.responses == []

    # A wildcard Patient ID names no one patient: no patient reference.
    wild = write_query(mwl_query(PatientID=PATIENT_ID[:5] + "*"), tmp_path / "wild.dcm")
    assert len(findscu(receiver.port, wild, tmp_path / "r3").responses) == 1

    first, second, third = _entries(receiver, "dicom.c-find")
    assert third.patient_key == "" and json.loads(third.detail)["matches"] == 1
    for entry in (first, second, third):
        assert (entry.action, entry.outcome, entry.outcome_desc) == ("E", "0", "0x0000")
        assert (entry.agent, entry.agent_type) == ("MODALITY1", "ae")  # findscu -aet
        assert entry.source.startswith("127.0.0.1")
        assert entry.resource == "SOPClass/1.2.840.10008.5.1.4.31"  # MWL FIND (PS3.4 K.4)
        assert entry.correlation_id not in ("", "-")
        _no_phi(entry)
    # The query named the patient: only the keyed reference is kept.
    assert first.patient_key == patient_key(secret, PATIENT_ID) and len(first.patient_key) == 32
    assert second.patient_key == ""
    assert json.loads(first.detail)["matches"] == 1
    assert json.loads(second.detail)["matches"] == 0
    # Two associations: two correlation ids.
    assert first.correlation_id != second.correlation_id
    assert audit_event(first)["type"]["code"] == "110112"  # DCM Query
    assert receiver.service.audit.verify() == []  # type: ignore[attr-defined]


def test_mpps_create_and_set_are_logged(receiver: Receiver, tmp_path: Path) -> None:
    _order(receiver)
    secret: bytes = receiver.service.patient_secret  # type: ignore[attr-defined]
    found = findscu(receiver.port, write_query(mwl_query(), tmp_path / "q.dcm"), tmp_path / "r")
    (item,) = found.responses
    sps = item.ScheduledProcedureStepSequence[0]

    uid = str(generate_uid())
    ref = StepRef(item.AccessionNumber, item.RequestedProcedureID,
                  sps.ScheduledProcedureStepID, item.StudyInstanceUID)
    create = create_dataset(
        ref, patient_name=item.PatientName, patient_id=item.PatientID, start_time="093500"
    )
    done = Dataset()  # an N-SET carries no Patient ID: the log must still name the patient
    done.PerformedProcedureStepStatus = "COMPLETED"
    done.PerformedProcedureStepEndDate = "20261125"
    done.PerformedProcedureStepEndTime = "094500"
    series = Dataset()
    series.SeriesInstanceUID = str(generate_uid())
    series.ProtocolName = "CHEST"
    series.ReferencedImageSequence = []
    done.PerformedSeriesSequence = [series]

    ae = AE(ae_title="CT_ROOM_7")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACSLAB")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
        # A step that is COMPLETED can no longer be set (PS3.4 F.7.2.2.2): a refusal.
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)
        refused = int(status.Status)
        assert refused == 0x0110
        # N-SET of a step nobody created: refused, and no patient to name.
        unknown = str(generate_uid())
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, unknown)
        assert status.Status == 0x0112
    finally:
        assoc.release()

    entries = _entries(receiver, "dicom.mpps")
    assert [(e.action, e.outcome, e.outcome_desc) for e in entries] == [
        ("C", "0", "0x0000"), ("U", "0", "0x0000"), ("U", "4", "0x0110"), ("U", "4", "0x0112")]
    key = patient_key(secret, str(item.PatientID), str(item.get("IssuerOfPatientID", "")))
    assert [e.patient_key for e in entries] == [key, key, key, ""]
    assert [e.resource for e in entries] == [f"SOPInstance/{uid}"] * 3 + [
        f"SOPInstance/{unknown}"]
    assert {(e.agent, e.agent_type) for e in entries} == {("CT_ROOM_7", "ae")}
    # One association: one correlation id on every entry of it.
    assert len({e.correlation_id for e in entries}) == 1
    assert entries[0].correlation_id not in ("", "-")
    for entry in entries:
        assert json.loads(entry.detail)["sop_class_uid"] == "1.2.840.10008.3.1.2.3.3"
        _no_phi(entry)
    assert audit_event(entries[0])["type"]["code"] == "110111"  # DCM Procedure Record

    result = _verify_cli(receiver)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit log intact" in result.stdout
