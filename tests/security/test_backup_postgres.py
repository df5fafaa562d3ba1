"""Backup and restore of an instance whose index is PostgreSQL (issue 7 §5).

The receiver runs on a throwaway PostgreSQL database (``pg_url``); the backup takes
``pg_dump`` (custom format, under an exported snapshot) while ``storescu`` is still
sending; ``pg_restore`` loads it into another empty database. Every instance
acknowledged before the backup started must come back bit for bit, and the action
log of the dump must verify, offline from the dump and online once restored.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_pg import PgServer, admin_url, create_database
from sqlalchemy import text

from core.settings import Settings
from pacslab.wiring import build_index
from storage.audit import AuditStore
from storage.backup import backup, restore, verify
from storage.originals import FileOriginalStore
from tests.security._support import backup_during_storescu
from tests.support import Receiver

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).parents[2]


@pytest.fixture
def settings(settings: Settings, pg_url: str) -> Settings:
    """The shared settings with the index on PostgreSQL (the receiver uses them too)."""
    return settings.model_copy(update={"index": settings.index.model_copy(update={"url": pg_url})})


def _another_database(pg_server: PgServer | str) -> str:
    return create_database(admin_url(pg_server))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.network
def test_pg_backup_during_storescu_restores_every_acknowledged_instance(
        receiver: Receiver, pg_server: PgServer | str, tmp_path: Path) -> None:
    settings = receiver.settings
    run = backup_during_storescu(receiver, settings, tmp_path, slices=60, size=64,
                                 start_after=20)
    before_backup = run.before_backup
    backup_dir = tmp_path / "backup"
    assert (backup_dir / "index.pgdump").is_file() and not (backup_dir / "index.db").exists()
    assert verify(backup_dir) == []
    report = run.report
    assert report.instances >= len(before_backup)  # type: ignore[attr-defined]
    # The C-STOREs were logged, so the dump carries an action log.
    assert report.audit_head is not None  # type: ignore[attr-defined]

    target_url = _another_database(pg_server)
    restored = tmp_path / "restored"
    manifest = restore(backup_dir, restored, index_url=target_url)
    assert manifest["index"] == {"dialect": "postgresql", "file": "index.pgdump"}
    assert not (restored / "index.pgdump").exists()  # the dump is not part of a data dir
    new = Settings(data_dir=restored, index={"url": target_url}, auth={"enabled": False})
    index = build_index(new, migrate=True)
    try:
        with index.engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM instances")).scalar_one()
        assert count == report.instances  # type: ignore[attr-defined]
        assert new.storage.originals_dir is not None
        copies = FileOriginalStore(new.storage.originals_dir)
        live = FileOriginalStore(settings.storage.originals_dir)  # type: ignore[arg-type]
        for uid in before_backup:
            inst = index.get_instance(uid)
            assert _sha(copies.path(inst.blob_key)) == _sha(live.path(inst.blob_key))
        store = AuditStore(index.engine)
        assert store.verify() == []
        assert store.head() == report.audit_head  # type: ignore[attr-defined]
    finally:
        index.close()
    with pytest.raises(FileExistsError):  # never over an existing database
        restore(backup_dir, tmp_path / "again", index_url=target_url)


def test_pg_dump_verify_reads_the_chain_and_detects_damage(settings: Settings,
                                                          tmp_path: Path) -> None:
    from core.audit import AuditEntry
    from storage.audit import AuditLog

    index = build_index(settings, migrate=True)
    try:
        log = AuditLog(index.engine, settings.audit, url=index.url)
        # Text the dump must escape: tab, newline, backslash, non-ASCII.
        log.append([AuditEntry(action="R", event_type="rest", outcome="0", agent=f"u{i}",
                               agent_type="user", resource=f"/x\t{i}\\y\nz",
                               detail=AuditEntry.details({"n": i, "s": "Nguyễn ✓"}))
                    for i in range(5)])
        assert backup(settings, tmp_path / "good").audit_head == log.head()
        assert verify(tmp_path / "good") == []
        # Tamper with entry 3 in the database (dropping the append-only triggers
        # first), then back up: the manifest hashes match, the chain in the dump does not.
        with index.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER audit_events_no_change ON audit_events"))
            conn.execute(text("UPDATE audit_events SET agent = 'someone' WHERE seq = 3"))
    finally:
        index.close()
    backup(settings, tmp_path / "bad")
    assert verify(tmp_path / "bad") == ["audit log: entry 3 was edited: its content does "
                                        "not match its hash"]
    dump = tmp_path / "good" / "index.pgdump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    assert "index.pgdump: content differs from the manifest" in verify(tmp_path / "good")


def test_cli_pg_backup_verify_restore(settings: Settings, pg_server: PgServer | str,
                                      tmp_path: Path) -> None:
    build_index(settings, migrate=True).close()

    def run(*args: str, url: str) -> subprocess.CompletedProcess[str]:
        env = {"PACSLAB_DATA_DIR": str(settings.data_dir), "PACSLAB_INDEX__URL": url,
               "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        return subprocess.run([sys.executable, "-m", "pacslab", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, check=False)

    url = settings.index.url
    out = run("backup", str(tmp_path / "b"), url=url)
    assert out.returncode == 0, out.stderr
    out = run("backup", "verify", str(tmp_path / "b"), url=url)
    assert out.returncode == 0 and "verifies" in out.stdout
    # Restoring over the live database is refused: it is not empty.
    out = run("restore", str(tmp_path / "b"), "--data-dir", str(tmp_path / "n0"), url=url)
    assert out.returncode == 1 and "not empty" in out.stderr
    target = _another_database(pg_server)
    out = run("restore", str(tmp_path / "b"), "--data-dir", str(tmp_path / "n"), url=target)
    assert out.returncode == 0, out.stderr
    env = {"PACSLAB_DATA_DIR": str(tmp_path / "n"), "PACSLAB_INDEX__URL": target,
           "PATH": "/usr/bin:/bin"}
    audit = subprocess.run([sys.executable, "-m", "pacslab", "audit", "verify"], env=env,
                           cwd=ROOT, capture_output=True, text=True, check=False)
    assert audit.returncode == 0 and "intact" in audit.stdout, audit.stdout + audit.stderr
