"""Errors as problem+json, /metrics (Prometheus text), /health."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.errors import OutOfResourcesError


def test_problem_json_for_routing_and_validation(client: TestClient) -> None:
    r = client.get("/nowhere")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert set(body) == {"type", "title", "status", "detail", "instance"}
    assert body["instance"] == "/nowhere"
    r = client.delete("/dicomweb/studies")
    assert r.status_code == 405 and r.json()["status"] == 405
    # a bad typed query parameter is the client's fault: 400, not 422 or 500
    r = client.get(
        "/dicomweb/studies/1.2/series/3.4/instances/5.6/rendered", params={"quality": "high"}
    )
    assert r.status_code == 400
    assert r.json()["title"] == "Invalid request"


def test_service_error_mapping_uses_class_status(app: FastAPI) -> None:
    @app.get("/boom")
    def boom() -> None:
        raise OutOfResourcesError("disk full")

    r = TestClient(app).get("/boom")
    assert r.status_code == 507
    assert r.json()["title"] == "Out of resources"
    assert r.json()["detail"] == "disk full"
    assert r.json()["type"] == "urn:pacslab:error:out-of-resources"


def test_unexpected_error_is_500_problem_without_detail(app: FastAPI) -> None:
    @app.get("/bug")
    def bug() -> None:
        raise RuntimeError("secret internals")

    r = TestClient(app, raise_server_exceptions=False).get("/bug")
    assert r.status_code == 500
    assert "secret" not in r.text


def test_metrics_counts_and_latency(client: TestClient) -> None:
    client.get("/health")
    client.get("/dicomweb/studies/1.2.3/metadata")
    text = client.get("/metrics").text
    assert 'pacslab_http_requests_total{method="GET",route="/health",status="200"} 1.0' in text
    assert (
        'pacslab_http_requests_total{method="GET",'
        'route="/dicomweb/studies/{study}/metadata",status="404"} 1.0'
    ) in text
    assert "pacslab_http_request_duration_seconds_bucket{" in text
    assert "pacslab_instances 0" in text  # the index gauges are kept
    assert client.get("/health").json()["status"] == "ok"
