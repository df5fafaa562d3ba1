"""The action log on the index database: a hash chain appended from a background thread.

Callers (C-STORE, C-FIND, MPPS, HTTP requests, lab files, signing) only
:meth:`AuditLog.record` an :class:`~core.audit.AuditEntry`: a queue put that never
blocks on the database and never raises. A writer thread takes everything queued in
the last ``flush_interval_s`` and appends it in one transaction under the index's
write lock: it reads the chain head (``audit_head``), links the batch
(:func:`core.audit.chain`) and moves the head. If the database refuses, the batch is
logged at ERROR and kept for the next attempt (up to ``max_pending`` entries) — an
audit failure never delays or refuses an acknowledgement (STYLE.md §5), and a
process that dies loses at most the last ``flush_interval_s`` of entries.

Anchoring (:mod:`core.audit`): the writer keys every hash with the chain key
(``audit.chain_key_file``, 0600, outside the database) and appends a checkpoint to
``audit.checkpoint_file`` on its first write, at most every
``checkpoint_interval_s`` after, and on close; each checkpoint is also logged at INFO
(logger ``storage.audit``), so a syslog handler keeps a copy off the machine.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, select, update

from core.audit import (
    AuditEntry,
    ChainedEntry,
    ChainProblem,
    Checkpoint,
    chain,
    checkpoint_line,
    is_keyed,
    parse_checkpoints,
    verify_chain,
)
from core.settings import AuditSettings
from storage.index import sqlite as _sqlite
from storage.index.queries import bounded_count
from storage.index.schema_emr import audit_events, audit_head
from storage.index.sqlite import read_only
from storage.syslog import SyslogSender

__all__ = [
    "AuditKeyError",
    "AuditLog",
    "AuditStore",
    "CheckpointFile",
    "load_chain_key",
    "load_secret",
]

logger = logging.getLogger(__name__)


def load_secret(path: Path, *, size: int = 32) -> bytes:
    """Read a random secret from ``path``, creating it (mode 0600) if it does not exist.

    Several processes may start at once: ``O_EXCL`` makes exactly one of them write it.
    """
    with contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
        if len(data) >= 16:
            return data
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token_bytes(size))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process won the race
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


class AuditKeyError(RuntimeError):
    """The chain key is missing where the log was keyed, or readable by others."""


def load_chain_key(path: Path, checkpoints: Path | None = None, *,
                   create: bool = True) -> bytes | None:
    """The chain key at ``path``; created (0600) on first start when ``create``.

    Raises
    ------
    AuditKeyError
        The file is readable or writable by group or others (as ssh refuses such a
        private key: anyone who can read it can re-chain the log), or it is missing
        while ``checkpoints`` shows the log was keyed — a new key would make every
        keyed entry look forged, so the old key must be restored from a backup.
    """
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise AuditKeyError(f"audit chain key {path} is accessible to others (mode "
                                f"{mode:o}): chmod 600 {path}")
        return load_secret(path)
    if checkpoints is not None and CheckpointFile(checkpoints).lines():
        raise AuditKeyError(f"audit chain key {path} is missing but {checkpoints} shows the "
                            "log was keyed with it: restore keys/audit-chain.key from a backup")
    if not create:
        return None
    return load_secret(path)


class CheckpointFile:
    """The append-only checkpoint file (JSON lines, :func:`core.audit.checkpoint_line`).

    Appends are one ``write`` to an ``O_APPEND`` descriptor under ``flock`` and are
    fsynced, so writers in several processes never interleave or lose a line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return text.splitlines(keepends=True)

    def read(self, key: bytes | None) -> tuple[list[Checkpoint], list[ChainProblem]]:
        return parse_checkpoints(self.lines(), key)

    @contextlib.contextmanager
    def locked(self) -> Iterator[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def append(self, cp: Checkpoint, key: bytes, *, fd: int | None = None) -> None:
        line = checkpoint_line(cp, key).encode()
        with contextlib.nullcontext(fd) if fd is not None else self.locked() as out:
            os.write(out, line)
            os.fsync(out)
        logger.info("audit checkpoint seq=%d hash=%s keyed_from=%d", cp.seq, cp.hash,
                    cp.keyed_from)


class AuditStore:
    """Read side of the log: entries in chain order, search, verification."""

    def __init__(self, engine: Engine, *, key: bytes | None = None,
                 checkpoints: Path | None = None) -> None:
        self.engine = engine
        #: The chain key; without it keyed entries are checked for their links only.
        self.key = key
        self.checkpoints = CheckpointFile(checkpoints) if checkpoints is not None else None

    @classmethod
    def from_settings(cls, engine: Engine, settings: AuditSettings) -> AuditStore:
        """A reader with the key and checkpoints ``settings`` name (the key is not created)."""
        key = (load_chain_key(settings.chain_key_file, settings.checkpoint_file, create=False)
               if settings.chain_key_file is not None else None)
        return cls(engine, key=key, checkpoints=settings.checkpoint_file)

    def head(self) -> tuple[int, str] | None:
        with read_only(self.engine) as conn:
            row = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).first()
        return (int(row.seq), str(row.hash)) if row is not None else None

    def entries(self, *, chunk: int = 5000) -> Iterator[ChainedEntry]:
        """Every entry in ``seq`` order, read in chunks."""
        after = 0
        while True:
            with read_only(self.engine) as conn:
                rows = conn.execute(
                    select(audit_events)
                    .where(audit_events.c.seq > after)
                    .order_by(audit_events.c.seq)
                    .limit(chunk)
                ).mappings().all()
            if not rows:
                return
            for row in rows:
                yield ChainedEntry.from_row(row)
            after = int(rows[-1]["seq"])

    def verify(self) -> list[ChainProblem]:
        """:func:`core.audit.verify_chain` over the whole log, its head and checkpoints.

        With a key, a log with entries but no checkpoint is a problem too: the key
        and the first checkpoint are made together at start-up (:meth:`AuditLog.anchor`)
        or on the first keyed write, so the file was removed, and a log re-chained from
        its start (keyed or not) could not be told from the original.
        """
        checkpoints: list[Checkpoint] = []
        problems: list[ChainProblem] = []
        if self.checkpoints is not None:
            checkpoints, problems = self.checkpoints.read(self.key)
        entries = list(self.entries())
        problems += verify_chain(entries, self.head(), key=self.key, checkpoints=checkpoints)
        if self.key is not None and self.checkpoints is not None and not checkpoints and entries:
            problems.append(ChainProblem(
                "checkpoint", 0, f"no checkpoint in {self.checkpoints.path} although the "
                "chain key exists: the file was removed; a re-chained log cannot be ruled out"))
        return problems

    def search(
        self,
        *,
        patient_key: str | None = None,
        agent: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
        offset: int = 0,
        oldest_first: bool = False,
    ) -> list[ChainedEntry]:
        """Entries matching every given criterion, newest first (or oldest first).

        ``since``/``until`` compare ISO 8601 text (``recorded`` is UTC ``…Z``), so a date
        ``2026-01-02`` bounds at midnight UTC. Oldest first keeps offsets stable while
        entries are appended, so a pager sees each entry once.
        """
        cond = self._conditions(patient_key, agent, since, until)
        order = audit_events.c.seq if oldest_first else audit_events.c.seq.desc()
        query = select(audit_events).order_by(order).limit(limit).offset(offset)
        if cond:
            query = query.where(and_(*cond))
        with read_only(self.engine) as conn:
            return [ChainedEntry.from_row(r) for r in conn.execute(query).mappings()]

    def count(
        self,
        *,
        patient_key: str | None = None,
        agent: str | None = None,
        since: str | None = None,
        until: str | None = None,
        at_most: int | None = None,
    ) -> int:
        """How many entries :meth:`search` with these criteria finds (FHIR Bundle.total),
        counted no further than ``at_most + 1`` when given (FHIR ``_total``)."""
        cond = self._conditions(patient_key, agent, since, until)
        matching = select(audit_events.c.seq)
        if cond:
            matching = matching.where(and_(*cond))
        query = bounded_count(matching, at_most)
        with read_only(self.engine) as conn:
            return int(conn.execute(query).scalar_one())

    @staticmethod
    def _conditions(
        patient_key: str | None, agent: str | None, since: str | None, until: str | None
    ) -> list[Any]:
        cond: list[Any] = []
        if patient_key:
            cond.append(audit_events.c.patient_key == patient_key)
        if agent:
            cond.append(audit_events.c.agent == agent)
        if since:
            cond.append(audit_events.c.recorded >= since)
        if until:
            cond.append(audit_events.c.recorded < until)
        return cond


