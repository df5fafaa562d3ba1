"""Originals: what is flushed, and in what order, before an instance is acknowledged
(storage/originals.py, storage/archive.py; issue 19).

A power cut cannot be staged in a test; what can be checked is the order that makes an
acknowledged original durable even though the flushes now run concurrently: the
staged file's fsync has returned before the file is published under its key, the
directory that gained the name and the fan-out directory above it are fsynced before
the index row is written, and ``accept`` returns (the C-STORE is answered) only after
all of it. The first fan-out level is made durable when the store opens.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import OutOfResourcesError
from core.settings import IndexSettings
from core.synthetic import write_ct_series
from storage import originals as originals_module
from storage.archive import Archive
from storage.index.sql import SqlIndex
from storage.originals import FileOriginalStore
from storage.staging import stage_part10


@pytest.fixture
def index(tmp_path: Path) -> Iterator[SqlIndex]:
    idx = SqlIndex(IndexSettings(url=f"sqlite:///{tmp_path / 'index.db'}", migrate=True))
    yield idx
    idx.close()


class _Events:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        fsync, replace = os.fsync, os.replace

        def tracking_fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            fsync(fd)
            self.add("fsync", path)

        def tracking_replace(src: object, dst: object) -> None:
            replace(src, dst)  # type: ignore[arg-type]
            self.add("publish", str(dst))

        monkeypatch.setattr(os, "fsync", tracking_fsync)
        monkeypatch.setattr(os, "replace", tracking_replace)

    def add(self, what: str, path: str) -> None:
        with self._lock:
            self.log.append((what, path))

    def at(self, what: str, path: Path | str = "") -> int:
        return self.log.index((what, str(path)))


def test_first_fan_out_level_made_durable_when_the_store_opens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = _Events(monkeypatch)
    root = tmp_path / "originals"
    FileOriginalStore(root, fsync=True)
    assert sorted(p.name for p in root.iterdir() if p.name != ".staging") == [
        f"{i:02x}" for i in range(256)]
    assert ("fsync", str(root)) in events.log
    # Again on an existing store: another process may have made them unsynced.
    events.log.clear()
    FileOriginalStore(root, fsync=True)
    assert events.log == [("fsync", str(root))]


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_accept_flushes_file_then_directories_then_index(
        tmp_path: Path, index: SqlIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileOriginalStore(tmp_path / "originals", fsync=True)
    archive = Archive(store, index, quarantine=tmp_path / "quarantine", fsync=True)
    events = _Events(monkeypatch)
    add_instances, sync_instances = index.add_instances, index.sync_instances

    def tracking_add(items, **kw):  # type: ignore[no-untyped-def]
        events.add("index", "")
        return add_instances(items, **kw)

    def tracking_sync() -> None:
        sync_instances()
        events.add("index durable", "")

    monkeypatch.setattr(index, "add_instances", tracking_add)
    monkeypatch.setattr(index, "sync_instances", tracking_sync)
    (source,) = write_ct_series(tmp_path / "in", slices=1, rows=16, columns=16)
    with source.open("rb") as fp:
        staged = stage_part10(store.staging_dir(), fp, fsync=False)
    accepted = archive.accept(staged)
    events.add("acknowledged", "")
    final = store.path(accepted.key)
    assert final.exists()
    publish = events.at("publish", final)
    assert events.at("fsync", staged.path) < publish
    commit = events.at("index")
    assert publish < events.at("fsync", final.parent) < commit
    assert events.at("fsync", final.parent.parent) < commit  # new fan-out directory
    # The WAL flush may leave the write path, not the acknowledgement's.
    assert commit < events.at("index durable") < events.at("acknowledged")


def test_a_failed_directory_flush_fails_the_sync_and_stays_dirty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileOriginalStore(tmp_path / "originals", fsync=True)
    dirs = [store.root / f"{i:02x}" for i in range(6)]
    store._dirty(*dirs)
    failing = dirs[3]
    fsync_dir = originals_module.fsync_dir

    def flaky(path: Path) -> None:
        if path == failing:
            raise OSError(5, "I/O error")
        fsync_dir(path)

    monkeypatch.setattr(originals_module, "fsync_dir", flaky)
    with pytest.raises(OutOfResourcesError):
        store.sync()
    # Not known durable: the next sync flushes every one of them again.
    assert store._dirty_dirs == set(dirs)
    monkeypatch.setattr(originals_module, "fsync_dir", fsync_dir)
    store.sync()
    assert not store._dirty_dirs
