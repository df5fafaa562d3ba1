"""The idle worker polls a change counter, not the job queue (issue 21), and still
picks up everything as soon as before: a commit from another process, a series
passing its quiet period, a retry's back-off. Counts of statements, no timings.

On SQLite the counter is ``PRAGMA data_version``; on PostgreSQL the notifications of
migration 0012's triggers, received on a listening connection of the index's own
(``storage.index.postgres.WorkListener``), which must survive a server restart."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from core.instance import InstanceRecord
from core.settings import IndexSettings
from processing.worker import JobWorker
from services.scrub import OriginalScrub
from storage.abc import Job, NewInstance
from storage.index.postgres import WorkListener
from storage.index.sql import SqlIndex
from tests.conftest_pg import PgServer
from tests.support import wait_until


def _instances(series: str, n: int) -> list[NewInstance]:
    return [NewInstance(record=InstanceRecord("1.2", f"{series}.{i}", "1.2.3", series,
                                              "1.2.840.10008.1.2.1"),
                        blob_key=f"{series}-{i}".replace(".", "a").ljust(64, "0"), size=1,
                        calling_ae="X", received_at=datetime.now(UTC)) for i in range(n)]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty index, migrated once and copied per test."""
    path = tmp_path_factory.mktemp("idle") / "index.db"
    SqlIndex(IndexSettings(url=f"sqlite:///{path}")).close()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def paths(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[SqlIndex, SqlIndex]]:
    """The worker's index, and another one on the same database (a receiver's process)."""
    if request.param == "sqlite":
        shutil.copyfile(request.getfixturevalue("template"), tmp_path / "index.db")
        url = f"sqlite:///{tmp_path}/index.db"
    else:
        url = request.getfixturevalue("pg_url")
        SqlIndex(IndexSettings(url=url)).close()  # migrated, triggers and all
    ours, theirs = (SqlIndex(IndexSettings(url=url, migrate=False)) for _ in range(2))
    yield ours, theirs
    theirs.close()
    ours.close()


class _Counting:
    """Statements the worker's engine runs, and how many polls read the counter."""

    def __init__(self, index: SqlIndex) -> None:
        self.statements = 0
        self.polls = 0
        read = index.data_version

        def counted() -> int | None:
            self.polls += 1
            return read()

        index.data_version = counted  # type: ignore[method-assign]
        event.listen(index.engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: Any) -> None:
        self.statements += 1

    def after_polls(self, n: int) -> None:
        start = self.polls
        wait_until(lambda: self.polls >= start + n, interval=0.005)


def _worker(index: SqlIndex, handlers: dict[str, Any], **kw: Any) -> JobWorker:
    return JobWorker(index, handlers, name="w", batch=10, poll_interval_s=0.005, **kw)


def test_an_idle_worker_reads_the_counter_only(paths: tuple[SqlIndex, SqlIndex]) -> None:
    ours, theirs = paths
    done: list[str] = []
    counting = _Counting(ours)
    worker = _worker(ours, {"instance": lambda job: done.append(job.target) or {}})
    worker.start()
    try:
        counting.after_polls(5)
        before = counting.statements
        counting.after_polls(40)
        assert counting.statements == before  # 40 polls, not one query
        # A commit of another process: picked up at the next poll, all of it although
        # a claim takes 10 (PostgreSQL: the claims themselves notify no one).
        theirs.add_instances(_instances("1.2.3.4", 25))
        wait_until(lambda: len(done) == 25, message=lambda: f"done: {done}")
        counting.after_polls(5)
        before = counting.statements
        counting.after_polls(40)
        assert counting.statements == before
    finally:
        worker.stop()


def test_time_alone_makes_a_series_due(paths: tuple[SqlIndex, SqlIndex]) -> None:
    """No commit after the last instance: the roll-up still comes when the series has
    been quiet for ``series_quiet_s`` (``next_due``), not at the hourly safety net."""
    ours, theirs = paths
    rolled: list[str] = []
    worker = _worker(ours, {"instance": lambda job: {},
                            "series": lambda job: rolled.append(job.target) or {}},
                     defer_arriving_s=0.1)

    def roll_up() -> None:
        for uid in ours.series_due(0.3):
            ours.add_job("series", uid)

    worker.on_idle.append(roll_up)
    worker.next_due = lambda: ours.next_due([0.3, 0.1])
    worker.start()
    try:
        theirs.add_instances(_instances("1.2.3.5", 2))
        # The handler has run before the worker marks its job done: wait for both.
        wait_until(lambda: rolled and {j.status for j in ours.get_jobs()} == {"done"},
                   message=lambda: f"rolled: {rolled}, jobs: {ours.get_jobs()}")
        assert rolled == ["1.2.3.5"]
    finally:
        worker.stop()


