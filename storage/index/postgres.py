"""PostgreSQL specifics (psycopg 3): job claims use ``FOR UPDATE SKIP LOCKED``."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.dialects.postgresql import insert as pg_insert

__all__ = ["make_engine", "upsert"]

upsert = pg_insert


def make_engine(url: str, *, busy_timeout_s: float) -> Engine:
    # lock_timeout bounds how long a writer waits, like SQLite's busy_timeout.
    return create_engine(
        url,
        pool_size=8,
        max_overflow=8,
        pool_pre_ping=True,
        connect_args={"options": f"-c lock_timeout={int(busy_timeout_s * 1000)}"},
    )


def write_lock(url: str) -> None:
    """PostgreSQL queues writers itself."""
    return None
