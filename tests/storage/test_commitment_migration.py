"""Migration 0011_qr_commitment: ``commitment_requests`` as storage/index/qr.py declares
it, up, down, up."""

from __future__ import annotations

from pathlib import Path

from storage.index.qr import commitment_requests
from tests.storage.migration_checks import assert_table_migration


def test_migration_0011_qr_commitment_up_down_up(tmp_path: Path) -> None:
    assert_table_migration(tmp_path, "0011_qr_commitment", "0010_share", commitment_requests)
