"""Issue 21: on SQLite, nothing a receiver waits for runs inside its commit.

* WAL checkpoints: the index's connections turn SQLite's automatic checkpoint off and
  a thread of their own (``storage.index.sqlite.Checkpointer``) copies the WAL into
  the database file after commits; the control shows the automatic one would have
  run inside the commit.
* The other stores of the index (orders, worklist, MPPS, API keys, Q/R destinations)
  read without taking the write lock, as ``SqlIndex`` itself does.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from core.settings import IndexSettings
from storage.apikeys import ApiKeyStore
from storage.index.orders import SqlOrderStore, SqlWorklistSource
from storage.index.qr import list_destinations
from storage.index.sql import SqlIndex
from storage.index.sqlite import Checkpointer, make_engine
from tests.support import wait_until
from worklist.ports import CandidateFilter

ROWS = 3000  # ~6 MB of 2 KB rows: far past the automatic checkpoint's 1,000 pages


def _big_commit(path: Path, checkpoints: Checkpointer | None) -> tuple[int, object]:
    engine = make_engine(f"sqlite:///{path}", busy_timeout_s=5, checkpoints=checkpoints)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x BLOB)"))
        conn.execute(text("INSERT INTO t VALUES (:x)"), [{"x": b"x" * 2048}] * ROWS)
    return path.stat().st_size, engine


def test_commits_leave_checkpoints_to_the_thread(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    checkpoints = Checkpointer(str(path), delay_s=1.0)
    size, engine = _big_commit(path, checkpoints)
    try:
        assert size < ROWS * 2048 // 4  # the commit copied nothing into the file
        with engine.connect() as conn:  # type: ignore[attr-defined]
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        wait_until(lambda: path.stat().st_size > ROWS * 2048, timeout=30)
    finally:
        checkpoints.close()
        engine.dispose()  # type: ignore[attr-defined]


def test_control_the_automatic_checkpoint_runs_in_the_commit(tmp_path: Path) -> None:
    size, engine = _big_commit(tmp_path / "index.db", None)
    engine.dispose()  # type: ignore[attr-defined]
    assert size > ROWS * 2048


def test_index_writes_wake_the_checkpointer(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    index = SqlIndex(IndexSettings(url=f"sqlite:///{path}"))
    try:
        with index.write() as conn:
            conn.execute(text("CREATE TABLE t (x BLOB)"))
            conn.execute(text("INSERT INTO t VALUES (:x)"), [{"x": b"x" * 2048}] * ROWS)
        wait_until(lambda: path.stat().st_size > ROWS * 2048, timeout=30)
    finally:
        index.close()


@pytest.fixture
def index(tmp_path: Path) -> Iterator[SqlIndex]:
    idx = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/index.db", busy_timeout_s=0.2))
    yield idx
    idx.close()


def test_store_reads_never_take_the_write_lock(index: SqlIndex, tmp_path: Path) -> None:
    holder = sqlite3.connect(tmp_path / "index.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a receiver's long commit, say
    try:
        # A modality's worklist query, an order lookup, an API key check, Q/R.
        assert list(SqlWorklistSource(index).candidates(CandidateFilter())) == []
        orders = SqlOrderStore(index)
        assert orders.find(accession="A1") is None
        assert orders.search() == [] and orders.count() == 0
        assert ApiKeyStore(index.engine).get("nokey") is None
        assert list_destinations(index) == {}
        # The control: a write does wait for the lock, and gives up.
        with pytest.raises(Exception, match="locked"), index.write() as conn:
            conn.execute(text("DELETE FROM orders"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
