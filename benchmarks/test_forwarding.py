"""Forwarding throughput to a DCMTK storescp, beside Orthanc's classic Lua auto-routing (issue 16).

pacslab: ``pacslab dicom`` receives, ``pacslab worker`` runs the instance jobs and the
forwarding jobs (rule: everything to the storescp). Orthanc: ``OnStoredInstance`` ->
``SendToModality`` (the routing recipe of the Orthanc Book). The same CT series is sent
by ``storescu``; the figure is instances/s from the first byte sent to the last file
on the storescp's disk, so it includes ingest on both sides.

Smoke run without --benchmark-enable: 3 small instances.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.support import benchmarks_enabled, record
from core.synthetic import write_ct_series
from tests.orthanc_peer import OrthancPeer
from tests.support import free_port

# The measuring run sends 300 CT images through both: longer than the suite's 300 s.
pytestmark = [pytest.mark.network, pytest.mark.timeout(4 * 3600)]


def _storescp(out: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([shutil.which("storescp") or "storescp", "-aet", "STORESCP", "+xa",
                             "-od", str(out), str(port)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TCP_NODELAY": "1"})


def _wait_files(folder: Path, n: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < n:
        assert time.monotonic() < deadline, f"{len(list(folder.iterdir()))} of {n} arrived"
        time.sleep(0.05)
    return time.perf_counter()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _pacslab(work: Path, scp_port: int) -> tuple[int, list[subprocess.Popen[bytes]]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    env.update(
        PACSLAB_DATA_DIR=str(work), PACSLAB_DICOM__PORT=str(port),
        PACSLAB_DICOM__HOST="127.0.0.1", PACSLAB_LOG__LEVEL="WARNING",
        PACSLAB_PROCESSING__SERIES_QUIET_S="86400", PACSLAB_PROCESSING__POLL_INTERVAL_S="0.05",
        PACSLAB_FORWARDING__DESTINATIONS=json.dumps(
            {"SCP": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp_port}}),
        PACSLAB_FORWARDING__RULES=json.dumps([{"name": "all", "destinations": ["SCP"]}]),
    )
    dicom = subprocess.Popen([sys.executable, "-m", "pacslab", "dicom"], env=env,
                             start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while subprocess.run(["echoscu", "127.0.0.1", str(port)], capture_output=True,
                         check=False).returncode != 0:
        assert time.monotonic() < deadline and dicom.poll() is None, "no pacslab dicom"
        time.sleep(0.2)
    worker = subprocess.Popen([sys.executable, "-m", "pacslab", "worker"], env=env,
                              start_new_session=True, stderr=subprocess.DEVNULL)
    return port, [dicom, worker]


def test_forwarding_throughput(benchmark: Any, tmp_path: Path,
                               request: pytest.FixtureRequest) -> None:
    measuring = benchmarks_enabled(request.config)
    n = int(os.environ.get("PACSLAB_QR_BENCH_CT_SLICES", "300")) if measuring else 3
    files = write_ct_series(tmp_path / "ct", slices=n, rows=512 if measuring else 64,
                            columns=512 if measuring else 64)
    rates: dict[str, float] = {}
    for target in ("pacslab", "orthanc"):
        out = tmp_path / f"{target}-scp"
        out.mkdir()
        scp_port = free_port()
        scp = _storescp(out, scp_port)
        procs: list[subprocess.Popen[bytes]] = []
        peer: OrthancPeer | None = None
        try:
            if target == "pacslab":
                port, procs = _pacslab(tmp_path / "pacslab", scp_port)
                aet = "PACSLAB"
            else:
                lua = tmp_path / "route.lua"
                lua.write_text("function OnStoredInstance(instanceId, tags, metadata, origin)\n"
                               "  SendToModality(instanceId, 'STORESCP')\nend\n")
                peer = OrthancPeer(tmp_path / "orthanc", modalities={
                    "STORESCP": ["STORESCP", "127.0.0.1", scp_port]},
                    extra={"LuaScripts": [str(lua)]}).start()
                port, aet = peer.dicom_port, "ORTHANC"
            started = time.perf_counter()
            subprocess.run([shutil.which("storescu") or "storescu", "-aec", aet, "+sd",
                            "127.0.0.1", str(port), str(tmp_path / "ct")], check=True,
                           capture_output=True, timeout=3600,
                           env={**os.environ, "TCP_NODELAY": "1"})
            finished = _wait_files(out, len(files), timeout=1800)
            rates[target] = len(files) / (finished - started)
            record(f"forwarding {n} CT to storescp", target, rates[target], "instances/s")
        finally:
            for proc in procs:
                _kill(proc)
            if peer is not None:
                peer.stop()
            scp.terminate()
            scp.wait(timeout=10)
    benchmark.extra_info.update(
        case=f"forwarding of a {n}-instance CT to storescp (ingest included)",
        pacslab=round(rates["pacslab"], 1), anchor=round(rates["orthanc"], 1),
        ratio=round(rates["pacslab"] / rates["orthanc"], 2),
        target="throughput reported; anchor Orthanc Lua SendToModality",
    )
    benchmark(lambda: None)
