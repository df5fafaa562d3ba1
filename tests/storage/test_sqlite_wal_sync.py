"""SQLite: an indexed instance is as durable as a FULL commit, without flushing under
the write lock (storage/index/sqlite.py).

A power cut cannot be staged in a test; what can be checked is the order that makes
the commit durable: the instance's transaction commits with ``synchronous=NORMAL``
(no flush inside COMMIT), and the WAL that holds it is flushed after the write lock
is released and before ``add_instances`` returns. Every other write keeps FULL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from core.errors import OutOfResourcesError
from core.settings import IndexSettings
from storage.index import sqlite as sqlite_dialect
from storage.index.sql import SqlIndex
from tests.storage.test_index_contract import new, record


@pytest.fixture
def index(tmp_path: Path) -> Iterator[SqlIndex]:
    idx = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path / 'index.db'}", migrate=True))
    yield idx
    idx.close()


def _synchronous(engine: object) -> int:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        return int(conn.execute(text("PRAGMA synchronous")).scalar_one())


def test_instances_commit_normal_everything_else_full(index: SqlIndex) -> None:
    assert _synchronous(index._ingest()[0]) == 1  # NORMAL
    assert _synchronous(index.engine) == 2  # FULL


def test_wal_flushed_after_the_lock_is_released(index: SqlIndex,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert index._write_lock is not None
    events: list[str] = []
    held = index._write_lock.held

    def tracking_held():  # type: ignore[no-untyped-def]
        cm = held()

        class Tracker:
            def __enter__(self) -> None:
                cm.__enter__()
                events.append("locked")

            def __exit__(self, *exc: object) -> None:
                cm.__exit__(*exc)
                events.append("released")
        return Tracker()

    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        events.append("flush " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fdatasync(fd)

    monkeypatch.setattr(index._write_lock, "held", tracking_held)
    monkeypatch.setattr(sqlite_dialect.os, "fdatasync", fdatasync)
    outcome = index.add_instances([new(record(1), "a")])
    assert outcome[0].status == "stored"
    assert events == ["locked", "released", "flush index.db-wal"]
    # The row is visible to every other connection once add_instances returned.
    assert index.get_instance("1.2.3.1.1").version == 1


def test_failed_flush_is_out_of_resources(index: SqlIndex,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sqlite_dialect.os, "fdatasync", failing)
    with pytest.raises(OutOfResourcesError):
        index.add_instances([new(record(1), "a")])
    monkeypatch.undo()
    # Sent again, it is found committed with the same bytes: acknowledged then.
    assert index.add_instances([new(record(1), "a")])[0].status == "duplicate"


def test_wal_path_is_the_one_sqlite_uses(tmp_path: Path) -> None:
    # Asked of SQLite (PRAGMA database_list), not derived from the URL's text.
    idx = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path}/./sub/../a.db", migrate=True))
    try:
        wal = idx._ingest()[1]
        assert wal == f"{tmp_path / 'a.db'}-wal"
        assert os.path.exists(wal)
    finally:
        idx.close()


def test_no_wal_file_flushes_the_database(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "b.db"
    db.write_bytes(b"")
    flushed: list[str] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fdatasync(fd)

    monkeypatch.setattr(sqlite_dialect.os, "fdatasync", fdatasync)
    sqlite_dialect.sync_wal(f"{db}-wal")
    assert flushed == [str(db)]
    with pytest.raises(FileNotFoundError):  # a wrong path fails, never passes silently
        sqlite_dialect.sync_wal(str(tmp_path / "missing.db-wal"))


def test_journal_mode_unknown_yet_uses_full_and_asks_again(
        index: SqlIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    real = sqlite_dialect.wal_path
    calls: list[int] = []

    def busy_once(engine: object) -> str | None:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("PRAGMA journal_mode", None, Exception("database is locked"))
        return real(engine)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite_dialect, "wal_path", busy_once)
    assert index.add_instances([new(record(1), "a")])[0].status == "stored"
    assert index._ingest_setup is None  # FULL this time, not settled
    assert index.add_instances([new(record(2), "b")])[0].status == "stored"
    assert index._ingest_setup is not None and index._ingest_setup[1] is not None
    assert len(calls) == 2


def test_a_receiver_can_open_its_ingest_connection_before_the_first_instance(
        index: SqlIndex) -> None:
    """``prepare_ingest`` (called by each receiver process at start): the NORMAL
    engine is settled and holds an open connection, which the first instance uses."""
    index.prepare_ingest()
    engine, wal = index._ingest()
    assert wal and engine is not index.engine
    assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    index.add_instances([new(record(1), "k1")])
    assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]  # the same one
    assert _synchronous(engine) == 1
