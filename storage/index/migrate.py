"""Alembic migrations run programmatically, so ``pacslab serve`` needs no alembic.ini.

Several receiver processes may start at once; SQLite's write lock (BEGIN IMMEDIATE in
our engine) and, on PostgreSQL, an advisory lock serialise them, and the second one
finds the schema at head.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

__all__ = ["alembic_config", "upgrade"]

MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATE_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended('pacslab-migrate', 0))")


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Receivers on several machines may start at once: one migrates, the others
            # wait here and then find the schema at head (DDL alone would race on
            # creating alembic_version).
            conn.execute(_MIGRATE_LOCK)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
