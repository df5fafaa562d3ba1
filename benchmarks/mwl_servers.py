"""Worklist benchmark servers, each in its own process, as a modality meets them.

* ``pacslab``: the real ``pacslab dicom`` receiver (the process kind ``pacslab serve``
  forks) over a SQLite index filled with the orders beforehand
  (``tests.worklist.dcmtk.pacslab_dicom``);
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
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset

from tests.worklist.dcmtk import free_port, run_process, scrubbed_env
from worklist.model import WorklistItem, make_item

__all__ = [
    "DAY0",
    "DAYS",
    "STATIONS",
    "make_items",
    "memory_server",
    "modality_query",
    "session_cpu_seconds",
]

STATIONS = (
    [f"CT{n}" for n in range(1, 11)]
    + [f"MR{n}" for n in range(1, 6)]
    + [f"US{n}" for n in range(1, 6)]
)
DAYS = 25
DAY0 = datetime(2026, 11, 25, 7, 0)


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


@contextlib.contextmanager
def memory_server(size: int) -> Iterator[int]:
    """The MWL SCP over the in-memory fake with ``make_items(size)``, in a child process."""
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.mwl_servers", "memory", str(size), str(port)]
    with run_process(cmd, scrubbed_env(), port) as p:
        yield p


def session_cpu_seconds(session: int) -> float:
    """User + system CPU time of the live processes in ``session`` (Linux ``/proc``).

    Wall-clock latency on a shared two-core machine mostly measures the neighbours;
    the server's CPU per query does not.
    """
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesised command name; session is field 6.
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[3]) == session:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


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
