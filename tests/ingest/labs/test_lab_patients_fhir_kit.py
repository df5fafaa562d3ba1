"""A real FHIR client follows lab results to their patient (issue 13.5), over HTTP.

npm ``fhir-kit-client`` 2.0.3 (nobody on the team wrote it) searches ``Patient`` by
``identifier=system|value``, then ``Observation?patient=Patient/<id>`` and
``DiagnosticReport?patient=…``, and resolves each ``subject`` reference; npm ``fhir``
4.12.0 validates every resource it got against the R4 structure definitions. The
server is uvicorn on a loopback port over a data dir filled through the lab inbox
with real captures (tests/data/lab/SOURCES.md). Skipped without node or the modules.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from lab_support import LAB_DATA, LabRig, lab_settings, open_rig

from core.settings import Settings
from tests.support import free_port, wait_until

JS = Path(__file__).resolve().parents[2] / "js"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(
        NODE is None
        or not (JS / "node_modules" / "fhir-kit-client").is_dir()
        or not (JS / "node_modules" / "fhir").is_dir(),
        reason="node, fhir-kit-client or fhir not installed (./run test installs them)",
    ),
]

BAPTIST = "urn:pacslab:issuer:" + quote("Baptist East", safe="")

SCRIPT = r"""
import { Client } from 'fhir-kit-client';
import fhirPkg from 'fhir';
const { Fhir } = fhirPkg;
const [base, system, value] = process.argv.slice(1);
const client = new Client({ baseUrl: base });
const fhir = new Fhir();
const problems = [];
const check = (r) => {
  for (const m of fhir.validate(r).messages) {
    if (m.severity !== 'error') continue;
    problems.push(`${r.resourceType}/${r.id}: ${m.location} ${m.message}`);
  }
  return r;
};
const find = async (resourceType, searchParams) =>
  ((await client.search({ resourceType, searchParams })).entry || []).map((e) => check(e.resource));
const patients = await find('Patient', { identifier: `${system}|${value}` });
const id = patients[0].id;
const observations = await find('Observation', { patient: `Patient/${id}` });
const resolved = [];
for (const o of observations) {
  resolved.push(check(await client.resolve({ reference: o.subject.reference })));
}
const reports = await find('DiagnosticReport', { patient: `Patient/${id}` });
const held = await find('Observation', { _tag: 'needs-review' });
console.log(JSON.stringify({ patients, observations, resolved, reports, held, problems }));
"""


@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[LabRig, str]]:
    import uvicorn

    from api.app import create_app

    with open_rig(lab_settings(settings)) as rig:
        rig.drop("hl7/cdc_oru_r01_v251_result_linked.hl7")
        rig.drop("hl7/cdc_oru_r01_v251_utf8_micro_lf.hl7")
        assert [o.status for o in rig.run()] == ["ingested", "ingested"]
        raw = (LAB_DATA / "hl7/cdc_oru_r01_v251_result_linked.hl7").read_bytes()
        (rig.inbox() / "other.hl7").write_bytes(
            raw.replace(b"1300974^^^Baptist East", b"7700001^^^Baptist East")
        )
        assert [o.status for o in rig.run()] == ["ingested"]
        port = free_port()
        config = uvicorn.Config(
            create_app(rig.settings),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
        )
        srv = uvicorn.Server(config)
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        wait_until(lambda: srv.started, timeout=20, message="uvicorn did not start")
        try:
            yield rig, f"http://127.0.0.1:{port}/fhir"
        finally:
            srv.should_exit = True
            thread.join(timeout=10)


def _client(base: str, system: str, value: str) -> dict[str, list[dict[str, object]]]:
    assert NODE is not None
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", SCRIPT, base, system, value],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_fhir_kit_client_follows_results_to_their_patient(served: tuple[LabRig, str]) -> None:
    _rig, base = served
    first = _client(base, BAPTIST, "1300974")
    assert first["problems"] == []
    (patient,) = first["patients"]
    assert patient["identifier"][0]["system"] == BAPTIST  # type: ignore[index]
    (obs,) = first["observations"]
    assert obs["subject"]["reference"] == f"Patient/{patient['id']}"  # type: ignore[index]
    assert obs["status"] == "final"
    assert [p["id"] for p in first["resolved"]] == [patient["id"]]
    (report,) = first["reports"]
    assert report["code"]["coding"][0]["code"] == "57128-1"  # type: ignore[index]
    (held,) = first["held"]  # the other patient's result of the same specimen
    assert held["subject"]["reference"] != obs["subject"]["reference"]  # type: ignore[index]
    assert held["status"] == "preliminary"

    second = _client(base, BAPTIST, "7700001")
    assert second["problems"] == []
    assert [o["id"] for o in second["observations"]] == [held["id"]]
    other = _client(base, "urn:pacslab:issuer:NPI", "80008836")
    assert other["problems"] == [] and len(other["observations"]) >= 1
    assert not {o["id"] for o in other["observations"]} & {obs["id"], held["id"]}
