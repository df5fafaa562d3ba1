"""Mixed load on one ``pacslab serve`` over loopback (issue #8 §6).

For a bounded time, with authentication ON (bearer tokens from the embedded issuer,
``pacslab token``, as an operator gets them):

- 4 modalities send series with DCMTK ``storescu`` (each a loop of associations);
- 2 analyzers drop real captures into the lab inbox (HL7 v2 and ASTM, from
  ``tests/data/lab``, origin and license in its SOURCES.md; each drop with a fresh
  message control id, see ``tests/ingest/labs/_analyzer.py``), each waiting until its file
  is filed before the next, as analyzer middleware does;
- 1 Modality Worklist C-FIND per second (pynetdicom);
- N viewers read IIIF tiles of the converted series (scrolling through slices, now
  and then with a window of their own, which must be rendered), and a monitor
  scrapes ``/metrics`` once a second.

Reported: throughput and p99 latency of each (C-STORE, lab drop → filed, C-FIND,
tiles), the service's memory high-water mark (all its processes, sampled with
psutil) and loss: every instance a ``storescu`` was told was stored must be in the
index, every lab file filed in ``processed/`` must be journaled with its results
(asserted: zero lost, zero HTTP errors).

With --benchmark-enable: 300 s (``PACSLAB_LOAD_SECONDS``), 20 viewers. Without it
(the normal suite) a 5 s smoke run with 2 viewers; ``./run bench --quick``: 20 s with
4 viewers on the smoke corpus.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from benchmarks.support import per_round, quick, record
from core.synthetic import write_ct_series
from tests.ingest.labs._analyzer import drop, drops
from tests.support import free_port
from tests.worklist.order_requests import service_request

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[1]


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

    def count(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.counts[kind] += n


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
            matches = 0
            for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
                if status is None or status.Status not in (0xFF00, 0xFF01):
                    break
                matches += identifier is not None
            stats.add("c-find", time.perf_counter() - started)
            stats.count("c-find")
            stats.count("c-find matches", matches)
        finally:
            assoc.release()


def _stacks(client: Any) -> list[dict[str, Any]]:
    """Converted stacks as the viewer lists them: versioned image ids (immutable tiles)."""
    out = []
    for study in client.get("/viewer/api/studies").json():
        for item in client.get(f"/viewer/api/studies/{study['study_instance_uid']}/series").json():
            for stack in item["stacks"]:
                plane = stack["default_plane"]
                out.append({"id": stack["id"], "plane": plane,
                            "depth": stack["planes"][plane]["depth"]})
    return out


def _viewer(base: str, token: str, stats: Stats, stop: threading.Event, seed: int) -> None:
    """Scroll through the slices of one converted stack after another, tile by tile."""
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=10,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        stacks: list[dict[str, Any]] = []
        while not stop.is_set():
            if not stacks or rng.random() < 0.05:  # the study list is refreshed now and then
                try:
                    stacks = _stacks(client)
                except (httpx.HTTPError, ValueError):
                    stats.count("http error")
                    stats.count("viewer list failed")
                    stop.wait(0.5)
                    continue
                if not stacks:
                    stop.wait(0.2)
                    continue
            stack = rng.choice(stacks)
            # A window of the viewer's own for one stack in five: tiles are rendered.
            window = ""
            if rng.random() < 0.2:
                window = f":{rng.randint(0, 400)},{rng.randint(200, 2000)}"
            for z in range(stack["depth"]):
                if stop.is_set():
                    break
                path = (f"/iiif/{stack['id']}:{stack['plane']}:{z}{window}"
                        "/full/max/0/default.png")
                started = time.perf_counter()
                try:
                    response = client.get(path)
                    ok = response.status_code == 200
                    if not ok:
                        stats.count(f"tile HTTP {response.status_code}")
                except httpx.HTTPError as exc:
                    ok = False
                    stats.count(f"tile {type(exc).__name__}")
                stats.add("tile", time.perf_counter() - started)
                stats.count("tile ok" if ok else "tile error")
                stats.count(f"http {'ok' if ok else 'error'}")


def _monitor(base: str, token: str, stats: Stats, stop: threading.Event) -> None:
    """A metrics scrape per second (admin token), as a monitoring system does."""
    import httpx

    with httpx.Client(base_url=base, timeout=10,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        while not stop.wait(1.0):
            started = time.perf_counter()
            try:
                ok = client.get("/metrics").status_code == 200
            except httpx.HTTPError:
                ok = False
            stats.add("http /metrics", time.perf_counter() - started)
            stats.count(f"http {'ok' if ok else 'error'}")


def _analyzer(kind: str, inbox: Path, stats: Stats, stop: threading.Event,
              dropped: list[str]) -> None:
    """Drop a capture, wait until it is filed (processed/ or rejected/), pause, again."""
    for name, raw in drops(kind, f"L{kind[0].upper()}"):
        if stop.wait(0.5):
            return
        drop(inbox, name, raw)
        dropped.append(hashlib.sha256(raw).hexdigest())
        started = time.perf_counter()
        filed = (inbox / "processed" / name, inbox / "rejected" / name)
        while not any(p.exists() for p in filed):
            if time.perf_counter() - started > 30:
                stats.count("lab file not filed within 30 s")
                break
            time.sleep(0.005)
        else:
            stats.add("lab", time.perf_counter() - started)
            stats.count("lab processed" if filed[0].exists() else "lab rejected")


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


def _token(env: dict[str, str], *scopes: str) -> str:
    """A bearer token from the service's embedded issuer, as an operator gets one."""
    out = subprocess.run([sys.executable, "-m", "pacslab", "token", "--subject", "load-test",
                          "--scopes", *scopes], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60)
    return out.stdout.strip()


