"""Real FHIR clients nobody on the team wrote, against a real uvicorn server on loopback
with authentication on: npm ``fhir-kit-client`` pages through every resource type with
``_count=2`` and the npm ``fhir`` validator (FHIR.js, R4) checks everything returned
(tests/js/fhir_paging.mjs). Skipped when node or the modules are missing."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from tests.api.fhir_dataset import dataset
from tests.support import wait_until

pytestmark = pytest.mark.network

JS = Path(__file__).resolve().parents[1] / "js"
NODE = shutil.which("node") or "/usr/bin/node"
if not Path(NODE).exists() or not all(
    (JS / "node_modules" / m / "package.json").exists() for m in ("fhir-kit-client", "fhir")
):
    pytest.skip("node or the npm FHIR modules are missing (tests/js)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, dict[str, str]]]:
    from api.keys import issue_token

    with dataset(tmp_path_factory.mktemp("fhirjs"), auth=True) as (app, ids, settings):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        wait_until(lambda: srv.started, interval=0.02, message="uvicorn did not start")
        assert srv.started, "uvicorn did not start"
        token = issue_token(
            settings.auth,
            subject="fhir-kit-client",
            scopes=["imaging.read", "lab.read", "orders.read", "admin"],
        )
        try:
            yield f"http://127.0.0.1:{port}/fhir", token, ids
        finally:
            srv.should_exit = True
            thread.join(timeout=10)
            sock.close()


def test_fhir_kit_client_pages_every_resource_once_and_fhir_js_validates(
    server: tuple[str, str, dict[str, str]],
) -> None:
    base, token, ids = server
    run = subprocess.run(
        [NODE, str(JS / "fhir_paging.mjs"), base, token],
        capture_output=True, text=True, timeout=120, cwd=JS,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    expected = {
        "Patient": {"p1", "p2"},
        "ImagingStudy": {"a", "b", "c"},
        "ServiceRequest": {"o1", "o2", "o3"},
        "Observation": {"g1", "k1", "g2"},
        "DiagnosticReport": {"r1", "r2"},
    }
    for resource, names in expected.items():
        got = report["ids"][resource]
        assert len(got) == len(set(got)), (resource, got)  # each exactly once
        assert set(got) == {ids[n] for n in names}, resource
        assert report["totals"][resource] == len(names)
        assert report["pages"][resource] == (len(names) + 1) // 2
    audit = report["ids"]["AuditEvent"]
    assert len(audit) == len(set(audit)) and len(audit) >= report["totals"]["AuditEvent"] > 0
    # the search we sent with an unknown parameter came back as a 400 OperationOutcome
    assert report["outcomeStatus"] == 400
    assert report["control"] is False  # the validator rejects what is invalid
    assert report["invalid"] == [], report["invalid"]
    for kind in ("Bundle", "Patient", "ImagingStudy", "ServiceRequest", "Observation",
                 "DiagnosticReport", "AuditEvent", "CapabilityStatement", "Endpoint",
                 "OperationOutcome"):
        assert report["validated"].get(kind, 0) > 0, kind
