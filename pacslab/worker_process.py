"""Wire the processing worker of ``pacslab serve``: instance jobs and series pyramids.

The handlers themselves are the application layer's (:mod:`services.ingest_jobs`,
issue 15); this module builds them from ``Settings`` and starts the worker at a low
CPU priority, with the instance jobs of a series deferred until it pauses and the
scrub of originals as an idle-time hook (issue 19).

Under ``pacslab serve`` the worker runs in a process of its own
(:class:`WorkerProcess`, issue 21), as the DICOM receivers do. In the API's process
its Python work and the API's took turns on one GIL: a worker thread that held the
index's write lock (SQLite: one writer for the whole file) kept it while the API's
threads ran, and the receivers' C-STORE commits waited behind both. It needs nothing
from the API's process: it finds work through the index (``data_version()``, which
already told it about the receivers' commits), and takes back its own claims when
restarted under the same name.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from core.logging import configure
from core.settings import Settings
from pacslab.runtime import configure_runtime, die_with_parent
from pacslab.wiring import (
    build_audit,
    build_commitment_queue,
    build_index,
    build_order_service,
    build_originals,
)
from processing.worker import JobWorker
from services.commitment import CommitmentService
from services.destinations import DestinationDirectory
from services.forwarding import ForwardingService
from services.ingest_jobs import IngestJobs
from services.scrub import OriginalScrub
from storage.index.qr import COMMIT_JOB

__all__ = ["WorkerProcess", "build_worker", "start_worker"]

logger = logging.getLogger(__name__)


def build_worker(settings: Settings, *, name: str = "embedded") -> JobWorker:
    """The job worker of ``settings``; ``name`` (with the host name) identifies its claims.

    A worker restarted under the same name takes back the jobs it left ``running``,
    so each worker process on a host needs its own name (``pacslab serve`` uses
    ``embedded``, ``pacslab worker`` ``processing.worker_name``).
    """
    index = build_index(settings, migrate=False)
    originals = build_originals(settings, index=index)  # (it finds journaled originals)
    processing = settings.processing
    forwarding = ForwardingService(
        settings.forwarding,
        index,
        originals,
        ae_title=settings.dicom.ae_title,
        audit=build_audit(settings, index)[0] if settings.forwarding.rules else None,
    )
    jobs = IngestJobs(
        index=index,
        originals=originals,
        orders=build_order_service(settings, index),
        forwarding=forwarding,
        zarr_root=settings.storage.zarr_url.rstrip("/"),
        storage_options=settings.storage.storage_options or None,
        scheduler=settings.dask.scheduler or None,
        workers=settings.dask.workers or None,
        webhook_url=settings.orders.webhook_url,
        webhook_timeout_s=settings.orders.webhook_timeout_s,
    )
    handlers = jobs.handlers()
    # Storage Commitment reports the receivers could not deliver (issue 16 §3).
    directory = DestinationDirectory(index, settings.qr.destinations)
    handlers[COMMIT_JOB] = build_commitment_queue(
        settings, index, CommitmentService(index, originals), directory.lookup
    ).run_job
    worker = JobWorker(
        index,
        handlers,
        batch_handlers=jobs.batch_handlers(),
        name=f"{socket.gethostname()}-{name}",
        poll_interval_s=processing.poll_interval_s,
        max_attempts=processing.max_attempts,
        batch=processing.batch,
        lease_s=processing.lease_s,
        prune_after_s=processing.done_job_retention_s,
        # Never later than the series roll-up: the pyramid's job comes after them.
        defer_arriving_s=min(processing.instance_defer_s, processing.series_quiet_s),
        defer_busy_s=min(processing.instance_defer_busy_s, processing.series_quiet_s),
    )

    def roll_up() -> None:
        for uid in index.series_due(processing.series_quiet_s):
            index.add_job("series", uid)

    worker.on_idle.append(roll_up)
    # Forwarding keeps one association per destination while jobs keep coming; an
    # idle queue releases them rather than holding the peers' association slots.
    worker.on_idle.append(forwarding.close)
    # Time alone makes work due when a series passes its quiet period (the roll-up),
    # its instance jobs' deferral ends, or a retry's back-off does.
    waits = sorted(
        {processing.series_quiet_s, worker.defer_arriving_s, worker.defer_busy_s} - {0.0}
    )
    worker.next_due = lambda: index.next_due(waits)
    # Paced by its CPU budget, on every idle poll (not only when a job may be due).
    worker.on_tick.append(
        OriginalScrub(
            index,
            originals,
            per_turn=processing.scrub_per_idle,
            cpu_pct=processing.scrub_cpu_pct,
        ).step
    )
    return worker


def _lower_priority(nice: int) -> Callable[[], None]:
    def lower() -> None:
        # Linux nice values are per thread, and the threads this one starts (Dask's
        # pool) inherit it: the worker yields the CPU to the receivers, so a burst of
        # C-STOREs is acknowledged first and processed right after. Not SCHED_IDLE: a
        # thread of that class can starve on a busy machine while it holds the
        # index's write lock, and the receivers would then wait for it.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)

    return lower


def start_worker(settings: Settings, *, name: str = "embedded") -> Callable[[], None]:
    worker = build_worker(settings, name=name)
    worker.on_start.append(_lower_priority(settings.processing.nice))
    worker.start()
    return worker.stop


def _child_main(settings: Settings, name: str, parent_pid: int) -> None:
    """The worker process: run the worker until the parent's SIGTERM, then stop it."""
    die_with_parent(parent_pid)
    configure(settings.log.level, json_format=settings.log.json_format)
    configure_runtime()  # a DICOM SCU (forwarding, commitment reports)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    # Ctrl-C reaches the whole process group: the parent stops first and then asks
    # this process (SIGTERM), so a job in hand is finished or left to be taken back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = start_worker(settings, name=name)
    stopping.wait()
    stop()


