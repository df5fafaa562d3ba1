"""Issue 21 on PostgreSQL: the worker's periodic statements and the receiver's index
write keep their indexes, and an idle turn takes no row lock.

The SQLite plans are checked by ``test_index_query_plans.py``. Here each statement the
worker's engine is handed is explained (``EXPLAIN (FORMAT JSON)``, with its values
bound) with ``enable_seqscan = off``: on a test-sized table PostgreSQL rightly prefers
reading it whole, but with sequential scans priced out it still chooses one only when
no index can serve the statement, which is the statement whose cost would grow with
the archive. And no statement of an idle turn may say ``FOR UPDATE``: the claim's row
locks are for when a job is there to claim (``SqlIndex.claim_jobs`` looks first in a
read-only transaction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event

from core.settings import IndexSettings
from storage.index.direct import DirectStatement
from storage.index.queries import Match, Query
from storage.index.sql import SqlIndex
from tests.conftest_pg import admin_url
from tests.storage.test_index_query_plans import BIG
from tests.storage.test_index_scale import fill, new, record

pytestmark = pytest.mark.postgres


@pytest.fixture
def index(pg_url: str) -> Iterator[SqlIndex]:
    idx = SqlIndex(IndexSettings(url=pg_url))
    fill(idx, age_s=60)
    yield idx
    idx.close()


def _statements(index: SqlIndex, call: Callable[[], object]) -> list[tuple[str, Any]]:
    """Every statement (and its parameters) ``call`` runs on the index's engine."""
    seen: list[tuple[str, Any]] = []

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
               executemany: bool) -> None:
        if not executemany:
            seen.append((statement, parameters))

    event.listen(index.engine, "before_cursor_execute", before)
    try:
        call()
    finally:
        event.remove(index.engine, "before_cursor_execute", before)
    assert seen, "no statement seen"
    return seen


def _scans(node: dict[str, Any]) -> Iterator[str]:
    """The tables a plan reads from end to end (``Seq Scan`` nodes)."""
    if node.get("Node Type") == "Seq Scan":
        yield str(node.get("Relation Name"))
    for child in node.get("Plans", ()):
        yield from _scans(child)


def _whole_index_reads(node: dict[str, Any]) -> Iterator[str]:
    """The indexes of ``study_modalities`` a plan reads from end to end: an index scan
    without an ``Index Cond`` (``modality LIKE 'C%'`` is such a read, filtered)."""
    if (str(node.get("Index Name", "")).endswith("study_modalities_modality")
            or node.get("Index Name") == "pk_study_modalities") and "Index Cond" not in node:
        yield str(node["Index Name"])
    for child in node.get("Plans", ()):
        yield from _whole_index_reads(child)


def _no_full_scan(index: SqlIndex, statements: list[tuple[str, Any]]) -> None:
    with index.engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")
        for sql, params in statements:
            head = sql.lstrip().split(None, 1)[0].upper()
            if head not in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH"):
                continue
            plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, params).scalar_one()
            scanned = set(_scans(plan[0]["Plan"])) & set(BIG)
            assert not scanned, (scanned, sql)
            whole = list(_whole_index_reads(plan[0]["Plan"]))
            assert not whole, (whole, sql)
        conn.rollback()


def _drain(index: SqlIndex) -> None:
    """The steady state of an idle service: every job done, every series rolled up."""
    for uid in index.series_due(0):
        index.add_job("series", uid)
    while jobs := index.claim_jobs("w", limit=100):
        index.finish_jobs([(j.id, {}) for j in jobs])


def test_an_idle_turn_takes_no_lock_and_scans_nothing(index: SqlIndex) -> None:
    _drain(index)

    def idle_turn() -> None:  # what JobWorker.run and pacslab/worker_process.py run
        index.requeue_stale_jobs(600, give_up_after=5)
        assert index.claim_jobs("w", limit=64, defer_arriving_s=2.0, defer_busy_s=10.0) == []
        assert index.series_due(10) == []
        index.prune_jobs(3600)
        index.next_due([2.0, 10.0, 10.0])
        index.series_arriving()
        index.counts()

    statements = _statements(index, idle_turn)
    locking = [sql for sql, _ in statements if "FOR UPDATE" in sql.upper()]
    assert locking == []
    _no_full_scan(index, statements)


def test_a_busy_turn_claims_through_indexes(index: SqlIndex) -> None:
    """With jobs waiting: the claim (``FOR UPDATE SKIP LOCKED``), the deferral of a
    series still arriving, the roll-up and the finish read indexes only."""

    def busy_turn() -> None:
        jobs = index.claim_jobs("w", limit=8, defer_arriving_s=2.0, defer_busy_s=10.0)
        assert jobs
        index.finish_jobs([(j.id, {}) for j in jobs])
        for uid in index.series_due(10)[:1]:
            index.add_job("series", uid)
        index.renew_jobs("w", [j.id for j in jobs])

    _no_full_scan(index, _statements(index, busy_turn))


