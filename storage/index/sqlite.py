"""SQLite specifics: WAL, durable commits, write lock taken at BEGIN, writers queued.

Why ``BEGIN IMMEDIATE``: several receiver processes write the same file; a deferred
transaction that reads first and then writes can fail with SQLITE_BUSY on the
lock upgrade without waiting for busy_timeout. Taking the write lock at BEGIN makes
writers queue instead. ``synchronous=FULL`` in WAL mode fsyncs the WAL on every
commit: a C-STORE success is never acknowledged on a commit a power cut could undo.

Why C-STORE's transactions commit with ``synchronous=NORMAL`` and then fsync the WAL
themselves (:func:`sync_wal`): with FULL, SQLite fsyncs the WAL inside COMMIT, while
the write lock is held, so receiver processes queue behind each other's flushes (about
1 ms each here, the largest part of a single-instance transaction). In WAL mode NORMAL
is crash-consistent but may lose the last commits on power loss; fsyncing the WAL
after COMMIT, outside the lock and before the C-STORE is answered, makes the commit
exactly as durable as FULL would (its frames are in that file, or, once checkpointed,
in the database file SQLite has synced), and concurrent receivers' flushes overlap.
Every other writer keeps FULL.

Why checkpoints run in a thread of their own (:class:`Checkpointer`): SQLite's
automatic checkpoint runs inside the COMMIT that takes the WAL past 1,000 pages. At a
million instances that is one single-instance C-STORE in about 80: it copies those
pages into the database file and fsyncs it while holding the write lock (SQLite's and
ours), and every receiver queues behind it; with 300 writes measured, the p99 is such
a write (issue 21). The index's connections turn the automatic checkpoint off and
wake the checkpointer after they commit; its PASSIVE checkpoint waits for no reader
and no writer, and none waits for it.

Why an ``flock`` around each write transaction (:class:`WriteLock`): when SQLite's
lock is taken, its busy handler sleeps 1, 2, 5, 10… ms before trying again, so
receiver processes contending for the index lose milliseconds per instance. A
blocking ``flock`` on a side file is woken by the kernel the moment the holder has
committed, so writers queue without sleeping. Readers never take it (WAL readers do
not block writers).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

__all__ = [
    "CHECKPOINT_DELAY_S",
    "MMAP_SIZE",
    "READ_ONLY",
    "Checkpointer",
    "DataVersion",
    "WriteLock",
    "checkpointer",
    "data_version",
    "is_retryable",
    "lock_keys",
    "make_engine",
    "mark_written",
    "read_only",
    "sync_wal",
    "upsert",
    "wal_path",
    "write_lock",
]

#: Bytes of the database file SQLite maps into memory per connection (see make_engine).
MMAP_SIZE = 0x7FFF0000  # SQLite caps it at its compile-time SQLITE_MAX_MMAP_SIZE (this)

#: Seconds between a commit and the checkpoint it wakes. Each checkpoint of a big index
#: fsyncs the database file; a receiver's commit that flushes the WAL meanwhile waits
#: behind that flush on the same disk. At a million instances every insert dirties leaf
#: pages scattered over the file (random UIDs and content keys), so each checkpoint
#: flushes many; under continuous writes 0.25 s made the single-instance write p99
#: 180-200 ms against 60-100 ms at 1-5 s, interleaved on one copy of the file (empty
#: archive: no trend). 1 s keeps the WAL to a second of writes (issue 21).
CHECKPOINT_DELAY_S = 1.0

#: Mark of a pooled connection that committed since it was checked out.
_WROTE = "pacslab_wrote"

#: Execution option of connections that only read (see ``_on_begin``).
READ_ONLY = "pacslab_read_only"

upsert = sqlite_insert

logger = logging.getLogger(__name__)


class _LockFile:
    """One thread's open file description of the lock file, closed when the thread's
    ``threading.local`` storage goes (the thread ended) or when the lock is closed."""

    __slots__ = ("__weakref__", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


class WriteLock:
    """Cross-process, cross-thread exclusive lock on ``<database>.writelock``.

    Each thread gets its own open file description (flocks of two threads conflict, as
    they must: flock locks belong to the open file description). Association and
    request threads come and go, so a thread's descriptor is closed when the thread
    ends; kept open, one leaked per association thread would, after about a thousand
    associations, push the process's descriptors past ``select()``'s FD_SETSIZE, which
    pynetdicom's transport uses.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        self._files: weakref.WeakSet[_LockFile] = weakref.WeakSet()

    def _fd(self) -> int:
        held: _LockFile | None = getattr(self._local, "file", None)
        if held is None or held.fd < 0:
            held = _LockFile(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            self._local.file = held
            self._files.add(held)
        return held.fd

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        fd = self._fd()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close every thread's descriptor (the index is closing: no writer is left)."""
        for held in list(self._files):
            held.close()


class Checkpointer:
    """PASSIVE checkpoints of one database file, off the write path (module docstring).

    Writers call :meth:`wrote` after each commit; the thread, started on the first
    one, checkpoints ``delay_s`` later, so a burst of commits shares one checkpoint,
    and sleeps while nothing is written (no CPU when idle). Each process that writes
    runs its own: SQLite lets one checkpoint run at a time and a PASSIVE one copies
    what it can without waiting, so they never block each other or anyone else.
    """

    def __init__(self, path: str, *, delay_s: float = CHECKPOINT_DELAY_S) -> None:
        self.path = path
        self.delay_s = delay_s
        self._wake = threading.Event()
        #: Set by close(): ends the delay at once, so closing an index never waits out
        #: ``delay_s`` (every test app's shutdown waited a second for it).
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def wrote(self) -> None:
        """A transaction was committed: checkpoint soon."""
        if self._thread is None:
            with self._start:
                if self._thread is None and not self._closed:
                    thread = threading.Thread(
                        target=self._run, name="sqlite-checkpoint", daemon=True
                    )
                    thread.start()
                    self._thread = thread
        self._wake.set()

    def checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            # Nothing is lost: the frames stay in the WAL for the next checkpoint.
            logger.warning("index checkpoint failed: %s", exc)

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            while True:
                self._wake.wait()
                if self._closed or self._stop.wait(self.delay_s):
                    return
                # Cleared before the checkpoint: a commit from now on wakes it again.
                self._wake.clear()
                self.checkpoint(conn)
                if self._closed:
                    return
        finally:
            conn.close()

    def close(self) -> None:
        """Stop the thread (the index is closing; SQLite checkpoints when the last
        connection to the file closes)."""
        self._closed = True
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)


