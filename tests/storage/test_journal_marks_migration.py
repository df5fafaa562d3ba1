"""Migration 0015_journal_marks: ``journal_marks`` as storage/index/schema.py declares
it, up, down, up."""

from __future__ import annotations

from pathlib import Path

from storage.index.schema import journal_marks
from tests.storage.migration_checks import assert_table_migration


def test_migration_0015_journal_marks_up_down_up(tmp_path: Path) -> None:
    assert_table_migration(tmp_path, "0015_journal_marks", "0014_pir_change_patients",
                           journal_marks)
