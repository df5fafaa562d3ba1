"""Wire the processing worker of ``pacslab serve``: instance jobs and series pyramids.

The handlers themselves are the application layer's (:mod:`services.ingest_jobs`,
issue 15); this module builds them from ``Settings`` and starts the worker at a low
CPU priority, with the instance jobs of a series deferred until it pauses and the
scrub of originals as an idle-time hook (issue 19).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

from core.settings import Settings
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

__all__ = ["build_worker", "start_worker"]

logger = logging.getLogger(__name__)


def build_worker(settings: Settings, *, name: str = "embedded") -> JobWorker:
    """The job worker of ``settings``; ``name`` (with the host name) identifies its claims.

    A worker restarted under the same name takes back the jobs it left ``running``,
    so each worker process on a host needs its own name (``pacslab serve`` uses
    ``embedded``, ``pacslab worker`` ``processing.worker_name``).
    """
    index = build_index(settings, migrate=False)
    originals = build_originals(settings)
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
    waits = sorted({processing.series_quiet_s, worker.defer_arriving_s} - {0.0})
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
