"""Admin API of issue 16: C-MOVE destinations and the forwarding queue (dead letters)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.settings import QueryRetrieveSettings, RemoteAE, Settings
from services.forwarding import job_kind


@pytest.fixture
def settings(settings: Settings) -> Settings:
    qr = QueryRetrieveSettings(destinations={"FIXED": RemoteAE(host="10.0.0.9", port=104)})
    return settings.model_copy(update={"qr": qr})


def test_destinations_crud(client: TestClient) -> None:
    assert client.get("/admin/dicom/destinations").json() == [
        {"ae_title": "FIXED", "host": "10.0.0.9", "port": 104, "source": "settings"}
    ]
    r = client.put("/admin/dicom/destinations/WS1", json={"host": "192.168.1.20", "port": 11113})
    assert r.status_code == 201, r.text
    r = client.put("/admin/dicom/destinations/WS1", json={"host": "192.168.1.21", "port": 11113})
    assert r.status_code == 200
    listed = {d["ae_title"]: d for d in client.get("/admin/dicom/destinations").json()}
    assert listed["WS1"] == {"ae_title": "WS1", "host": "192.168.1.21", "port": 11113,
                             "source": "api"}
    # Refused: a settings entry, a bad AE title, a bad host or port.
    assert client.put("/admin/dicom/destinations/FIXED",
                      json={"host": "h", "port": 1}).status_code == 409
    assert client.put("/admin/dicom/destinations/" + "A" * 17,
                      json={"host": "h", "port": 1}).status_code == 400
    assert client.put("/admin/dicom/destinations/WS2",
                      json={"host": "a b;rm", "port": 1}).status_code == 400
    assert client.put("/admin/dicom/destinations/WS2",
                      json={"host": "h", "port": 0}).status_code == 400
    assert client.delete("/admin/dicom/destinations/WS1").status_code == 204
    assert client.delete("/admin/dicom/destinations/WS1").status_code == 404
    assert client.delete("/admin/dicom/destinations/FIXED").status_code == 409


def test_forwarding_queue_and_manual_retry(client: TestClient, app: Any) -> None:
    index = app.state.index
    index.add_job(job_kind("REGIONAL"), "1.2.3.1")
    index.add_job(job_kind("REGIONAL"), "1.2.3.2")
    index.add_job("instance", "1.2.3.1")  # not a forwarding job: never listed
    jobs = {j.target: j for j in index.get_jobs() if j.kind.startswith("fwd:")}
    index.fail_job(jobs["1.2.3.2"].id, "PeerUnavailableError: association refused")
    summary = client.get("/admin/forwarding").json()["destinations"]
    assert summary["REGIONAL"]["pending"] == 1 and summary["REGIONAL"]["failed"] == 1
    dead = client.get("/admin/forwarding/jobs", params={"status": "failed"}).json()
    assert [(d["sop_instance_uid"], d["last_error"]) for d in dead] == [
        ("1.2.3.2", "PeerUnavailableError: association refused")
    ]
    assert client.post(f"/admin/forwarding/jobs/{dead[0]['id']}/retry").status_code == 202
    assert client.get("/admin/forwarding/jobs", params={"status": "failed"}).json() == []
    # Only a failed forwarding job can be retried.
    assert client.post(f"/admin/forwarding/jobs/{dead[0]['id']}/retry").status_code == 404
    other = next(j for j in index.get_jobs() if j.kind == "instance")
    index.fail_job(other.id, "boom")
    assert client.post(f"/admin/forwarding/jobs/{other.id}/retry").status_code == 404
    assert client.get("/admin/forwarding/jobs", params={"status": "bogus"}).status_code == 400


def test_job_id_out_of_range_is_a_400_not_a_500(client: TestClient) -> None:
    # SQLite integers are 64-bit: a larger id raised OverflowError (schemathesis found it).
    assert client.post(f"/admin/forwarding/jobs/{2**70}/retry").status_code == 400
    assert client.post("/admin/forwarding/jobs/0/retry").status_code == 400


def test_metrics_show_the_forwarding_queue(client: TestClient, app: Any) -> None:
    app.state.index.add_job(job_kind("REGIONAL"), "1.2.3.9")
    text = client.get("/metrics").text
    assert 'pacslab_forward_jobs{destination="REGIONAL",status="pending"} 1' in text