def checkpointer(url: str) -> Checkpointer | None:
    """The checkpointer of a database file; None for an in-memory database."""
    db_path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
    if not db_path or db_path == ":memory:":
        return None
    return Checkpointer(db_path)


class DataVersion:
    """``PRAGMA data_version`` of one database file, on a connection of its own.

    The number changes whenever another connection, of this process or any other,
    commits to the file (SQLite reads it from the WAL index: microseconds, no table
    read, no transaction left open). This connection never writes, so every commit
    counts. The idle worker reads it on each poll and looks at the job queue only
    when it moved (issue 21).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def read(self) -> int:
        with self._lock:
            if self._conn is None:
                self._conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def data_version(url: str) -> DataVersion | None:
    """The commit counter of a database file; None for an in-memory database."""
    db_path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
    if not db_path or db_path == ":memory:":
        return None
    return DataVersion(db_path)


def write_lock(url: str) -> WriteLock | None:
    db_path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
    if not db_path or db_path == ":memory:":
        return None
    return WriteLock(f"{db_path}.writelock")


def wal_path(engine: Engine) -> str | None:
    """The WAL file of ``engine``'s database, as SQLite itself names it; None for an
    in-memory database or one not in WAL mode (there NORMAL would not be safe)."""
    with engine.connect() as conn:
        mode = str(conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()).lower()
        files = {row[1]: row[2] for row in conn.exec_driver_sql("PRAGMA database_list")}
    path = files.get("main") or ""
    if mode != "wal" or not path:
        return None
    return f"{path}-wal"


def sync_wal(path: str) -> None:
    """Make every commit written to the WAL so far durable (see the module docstring).

    Opened by name each time: SQLite may delete and recreate the file (after a
    checkpoint, when the last connection closes), and a kept descriptor would then
    flush a file no longer in use. No WAL file means everything was checkpointed
    into the database, which SQLite synced before removing it; the database file is
    flushed then all the same (cheap, and it fails loudly if the path were wrong).

    Raises
    ------
    OSError
        The flush failed: the commits are not known to be durable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = os.open(path.removesuffix("-wal"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _unicode_lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def make_engine(
    url: str,
    *,
    busy_timeout_s: float,
    synchronous: str = "FULL",
    checkpoints: Checkpointer | None = None,
) -> Engine:
    """An engine on SQLite; with ``checkpoints``, its connections leave checkpoints to
    that :class:`Checkpointer` and wake it on every commit (module docstring)."""
    engine = create_engine(
        url,
        connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
        pool_size=8,
        max_overflow=8,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would defer it).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        # LIKE is case-sensitive on PostgreSQL; make SQLite agree, so that QIDO wildcard
        # matching (PS3.4 C.2.2.2.4) behaves the same on both (queries.py lowers PN).
        cur.execute("PRAGMA case_sensitive_like=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        # Read pages through a memory map of the database file (the OS page cache)
        # rather than each connection's own 2 MB page cache: at a million instances the
        # index is over a gigabyte, and a receiver's insert touches leaves of several
        # B-trees keyed by random UIDs and hashes; with the small cache their pages were
        # read again and again (write p99 ~11 ms against ~3 ms mapped, issue 21).
        # Address space only: pages are shared with every other connection and process.
        cur.execute(f"PRAGMA mmap_size={MMAP_SIZE}")
        if checkpoints is not None:
            cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()
        # SQLite's built-in lower() folds ASCII only, so a PN search lowered in Python
        # ("nguyễn") never met the stored "NGUYỄN" lowered in SQL ("nguyỄn"): OHIF's
        # study list found no Vietnamese name (issue 20). Replace it with Python's
        # Unicode lower(), as PostgreSQL's lower() already is.
        dbapi_conn.create_function("lower", 1, _unicode_lower, deterministic=True)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Queries that only read (QIDO-RS, /metadata, FHIR search) ask for a deferred
        # BEGIN: in WAL mode they then read a snapshot without taking the write lock,
        # so API reads never queue behind, or hold up, receivers' commits.
        if conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    if checkpoints is not None:
        # SQLAlchemy's "commit" event comes before the COMMIT (which, with FULL, also
        # flushes the WAL): a checkpoint woken there could run before the frames are
        # committed and miss them. So the commit marks the pooled connection, and the
        # checkpointer is woken when it returns to the pool, committed.
        @event.listens_for(engine, "commit")
        def _on_commit(conn: Any) -> None:
            conn.connection.info[_WROTE] = True

        @event.listens_for(engine, "checkin")
        def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
            if record is not None and record.info.pop(_WROTE, False):
                checkpoints.wrote()

    return engine


def mark_written(pooled: Any) -> None:
    """Record that a transaction on this raw pooled connection (``engine.raw_connection``)
    committed, so the checkpointer is woken when it returns to the pool, as for
    connections that commit through SQLAlchemy (see ``make_engine``)."""
    pooled.info[_WROTE] = True


def read_only(engine: Engine) -> Connection:
    """A connection for transactions that only read.

    On SQLite its BEGIN is deferred (see ``_on_begin``): a WAL reader takes a snapshot
    and never the write lock, so it neither waits for receivers' commits nor holds
    them up, whereas a plain ``engine.connect()`` begins IMMEDIATE and queues with the
    writers (issue 21). Other dialects ignore the option.
    """
    return engine.connect().execution_options(**{READ_ONLY: True})


def lock_keys(conn: Any, keys: Any) -> None:
    """No-op: ``BEGIN IMMEDIATE`` already serialises SQLite's writers."""


def is_retryable(exc: Any) -> bool:
    """SQLite's lock waits happen inside busy_timeout; nothing to retry here."""
    return False
