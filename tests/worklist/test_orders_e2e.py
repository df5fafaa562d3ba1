"""End to end through the real receiver: order via FHIR → MWL → MPPS → images → completed.

The ``receiver`` fixture runs ``run_receiver`` in this process, so the worklist and
MPPS are served by the wiring of ``pacslab/dicom_process.py`` on the receiver's
port. DCMTK peers (``findscu -W``, ``storescu``) run with the default environment
and with ``TCP_NODELAY=1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from api.app import create_app
from core.synthetic import write_ct_series
from pacslab.wiring import build_order_service
from pacslab.worker_process import build_worker
from tests.support import Receiver, run_dcmtk
from tests.worklist.dcmtk import HAVE_DCMTK, findscu, write_query
from tests.worklist.mpps_requests import create_dataset
from tests.worklist.order_requests import mwl_query, service_request
from worklist.mpps import StepRef

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK not installed"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR"),
]

def _run_jobs(receiver: Receiver) -> None:
    # Run by hand right after a transfer, as if the sender's pause had passed: the
    # instance jobs of a series that just arrived are not deferred (issue 19).
    processing = receiver.settings.processing.model_copy(update={"instance_defer_s": 0.0})
    worker = build_worker(receiver.settings.model_copy(update={"processing": processing}))
    try:
        for _ in range(50):
            if not worker.run_once():
                return
    finally:
        worker.index.close()


def _mpps_assoc(port: int) -> Any:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSLAB")
    assert assoc.is_established
    return assoc


@pytest.mark.parametrize("nodelay", [False, True], ids=["default", "TCP_NODELAY"])
def test_order_to_completed_study(receiver: Receiver, tmp_path: Path, nodelay: bool) -> None:
    fhir = pytest.importorskip("fhir.resources.R4B.servicerequest")
    env = {"TCP_NODELAY": "1"} if nodelay else {}
    with TestClient(create_app(receiver.settings)) as client:
        # 1. The record system places the order.
        r = client.post("/fhir/ServiceRequest", json=service_request("E2E-1"))
        assert r.status_code == 201, r.text
        order = r.json()
        ids = {
            (i.get("type") or {}).get("coding", [{}])[0].get("code"): i["value"]
            for i in order["identifier"]
        }
        accession, study_uid = ids["ACSN"], ids[None].removeprefix("urn:oid:")

        # 2. The modality queries the worklist (DCMTK findscu -W, the real receiver).
        query = write_query(mwl_query(), tmp_path / "q.dcm")
        found = findscu(receiver.port, query, tmp_path / "rsp", env=env)
        assert found.returncode == 0, found.stderr
        (item,) = found.responses
        assert item.AccessionNumber == accession
        assert item.StudyInstanceUID == study_uid
        assert str(item.PatientName) == "NGUYỄN^VĂN AN"
        sps = item.ScheduledProcedureStepSequence[0]
        assert (sps.Modality, sps.ScheduledProcedureStepStartTime) == ("CT", "093000")
        # Accent-insensitive PN wildcard (PS3.4 C.2.2.2.1.1 option), as typed at a console.
        wild = write_query(mwl_query(PatientName="NGUYEN*"), tmp_path / "q2.dcm")
        assert len(findscu(receiver.port, wild, tmp_path / "rsp2", env=env).responses) == 1

        # 3. MPPS N-CREATE IN PROGRESS, referencing the worklist entry.
        mpps_uid = str(generate_uid())
        series_uid = str(generate_uid())
        ref = StepRef(accession, item.RequestedProcedureID, sps.ScheduledProcedureStepID, study_uid)
        create = create_dataset(
            ref, patient_name=item.PatientName, patient_id=item.PatientID, start_time="093500"
        )
        assoc = _mpps_assoc(receiver.port)
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, mpps_uid)
        assert status.Status == 0x0000
        sr = client.get(f"/fhir/ServiceRequest/{order['id']}").json()
        assert sr["status"] == "active" and sr["extension"][0]["valueCode"] == "in-progress"
        # A started step leaves the worklist.
        assert findscu(receiver.port, query, tmp_path / "rsp3", env=env).responses == []

        # 4. Images, with the order's identifiers but demographics typed at the console.
        write_ct_series(
            tmp_path / "ct",
            slices=3,
            rows=64,
            columns=64,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            accession_number=accession,
            patient_id="CONSOLE1",
            patient_name="NGUYEN^VAN",
        )
        sent = run_dcmtk(
            ["storescu", "+sd", "127.0.0.1", str(receiver.port), str(tmp_path / "ct")],
            nodelay=nodelay,
        )
        assert sent.returncode == 0, sent.stderr

        # 5. MPPS N-SET COMPLETED with the performed series.
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        done.PerformedProcedureStepEndDate = "20261125"
        done.PerformedProcedureStepEndTime = "094500"
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ProtocolName = "CHEST"
        series.ReferencedImageSequence = []
        done.PerformedSeriesSequence = [series]
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, mpps_uid)
        assert status.Status == 0x0000
        assoc.release()
        assert [j.status for j in receiver.index.get_jobs(target=series_uid)] == ["pending"]

        # 6. The worker indexes, reconciles, processes the completed series.
        _run_jobs(receiver)
        assert [j.status for j in receiver.index.get_jobs(target=series_uid)] == ["done"]
        final = client.get(f"/fhir/ServiceRequest/{order['id']}").json()
        resource = fhir.ServiceRequest.model_validate(final)
        assert resource.status == "completed"
        (study,) = final["supportingInfo"]
        assert study["type"] == "ImagingStudy"
        assert study["identifier"]["value"] == f"urn:oid:{study_uid}"
        events = [
            v.event
            for v in build_order_service(receiver.settings, receiver.index).history(order["id"])
        ]
        assert events == ["placed", "step", "step", "images"] or events == [
            "placed",
            "step",
            "images",
            "step",
        ]

        # Order demographics won; the console's values are kept beside the link.
        store = build_order_service(receiver.settings, receiver.index).store
        assert store.study_patient(study_uid)["patient_id"] == "PID-E2E-1"
        assert store.study_patient(study_uid)["patient_name"] == "NGUYỄN^VĂN AN"
        link = store.get_link(study_uid)
        assert link is not None and link.matched_by == "study_instance_uid"
        assert link.original["patient_id"] == "CONSOLE1"
        assert link.original["patient_name"] == "NGUYEN^VAN"

        # 7. A study no order claims is listed, and can be linked by hand.
        stray_uid = str(generate_uid())
        write_ct_series(
            tmp_path / "stray",
            slices=1,
            rows=32,
            columns=32,
            study_instance_uid=stray_uid,
            accession_number="NOORDER",
        )
        assert (
            run_dcmtk(
                ["storescu", "+sd", "127.0.0.1", str(receiver.port), str(tmp_path / "stray")],
                nodelay=nodelay,
            ).returncode
            == 0
        )
        _run_jobs(receiver)
        unmatched = client.get("/orders/unmatched").json()
        assert [u["study_instance_uid"] for u in unmatched] == [stray_uid]
        other = client.post("/fhir/ServiceRequest", json=service_request("E2E-2", "TRẦN"))
        r = client.post(f"/orders/unmatched/{stray_uid}/link", json={"order": other.json()["id"]})
        assert r.status_code == 200 and r.json()["matched_by"] == "manual"
        assert client.get("/orders/unmatched").json() == []
        assert store.study_patient(stray_uid)["patient_name"] == "TRẦN^VĂN AN"