class _Later(RuntimeError):
    retry_in_s = 0.2


def test_a_retry_runs_when_its_back_off_ends(paths: tuple[SqlIndex, SqlIndex]) -> None:
    ours, theirs = paths
    tries: list[str] = []

    def flaky(job: Job) -> dict[str, str]:
        tries.append(job.target)
        if len(tries) == 1:
            raise _Later("peer down")
        return {}

    worker = _worker(ours, {"forward": flaky})
    worker.next_due = lambda: ours.next_due()
    worker.start()
    try:
        theirs.add_job("forward", "1.2.3.6")
        wait_until(lambda: [j.status for j in ours.get_jobs()] == ["done"],
                   message=lambda: f"jobs: {ours.get_jobs()}")
        assert tries == ["1.2.3.6", "1.2.3.6"]
    finally:
        worker.stop()


def test_next_due_names_the_next_moment(paths: tuple[SqlIndex, SqlIndex]) -> None:
    ours, theirs = paths
    assert ours.next_due([10.0]) is None
    theirs.add_instances(_instances("1.2.3.7", 1))
    due = ours.next_due([10.0, 2.0])
    assert due is not None
    received = ours.get_instance("1.2.3.7.0").received_at.timestamp()
    assert abs(due - (received + 2.0)) < 1.0
    before = time.time()
    theirs.add_job("forward", "x", delay_s=3600)
    later = ours.next_due([])
    assert later is not None and before + 3600 <= later <= time.time() + 3600


def test_the_scrub_keeps_to_its_cpu_budget() -> None:
    class Index:
        calls = 0

        def series_arriving(self) -> bool:
            self.calls += 1
            sum(range(20_000))  # some CPU, as a turn has
            return True

    for pct, calls in ((1.0, 1), (100.0, 3)):
        index = Index()
        scrub = OriginalScrub(index, None, per_turn=8, cpu_pct=pct)  # type: ignore[arg-type]
        for _ in range(3):
            assert scrub.step() == 0
        assert index.calls == calls, pct


def test_stop_ends_an_idle_wait(paths: tuple[SqlIndex, SqlIndex]) -> None:
    worker = _worker(paths[0], {})
    worker.poll_interval_s = 3600.0
    worker.start()
    stopped = threading.Thread(target=worker.stop)
    stopped.start()
    stopped.join(timeout=30)
    assert not stopped.is_alive()


@pytest.mark.postgres
def test_the_listener_survives_a_postgres_restart(restartable_pg: PgServer) -> None:
    """While the server is down the signal is None (the worker reads the tables, as
    without one); once back, the listener reconnects by itself and the counter moves
    (notifications sent in the gap are lost: the worker's next poll is a full turn).
    Then a commit of another process is picked up without a query per poll again."""
    url = restartable_pg.url()
    SqlIndex(IndexSettings(url=url)).close()
    ours, theirs = (SqlIndex(IndexSettings(url=url, migrate=False)) for _ in range(2))
    listener = ours._data_version
    assert isinstance(listener, WorkListener)
    listener._reconnect_s = 0.05
    done: list[str] = []
    counting = _Counting(ours)
    worker = _worker(ours, {"instance": lambda job: done.append(job.target) or {}})
    worker.poll_interval_s = 0.05  # fewer "worker loop error" lines while it is down
    worker.start()
    try:
        counting.after_polls(3)
        before_restart = listener.read()
        assert before_restart is not None
        restartable_pg.stop("immediate")
        wait_until(lambda: listener.read() is None, message="the lost connection went unseen")
        restartable_pg.start()
        after = wait_until(listener.read, message="the listener did not reconnect")
        assert after is not None and after > before_restart
        theirs.add_instances(_instances("1.2.3.8", 4))
        wait_until(lambda: len(done) == 4, message=lambda: f"done: {done}")
        counting.after_polls(5)
        before = counting.statements
        counting.after_polls(20)
        assert counting.statements == before
    finally:
        worker.stop()
        theirs.close()
        ours.close()


@pytest.mark.postgres
def test_no_signal_on_a_schema_without_the_triggers(pg_empty_url: str) -> None:
    """A worker started (``migrate=False``) on an index not yet upgraded to migration
    0012: nothing would notify, so there is no signal and every poll reads the tables,
    rather than a counter that never moves and jobs left waiting."""
    from sqlalchemy import create_engine

    from storage.index.migrate import upgrade

    engine = create_engine(pg_empty_url)
    upgrade(engine, "0011_qr_commitment")
    engine.dispose()
    index = SqlIndex(IndexSettings(url=pg_empty_url, migrate=False))
    try:
        assert index.data_version() is None
    finally:
        index.close()
