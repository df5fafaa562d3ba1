"""A provincial hospital's archive under ``pacslab serve`` (issue 21).

The index is filled through the receiver's own call (``SqlIndex.add_instances``, in
batches of 5,000) with realistic studies: 1-4 series of 20-300 instances, Vietnamese
patient names, a DICOM JSON header per instance. The archive is then put in the state
a running service leaves it: instance jobs done, series rolled up, finished instance
jobs older than a day pruned (the newest 25,000 kept, one day's worth). Then, with
``pacslab serve`` running on that index, it measures:

* idle CPU of the whole service (all its processes), % of one core;
* the receiver's index write (one instance per transaction, as a C-STORE), p50/p99, on
  an empty archive (the anchor: a file of its own on SQLite, a database of its own on
  the same server on PostgreSQL), on the filled one with the service idle, and on the
  filled one while ``READ_CLIENTS`` processes query QIDO-RS, FHIR, the viewer,
  ``/metrics`` and the worklist in a loop, and (``loaded_empty``, not a target) on the
  empty one while those clients query the filled one: ``WRITE_ROUNDS`` rounds, the
  conditions interleaved; pooled p99s, the rounds' median p99s and the ratios
  loaded/idle, idle/empty, loaded/empty and loaded/loaded_empty;
* p50/p99 of QIDO-RS ``PatientName=NGUY*``, ``PatientName=TRẦN*``,
  ``ModalitiesInStudy=CT``, a ``StudyDate`` range, the second page of the default
  listing, FHIR ``Patient?name=trần``, the viewer's study search and series panel,
  ``/metrics`` and a Modality Worklist C-FIND (``PatientName=TRẦN*``), one of each per
  round;
* index bytes per instance.

Size: ``PACSLAB_BENCH_SCALE_INSTANCES`` (default 2,000: the smoke run of the normal
suite; 1,000,000 for the issue's figures, 10,000,000 as the long run). Filling 1 M takes
5-10 minutes on a quiet machine, 22 minutes (1 M) and 31 minutes (2 M) at load 10-19 on
2026-12-03; 10 M took 17 minutes on SQLite and 76 on PostgreSQL, on a quiet machine. With
``PACSLAB_BENCH_SCALE_CACHE=DIR`` the filled SQLite file is kept in DIR
(``archive_scale_<n>_v<FILL_VERSION>.db``) and copied by later runs instead.
Backends: SQLite, and PostgreSQL when the test server of ``tests/conftest_pg.py`` can start.
Targets (issue 21), asserted with ``--benchmark-enable`` from 100,000 instances on:
write p99 within 2x of the empty archive, idle CPU < 2 % of a core, every request p99
< 50 ms, ``/metrics`` < 20 ms. The loaded write is held to the empty archive under the
same read load (``loaded_empty``), not to the quiet one: on two cores the clients take
the CPU the writer would have, whatever the archive's size (PostgreSQL, 100,000
instances, 2026-12-03: loaded 34.1 ms, loaded_empty 32.0, quiet empty 6.8; the old
comparison, loaded/empty, is still reported). SQLite missed it (same day, 100,000:
loaded 45.5 ms, loaded_empty 8.0; 194 against 77 on a busier hour): its loaded writes
waited for the write lock, taken by FHIR Patient reads (BEGIN IMMEDIATE) and held by
the in-process job worker, slowed by the API threads' hold on the GIL. After the fix
(deferred reads, one transaction per failed batch), same hour: 1.22 (measured with a
0.5 ms GIL switch interval in ``serve`` as well, 1.21 and 1.43; that change was not
kept: process-wide, for a small gain). The wait for the job worker's write
transactions is smaller but not gone at load 6-14: the worker belongs in a process of
its own. It has one since (pacslab/worker_process.py). On a quiet machine the same day
(load ~1, the benchmark's own), at 1 M instances, all targets were met on PostgreSQL
(requests p99 <= 17.4 ms, /metrics 11.5, loaded/loaded_empty 0.5); on SQLite the
loaded write stayed at 2.0-2.2x loaded_empty, 1.0x with the action log off: its
writer thread, in the API's process, held the write lock while it waited for the GIL.
The API's process now switches threads every 0.5 ms (0.7-0.8x, one run 2.2x). At 10 M
on SQLite (fill 17 min, 1,146 bytes per instance): idle CPU 1.2 %, /metrics p99 10.2
ms, loaded/loaded_empty 0.7; missed: idle write p99 4.0 ms against 1.6 empty (p50s
0.6 both), QIDO NGUY* p99 56 ms and the viewer's name search p99 108 ms (p50 15; its
page was every matching study sorted, now read among the newest studies first:
storage/index/queries.newest_window). Run again after that fix, from the cached file:
every target met (viewer search p99 8.9 ms, NGUY* 18.0, idle write 1.2 against 1.1).
At 10 M on PostgreSQL (2026-12-03, quiet machine; fill 76 min through the receiver's
call, 1,483 bytes per instance): every target met, the assertions passed. Idle CPU
0.8 %, write p99 idle/empty 4.2/3.2 ms (1.3x), loaded/loaded_empty 6.0/14.5 (0.4x),
requests p99 10.8-17.5 ms (QIDO NGUY* 12.9, page 2 17.1, viewer search 17.5),
/metrics 7.8 ms.
``benchmark.extra_info`` carries ``pacslab`` (the figures), ``anchor`` (the empty
archive's write p99) and ``target``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import text

from benchmarks.support import record
from core.instance import InstanceRecord
from core.settings import IndexSettings
from storage.abc import NewInstance
from storage.index.sql import SqlIndex
from tests.conftest_pg import (  # noqa: F401  (fixtures)
    admin_url,
    create_database,
    pg_server,
    pg_template,
    pg_url,
)
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
N_INSTANCES = int(os.environ.get("PACSLAB_BENCH_SCALE_INSTANCES", "2000"))
# Filling takes ~20 s per 100,000 instances here (2 shared cores), several times that
# when the machine is busy: the suite's 300 s timeout is for the smoke size only.
pytestmark = [pytest.mark.network,
              pytest.mark.timeout(max(300, 300 + N_INSTANCES // 400))]
BATCH = 5000
CACHE = os.environ.get("PACSLAB_BENCH_SCALE_CACHE", "")
#: Bump when generate() or fill() change what is indexed: cached files are refilled.
FILL_VERSION = 1
#: A two-week StudyDate range inside the generated archive (studies every 7 minutes
#: from 2026-01-01: 1 M instances span about 17 days).
DATE_RANGE = "20260105-20260112"
#: Interleaved write rounds (empty archive, filled archive idle, filled archive under
#: read load) and read-load client processes (QIDO-RS, FHIR, viewer, /metrics, MWL).
WRITE_ROUNDS = 5
#: Timed writes per condition (split over the rounds): the pooled p99 is the 15th
#: slowest of 1,500, not the 5th of 500 (one scheduler hiccup of this shared machine
#: moved that by 2x between runs).
WRITES = 1500
READ_CLIENTS = 2
TARGETS = {"write_p99_ratio": 2.0, "idle_cpu_pct": 2.0, "request_p99_ms": 50.0,
           "metrics_p99_ms": 20.0}

FAMILY = ["NGUYỄN", "TRẦN", "LÊ", "PHẠM", "HOÀNG", "HUỲNH", "PHAN", "VŨ", "VÕ", "ĐẶNG",
          "BÙI", "ĐỖ", "HỒ", "NGÔ", "DƯƠNG", "LÝ"]
# Rough frequencies: Nguyễn alone is about 38 % of Vietnamese family names.
FAMILY_WEIGHTS = [38, 11, 9.5, 7, 5.1, 5, 4.5, 3.9, 3.9, 2.1, 2, 1.4, 1.3, 1.3, 1, 0.5]
MIDDLE = ["VĂN", "THỊ", "HỮU", "ĐỨC", "NGỌC", "MINH", "THANH", "QUỐC", "XUÂN", "KIM"]
GIVEN = ["AN", "BÌNH", "LAN", "HÙNG", "DŨNG", "HƯƠNG", "THẢO", "TUẤN", "HẰNG", "PHƯƠNG",
         "LINH", "NAM", "HẢI", "TRANG", "QUÂN", "YẾN", "SƠN", "HÒA", "KHÁNH", "VY"]
MODALITIES = [("CT", 0.45, (80, 300)), ("MR", 0.2, (40, 200)), ("CR", 0.15, (1, 3)),
              ("US", 0.1, (10, 40)), ("DX", 0.1, (1, 4))]


def _header(template_len: int = 40) -> str:
    """A DICOM JSON header of realistic size (~2.5 KB) with per-instance values."""
    elements = {f"0008{i:04X}": {"vr": "LO", "Value": [f"VALUE {i} " * 4]}
                for i in range(0x1000, 0x1000 + template_len)}
    return json.dumps(elements, separators=(",", ":"), sort_keys=True)


_HEADER = _header()


def generate(n: int, seed: int = 21) -> Iterator[NewInstance]:
    """``n`` instances of realistic studies, in arrival order (series by series)."""
    rng = random.Random(seed)
    made = 0
    study = 0
    start = datetime(2026, 1, 1, tzinfo=UTC)
    patients = max(10, n // 600)  # returning patients: ~1.2 studies each
    while made < n:
        study += 1
        p = 0 if study == 1 else rng.randrange(patients)
        prng = random.Random(p)
        # Patient 0 (the first study's) is a TRẦN, so that even the smoke run's few
        # studies hold the name the sanity check searches for.
        family = "TRẦN" if p == 0 else prng.choices(FAMILY, FAMILY_WEIGHTS)[0]
        name = f"{family}^{prng.choice(MIDDLE)} {prng.choice(GIVEN)}"
        day = start + timedelta(minutes=study * 7)
        study_uid = f"1.2.826.0.1.3680043.10.21.{study}"
        modality, _, (lo, hi) = rng.choices(MODALITIES, [m[1] for m in MODALITIES])[0]
        for s in range(1, rng.randint(1, 4) + 1):
            series_uid = f"{study_uid}.{s}"
            for i in range(1, rng.randint(lo, hi) + 1):
                if made >= n:
                    return
                sop = f"{series_uid}.{i}"
                rec = InstanceRecord(
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=sop,
                    study_instance_uid=study_uid, series_instance_uid=series_uid,
                    transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id=f"BN{p:07d}",
                    patient_name=name, patient_birth_date=f"19{50 + p % 50}0101",
                    patient_sex="MF"[p % 2], study_date=day.strftime("%Y%m%d"),
                    study_time=day.strftime("%H%M%S"), accession_number=f"ACC{study:09d}",
                    study_id=str(study % 100000), study_description=f"{modality} STUDY",
                    institution_name="BENH VIEN TINH", modality=modality, series_number=s,
                    series_description=f"{modality} SERIES {s}", instance_number=i,
                    rows=512, columns=512, bits_allocated=16,
                    photometric_interpretation="MONOCHROME2")
                meta = _HEADER.replace("VALUE 4096", sop, 1)
                yield NewInstance(record=rec, blob_key=f"{made:064x}", size=526_000,
                                  calling_ae="CT1", received_at=day, metadata_json=meta)
                made += 1


def fill(index: SqlIndex, n: int) -> float:
    """Index ``n`` instances through ``add_instances``; then the steady state a running
    service reaches (jobs done, series rolled up, old finished jobs pruned). Seconds."""
    started = time.perf_counter()
    batch: list[NewInstance] = []
    for item in generate(n):
        batch.append(item)
        if len(batch) == BATCH:
            index.add_instances(batch)
            batch = []
    index.add_instances(batch)
    with index.write() as conn:
        conn.execute(text("UPDATE jobs SET status = 'done' WHERE status = 'pending'"))
        conn.execute(text("UPDATE series SET rollup_due_at = NULL"))
        conn.execute(text(
            "DELETE FROM jobs WHERE kind = 'instance' AND id <= "
            "(SELECT coalesce(max(id), 0) - 25000 FROM jobs)"))
    if index.is_sqlite:
        raw = index.engine.raw_connection()  # autocommit: no BEGIN around these
        try:
            raw.driver_connection.execute("ANALYZE")  # type: ignore[union-attr]
            raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]
        finally:
            raw.close()
    else:
        with index.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    return time.perf_counter() - started


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def write_times(index: SqlIndex, n: int, tag: str, skip: int = 0) -> list[float]:
    """Seconds of ``n`` single-instance add_instances calls (a C-STORE's index write),
    the ``skip`` first instances of ``tag``'s sequence left out (already written)."""
    out = []
    for k, item in enumerate(generate(skip + n, seed=99)):
        if k < skip:
            continue
        # A content key of its own per instance (the tag and the key cut to 64
        # characters made every key of a tag the same).
        key = hashlib.sha256(f"{tag}{item.blob_key}".encode()).hexdigest()
        fresh = NewInstance(record=_with_prefix(item.record, tag),
                            blob_key=key, size=item.size,
                            calling_ae="CT1", received_at=datetime.now(UTC),
                            metadata_json=item.metadata_json)
        t = time.perf_counter()
        index.add_instances([fresh])
        out.append(time.perf_counter() - t)
    return out


def _with_prefix(rec: InstanceRecord, tag: str) -> InstanceRecord:
    from dataclasses import replace

    return replace(rec, sop_instance_uid=f"9.{tag}.{rec.sop_instance_uid}",
                   series_instance_uid=f"9.{tag}.{rec.series_instance_uid}",
                   study_instance_uid=f"9.{tag}.{rec.study_instance_uid}")


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    base: str
    dicom_port: int

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def cpu_pct(self, seconds: float) -> float:
        procs = self.tree()

        def total() -> float:
            s = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    s += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            return s

        before = total()
        time.sleep(seconds)
        return (total() - before) / seconds * 100


def start_serve(tmp_path: Path, index_url: str) -> Service:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    dicom_port, http_port = free_port(), free_port()
    env.update(PACSLAB_DATA_DIR=str(tmp_path / "data"), PACSLAB_INDEX__URL=index_url,
               PACSLAB_DICOM__HOST="127.0.0.1", PACSLAB_DICOM__PORT=str(dicom_port),
               PACSLAB_HTTP__HOST="127.0.0.1", PACSLAB_HTTP__PORT=str(http_port),
               PACSLAB_ORDERS__MLLP_PORT=str(free_port()), PACSLAB_LOG__LEVEL="WARNING",
               PACSLAB_AUTH__ENABLED="false")
    proc = subprocess.Popen([sys.executable, "-m", "pacslab", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("pacslab serve did not start")
        time.sleep(0.2)
    return Service(proc, base, dicom_port)


def stop_serve(service: Service) -> None:
    os.killpg(service.proc.pid, signal.SIGTERM)
    try:
        service.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(service.proc.pid, signal.SIGKILL)
        service.proc.wait()


def mwl_find(port: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """A Modality Worklist C-FIND on one association kept open (as a modality polls),
    and the function that releases it."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSLAB")
    assert assoc.is_established
    lock = threading.Lock()  # the read-load thread and the timing loop share it

    def once() -> None:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "TRẦN*"
        ds.PatientID = ""
        item = Dataset()
        item.Modality = ""
        item.ScheduledStationAETitle = ""
        item.ScheduledProcedureStepStartDate = ""
        ds.ScheduledProcedureStepSequence = [item]
        with lock:
            for status, _ in assoc.send_c_find(ds, ModalityWorklistInformationFind):
                assert status is not None and status.Status in (0x0000, 0xFF00, 0xFF01)

    return once, assoc.release


def read_load(base: str, study_uid: str, dicom_port: int, stop: Any, active: Any,
              client: int = 0) -> None:
    """QIDO-RS, FHIR, viewer, /metrics and MWL C-FIND in a loop while ``active`` is
    set, until ``stop`` is (run in its own process; ``client`` staggers the order)."""
    paths = [("/dicomweb/studies", {"PatientName": "NGUY*"}),
             ("/dicomweb/studies", {"PatientName": "TRẦN*"}),
             ("/dicomweb/studies", {"ModalitiesInStudy": "CT"}),
             ("/dicomweb/studies", {"StudyDate": DATE_RANGE}),
             ("/fhir/Patient", {"name": "trần"}),
             ("/viewer/api/studies", {"name": "trần"}),
             (f"/viewer/api/studies/{study_uid}/series", {}),
             ("/metrics", {})]
    paths = paths[client:] + paths[:client]
    find, release = mwl_find(dicom_port)
    with httpx.Client(base_url=base, timeout=60) as http:
        while not stop.is_set():
            if not active.wait(0.1):
                continue
            for path, params in paths:
                http.get(path, params=params)
            find()
    release()


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        (tmp_path / "data").mkdir()
        return f"sqlite:///{tmp_path / 'data' / 'index.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def empty_url(request: pytest.FixtureRequest, tmp_path: Path, index_url: str) -> str:
    """The anchor's index: empty, beside the filled one, written in the same rounds.
    SQLite: a file of its own on the same disk. PostgreSQL: a database of its own on
    the same server (same settings, same shared buffers, same WAL), migrated alike."""
    if index_url.startswith("sqlite"):
        (tmp_path / "empty").mkdir()
        return f"sqlite:///{tmp_path / 'empty' / 'index.db'}"
    return create_database(admin_url(request.getfixturevalue("pg_server")),
                           template=request.getfixturevalue("pg_template"))


def _index_bytes(index: SqlIndex) -> int:
    if index.is_sqlite:
        path = Path(index.url.removeprefix("sqlite:///"))
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")
                   if not p.name.endswith(".writelock"))
    with index.engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())


def _cached_fill(index: SqlIndex, index_url: str, cached: Path, n: int) -> float:
    """Copy the cached filled file into place (filling and keeping it first if there is
    none yet); seconds of the fill, or 0.0 when copied."""
    db = Path(index_url.removeprefix("sqlite:///"))
    index.close()
    if cached.exists():
        shutil.copyfile(cached, db)
        return 0.0
    index = SqlIndex(IndexSettings(url=index_url))
    try:
        seconds = fill(index, n)
    finally:
        index.close()  # the last connection: the WAL is checkpointed and removed
    cached.parent.mkdir(parents=True, exist_ok=True)
    part = cached.with_suffix(".part")
    shutil.copyfile(db, part)
    part.rename(cached)
    return seconds


def _queued_jobs(http: httpx.Client) -> float:
    """Pending and running jobs, as ``/metrics`` reports them."""
    queued = 0.0
    for line in http.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("pacslab_jobs_pending", "pacslab_jobs_running"):
            queued += float(value)
    return queued


def _write_rounds(index: SqlIndex, empty: SqlIndex, writes: int, active: Any,
                  figures: dict[str, float], *, diagnose: bool = True
                  ) -> dict[str, list[float]]:
    """The receiver's write p99 on the empty archive (the anchor), on the filled
    archive with the service idle, and with the read-load clients querying; and on
    the empty archive while the same clients query the filled one (``loaded_empty``:
    the same competition for this machine's two cores, without the archive, so that
    loaded/loaded_empty tells the archive's own share of the loaded figure).
    ``WRITE_ROUNDS`` rounds, the conditions interleaved (their order rotated each
    round) so that the machine's drift falls on all of them alike. Pooled p99 of all
    rounds per condition, the median of the rounds' p99s, and the ratios. Without
    ``diagnose``, no ``loaded_empty`` (the smoke run: its 10 s of pauses)."""
    conditions = ["empty", "idle", "loaded", *(["loaded_empty"] if diagnose else [])]
    per = max(20, writes // WRITE_ROUNDS)
    pooled: dict[str, list[float]] = {c: [] for c in conditions}
    rounds: dict[str, list[float]] = {c: [] for c in conditions}
    for r in range(WRITE_ROUNDS):
        for cond in conditions[r % len(conditions):] + conditions[:r % len(conditions)]:
            if cond.startswith("loaded"):
                active.set()
                time.sleep(1)  # the clients are querying
            try:
                target = empty if cond in ("empty", "loaded_empty") else index
                times = write_times(target, per, f"{cond}{r}")
            finally:
                if cond.startswith("loaded"):
                    active.clear()
                    time.sleep(1)  # their requests in flight end
            pooled[cond] += times
            rounds[cond].append(_pct(times, 0.99) * 1000)
    for cond in conditions:
        figures[f"write_p99_{cond}_ms"] = _pct(pooled[cond], 0.99) * 1000
        figures[f"write_p50_{cond}_ms"] = _pct(pooled[cond], 0.5) * 1000
        figures[f"write_p99_{cond}_round_median_ms"] = statistics.median(rounds[cond])
    figures["write_p99_loaded_over_idle"] = (figures["write_p99_loaded_ms"]
                                             / figures["write_p99_idle_ms"])
    if diagnose:
        figures["write_p99_loaded_over_loaded_empty"] = (
            figures["write_p99_loaded_ms"] / figures["write_p99_loaded_empty_ms"])
    return rounds


def test_archive_scale(benchmark: Any, measuring: bool, tmp_path: Path, index_url: str,
                       empty_url: str) -> None:
    n = N_INSTANCES
    backend = "sqlite" if index_url.startswith("sqlite") else "postgresql"
    writes = WRITES if measuring else 20
    index = SqlIndex(IndexSettings(url=index_url))
    # The anchor: an empty index of its own (see empty_url), written in the same
    # interleaved rounds as the filled one. PostgreSQL's anchor used to be measured
    # once, before the fill, minutes earlier than the rounds it was compared with:
    # the machine's drift in between counted as the archive's cost (issue 21).
    empty = SqlIndex(IndexSettings(url=empty_url))
    figures: dict[str, float] = {}
    cached = (Path(CACHE) / f"archive_scale_{n}_v{FILL_VERSION}.db"
              if CACHE and backend == "sqlite" else None)
    empty_p99 = float("nan")
    try:
        if cached is not None:
            figures["fill_s"] = _cached_fill(index, index_url, cached, n)
            index = SqlIndex(IndexSettings(url=index_url))
        else:
            figures["fill_s"] = fill(index, n)
        figures["index_bytes_per_instance"] = _index_bytes(index) / n
        service = start_serve(tmp_path, index_url)
        try:
            time.sleep(3 if measuring else 1)  # start-up work done
            figures["idle_cpu_pct"] = service.cpu_pct(20 if measuring else 2)
            study_uid = "1.2.826.0.1.3680043.10.21.1"
            # The receiver's writes while the read requests run in a loop, from other
            # processes: threads here would share the GIL with the timed writes.
            ctx = multiprocessing.get_context("spawn")
            stop_load, active = ctx.Event(), ctx.Event()
            loaders = [ctx.Process(target=read_load, args=(service.base, study_uid,
                                                           service.dicom_port, stop_load,
                                                           active, k))
                       for k in range(READ_CLIENTS)]
            for loader in loaders:
                loader.start()
            try:
                time.sleep(5 if measuring else 2)  # the clients are up, paused
                _write_rounds(index, empty, writes, active, figures, diagnose=measuring)
            finally:
                stop_load.set()
                active.set()
                for loader in loaders:
                    loader.join(timeout=60)
                    if loader.is_alive():
                        loader.kill()
            empty_p99 = figures["write_p99_empty_ms"]
            for cond in ("idle", "loaded"):
                figures[f"write_p99_{cond}_over_empty"] = (figures[f"write_p99_{cond}_ms"]
                                                           / empty_p99)
            http = httpx.Client(base_url=service.base, timeout=60)
            requests: dict[str, Callable[[], None]] = {}

            def get(path: str, **params: str) -> Callable[[], None]:
                def once() -> None:
                    r = http.get(path, params=params)
                    assert r.status_code in (200, 204), (path, r.status_code, r.text[:200])
                return once

            requests["qido_name_nguy"] = get("/dicomweb/studies", PatientName="NGUY*")
            requests["qido_name_tran"] = get("/dicomweb/studies", PatientName="TRẦN*")
            requests["qido_modality_ct"] = get("/dicomweb/studies", ModalitiesInStudy="CT")
            requests["qido_date_range"] = get("/dicomweb/studies", StudyDate=DATE_RANGE)
            requests["qido_page_2"] = get("/dicomweb/studies", offset="100")
            requests["fhir_patient_name"] = get("/fhir/Patient", name="trần")
            requests["viewer_study_search"] = get("/viewer/api/studies", name="trần")
            requests["viewer_series"] = get(f"/viewer/api/studies/{study_uid}/series")
            requests["metrics"] = get("/metrics")
            requests["mwl_find"], release_mwl = mwl_find(service.dicom_port)
            # Sanity: the Vietnamese name search finds studies (an ignored filter or
            # ASCII-only folding would not).
            r = http.get("/dicomweb/studies", params={"PatientName": "trần*", "limit": "5"})
            assert r.status_code == 200 and r.json(), r.status_code
            found = {s["00100010"]["Value"][0]["Alphabetic"].split("^")[0] for s in r.json()}
            assert found == {"TRẦN"}, found

            rounds = 100 if measuring else 5
            times: dict[str, list[float]] = {name: [] for name in requests}
            # Diagnostic: the worker's queue as the timed requests begin (the write
            # rounds' instances are jobs it runs meanwhile; their originals are none).
            figures["jobs_queued_at_requests"] = _queued_jobs(http)
            for call in requests.values():
                for _ in range(3):  # warm: statement caches, first connections
                    call()
            # Interleaved: one of each request per round, so a slow minute of this
            # shared machine falls on all of them alike.
            for _ in range(rounds):
                for name, call in requests.items():
                    t = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t)
            for name in requests:
                figures[f"{name}_p50_ms"] = _pct(times[name], 0.5) * 1000
                figures[f"{name}_p99_ms"] = _pct(times[name], 0.99) * 1000
            benchmark.pedantic(requests["qido_name_tran"], rounds=rounds if measuring else 1)
            release_mwl()
            http.close()
        finally:
            stop_serve(service)
    finally:
        index.close()
        empty.close()
    case = f"archive_scale_{n}_{backend}"
    benchmark.extra_info.update(
        case=case, instances=n, backend=backend, pacslab=figures,
        anchor={"write_p99_empty_ms": empty_p99}, target=TARGETS)
    for key, value in figures.items():
        record(f"{case}: {key}", "pacslab", value, "ms" if key.endswith("_ms") else "")
    print(json.dumps({"case": case, **{k: round(v, 2) for k, v in figures.items()}}))
    if measuring and n >= 100_000:
        assert figures["write_p99_idle_ms"] <= TARGETS["write_p99_ratio"] * empty_p99, figures
        assert (figures["write_p99_loaded_ms"]
                <= TARGETS["write_p99_ratio"] * figures["write_p99_loaded_empty_ms"]), figures
        assert figures["idle_cpu_pct"] < TARGETS["idle_cpu_pct"], figures
        assert figures["metrics_p99_ms"] < TARGETS["metrics_p99_ms"], figures
        for name in requests:
            assert figures[f"{name}_p99_ms"] < TARGETS["request_p99_ms"], (name, figures)
