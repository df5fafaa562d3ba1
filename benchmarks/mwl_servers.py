"""Worklist benchmark servers, each in its own process, as a modality meets them.

* ``pacslab``: the real ``pacslab dicom`` receiver (the process kind ``pacslab serve``
  forks) over a SQLite index filled with the orders beforehand;
* ``pacslab-memory``: the same SCP handlers over the in-memory fake, started as
  ``python -m benchmarks.mwl_servers memory <items> <port>``;
* ``wlmscpfs``: DCMTK over ``.wl`` files (see ``tests/worklist/dcmtk.py``).

The client (``FindSCU``) stays in the pytest process, so its decoding no longer
shares a GIL with the server's encoding.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset

from tests.worklist.dcmtk import _wait_for_port, free_port
from worklist.model import WorklistItem, make_item

__all__ = [
    "DAY0",
    "DAYS",
    "STATIONS",
    "make_items",
    "memory_server",
    "modality_query",
    "pacslab_dicom",
]

STATIONS = (
    [f"CT{n}" for n in range(1, 11)]
    + [f"MR{n}" for n in range(1, 6)]
    + [f"US{n}" for n in range(1, 6)]
)
DAYS = 25
DAY0 = datetime(2026, 11, 25, 7, 0)
ROOT = Path(__file__).resolve().parents[1]


def make_items(n: int) -> list[WorklistItem]:
    """``n`` items spread evenly over 20 stations and 25 days, 07:00-19:00."""
    items = []
    for i in range(n):
        station = STATIONS[i % len(STATIONS)]
        day = (i // len(STATIONS)) % DAYS
        minutes = (i * 7) % (12 * 60)
        items.append(
            make_item(
                f"ACC{i:06d}",
                patient_name=f"PATIENT{i:06d}^TEST",
                station_ae_title=station,
                modality=station[:2],
                start=DAY0 + timedelta(days=day, minutes=minutes),
            )
        )
    return items


def modality_query(station: str, day: int) -> Dataset:
    """What a modality polls with: its station and one day, ~20 return keys."""
    q = Dataset()
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "RequestedProcedureID",
        "RequestedProcedureDescription",
        "StudyInstanceUID",
        "ReferringPhysicianName",
        "AdmissionID",
    ):
        setattr(q, keyword, "")
    sps = Dataset()
    sps.ScheduledStationAETitle = station
    sps.ScheduledProcedureStepStartDate = (DAY0 + timedelta(days=day)).strftime("%Y%m%d")
    for keyword in (
        "ScheduledProcedureStepStartTime",
        "Modality",
        "ScheduledProcedureStepID",
        "ScheduledProcedureStepDescription",
        "ScheduledPerformingPhysicianName",
        "ScheduledStationName",
    ):
        setattr(sps, keyword, "")
    sps.ScheduledProtocolCodeSequence = []
    q.ScheduledProcedureStepSequence = [sps]
    return q


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(values)
    return env


@contextlib.contextmanager
def _process(cmd: list[str], env: dict[str, str], port: int) -> Iterator[int]:
    # A session of its own, so the receiver's forked children go with it.
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc, timeout=60)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def fill_index(items: list[WorklistItem], url: str) -> None:
    """Place ``items`` as orders in the index at ``url`` (migrated to head)."""
    from core.orders import derive_status
    from core.settings import IndexSettings
    from storage.index.orders import SqlOrderStore
    from storage.index.sql import SqlIndex

    index = SqlIndex(IndexSettings(url=url, migrate=True))
    try:
        store = SqlOrderStore(index)
        for n, item in enumerate(items):
            store.create(
                public_id=f"order-{n}",
                placer=f"PL{n}",
                filler="",
                source="bench",
                build=lambda _pk, item=item: item,
                status=lambda it: derive_status(it.steps),
            )
    finally:
        index.close()


@contextlib.contextmanager
def pacslab_dicom(items: list[WorklistItem], work: Path) -> Iterator[int]:
    """``pacslab dicom`` over a SQLite index holding ``items``; yield its port.

    One receiver process: the benchmark's single association is served by one
    child anyway, and a second would only take memory on a shared machine.
    """
    url = f"sqlite:///{work}/index.db"
    fill_index(items, url)
    port = free_port()
    env = _env(
        PACSLAB_DATA_DIR=str(work),
        PACSLAB_INDEX__URL=url,
        PACSLAB_DICOM__HOST="127.0.0.1",
        PACSLAB_DICOM__PORT=str(port),
        PACSLAB_DICOM__WORKERS="1",
        PACSLAB_LOG__LEVEL="WARNING",
    )
    with _process([sys.executable, "-m", "pacslab", "dicom"], env, port) as p:
        yield p


@contextlib.contextmanager
def memory_server(size: int) -> Iterator[int]:
    """The MWL SCP over the in-memory fake with ``make_items(size)``, in a child process."""
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.mwl_servers", "memory", str(size), str(port)]
    with _process(cmd, _env(), port) as p:
        yield p


def _serve_memory(size: int, port: int) -> None:
    from worklist.memory import InMemoryMppsRepository, InMemoryWorklist
    from worklist.query import MatchOptions
    from worklist.scp import build_ae, handlers

    source = InMemoryWorklist(make_items(size))
    ae = build_ae(ae_title="PACSLAB")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=handlers(
            source, InMemoryMppsRepository(), MatchOptions(), source.apply_effects
        ),
    )
    assert server is not None
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    _, kind, size, port = sys.argv
    if kind != "memory":
        raise SystemExit(f"unknown server kind {kind}")
    _serve_memory(int(size), int(port))
