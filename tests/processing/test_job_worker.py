"""JobWorker: restart-safe, idempotent, a poison input never blocks the queue."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.errors import InvalidDatasetError
from core.instance import InstanceRecord
from core.settings import IndexSettings
from processing.worker import JobWorker
from storage.abc import Job, NewInstance
from storage.index.sql import SqlIndex
from tests.support import wait_until


@pytest.fixture
def index(tmp_path: Path) -> SqlIndex:
    idx = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db"))
    items = [NewInstance(record=InstanceRecord("1.2", f"1.2.3.{i}", "1.2.3", "1.2.3.4",
                                               "1.2.840.10008.1.2.1"),
                         blob_key=f"{i:064x}", size=1, calling_ae="X",
                         received_at=datetime.now(UTC)) for i in range(5)]
    idx.add_instances(items)
    yield idx  # type: ignore[misc]
    idx.close()


def test_poison_fails_alone_and_bugs_are_retried(index: SqlIndex) -> None:
    seen: list[str] = []
    flaky = {"1.2.3.3": 1}

    def handler(job: Job) -> dict[str, str]:
        seen.append(job.target)
        if job.target == "1.2.3.1":
            raise InvalidDatasetError("undecodable pixel data")  # bad input: no retry
        if flaky.get(job.target):
            flaky[job.target] -= 1
            raise RuntimeError("transient")  # a bug or hiccup: retried later
        return {"ok": job.target}

    worker = JobWorker(index, {"instance": handler}, name="w", batch=10)
    assert worker.run_once() == 5
    jobs = {j.target: j for j in index.get_jobs()}
    assert jobs["1.2.3.1"].status == "failed" and "undecodable" in jobs["1.2.3.1"].error
    assert jobs["1.2.3.3"].status == "pending" and "transient" in jobs["1.2.3.3"].error
    assert [j.status for t, j in sorted(jobs.items()) if t not in {"1.2.3.1", "1.2.3.3"}] \
        == ["done"] * 3
    assert jobs["1.2.3.0"].result == {"ok": "1.2.3.0"}


def test_restart_resumes_running_jobs(index: SqlIndex) -> None:
    claimed = index.claim_jobs("host-embedded", limit=2)  # then the worker died
    assert len(claimed) == 2
    done: list[str] = []
    worker = JobWorker(index, {"instance": lambda job: done.append(job.target) or {}},
                       name="host-embedded", batch=10)
    worker.on_idle.append(worker.stop)
    worker.run()  # requeues its own jobs first, runs everything, stops when idle
    assert sorted(done) == [f"1.2.3.{i}" for i in range(5)]
    assert index.counts()["jobs_done"] == 5


def test_a_running_worker_takes_over_jobs_of_one_that_never_came_back(index: SqlIndex) -> None:
    # Another machine's worker claims two jobs, then dies for good *after* this worker
    # started: only a lease check while running (not the one at start) requeues them.
    done: list[str] = []
    worker = JobWorker(index, {"instance": lambda job: done.append(job.target) or {}},
                       name="this-host", batch=10, poll_interval_s=0.01, lease_s=0.2)
    gone = index.claim_jobs("other-host", limit=2)
    assert len(gone) == 2
    worker.start()
    try:
        wait_until(lambda: index.counts().get("jobs_done") == 5, timeout=30, interval=0.01,
                   message=lambda: f"jobs: {index.counts()}")
    finally:
        worker.stop()
    assert sorted(done) == [f"1.2.3.{i}" for i in range(5)]
    jobs = index.get_jobs()
    assert all(j.status == "done" for j in jobs)
    assert sorted(j.attempts for j in jobs) == [1, 1, 1, 2, 2]  # each ran once here


def test_a_batch_longer_than_the_lease_is_not_taken_over(index: SqlIndex) -> None:
    # Five jobs of 0.15 s claimed together: the batch runs 0.75 s, three leases of
    # 0.25 s. Another worker checking leases all the while must find none expired.
    seen: list[str] = []
    pause = threading.Event()  # never set: a 0.15 s job

    def slow(job: Job) -> dict[str, str]:
        seen.append(job.target)
        pause.wait(0.15)
        return {}

    worker = JobWorker(index, {"instance": slow}, name="busy", batch=10, lease_s=0.25)
    other = JobWorker(index, {"instance": slow}, name="other", batch=10, lease_s=0.25)
    requeued: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            other._next_lease_check = 0.0  # check on every pass, not every lease_s / 4
            requeued.append(other.requeue_expired())
            stop.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert worker.run_once() == 5
    finally:
        stop.set()
        watcher.join()
    assert len(requeued) > 10 and sum(requeued) == 0
    assert sorted(seen) == [f"1.2.3.{i}" for i in range(5)]  # each ran once
    assert index.counts()["jobs_done"] == 5


def test_a_batch_fails_job_by_job_and_a_job_left_out_is_not_done(index: SqlIndex) -> None:
    def batch(jobs: list[Job]) -> dict[int, object]:
        out: dict[int, object] = {j.id: {"ok": j.target} for j in jobs}
        out[jobs[1].id] = InvalidDatasetError("unreadable")  # fails alone, no retry
        del out[jobs[2].id]  # the handler forgot it: retried, never marked done
        return out

    worker = JobWorker(index, {}, batch_handlers={"instance": batch},  # type: ignore[dict-item]
                       name="w", batch=10)
    assert worker.run_once() == 5
    jobs = {j.target: j for j in index.get_jobs()}
    assert jobs["1.2.3.1"].status == "failed" and "unreadable" in (jobs["1.2.3.1"].error or "")
    assert jobs["1.2.3.2"].status == "pending" and "no result" in (jobs["1.2.3.2"].error or "")
    assert [jobs[f"1.2.3.{i}"].status for i in (0, 3, 4)] == ["done"] * 3
    assert jobs["1.2.3.0"].result == {"ok": "1.2.3.0"}


def test_a_batch_that_fails_as_a_whole_records_its_failures_in_one_transaction(
        index: SqlIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    # One write transaction per failed job held the write lock through one WAL fsync
    # each, and queued the receiver's commits behind them (issue 21).
    def batch(jobs: list[Job]) -> dict[int, object]:
        raise OSError("disk gone")

    calls: list[int] = []
    fail_jobs = index.fail_jobs
    monkeypatch.setattr(index, "fail_jobs", lambda failed: (calls.append(len(failed)),
                                                           fail_jobs(failed))[1])
    worker = JobWorker(index, {}, batch_handlers={"instance": batch},  # type: ignore[dict-item]
                       name="w", batch=10)
    assert worker.run_once() == 5
    assert calls == [5]
    jobs = index.get_jobs()
    assert {j.status for j in jobs} == {"pending"}
    assert all("disk gone" in (j.error or "") for j in jobs)