def _send_and_convert(port: int, folder: Path, base: str, token: str) -> None:
    """Send one series and wait until the viewer lists its pyramid: tiles to read from
    the first second of the load (a liveness bound, not a timing assertion)."""
    import httpx

    storescu = shutil.which("storescu") or "storescu"
    subprocess.run([storescu, "+sd", "127.0.0.1", str(port), str(folder)], check=True,
                   capture_output=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"})
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=base, timeout=10,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        while not _stacks(client):
            assert time.monotonic() < deadline, "the first series was never converted"
            time.sleep(0.2)


LOAD_SECONDS = float(os.environ.get("PACSLAB_LOAD_SECONDS", "300"))


@pytest.mark.timeout(int(LOAD_SECONDS) + 600)  # the corpus, start-up and the final checks
def test_mixed_load(tmp_path: Path, measuring: bool) -> None:
    full = measuring and not quick()
    seconds = LOAD_SECONDS if full else 20.0 if measuring else 5.0
    viewers = 20 if full else 4 if measuring else 2
    series_per_modality, slices, size = (20, 40, 128) if full else (2, 8, 32)
    orders = 200 if full else 10
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
    seed = tmp_path / "corpus" / "seed"
    write_ct_series(seed, slices=slices, rows=size, columns=size)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    dicom_port, http_port = free_port(), free_port()
    env.update(PACSLAB_DATA_DIR=str(tmp_path / "data"), PACSLAB_DICOM__HOST="127.0.0.1",
               PACSLAB_DICOM__PORT=str(dicom_port), PACSLAB_HTTP__HOST="127.0.0.1",
               PACSLAB_HTTP__PORT=str(http_port), PACSLAB_LOG__LEVEL="WARNING",
               PACSLAB_ORDERS__MLLP_PORT=str(free_port()),  # not the shared default 2575
               PACSLAB_AUTH__ENABLED="true",
               # series go quiet within the run, so that viewers get new pyramids
               PACSLAB_PROCESSING__SERIES_QUIET_S="2")
    service = subprocess.Popen([sys.executable, "-m", "pacslab", "serve"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    inbox = tmp_path / "data" / "inbox" / "lab" / "auto"
    dropped: list[str] = []
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
        viewer_token = _token(env, "imaging.read")
        monitor_token = _token(env, "admin")
        _send_and_convert(dicom_port, seed, base, viewer_token)
        # Orders for the worklist to answer from (FHIR, as the record system places them).
        orders_token = _token(env, "orders.write")
        with httpx.Client(base_url=base, timeout=30,
                          headers={"Authorization": f"Bearer {orders_token}"}) as http:
            for n in range(orders):
                # half CT on CT1, half MR on MR1
                modality = ("CT", "MR")[n % 2]
                order = service_request(f"LOAD-{n:05d}", patient_id=f"LOAD{n:05d}",
                                        modality=modality, station=f"{modality}1")
                r = http.post("/fhir/ServiceRequest", json=order)
                assert r.status_code == 201, r.text

        stats = Stats()
        stop = threading.Event()
        peak = [0]
        threads = [threading.Thread(target=_modality, args=(dicom_port, fs, uid_of, stats,
                                                            stop, aet))
                   for aet, fs in folders.items()]
        threads += [threading.Thread(target=_analyzer, args=(kind, inbox, stats, stop, dropped))
                    for kind in ("hl7", "astm")]
        threads.append(threading.Thread(target=_worklist, args=(dicom_port, stats, stop)))
        threads += [threading.Thread(target=_viewer, args=(base, viewer_token, stats, stop, n))
                    for n in range(viewers)]
        threads.append(threading.Thread(target=_monitor, args=(base, monitor_token, stats, stop)))
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
    from storage.index.lab import SqlLabStore
    from storage.index.sql import SqlIndex

    index = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path / 'data' / 'index.db'}",
                                   migrate=False))
    lost = [uid for uid in stats.acknowledged if not index.instance_versions(uid)]
    indexed = index.counts()["instances"]
    # Every lab file the watcher filed as processed is journaled with its results.
    lab = SqlLabStore(index)
    lab_files = lab_results = 0
    lab_lost = []
    for path in (inbox / "processed").iterdir():
        if path.name.endswith(".summary.json"):
            continue
        state = lab.file_state(hashlib.sha256(path.read_bytes()).hexdigest())
        if state is None or state.status != "filed" or state.result_count < 1:
            lab_lost.append(path.name)
        else:
            lab_files += 1
            lab_results += state.result_count
    index.close()

    def p99_ms(kind: str) -> float:
        return round(_p(stats.latencies.get(kind, []), 0.99) * 1e3, 1)

    stores = stats.counts["c-store ok"]
    tiles = stats.counts["tile ok"]
    lines = {
        "seconds": round(elapsed, 1),
        "c-store/s": round(stores / elapsed, 1),
        "c-store p50 ms": round(_p(stats.latencies.get("c-store", []), 0.5) * 1e3, 1),
        "c-store p99 ms": p99_ms("c-store"),
        "lab files/s": round(lab_files / elapsed, 2),
        "lab results/s": round(lab_results / elapsed, 1),
        "lab drop-to-filed p99 ms": p99_ms("lab"),
        "c-find/s": round(stats.counts["c-find"] / elapsed, 2),
        "c-find p99 ms": p99_ms("c-find"),
        "tiles/s": round(tiles / elapsed, 1),
        "tile p50 ms": round(_p(stats.latencies.get("tile", []), 0.5) * 1e3, 1),
        "tile p99 ms": p99_ms("tile"),
        "metrics p99 ms": p99_ms("http /metrics"),
        "memory high-water MiB": round(peak[0] / 2**20, 1),
        "acknowledged": len(stats.acknowledged),
        "indexed": indexed,
        "lab dropped": len(dropped),
        "lab processed": lab_files,
        "lost": len(lost) + len(lab_lost),
    }
    print("\nload:", lines, dict(stats.counts))
    def record_p99(case: str, kind: str) -> None:
        # the latencies in the order measured, in five parts: the p99 of each part
        ms = [t * 1e3 for t in stats.latencies.get(kind, [])]
        record(case, "pacslab", p99_ms(kind), "ms", samples=ms,
               rounds=per_round(ms, 5, lambda v: _p(v, 0.99)))

    record("load: C-STORE (4 modalities)", "pacslab", lines["c-store/s"], "instances/s")
    record_p99("load: C-STORE p99", "c-store")
    record("load: lab files (2 analyzers)", "pacslab", lines["lab files/s"], "files/s")
    record_p99("load: lab drop-to-filed p99", "lab")
    record(f"load: tiles ({viewers} viewers)", "pacslab", lines["tiles/s"], "tiles/s")
    record_p99("load: tile p99", "tile")
    record("load: HTTP p99", "pacslab", p99_ms("tile"), "ms")
    record("load: memory high-water", "pacslab", lines["memory high-water MiB"], "MiB")
    if stats.latencies.get("c-find"):
        record_p99("load: C-FIND p99", "c-find")
    assert stores > 0 and stats.counts["http ok"] > 0
    assert tiles > 0 and stats.counts["lab processed"] > 0
    assert stats.counts["http error"] == 0, dict(stats.counts)
    if stats.counts["c-find"]:  # every query answers the CT half of the seeded orders
        assert stats.counts["c-find matches"] == stats.counts["c-find"] * (orders // 2)
    assert stats.counts["lab file not filed within 30 s"] == 0
    assert lost == [], f"{len(lost)} acknowledged instances not in the index"
    assert lab_lost == [], f"lab files filed without their results: {lab_lost}"
