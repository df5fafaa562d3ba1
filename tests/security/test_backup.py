"""Backup while storescu is sending; restore; every acknowledged instance is there (issue 7 §5)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydicom import dcmread

from core.settings import Settings
from core.synthetic import write_ct_series
from storage.backup import backup, restore, verify


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.network
@pytest.mark.slow
def test_backup_during_storescu_restores_every_acknowledged_instance(receiver,
                                                                      tmp_path: Path) -> None:
    from tests.support import dcmtk

    settings: Settings = receiver.settings
    files = write_ct_series(tmp_path / "ct", slices=150, rows=256, columns=256)
    uid_of = {p.resolve(): str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
              for p in files}
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-v", "+sd", "127.0.0.1", str(receiver.port), str(tmp_path / "ct")],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "TCP_NODELAY": "1"})
    assert sender.stderr is not None
    acknowledged: list[str] = []
    before_backup: list[str] = []
    current: Path | None = None
    result: dict[str, object] = {}

    def take_backup() -> None:
        try:
            result["report"] = backup(settings, tmp_path / "backup")
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    worker: threading.Thread | None = None
    for line in sender.stderr:
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip()).resolve()
        elif re.search(r"Received Store Response \(Success\)", line) and current:
            acknowledged.append(uid_of[current])
            if len(acknowledged) == 40:
                before_backup = list(acknowledged)  # acknowledged before the backup starts
                worker = threading.Thread(target=take_backup)
                worker.start()
    assert sender.wait(timeout=120) == 0
    assert worker is not None
    worker.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert len(acknowledged) == len(files)
    assert verify(tmp_path / "backup") == []
    report = result["report"]
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
