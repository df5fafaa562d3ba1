"""Checks the migration tests share: a migration's table as the code declares it, and
the database a backfill test migrates step by step, on either backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, Table, create_engine, inspect

from storage.index.migrate import alembic_config, upgrade

__all__ = ["assert_table_migration", "empty_index_url", "on_both_backends"]

#: A backfill test's ``backend`` parameter: SQLite, and PostgreSQL where its test server
#: can start (``empty_index_url`` turns it into a new index).
on_both_backends = pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)


def assert_table_migration(tmp_path: Path, revision: str, previous: str, table: Table,
                           *referenced: Table) -> None:
    """On SQLite: ``revision`` creates ``table`` exactly as declared (alembic's
    ``compare_metadata``, that table only; ``referenced`` are the tables its foreign
    keys name), its downgrade to ``previous`` drops it, and upgrading again brings it
    back."""
    engine = create_engine(f"sqlite:///{tmp_path}/m.db")
    upgrade(engine, revision)
    assert table.name in inspect(engine).get_table_names()
    only = MetaData()
    for other in (*referenced, table):
        other.to_metadata(only)

    def ours(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
        owner = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", "")
        return bool(owner == table.name)

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": ours})
        assert compare_metadata(context, only) == []
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, previous)
    assert table.name not in inspect(engine).get_table_names()
    upgrade(engine)
    assert table.name in inspect(engine).get_table_names()
    engine.dispose()


def empty_index_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A new, unmigrated index: a SQLite file in ``tmp_path`` or an empty PostgreSQL
    database (``pg_empty_url`` of tests/conftest_pg.py)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/index.db"
    return str(request.getfixturevalue("pg_empty_url"))