class AuditLog(AuditStore):
    """Append side: :meth:`record` queues, a daemon thread writes batches."""

    def __init__(self, engine: Engine, settings: AuditSettings, *, url: str = "") -> None:
        key = (load_chain_key(settings.chain_key_file, settings.checkpoint_file)
               if settings.chain_key_file is not None else None)
        super().__init__(engine, key=key, checkpoints=settings.checkpoint_file)
        self.settings = settings
        #: First keyed seq (from the checkpoints, or set on this process's first write).
        self._keyed_from: int | None = None
        self._checkpointed = 0.0
        self._last: tuple[int, str] | None = None
        self.enabled = settings.enabled
        self._is_pg = engine.dialect.name == "postgresql"
        self._lock = _sqlite.write_lock(url) if url.startswith("sqlite") else None
        #: The WAL file appends flush after the write lock ("" not WAL; None: not known).
        self._wal: str | None = None
        self._pending: collections.deque[AuditEntry] = collections.deque()
        self._cond = threading.Condition()
        self._flushes: list[threading.Event] = []
        #: Entries the writer took from ``_pending`` and is writing now: a flush waits
        #: for them too (it returned while a batch was being written, and the entries
        #: it had to wait for were not there yet: seen in CI).
        self._writing = 0
        self._closed = False
        self.dropped = 0
        self._thread: threading.Thread | None = None
        #: ATNA copy of every entry to a syslog collector (issue 17), if configured.
        self.atna = SyslogSender(settings.atna) if settings.atna.url else None

    def _ensure_thread(self) -> None:
        # Started lazily, so an AuditLog built before a fork runs its thread in the child.
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="pacslab-audit", daemon=True)
            self._thread.start()

    def record(self, entry: AuditEntry) -> None:
        """Queue one entry; never blocks on I/O, never raises."""
        if not self.enabled:
            return
        try:
            stamped = entry.stamped()
            if self.atna is not None:
                self.atna.submit(stamped)  # a queue put too: never blocks, never raises
            with self._cond:
                if len(self._pending) >= self.settings.max_pending:
                    self.dropped += 1
                    if self.dropped == 1 or self.dropped % 1000 == 0:
                        logger.error("audit log backlog full: %d entries dropped", self.dropped)
                    return
                self._pending.append(stamped)
                self._ensure_thread()
                # Only an idle writer needs waking: one that is gathering a batch waits
                # for its interval anyway, and waking it per entry cost a GIL handoff
                # per C-STORE.
                if len(self._pending) == 1:
                    self._cond.notify()
        except Exception:
            logger.error("could not queue an audit entry", exc_info=True)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written; False if it could not be."""
        if not self.enabled:
            return True
        done = threading.Event()
        with self._cond:
            if not self._pending and not self._writing:
                return True
            self._flushes.append(done)
            self._ensure_thread()
            self._cond.notify()
        done.wait(timeout)
        with self._cond:
            return done.is_set() and not self._pending

    def _release_flushes(self) -> None:
        for ev in self._flushes:
            ev.set()
        self._flushes.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._writing = 0  # (the last batch is written, or back in _pending)
                while not self._pending and not self._closed:
                    self._release_flushes()
                    self._cond.wait()
                if not self._pending:  # closed and drained
                    self._release_flushes()
                    return
                # Let a burst (a whole series over C-STORE) gather into one transaction.
                self._cond.wait_for(lambda: bool(self._flushes) or self._closed,
                                    timeout=self.settings.flush_interval_s)
                batch = [self._pending.popleft()
                         for _ in range(min(len(self._pending), self.settings.batch_max))]
                self._writing = len(batch)
            try:
                self.append(batch)
            except Exception:
                logger.error("audit log write failed; %d entries kept for retry", len(batch),
                             exc_info=True)
                with self._cond:
                    self._pending.extendleft(reversed(batch))
                    self._release_flushes()  # they see the backlog and report False
                    if self._closed:
                        logger.error("audit log closed with %d unwritten entries",
                                     len(self._pending))
                        return
                    self._cond.wait(max(self.settings.flush_interval_s, 1.0))

    def append(self, entries: list[AuditEntry]) -> list[ChainedEntry]:
        """Append ``entries`` to the chain now, in one transaction (the writer thread's step)."""
        if not entries:
            return []
        wal = self._sqlite_wal()
        if wal:
            rows, durable = self._append_sqlite(entries, wal)
            if not durable:
                return rows  # committed (never to be appended again), not checkpointed
        else:
            held = self._lock.held() if self._lock else contextlib.nullcontext()
            with held, self.engine.begin() as conn:
                query = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
                if self._is_pg:
                    query = query.with_for_update()  # serialises writers on every machine
                head = conn.execute(query).first()
                if head is None:
                    raise RuntimeError("audit_head row missing (migration 0004 not applied?)")
                rows = self._link(entries, int(head.seq), str(head.hash))
                conn.execute(audit_events.insert(), [r.as_dict() for r in rows])
                conn.execute(
                    update(audit_head)
                    .where(audit_head.c.id == 1)
                    .values(seq=rows[-1].seq, hash=rows[-1].hash)
                )
        # After the commit: a checkpoint must never name an entry that is not there.
        self._last = (rows[-1].seq, rows[-1].hash)
        if time.monotonic() - self._checkpointed >= self.settings.checkpoint_interval_s:
            self.checkpoint()
        return rows

    def _link(self, entries: list[AuditEntry], head_seq: int, head_hash: str
              ) -> list[ChainedEntry]:
        if self.key is not None and self._keyed_from is None:
            self._start_keying(head_seq, head_hash)
        return chain(entries, last_seq=head_seq, last_hash=head_hash, key=self.key)

    def _sqlite_wal(self) -> str | None:
        """The WAL file to flush after an append, on SQLite in WAL mode (else None)."""
        if self._lock is None:
            return None
        if self._wal is None:
            try:
                self._wal = _sqlite.wal_path(self.engine) or ""
            except Exception:
                return None  # not known yet: this append commits with FULL
        return self._wal or None

    def _append_sqlite(self, entries: list[AuditEntry], wal: str
                       ) -> tuple[list[ChainedEntry], bool]:
        """One append on the bare sqlite3 connection, committed with ``synchronous=NORMAL``
        under the write lock and made durable by an ``fdatasync`` of the WAL once the lock
        is released (as C-STORE's commits are, storage/index/sqlite.py): the receivers
        queued behind this transaction no longer wait for its flush, nor for
        SQLAlchemy's per-statement work. Durable before it returns (so before any
        checkpoint names it) unless the flush failed: then the entries are committed,
        and must not be appended again, but not known durable (False).
        """
        assert self._lock is not None
        pooled = self.engine.raw_connection()
        try:
            db = pooled.driver_connection
            assert db is not None
            db.execute("PRAGMA synchronous=NORMAL")  # autocommit mode: no transaction open
            try:
                with self._lock.held():
                    db.execute("BEGIN IMMEDIATE")
                    try:
                        head = db.execute(
                            "SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
                        if head is None:
                            raise RuntimeError(
                                "audit_head row missing (migration 0004 not applied?)")
                        rows = self._link(entries, int(head[0]), str(head[1]))
                        db.executemany(_INSERT_EVENT,
                                       [tuple(getattr(r, f) for f in _EVENT_COLUMNS)
                                        for r in rows])
                        db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1",
                                   (rows[-1].seq, rows[-1].hash))
                        db.execute("COMMIT")
                    except BaseException:
                        with contextlib.suppress(Exception):
                            db.execute("ROLLBACK")
                        raise
            finally:
                db.execute("PRAGMA synchronous=FULL")  # the pool's other users' setting
            _sqlite.mark_written(pooled)  # wakes the index's checkpointer at check-in
        finally:
            pooled.close()
        try:
            _sqlite.sync_wal(wal)
        except OSError as exc:
            logger.error("audit log WAL flush failed: %s", exc.strerror)
            return rows, False
        return rows, True

    def anchor(self) -> None:
        """Record where keying begins now, before any entry is written (start-up).

        The composition root calls this once the index is migrated, so that a chain key
        always has a checkpoint beside it: a keyed installation whose log has entries
        but no checkpoint then means the file was removed (see :meth:`verify`).
        """
        if self.key is None or self._keyed_from is not None:
            return
        held = self._lock.held() if self._lock else contextlib.nullcontext()
        with held, self.engine.begin() as conn:
            query = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
            if self._is_pg:
                query = query.with_for_update()
            head = conn.execute(query).first()
            if head is not None:
                self._start_keying(int(head.seq), str(head.hash))

    def _start_keying(self, head_seq: int, head_hash: str) -> None:
        """Learn where keying began, or begin it after ``head_seq`` (the migration).

        Called under the database write lock, with the checkpoint file locked too, so
        of several processes starting together exactly one records the switch.
        """
        assert self.key is not None and self.checkpoints is not None
        with self.checkpoints.locked() as fd:
            known, _ = self.checkpoints.read(self.key)
            if known:
                self._keyed_from = min(cp.keyed_from for cp in known)
                return
            # No checkpoint yet: entries up to the head keep their SHA-256 hashes (see
            # core.audit); a keyed head means the file was lost after keying began.
            self._keyed_from = head_seq if is_keyed(head_hash) else head_seq + 1
            if head_seq:
                logger.warning("audit log: entries 1..%d are unkeyed (written before the "
                               "chain key); keyed from %d on", self._keyed_from - 1,
                               self._keyed_from)
            self.checkpoints.append(Checkpoint(head_seq, head_hash, self._keyed_from,
                                               _now()), self.key, fd=fd)

    def checkpoint(self) -> None:
        """Append a checkpoint of the last entry this process wrote (logs, never raises)."""
        if self.key is None or self.checkpoints is None or self._last is None:
            return
        if self._keyed_from is None:
            return
        try:
            self.checkpoints.append(Checkpoint(*self._last, self._keyed_from, _now()), self.key)
            self._checkpointed = time.monotonic()
        except OSError:
            logger.error("could not append an audit checkpoint", exc_info=True)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self.checkpoint()
        if self.atna is not None:
            self.atna.close()


#: audit_events' columns, in ChainedEntry's order, for the bare-sqlite3 insert.
_EVENT_COLUMNS = tuple(c.name for c in audit_events.columns)
_INSERT_EVENT = (f"INSERT INTO audit_events ({', '.join(_EVENT_COLUMNS)}) "
                 f"VALUES ({', '.join('?' for _ in _EVENT_COLUMNS)})")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
