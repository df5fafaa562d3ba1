"""PostgreSQL specifics (psycopg 3): row locks, advisory locks and retryable errors.

* Job claims use ``FOR UPDATE SKIP LOCKED`` (in :mod:`storage.index.sql`), so several
  workers on several machines share one queue without claiming a job twice.
* Receivers on several machines index the same SOP Instance at once (a study sent to
  two of them). Under READ COMMITTED both would see "no such instance" and both insert:
  a unique violation, or with other bytes two rows numbered version 2. So a write
  transaction first takes a transaction-scoped advisory lock per SOP Instance UID
  (:func:`lock_keys`), in sorted order and before any row lock, so they cannot deadlock.
  SQLite needs none of this: its writers are serialised by ``BEGIN IMMEDIATE``.
* Deadlocks, serialisation failures and unique violations that a concurrent writer
  caused are worth retrying once the other transaction is over (:func:`is_retryable`).
* The idle worker learns that work may have come from ``NOTIFY`` (:class:`WorkListener`),
  PostgreSQL's stand-in for SQLite's ``PRAGMA data_version`` (issue 21).
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "RECONNECT_S",
    "WORK_CHANNEL",
    "WorkListener",
    "is_retryable",
    "lock_keys",
    "make_engine",
    "upsert",
    "write_lock",
]

logger = logging.getLogger(__name__)

#: The channel the index's triggers notify (migration 0012) when a transaction creates
#: or re-queues a pending job or adds instances: what the job worker waits for.
WORK_CHANNEL = "pacslab_work"

#: Seconds between attempts to reconnect a lost listener: while PostgreSQL is down the
#: worker's full turns fail anyway, and each attempt may wait ``connect_timeout``.
RECONNECT_S = 2.0

upsert = pg_insert

#: SQLSTATEs a retry of the whole transaction can cure (PostgreSQL Appendix A).
_RETRYABLE = {"40001", "40P01", "23505"}

# The subquery's ORDER BY fixes the order in which the locks are taken.
_LOCK = text(
    "SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) "
    "FROM (SELECT unnest(CAST(:keys AS text[])) AS k ORDER BY 1) AS s"
)


def make_engine(url: str, *, busy_timeout_s: float) -> Engine:
    # lock_timeout bounds how long a writer waits, like SQLite's busy_timeout;
    # connect_timeout makes an unreachable server a quick 0xA700, not a hung C-STORE.
    # synchronous_commit=on whatever the server's default: a C-STORE success is only
    # sent after COMMIT, and with it off a server crash can undo acknowledged commits
    # (the fault suite saw exactly that against a server configured with it off).
    return create_engine(
        url,
        pool_size=8,
        max_overflow=8,
        pool_pre_ping=True,
        connect_args={
            "options": f"-c lock_timeout={int(busy_timeout_s * 1000)} "
            "-c synchronous_commit=on",
            "connect_timeout": max(1, int(min(busy_timeout_s, 10))),
        },
    )


def write_lock(url: str) -> None:
    """PostgreSQL queues writers itself."""
    return None


def lock_keys(conn: Connection, keys: Iterable[str]) -> None:
    """Take a transaction-scoped advisory lock on each key, in sorted order."""
    ordered = sorted(set(keys))
    if ordered:
        conn.execute(_LOCK, {"keys": ordered})


def is_retryable(exc: Any) -> bool:
    """True for errors a concurrent transaction caused (deadlock, unique violation)."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) in _RETRYABLE


#: The triggers of migration 0012 that notify :data:`WORK_CHANNEL`.
_TRIGGERS = ("nw_jobs_insert", "nw_jobs_update", "nw_instances_insert")
_TRIGGERS_THERE = (
    "SELECT count(*) FROM pg_trigger WHERE tgname IN ('" + "', '".join(_TRIGGERS) + "')"
)
#: Seconds before a listener that found no triggers looks again (an upgrade under way).
_NO_TRIGGERS_RECHECK_S = 60.0