def test_modality_lists_and_wildcards_read_ranges_of_the_index(index: SqlIndex) -> None:
    """QIDO-RS and C-FIND ``ModalitiesInStudy`` with one modality, a list or a wildcard
    (the wildcard first resolved by a loose scan of ``ix_study_modalities_modality``):
    every read of ``study_modalities`` is a range of one of its indexes."""
    for value in ("CT", "CT\\MR", "CT,MR,US", "C*", "?R"):
        match = (Match("ModalitiesInStudy", value),)

        def search(match: tuple[Match, ...] = match) -> None:
            index.find(Query(level="study", matches=match, limit=101))
            index.find(Query(level="study", matches=match, limit=51, offset=50,
                             newest_first=True))
            index.find(Query(level="study", matches=(*match, Match("PatientName", "NGUY*")),
                             limit=101))
            index.find(Query(level="study", matches=match, limit=101, after="1.1"))

        statements = _statements(index, search)
        _no_full_scan(index, statements)
        assert any("study_modalities.modality = " in sql for sql, _ in statements), value


def test_the_receivers_write_reads_indexes_only(index: SqlIndex,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE's ``add_instances``: its statements go to the driver
    (:class:`~storage.index.direct.DirectStatement`), past the engine's events, so
    they are caught there. A new series (patient, study, series upserts, name words,
    merge lookup, modality) and then the common case, an instance of a series this
    process has indexed (lookups by SOP Instance UID, inserts, the series' counters).
    Measured at 100,000 instances (issue 21): each of them costs the same as on an
    empty archive."""
    seen: list[tuple[str, Any]] = []
    execute = DirectStatement.execute

    def spy(self: DirectStatement, conn: Any, rows: Any) -> list[Any]:
        seen.extend((self.sql, self._params(row)) for row in rows)
        return execute(self, conn, rows)

    monkeypatch.setattr(DirectStatement, "execute", spy)
    for i in (1, 2):
        index.add_instances([new(record(i, series="9.1.1", study="9.1", patient="P9",
                                        name="LÊ^VĂN AN"), f"9a1a{i}")])
    monkeypatch.undo()
    sqls = {sql.split(None, 1)[0].upper() for sql, _ in seen}
    assert {"SELECT", "INSERT", "UPDATE", "DELETE"} <= sqls, sqls
    _no_full_scan(index, seen)


def _index_reads_without_cond(node: dict[str, Any], table: str) -> Iterator[str]:
    """The indexes of ``table`` a plan reads from end to end (no ``Index Cond``)."""
    if (node.get("Relation Name") == table and "Index Name" in node
            and "Index Cond" not in node):
        yield str(node["Index Name"])
    for child in node.get("Plans", ()):
        yield from _index_reads_without_cond(child, table)


@pytest.mark.parametrize("collation", ["en_US.utf8", "C.utf8"])
def test_job_kind_prefixes_read_a_range_under_any_collation(pg_server: Any,
                                                            collation: str) -> None:
    """``/metrics`` and the queue pages count jobs by kind prefix (``kind LIKE 'fwd:%'``,
    storage/index/qr.py). A btree index serves a LIKE prefix only under the C collation
    or with pattern ops: the test server is C, a production database usually is not,
    and there each scrape read all of ``jobs`` until migration 0013 (issue 21)."""
    import subprocess

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from storage.index import qr

    if collation.lower() not in subprocess.run(["locale", "-a"], capture_output=True,
                                               text=True, check=False).stdout.lower():
        pytest.skip(f"locale {collation} not installed")
    admin = admin_url(pg_server)
    name = f"pacslab_coll_{collation.split('.')[0].lower()}_{id(admin) % 100000}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f"CREATE DATABASE \"{name}\" TEMPLATE template0 "
                              f"LC_COLLATE '{collation}' LC_CTYPE '{collation}'"))
    finally:
        engine.dispose()
    index = SqlIndex(IndexSettings(url=make_url(admin).set(database=name)
                                   .render_as_string(hide_password=False)))
    try:
        for i in range(3):
            index.add_job("instance", f"1.{i}")
            index.add_job("fwd:PACS2", f"1.{i}")
        statements = _statements(index, lambda: (qr.job_counts(index, "fwd:"),
                                                 qr.list_jobs(index, "fwd:"),
                                                 qr.job_counts(index, "commit", exact=True)))
        with index.engine.connect() as conn:
            assert conn.execute(text("SELECT datcollate FROM pg_database WHERE datname = "
                                     "current_database()")).scalar_one() == collation
            conn.exec_driver_sql("SET enable_seqscan = off")
            for sql, params in statements:
                plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, params).scalar_one()
                assert "jobs" not in set(_scans(plan[0]["Plan"])), sql
                assert not list(_index_reads_without_cond(plan[0]["Plan"], "jobs")), sql
            conn.rollback()
    finally:
        index.close()
