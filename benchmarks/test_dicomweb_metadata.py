"""WADO-RS series ``/metadata`` for a 500-instance CT series (target: < 100 ms).

The series is stored through the durable path (``stage_part10`` → ``Archive.accept``),
then the instance job's metadata step fills ``instances.metadata_json``, so the
endpoint answers from one index query (PS3.18 10.4.1.1.2). Measured in-process with
TestClient, over uvicorn on loopback and, side by side, Orthanc with its DICOMweb
plugin when Debian's ``orthanc-dicomweb`` is installed (skipped otherwise).

``--benchmark-disable`` (the default ``addopts``) makes this a smoke run: 40 instances,
each benchmark executed once; ``./run bench --quick`` measures 40 instances.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread

from api.app import create_app
from benchmarks.support import Goal, per_round, quick, record
from core.instance import metadata_json
from core.settings import Settings
from core.synthetic import ct_series
from storage.index.sql import SqlIndex
from storage.staging import stage_part10
from tests.support import free_port


def _slices(request: pytest.FixtureRequest) -> int:
    disabled = request.config.getoption("benchmark_disable", default=True)
    enabled = request.config.getoption("benchmark_enable", default=False)
    return 40 if (disabled and not enabled) or quick() else 500


def _record(benchmark: Any, target: str, n: int, goal: Goal | None = None) -> None:
    """The round times (ms) of one of the three servers, under one case."""
    if benchmark.stats is None:
        return
    ms = [t * 1000 for t in benchmark.stats.stats.data]  # one request per round
    # the requests in order, in five slices: the median of each (one slow request
    # would otherwise be the whole spread)
    record(f"WADO-RS series metadata, {n} instances, median ms", target,
           benchmark.stats.stats.median * 1000, "ms", samples=ms,
           rounds=per_round(ms, 5, statistics.median), goal=goal)


@pytest.fixture
def stored_series(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, str, str, Path, int]]:
    n = _slices(request)
    for key in [k for k in os.environ if k.startswith("PACSLAB_")]:
        monkeypatch.delenv(key)
    # Authentication is measured by its own tests; here only the metadata path counts.
    cfg = Settings(data_dir=tmp_path / "data", storage={"fsync": False}, auth={"enabled": False})
    SqlIndex(cfg.index).close()
    app = create_app(cfg)
    archive, index = app.state.archive, app.state.index
    files = tmp_path / "series"
    files.mkdir()
    study = series = ""
    for i, ds in enumerate(ct_series(n, 16, 16)):
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        path = files / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with path.open("rb") as fp:
            archive.accept(stage_part10(archive.staging_dir(), fp, fsync=False), calling_ae="BENCH")
    # the instance job's metadata step (pacslab/worker_process.py)
    for inst in list(index.iter_instances()):
        with archive.originals.open(inst.blob_key) as fp:
            meta = metadata_json(dcmread(fp, defer_size=1024))
        index.set_metadata_json(inst.sop_instance_uid, inst.blob_key, meta)
    yield TestClient(app), study, series, files, n
    archive.close()
    index.close()


def test_series_metadata_pacslab(benchmark: Any, stored_series: Any) -> None:
    client, study, series, _files, n = stored_series
    url = f"/dicomweb/studies/{study}/series/{series}/metadata"

    def fetch() -> bytes:
        r = client.get(url)
        assert r.status_code == 200
        return bytes(r.content)

    body = benchmark(fetch)
    items = json.loads(body)
    assert len(items) == n
    assert items[0]["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")
    _record(benchmark, "pacslab (in-process)", n, Goal("<", 100.0))
    if benchmark.enabled:
        assert benchmark.stats.stats.median < 0.100, "series /metadata over 100 ms"


@pytest.mark.network
def test_series_metadata_pacslab_http(benchmark: Any, stored_series: Any) -> None:
    """The same over uvicorn on loopback, to compare with Orthanc on equal terms."""
    import threading

    import uvicorn

    client, study, series, _files, n = stored_series
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(client.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/dicomweb/studies/{study}/series/{series}/metadata"

        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=30) as r:
                return bytes(r.read())

        assert len(json.loads(benchmark(fetch))) == n
        _record(benchmark, "pacslab", n)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[str]:
    exe = shutil.which("Orthanc")
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if exe is None or not plugin.exists():
        pytest.skip("Orthanc with the DICOMweb plugin not installed (Debian orthanc-dicomweb)")
    http, dicom = free_port(), free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(tmp_path / "orthanc"),
        "IndexDirectory": str(tmp_path / "orthanc"),
        "HttpPort": http,
        "DicomPort": dicom,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    cfg = tmp_path / "orthanc.json"
    cfg.write_text(json.dumps(config))
    proc = subprocess.Popen([exe, str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/system", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.network
def test_series_metadata_orthanc(benchmark: Any, stored_series: Any, orthanc: str) -> None:
    _client, study, series, files, n = stored_series
    for path in sorted(files.iterdir()):
        req = urllib.request.Request(f"{orthanc}/instances", data=path.read_bytes(), method="POST")
        urllib.request.urlopen(req, timeout=30).read()
    url = f"{orthanc}/dicom-web/studies/{study}/series/{series}/metadata"

    def fetch() -> bytes:
        with urllib.request.urlopen(url, timeout=30) as r:
            return bytes(r.read())

    assert len(json.loads(benchmark(fetch))) == n
    _record(benchmark, "orthanc", n)
