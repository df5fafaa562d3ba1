"""Migration 0010_share: the ``shares`` table as schema.py declares it, up, down, up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, inspect

from storage.index.migrate import alembic_config, upgrade
from storage.index.schema import shares


def test_migration_0010_share_up_down_up(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/m.db")
    upgrade(engine, "0010_share")
    assert "shares" in inspect(engine).get_table_names()
    only = MetaData()
    shares.to_metadata(only)
    def ours(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
        table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", "")
        return table == "shares"

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": ours})
        assert compare_metadata(context, only) == []
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0009_iocm")
    assert "shares" not in inspect(engine).get_table_names()
    upgrade(engine)
    assert "shares" in inspect(engine).get_table_names()
