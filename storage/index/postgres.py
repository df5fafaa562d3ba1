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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

__all__ = ["is_retryable", "lock_keys", "make_engine", "upsert", "write_lock"]

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
