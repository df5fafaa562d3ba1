"""Mixed load on one ``pacslab serve`` over loopback (issue #8 §6).

For a bounded time: 4 modalities send series with DCMTK ``storescu`` (each a loop of
associations), 1 Modality Worklist C-FIND per second with pynetdicom (skipped cleanly
when the SCP does not offer MWL on this branch), and N viewers reading the HTTP API
(``/health`` and ``/metrics``: tiles and DICOMweb are not on this branch). Reported:
C-STORE throughput and p99 latency, C-FIND and HTTP p99s, the service's memory
high-water mark (all its processes, sampled with psutil) and loss: every instance a
``storescu`` was told was stored must be in the index (asserted: zero).

With --benchmark-enable: 60 s (``PACSLAB_LOAD_SECONDS``), 20 viewers. Without it
(the normal suite) a 5 s smoke run with 2 viewers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from benchmarks.support import record
from core.synthetic import write_ct_series

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    acknowledged: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(kind, []).append(seconds)

    def count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1


_SENDING = re.compile(r"I: Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+?)\)")


def _modality(port: int, folders: list[Path], uid_of: dict[Path, str], stats: Stats,
              stop: threading.Event, aet: str) -> None:
    storescu = shutil.which("storescu") or "storescu"
    i = 0
    while not stop.is_set():
        folder = folders[i % len(folders)]
        i += 1
        proc = subprocess.Popen([storescu, "-v", "-aet", aet, "+sd", "127.0.0.1", str(port),
                                 str(folder)], stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True,
                                env={**os.environ, "TCP_NODELAY": "1"})
        assert proc.stderr is not None
        current: Path | None = None
        sent_at = 0.0
        for line in proc.stderr:
            if (m := _SENDING.search(line)) is not None:
                current, sent_at = Path(m.group(1).strip()).resolve(), time.perf_counter()
            elif (m := _RESPONSE.search(line)) is not None and current is not None:
                stats.add("c-store", time.perf_counter() - sent_at)
                if m.group(1) == "Success":
                    with stats.lock:
                        stats.acknowledged.add(uid_of[current])
                    stats.count("c-store ok")
                else:
                    stats.count(f"c-store {m.group(1)}")
                current = None
        if proc.wait() != 0:
            stats.count("storescu failed")


def _worklist(port: int, stats: Stats, stop: threading.Event) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityWorklistInformationFind

    ae = AE(ae_title="LOADMWL")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ModalityWorklistInformationFind)
    query = Dataset()
    query.PatientName = "*"
    query.ScheduledProcedureStepSequence = [Dataset()]
    query.ScheduledProcedureStepSequence[0].Modality = "CT"
    while not stop.wait(1.0):
        started = time.perf_counter()
        assoc = ae.associate("127.0.0.1", port)
        if not assoc.is_established or not any(
                cx.abstract_syntax == ModalityWorklistInformationFind
                for cx in assoc.accepted_contexts):
            stats.count("worklist not offered by the SCP (skipped)")
            if assoc.is_established:
                assoc.release()
            return
        try:
            for status, _ in assoc.send_c_find(query, ModalityWorklistInformationFind):
                if status is None or status.Status not in (0xFF00, 0xFF01):
                    break
            stats.add("c-find", time.perf_counter() - started)
            stats.count("c-find")
        finally:
            assoc.release()


def _viewer(base: str, stats: Stats, stop: threading.Event) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=10) as client:
        n = 0
        while not stop.is_set():
            path = "/health" if n % 2 == 0 else "/metrics"
            n += 1
            started = time.perf_counter()
            try:
                response = client.get(path)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            stats.add(f"http {path}", time.perf_counter() - started)
            stats.count(f"http {'ok' if ok else 'error'}")


def _memory(pid: int, stop: threading.Event, peak: list[int]) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.wait(0.25):
        try:
            procs = [root, *root.children(recursive=True)]
            total = sum(p.memory_info().rss for p in procs if p.is_running())
        except psutil.Error:
            continue
        peak[0] = max(peak[0], total)


def test_mixed_load(tmp_path: Path, measuring: bool) -> None:
    seconds = float(os.environ.get("PACSLAB_LOAD_SECONDS", "60")) if measuring else 5.0
    viewers = 20 if measuring else 2
    series_per_modality, slices, size = (20, 40, 128) if measuring else (2, 8, 32)
    if shutil.which("storescu") is None:
        pytest.skip("DCMTK storescu not installed")
    from pydicom import dcmread

    folders: dict[str, list[Path]] = {}
    uid_of: dict[Path, str] = {}
    for modality in ("CT1", "CT2", "MR1", "DX1"):
        folders[modality] = []
        for n in range(series_per_modality):
            folder = tmp_path / "corpus" / modality / f"{n:03d}"
            for p in write_ct_series(folder, slices=slices, rows=size, columns=size):
                uid_of[p.resolve()] = str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            folders[modality].append(folder)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    dicom_port, http_port = _free_port(), _free_port()
    env.update(PACSLAB_DATA_DIR=str(tmp_path / "data"), PACSLAB_DICOM__HOST="127.0.0.1",
               PACSLAB_DICOM__PORT=str(dicom_port), PACSLAB_HTTP__HOST="127.0.0.1",
               PACSLAB_HTTP__PORT=str(http_port), PACSLAB_LOG__LEVEL="WARNING",
               # viewers here carry no token; authentication has its own tests
               PACSLAB_AUTH__ENABLED="false")
    service = subprocess.Popen([sys.executable, "-m", "pacslab", "serve"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert service.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)

        stats = Stats()
        stop = threading.Event()
        peak = [0]
        threads = [threading.Thread(target=_modality, args=(dicom_port, fs, uid_of, stats,
                                                            stop, aet))
                   for aet, fs in folders.items()]
        threads.append(threading.Thread(target=_worklist, args=(dicom_port, stats, stop)))
        threads += [threading.Thread(target=_viewer, args=(base, stats, stop))
                    for _ in range(viewers)]
        sampler = threading.Thread(target=_memory, args=(service.pid, stop, peak))
        started = time.perf_counter()
        for t in [*threads, sampler]:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in [*threads, sampler]:
            t.join(timeout=120)
        elapsed = time.perf_counter() - started
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)

    from core.settings import IndexSettings
    from storage.index.sql import SqlIndex

    index = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path / 'data' / 'index.db'}",
                                   migrate=False))
    lost = [uid for uid in stats.acknowledged if not index.instance_versions(uid)]
    indexed = index.counts()["instances"]
    index.close()

    stores = stats.counts["c-store ok"]
    http = [v for k, v in stats.latencies.items() if k.startswith("http") for v in v]
    lines = {
        "seconds": round(elapsed, 1),
        "c-store/s": round(stores / elapsed, 1),
        "c-store p50 ms": round(_p(stats.latencies.get("c-store", []), 0.5) * 1e3, 1),
        "c-store p99 ms": round(_p(stats.latencies.get("c-store", []), 0.99) * 1e3, 1),
        "c-find/s": round(stats.counts["c-find"] / elapsed, 2),
        "c-find p99 ms": round(_p(stats.latencies.get("c-find", []), 0.99) * 1e3, 1),
        "http req/s": round(len(http) / elapsed, 1),
        "http p99 ms": round(_p(http, 0.99) * 1e3, 1),
        "memory high-water MiB": round(peak[0] / 2**20, 1),
        "acknowledged": len(stats.acknowledged),
        "indexed": indexed,
        "lost": len(lost),
    }
    print("\nload:", lines, dict(stats.counts))
    record("load: C-STORE (4 modalities)", "pacslab", lines["c-store/s"], "instances/s")
    record("load: C-STORE p99", "pacslab", lines["c-store p99 ms"], "ms")
    record("load: HTTP p99", "pacslab", lines["http p99 ms"], "ms")
    record("load: memory high-water", "pacslab", lines["memory high-water MiB"], "MiB")
    if stats.latencies.get("c-find"):
        record("load: C-FIND p99", "pacslab", lines["c-find p99 ms"], "ms")
    assert stores > 0 and stats.counts["http ok"] > 0
    assert stats.counts["http error"] == 0
    assert lost == [], f"{len(lost)} acknowledged instances not in the index"
