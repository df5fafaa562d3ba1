"""Job worker: claims ``pending`` jobs from the index and runs them (STYLE.md §1).

Restart-safe and idempotent: a job is claimed (``running``), its handler runs, and it is
marked ``done`` with its result. A handler that raises records the error and is
retried with back-off until ``max_attempts``; then the job is ``failed`` and stays
visible. One poison input fails alone and never blocks the queue. Jobs left
``running`` by a worker that died are requeued when a worker with the same name
starts again, or by any running worker once their lease has expired (checked every
``lease_s / 4`` while it runs, not only at its start: a worker on another machine that
never comes back must not leave its jobs ``running`` forever). A living worker renews
the lease of every job it holds, every ``lease_s / 4`` (:class:`_LeaseKeeper`): a batch
of large series can take longer than one lease, and without renewal another worker
would take over jobs still being converted, and write the same store twice at once.

Kinds with a batch handler (``instance``) run as one call per claim, each job still
failing or succeeding on its own; with ``defer_arriving_s`` the index leaves the
instance jobs of a series still arriving pending until the sender pauses, and with
``defer_busy_s`` while any series arrives, up to that long (issue 19).

Nothing an idle worker does grows with the archive (issue 21): claiming looks for a
pending job in a read-only transaction, the roll-up hook (``on_idle``) reads the series
past their quiet period from an index, and finished instance jobs older than
``prune_after_s`` are deleted in bounded batches (at most every ``prune_every_s``), so
the jobs table holds the recent past, not one row per instance ever received.

Nor does it wake the CPU for nothing (issue 21: 3.3 % of a core at any archive size).
On an index that offers ``data_version()``, each poll reads that number only, and a
full turn (claim, the ``on_idle`` hooks, the lease check, the pruning) runs when it
moved (someone committed work: a receiver's instances, a STOW-RS, a job added by the
API, in any process), when the time ``next_due()`` gave has come (a series passing its
quiet period, a retry's back-off) or when a timer is due, and at least every
:data:`IDLE_RECHECK_S`. SQLite's number is its commit counter (read from the WAL index
in microseconds); PostgreSQL's counts the notifications its triggers send from each
transaction that queues a job or adds instances (received on a listening connection:
no query). So a job is picked up as soon as before: at the first poll after the commit
or the moment that makes it due. Where there is none (None: the test fakes, or a
PostgreSQL listener reconnecting after a server restart), every poll is a full turn;
the number moves again once the listener is back, as notifications sent meanwhile are
lost (idle ``pacslab serve`` on PostgreSQL, 100,000 instances, 2026-12-03: 1.9 % of a
core with a full turn per poll, 1.0 % listening; the server's own 0.8 % to 0.45 %).
The worker itself does not know which backend it runs on. ``on_tick`` hooks
(the scrub of originals, which paces itself) run on every idle poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from core.errors import ServiceError
from core.logging import correlation
from storage.abc import Job

__all__ = ["BatchHandler", "JobHandler", "JobWorker"]

logger = logging.getLogger(__name__)

#: Longest an idle worker goes without a full turn although nothing changed: a safety
#: net (a wall clock stepped back delays ``next_due``), not the way work is found.
IDLE_RECHECK_S = 60.0

JobHandler = Callable[[Job], Mapping[str, Any] | None]
#: Runs several jobs of one kind at once (the instance jobs of a series share one
#: index transaction); per job id its result, or the exception it failed with.
BatchHandler = Callable[[list[Job]], Mapping[int, Mapping[str, Any] | BaseException]]


class _LeaseKeeper:
    """Renews the lease of a batch's jobs every ``interval_s`` while it runs."""

    def __init__(self, index: Any, worker: str, job_ids: list[int], interval_s: float) -> None:
        self.index = index
        self.worker = worker
        self.job_ids = job_ids
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{worker}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                renewed = self.index.renew_jobs(self.worker, self.job_ids)
            except Exception:  # the index is down: the next renewal may succeed
                logger.warning("could not renew job leases", exc_info=True)
                continue
            if renewed < len(self.job_ids):
                # Finished ones are no longer ``running``; others were taken over
                # after a lease this worker failed to renew (the index was down).
                logger.debug("renewed %d of %d job leases", renewed, len(self.job_ids))


