"""Backup while storescu is sending; restore; every acknowledged instance is there (issue 7 §5)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import Settings
from storage.backup import backup, restore, verify
from tests.security._support import backup_during_storescu


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.network
@pytest.mark.slow
def test_backup_during_storescu_restores_every_acknowledged_instance(receiver,
                                                                      tmp_path: Path) -> None:
    settings: Settings = receiver.settings
    run = backup_during_storescu(receiver, settings, tmp_path, slices=150, size=256,
                                 start_after=40)
    files, acknowledged, before_backup = run.files, run.acknowledged, run.before_backup
    assert len(acknowledged) == len(files)
    assert verify(tmp_path / "backup") == []
    report = run.report
    assert report.instances >= len(before_backup)  # type: ignore[attr-defined]

    restored = tmp_path / "restored"
    restore(tmp_path / "backup", restored)
    from pacslab.wiring import build_index
    from storage.originals import FileOriginalStore

    new = Settings(data_dir=restored, auth={"enabled": False})
    index = build_index(new, migrate=True)
    try:
        assert new.storage.originals_dir is not None
        original_store = FileOriginalStore(new.storage.originals_dir)
        live = FileOriginalStore(settings.storage.originals_dir)  # type: ignore[arg-type]
        for uid in before_backup:
            inst = index.get_instance(uid)
            copy = original_store.path(inst.blob_key)
            assert copy.is_file(), uid
            assert _sha(copy) == _sha(live.path(inst.blob_key))  # bit-identical
        # the snapshot's action log is intact and covers those instances
        from storage.audit import AuditStore

        store = AuditStore(index.engine)
        assert store.verify() == []
    finally:
        index.close()


def test_backup_verify_detects_damage_and_restore_refuses(settings: Settings,
                                                          tmp_path: Path) -> None:
    from pacslab.wiring import build_index

    build_index(settings, migrate=True).close()
    keys = settings.keys_dir
    keys.mkdir(parents=True)
    (keys / "k").write_bytes(b"secret")
    originals = settings.storage.originals_dir
    assert originals is not None
    blob = originals / "ab" / "cd" / ("abcd" + "0" * 60 + ".dcm")
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"DICM" * 100)
    report = backup(settings, tmp_path / "b")
    assert report.files == 3 and verify(tmp_path / "b") == []
    with pytest.raises(FileExistsError):
        backup(settings, tmp_path / "b")
    # incremental: unchanged originals become hard links to the previous backup
    second = backup(settings, tmp_path / "b2", link_dest=tmp_path / "b")
    assert second.linked == 1 and verify(tmp_path / "b2") == []
    copy = tmp_path / "b" / "originals" / blob.relative_to(originals)
    data = bytearray(copy.read_bytes())
    data[10] ^= 1
    copy.write_bytes(bytes(data))
    problems = verify(tmp_path / "b")
    assert problems == [f"originals/{blob.relative_to(originals).as_posix()}: content differs "
                        "from the manifest"]
    with pytest.raises(ValueError):
        restore(tmp_path / "b", tmp_path / "new")


def test_cli_backup_verify_restore(settings: Settings, tmp_path: Path) -> None:
    from pacslab.wiring import build_index

    build_index(settings, migrate=True).close()
    env = {"PACSLAB_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin"}
    root = Path(__file__).parents[2]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pacslab", *args], env=env, cwd=root,
                              capture_output=True, text=True)

    assert run("backup", str(tmp_path / "b")).returncode == 0
    out = run("backup", "verify", str(tmp_path / "b"))
    assert out.returncode == 0 and "verifies" in out.stdout
    out = run("restore", str(tmp_path / "b"), "--data-dir", str(tmp_path / "n"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "n" / "index.db").is_file()
