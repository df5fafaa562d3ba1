"""Migration 0011_qr_commitment: ``commitment_requests`` as storage/index/qr.py declares
it, up, down, up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, inspect

from storage.index.migrate import alembic_config, upgrade
from storage.index.qr import commitment_requests


def test_migration_0011_qr_commitment_up_down_up(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/m.db")
    upgrade(engine, "0011_qr_commitment")
    assert "commitment_requests" in inspect(engine).get_table_names()
    only = MetaData()
    commitment_requests.to_metadata(only)

    def ours(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
        table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", "")
        return table == "commitment_requests"

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": ours})
        assert compare_metadata(context, only) == []
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0010_share")
    assert "commitment_requests" not in inspect(engine).get_table_names()
    upgrade(engine)
    assert "commitment_requests" in inspect(engine).get_table_names()