class WorkListener:
    """``LISTEN`` for :data:`WORK_CHANNEL` on a connection of its own: a counter of the
    notifications received, read without a query (issue 21).

    PostgreSQL has no commit counter such as SQLite's ``PRAGMA data_version``. Triggers
    (migration 0012) ``NOTIFY`` in every transaction that creates or re-queues a
    pending job or adds instances, and PostgreSQL delivers a notification only once
    that transaction has committed: when the worker sees it, the work is visible to
    its next query. :meth:`read` looks at this connection's socket without waiting
    (``poll`` with a zero timeout), consumes what arrived and counts it, so an idle
    worker's poll makes no query and no round trip.

    None means "no signal, read the tables": before the first connection, on a schema
    without the triggers (asked again every minute), and after the connection was lost
    (a server restart) until it is back. Notifications sent in
    that gap are lost, so reconnecting bumps the counter: the worker's next poll is a
    full turn, which finds whatever was committed meanwhile. LISTEN is in place before
    that turn, so nothing committed after it is missed either. TCP keepalives notice
    a server that vanished without closing the socket; the worker's own safety net
    (a full turn at least every minute) covers the rest.
    """

    def __init__(self, engine: Engine, *, connect_timeout_s: float,
                 reconnect_s: float = RECONNECT_S) -> None:
        self._engine = engine
        self._connect_timeout_s = connect_timeout_s
        self._reconnect_s = reconnect_s
        self._conn: psycopg.Connection[Any] | None = None
        self._count = 0
        self._next_connect = 0.0
        self._lock = threading.Lock()
        #: What a lost connection raises (psycopg's errors added once it is imported).
        self._errors: tuple[type[Exception], ...] = (OSError, ValueError)
        self._ok = 0  # psycopg.pq.ConnStatus.OK, read once psycopg is imported

    def read(self) -> int | None:
        """Notifications received so far (plus one per connection made); None while
        there is no listening connection."""
        with self._lock:
            if self._conn is None and not self._connect():
                return None
            assert self._conn is not None
            try:
                pgconn = self._conn.pgconn
                # poll, not select: select fails on descriptors past FD_SETSIZE.
                poller = select.poll()
                poller.register(pgconn.socket, select.POLLIN)
                if poller.poll(0):
                    pgconn.consume_input()  # raises once the server has gone
                while pgconn.notifies() is not None:
                    self._count += 1
                if self._conn.closed or pgconn.status != self._ok:
                    raise OSError("listener connection closed")
            except self._errors as exc:
                logger.warning("index change listener lost its connection (%s): "
                               "reconnecting", type(exc).__name__)
                self._drop()
                return None
            return self._count

    def _connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_connect:
            return False
        self._next_connect = now + self._reconnect_s
        import psycopg  # here: an index on SQLite never needs it

        self._errors = (OSError, ValueError, psycopg.Error)
        self._ok = psycopg.pq.ConnStatus.OK
        _args, params = self._engine.dialect.create_connect_args(self._engine.url)
        params.pop("context", None)  # SQLAlchemy's type adapters: not for this raw use
        params.update(
            autocommit=True,
            connect_timeout=max(1, int(min(self._connect_timeout_s, 10))),
            keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
            application_name="pacslab-worker-listen",
        )
        try:
            conn = psycopg.connect(**params)
            try:
                conn.execute(f"LISTEN {WORK_CHANNEL}")
                row = conn.execute(_TRIGGERS_THERE).fetchone()
            except BaseException:
                conn.close()
                raise
        except psycopg.Error as exc:
            logger.info("index change listener cannot connect yet (%s)", type(exc).__name__)
            return False
        if not row or row[0] < len(_TRIGGERS):
            # A schema before migration 0012 (a worker started with migrate=False before
            # the upgrade): nothing would notify, so no signal; asked again later.
            conn.close()
            self._next_connect = now + _NO_TRIGGERS_RECHECK_S
            logger.warning("index has no work notifications (migration 0012): the idle "
                           "worker reads the job queue on every poll")
            return False
        self._conn = conn
        # Whatever was notified while no one listened is lost: one full turn.
        self._count += 1
        return True

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken: nothing to release
                logger.debug("closing the lost listener failed", exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._drop()
            self._next_connect = float("inf")  # closed for good: no reconnect