class WorkerProcess:
    """The job worker in a supervised process of its own, restarted if it dies.

    Started with ``spawn``, not ``fork``: the parent has threads by then (the
    receivers' supervisor), and a fresh interpreter inherits neither their locks nor
    the DICOM listening socket. A worker that dies soon after starting (a broken
    index, say) is restarted after a growing pause, up to :attr:`MAX_BACKOFF_S`, not in
    a tight loop.
    """

    #: A run shorter than this counts as a failed start (the back-off grows).
    SHORT_RUN_S = 10.0
    MAX_BACKOFF_S = 30.0
    #: The worker's own stop waits up to 10 s for a job in hand; then it is killed
    #: (its claims are taken back by the next worker under the same name).
    STOP_TIMEOUT_S = 15.0

    def __init__(self, settings: Settings, *, name: str = "embedded") -> None:
        self.settings = settings
        self.name = name
        self._ctx = mp.get_context("spawn")
        self._proc: BaseProcess | None = None
        self._started_at = 0.0
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> WorkerProcess:
        self._spawn()
        self._watch = threading.Thread(
            target=self._supervise, name="worker-supervisor", daemon=True
        )
        self._watch.start()
        return self

    def _spawn(self) -> None:
        proc = self._ctx.Process(
            target=_child_main, args=(self.settings, self.name, os.getpid()),
            name="pacslab-worker",
            daemon=True,
        )
        proc.start()
        self._proc, self._started_at = proc, time.monotonic()
        logger.info("processing worker started in process %s", proc.pid)

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stop.wait(1.0):
            proc = self._proc
            if proc is None or proc.is_alive():
                continue
            ran = time.monotonic() - self._started_at
            backoff = 1.0 if ran >= self.SHORT_RUN_S else min(backoff * 2, self.MAX_BACKOFF_S)
            logger.error("worker process %s exited (%s) after %.0f s; restarting in %.0f s",
                         proc.pid, proc.exitcode, ran, backoff)
            if self._stop.wait(backoff):
                return
            self._spawn()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join(timeout=5)
        proc = self._proc
        if proc is None:
            return
        proc.terminate()  # SIGTERM: the child stops its worker
        proc.join(timeout=self.STOP_TIMEOUT_S)
        if proc.is_alive():
            logger.warning("worker process %s did not stop in %.0f s; killed",
                           proc.pid, self.STOP_TIMEOUT_S)
            proc.kill()
            proc.join(timeout=5)
