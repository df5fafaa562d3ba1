"""Migration 0010_share: the ``shares`` table as schema.py declares it, up, down, up."""

from __future__ import annotations

from pathlib import Path

from storage.index.schema import shares
from tests.storage.migration_checks import assert_table_migration


def test_migration_0010_share_up_down_up(tmp_path: Path) -> None:
    assert_table_migration(tmp_path, "0010_share", "0009_iocm", shares)
