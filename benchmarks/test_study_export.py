"""Study export to ZIP (issue 17.3): MB/s of ``pacslab serve``'s ``GET /export/studies/{uid}``
beside Orthanc's ``/studies/{id}/archive`` (and ``/media``, its ZIP with a DICOMDIR,
the same product as ours) on the same 500-instance CT, in interleaved rounds.

Both servers receive the study over C-STORE (DCMTK ``storescu``) first. pacslab runs
as ``pacslab serve`` (all services) with the series job held back
(``processing.series_quiet_s``), so no pyramid is built while the exports are timed;
the instance jobs are waited for. Each round downloads the whole archive over HTTP
on loopback and counts its bytes; MB/s is archive bytes / seconds (10^6 bytes).
``benchmark.extra_info`` has the figures, the archive sizes (Orthanc deflates its
archives, we store: the bytes differ), ``study_mb_per_s`` (the study's DICOM bytes per
second, the same numerator for all), ``ratio`` = pacslab / Orthanc ``/archive`` MB/s
and ``time_ratio`` = Orthanc ``/archive`` seconds / pacslab seconds.

Sizes: 500 slices of 512x512 (a chest CT, about 260 MB) when measuring; 20 slices
of 64x64 in a smoke run (``--benchmark-disable``, the default); ``./run bench
--quick``: 100 slices of 256x256.
"""

from __future__ import annotations

import io
import os
import signal
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.support import quick, record
from core.synthetic import write_ct_series
from tests.orthanc_peer import OrthancPeer
from tests.support import dcmtk, free_port

ROOT = Path(__file__).resolve().parent.parent


def _size(request: pytest.FixtureRequest) -> tuple[int, int, int]:
    """(slices, rows/columns, rounds)."""
    disabled = request.config.getoption("benchmark_disable", default=True)
    enabled = request.config.getoption("benchmark_enable", default=False)
    if disabled and not enabled:
        return 20, 64, 1
    if quick():
        return 100, 256, 2
    return 500, 512, 5


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    base: str
    dicom_port: int


def _start_serve(tmp_path: Path) -> Serve:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    dicom_port, http_port = free_port(), free_port()
    env.update(
        PACSLAB_DATA_DIR=str(tmp_path / "data"),
        PACSLAB_DICOM__HOST="127.0.0.1",
        PACSLAB_DICOM__PORT=str(dicom_port),
        PACSLAB_HTTP__HOST="127.0.0.1",
        PACSLAB_HTTP__PORT=str(http_port),
        PACSLAB_ORDERS__MLLP_PORT=str(free_port()),
        PACSLAB_LOG__LEVEL="WARNING",
        PACSLAB_AUTH__ENABLED="false",
        # No pyramid build while exports are timed (the series job waits this long).
        PACSLAB_PROCESSING__SERIES_QUIET_S="86400",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacslab", "serve"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return Serve(proc, base, dicom_port)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("pacslab serve did not start")
        time.sleep(0.2)


def _stop_serve(serve: Serve) -> None:
    os.killpg(serve.proc.pid, signal.SIGTERM)
    try:
        serve.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(serve.proc.pid, signal.SIGKILL)
        serve.proc.wait()


def _storescu(port: int, folder: Path) -> None:
    subprocess.run(
        [dcmtk("storescu"), "-aec", "ANY", "+sd", "127.0.0.1", str(port), str(folder)],
        check=True,
        capture_output=True,
        timeout=600,
    )


def _gauge(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _download(client: httpx.Client, url: str) -> tuple[float, int]:
    """Seconds and bytes of one whole archive download."""
    began = time.perf_counter()
    size = 0
    with client.stream("GET", url) as rsp:
        assert rsp.status_code == 200, rsp.status_code
        for chunk in rsp.iter_raw(1 << 20):
            size += len(chunk)
    return time.perf_counter() - began, size


@pytest.fixture
def servers(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Serve, OrthancPeer, str, str, int, int, int]]:
    slices, size, rounds = _size(request)
    files = write_ct_series(tmp_path / "ct", slices=slices, rows=size, columns=size)
    from pydicom import dcmread

    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    orthanc = OrthancPeer(tmp_path / "orthanc").start()
    serve = _start_serve(tmp_path)
    try:
        _storescu(serve.dicom_port, tmp_path / "ct")
        _storescu(orthanc.dicom_port, tmp_path / "ct")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the instance jobs (metadata) are done
            if (
                _gauge(serve.base, "pacslab_jobs_running") == 0
                and _gauge(serve.base, "pacslab_jobs_pending") <= 1
            ):  # the held-back series job
                break
            time.sleep(0.5)
        (found,) = orthanc.post("/tools/lookup", study.encode())
        study_bytes = sum(f.stat().st_size for f in files)
        yield serve, orthanc, study, str(found["ID"]), slices, rounds, study_bytes
    finally:
        _stop_serve(serve)
        orthanc.stop()


@pytest.mark.network
@pytest.mark.timeout(3600)  # a measured run stores 260 MB twice and downloads it 15 times
def test_study_export_zip(benchmark: Any, servers: Any, tmp_path: Path) -> None:
    serve, orthanc, study, orthanc_id, slices, rounds, study_bytes = servers
    targets = {
        "pacslab": f"{serve.base}/export/studies/{study}",
        "orthanc /archive": f"{orthanc.base}/studies/{orthanc_id}/archive",
        "orthanc /media": f"{orthanc.base}/studies/{orthanc_id}/media",
    }
    client = httpx.Client(timeout=600)
    # Once, outside the timing: each archive is a whole ZIP with every instance.
    for name, url in targets.items():
        began = time.perf_counter()
        body = client.get(url).content
        print(f"{name}: first download {time.perf_counter() - began:.1f} s", flush=True)
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            dicom = [n for n in names if not n.upper().endswith("DICOMDIR")]
            assert len(dicom) == slices, (name, len(names))
            if name != "orthanc /archive":
                assert any(n.upper().endswith("DICOMDIR") for n in names), name
    seconds: dict[str, list[float]] = {name: [] for name in targets}
    sizes: dict[str, int] = {}

    def one_round() -> None:
        for name, url in targets.items():
            took, size = _download(client, url)
            seconds[name].append(took)
            sizes[name] = size

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    client.close()
    mbps: dict[str, float] = {}
    for name, times in seconds.items():
        mbps[name] = sizes[name] / statistics.median(times) / 1e6
        benchmark.extra_info[name] = {
            "mb_per_s": round(mbps[name], 1),
            # the same study for every target: Orthanc deflates, so its archive is smaller
            "study_mb_per_s": round(study_bytes / statistics.median(times) / 1e6, 1),
            "archive_bytes": sizes[name],
            "rounds_s": [round(t, 3) for t in times],
        }
        record(
            f"Study export to ZIP, {slices} CT instances, MB/s",
            name,
            mbps[name],
            "MB/s",
            rounds=[sizes[name] / t / 1e6 for t in times],
            interleaved=True,
        )
    benchmark.extra_info["instances"] = slices
    benchmark.extra_info["ratio"] = round(mbps["pacslab"] / mbps["orthanc /archive"], 2)
    benchmark.extra_info["ratio_media"] = round(mbps["pacslab"] / mbps["orthanc /media"], 2)
    # By time for the same study (compression aside): Orthanc /archive seconds / ours.
    benchmark.extra_info["time_ratio"] = round(
        statistics.median(seconds["orthanc /archive"]) / statistics.median(seconds["pacslab"]), 2
    )
    print(
        {k: round(v, 1) for k, v in mbps.items()},
        "ratio",
        benchmark.extra_info["ratio"],
    )
