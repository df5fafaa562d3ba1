"""Migration 0009_iocm: up, down, up, and the same tables as storage/index/schema.py."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from storage.index.migrate import alembic_config, upgrade
from storage.index.schema import metadata

IOCM_TABLES = {"rejections", "study_versions"}


def test_migration_0009_matches_schema_and_goes_down(tmp_path: Path) -> None:
    from alembic import command

    engine = create_engine(f"sqlite:///{tmp_path}/m.db")
    upgrade(engine)
    assert set(inspect(engine).get_table_names()) >= IOCM_TABLES
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    ours = [d for d in diff if any(t in repr(d) for t in IOCM_TABLES)]
    assert ours == []
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0008_pir")
    assert not IOCM_TABLES & set(inspect(engine).get_table_names())
    upgrade(engine)
    assert set(inspect(engine).get_table_names()) >= IOCM_TABLES