class JobWorker:
    def __init__(
        self,
        index: Any,
        handlers: Mapping[str, JobHandler],
        *,
        name: str,
        poll_interval_s: float = 0.5,
        max_attempts: int = 3,
        batch: int = 8,
        lease_s: float = 600.0,
        prune_after_s: float = 0.0,
        prune_every_s: float = 60.0,
        batch_handlers: Mapping[str, BatchHandler] | None = None,
        defer_arriving_s: float = 0.0,
        defer_busy_s: float = 0.0,
    ) -> None:
        self.index = index
        self.handlers = dict(handlers)
        self.batch_handlers = dict(batch_handlers or {})
        # Instance jobs of a series still arriving wait (SqlIndex.claim_jobs, issue 19).
        self.defer_arriving_s = defer_arriving_s
        # ... and while any series arrives, up to this long after their own (issue 19).
        self.defer_busy_s = defer_busy_s
        self.name = name
        self.poll_interval_s = poll_interval_s
        self.max_attempts = max_attempts
        # Worker deaths under one job before it is given up: more than max_attempts, as
        # a job claimed in a batch can be interrupted once by a neighbour's crash, and
        # an operator's restarts should not fail a healthy job.
        self.give_up_after = max_attempts + 2
        self.batch = batch
        self.lease_s = lease_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_lease_check = 0.0
        self.prune_after_s = prune_after_s
        self.prune_every_s = prune_every_s
        self._next_prune = 0.0
        self.on_idle: list[Callable[[], object]] = []
        #: Idle work called on every idle poll, which must pace itself (the scrub).
        self.on_tick: list[Callable[[], object]] = []
        self.on_start: list[Callable[[], None]] = []
        #: When time alone next makes a job or an ``on_idle`` hook's work due (epoch
        #: seconds, None: only a commit will), asked after a turn that found nothing.
        self.next_due: Callable[[], float | None] | None = None

    def run_once(self) -> int:
        """Claim and run up to ``batch`` jobs; return how many ran."""
        if self.defer_arriving_s > 0:
            jobs = self.index.claim_jobs(
                self.name,
                limit=self.batch,
                defer_arriving_s=self.defer_arriving_s,
                defer_busy_s=self.defer_busy_s,
            )
        else:
            jobs = self.index.claim_jobs(self.name, limit=self.batch)
        if not jobs:
            return 0
        done: list[tuple[int, dict[str, Any]]] = []
        # Claimed jobs stay ``running`` until finish_jobs, the last ones of the batch
        # waiting for the first: all of them are renewed until then.
        with _LeaseKeeper(self.index, self.name, [j.id for j in jobs], self.lease_s / 4):
            try:
                grouped: dict[str, list[Job]] = {}
                single: list[Job] = []
                for job in jobs:
                    if job.kind in self.batch_handlers:
                        grouped.setdefault(job.kind, []).append(job)
                    else:
                        single.append(job)
                # Batched kinds first: instance jobs (the DICOM JSON) before the
                # series job of the same series, as the ids order them.
                for kind, group in grouped.items():
                    done += self._run_batch(kind, group)
                for job in single:
                    result = self._run(job)
                    if result is not None:
                        done.append((job.id, result))
            finally:
                self.index.finish_jobs(done)
        return len(jobs)

    def _run_batch(self, kind: str, jobs: list[Job]) -> list[tuple[int, dict[str, Any]]]:
        """Run jobs of one batched kind; the results of those that succeeded."""
        started = time.perf_counter()
        try:
            results = self.batch_handlers[kind](jobs)
        except Exception as exc:  # the batch as a whole (its transaction) failed
            results = dict.fromkeys((j.id for j in jobs), exc)
        done: list[tuple[int, dict[str, Any]]] = []
        failed: list[tuple[int, str, float | None]] = []
        try:
            for job in jobs:
                # A job the handler did not report on is not done: it is retried.
                outcome = results.get(job.id, RuntimeError(f"no result for {kind} job"))
                if isinstance(outcome, Exception):
                    with correlation(job.correlation_id or None):
                        failed.append(self._failure(job, outcome))
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    done.append((job.id, dict(outcome or {})))
        finally:
            # One transaction for the batch's failures, not one per job (issue 21).
            if failed:
                self.index.fail_jobs(failed)
        logger.debug(
            "%d %s jobs done in %.3f s", len(jobs), kind, time.perf_counter() - started
        )
        return done

    def _failed(self, job: Job, exc: Exception) -> None:
        """Record a failed run: retried with back-off, or failed for good."""
        job_id, error, retry = self._failure(job, exc)
        self.index.fail_job(job_id, error, retry_in_s=retry)

    def _failure(self, job: Job, exc: Exception) -> tuple[int, str, float | None]:
        """Log a failed run; what ``fail_jobs`` records of it (see ``_failed``)."""
        expected = isinstance(exc, ServiceError)
        error = f"{type(exc).__name__}: {exc}"
        retry = (
            None
            if job.attempts >= self.max_attempts or expected
            else min(60.0, 2.0**job.attempts)
        )
        # The handler may own its retry policy (forwarding to a peer that is
        # down for hours): an error carrying ``retry_in_s`` is retried then.
        asked = getattr(exc, "retry_in_s", None)
        if isinstance(asked, (int, float)):
            retry = float(asked)
        # A ServiceError (bad input) will fail the same way again: no retry.
        log = logger.warning if expected else logger.error
        log(
            "job %d %s %s failed (attempt %d): %s",
            job.id,
            job.kind,
            job.target,
            job.attempts,
            error,
            exc_info=(type(exc), exc, exc.__traceback__) if not expected else None,
        )
        return job.id, error, retry

    def _run(self, job: Job) -> dict[str, Any] | None:
        """Run one job; its result if it succeeded (the caller marks it done)."""
        handler = self.handlers.get(job.kind)
        with correlation(job.correlation_id or None):
            if handler is None:
                self.index.fail_job(job.id, f"no handler for job kind {job.kind!r}")
                return None
            started = time.perf_counter()
            try:
                result = handler(job)
            except Exception as exc:
                self._failed(job, exc)
                return None
            logger.debug(
                "job %d %s done in %.3f s", job.id, job.kind, time.perf_counter() - started
            )
            return dict(result or {})

    def requeue_expired(self) -> int:
        """Requeue jobs whose lease expired, at most every ``lease_s / 4``; how many."""
        now = time.monotonic()
        if now < self._next_lease_check:
            return 0
        self._next_lease_check = now + self.lease_s / 4
        n = int(self.index.requeue_stale_jobs(self.lease_s, give_up_after=self.give_up_after))
        if n:
            logger.warning("requeued %d jobs whose lease expired (their worker died or hangs)", n)
        return n

    def prune_done(self) -> int:
        """Delete finished instance jobs past their retention, at most every
        ``prune_every_s`` and 1000 at a time (a backlog drains over several calls)."""
        if not self.prune_after_s:
            return 0
        now = time.monotonic()
        if now < self._next_prune:
            return 0
        n = int(self.index.prune_jobs(self.prune_after_s))
        # A full batch means more are waiting: come back on the next idle turn.
        self._next_prune = now + (0.0 if n >= 1000 else self.prune_every_s)
        if n:
            logger.info("deleted %d finished instance jobs past their retention", n)
        return n

    def run(self) -> None:
        for hook in self.on_start:
            hook()
        # A worker restarting under its name resumes what it was doing when it died;
        # jobs of workers that never came back are taken over after their lease.
        n = int(self.index.requeue_worker_jobs(self.name, give_up_after=self.give_up_after))
        if n:
            logger.warning("resumed %d jobs this worker left running when it stopped", n)
        seen: int | None = None
        due = 0.0  # wall clock: a full turn is due then even if nothing was committed
        while not self._stop.is_set():
            ran = 0
            try:
                version = self._data_version()
                if version is None or version != seen or time.time() >= due or self._timer_due():
                    seen = version
                    self.requeue_expired()
                    ran = self.run_once()
                    if ran:
                        # A claim takes at most ``batch`` jobs: look again at once. The
                        # claim's own commit moves SQLite's counter, not PostgreSQL's
                        # (a job leaving ``pending`` notifies no one).
                        due = 0.0
                    else:
                        for idle_hook in self.on_idle:
                            idle_hook()
                        self.prune_done()
                        # Asked only once things are quiet: a commit during this turn
                        # (a receiver's, or an idle hook's job) means another turn anyway.
                        if version is not None and self._data_version() == version:
                            due = self._idle_until()
                        else:
                            due = 0.0
                if not ran:
                    for tick_hook in self.on_tick:
                        tick_hook()
            except Exception:
                logger.error("worker loop error", exc_info=True)
                ran, due = 0, 0.0
            if not ran:
                self._stop.wait(self.poll_interval_s)

    def _data_version(self) -> int | None:
        """The index's change counter, None if it has none (every poll a full turn)."""
        read = getattr(self.index, "data_version", None)
        return read() if read is not None else None

    def _timer_due(self) -> bool:
        now = time.monotonic()
        return now >= self._next_lease_check or bool(
            self.prune_after_s and now >= self._next_prune
        )

    def _idle_until(self) -> float:
        """The wall-clock time of the next full turn if nothing is committed before."""
        until = time.time() + IDLE_RECHECK_S
        if self.next_due is not None:
            due = self.next_due()
            if due is not None:
                until = min(until, due)
        return until

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"worker-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
