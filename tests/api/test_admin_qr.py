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


def test_commitment_dead_letters_and_manual_retry(client: TestClient, app: Any) -> None:
    """Owed Storage Commitment reports whose tries ran out: listed with their SCU and
    last error, retried one by one (tries reset), each retry in the action log."""
    from storage.index.qr import COMMIT_JOB, queue_commitment

    index = app.state.index
    refs = '[["1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"]]'
    dead = queue_commitment(index, "1.2.9.1", "MR1", refs, delay_s=0)
    queue_commitment(index, "1.2.9.2", "MR1", refs, delay_s=60)  # still owed: pending
    index.add_job(job_kind("REGIONAL"), "1.2.3.1")  # a forwarding job: never listed
    index.fail_job(dead, "ServiceError: MR1 at 10.0.0.7:104 took no N-EVENT-REPORT in 20 tries")
    assert client.get("/admin/commitment").json()["jobs"] == {
        "pending": 1, "running": 0, "done": 0, "failed": 1}
    failed = client.get("/admin/commitment/jobs", params={"status": "failed"}).json()
    assert [(j["id"], j["transaction_uid"], j["calling_ae"], j["last_error"])
            for j in failed] == [
        (dead, "1.2.9.1", "MR1",
         "ServiceError: MR1 at 10.0.0.7:104 took no N-EVENT-REPORT in 20 tries")]
    assert len(client.get("/admin/commitment/jobs").json()) == 2
    text = client.get("/metrics").text
    assert 'pacslab_commit_jobs{status="failed"} 1' in text
    assert 'pacslab_commit_jobs{status="pending"} 1' in text

    assert client.post(f"/admin/commitment/jobs/{dead}/retry").status_code == 202
    job = next(j for j in index.get_jobs(target="1.2.9.1") if j.kind == COMMIT_JOB)
    assert (job.status, job.attempts) == ("pending", 0)
    assert client.get("/admin/commitment/jobs", params={"status": "failed"}).json() == []
    # Only a failed commit job: not twice, not a forwarding job, not an unknown id.
    assert client.post(f"/admin/commitment/jobs/{dead}/retry").status_code == 404
    fwd = next(j for j in index.get_jobs() if j.kind.startswith("fwd:"))
    index.fail_job(fwd.id, "boom")
    assert client.post(f"/admin/commitment/jobs/{fwd.id}/retry").status_code == 404
    assert client.post("/admin/forwarding/jobs/999999/retry").status_code == 404
    assert client.post(f"/admin/commitment/jobs/{2**70}/retry").status_code == 400
    assert client.get("/admin/commitment/jobs", params={"limit": 0}).status_code == 400
    # Audited: who retried which job (the security middleware, as every /admin call).
    assert app.state.audit.flush()
    assert any(e.resource.endswith(f"/admin/commitment/jobs/{dead}/retry")
               and e.outcome_desc == "HTTP 202" for e in app.state.audit.entries())
