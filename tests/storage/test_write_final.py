"""``FileOriginalStore.write_final``: an original written out of the journal appears
whole or not at all, and a process killed while writing one leaves nothing behind
(a ``.final`` temporary file was found in staging after a kill -9 of the worker,
tests/faults/test_kill_worker_api.py)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest

from storage import originals as originals_module
from storage import staging
from storage.originals import FileOriginalStore


def _body(n: int = 3 << 20) -> tuple[bytes, str]:
    body = os.urandom(n)
    return body, hashlib.sha256(body).hexdigest()


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix != ".dcm"]


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named temporary"])
def test_written_whole_with_its_bytes_and_nothing_else(
        tmp_path: Path, unnamed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not unnamed:
        monkeypatch.setattr(originals_module, "write_unnamed", lambda *_: None)
    store = FileOriginalStore(tmp_path / "originals")
    body, key = _body()
    assert store.write_final(key, body) is True
    assert store.path(key).read_bytes() == body
    assert store.write_final(key, body) is False  # the same content: kept
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named temporary"])
def test_a_damaged_file_is_replaced(tmp_path: Path, unnamed: bool,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if not unnamed:
        monkeypatch.setattr(originals_module, "write_unnamed", lambda *_: None)
    store = FileOriginalStore(tmp_path / "originals")
    body, key = _body()
    final = store.path(key)
    final.parent.mkdir(parents=True)
    final.write_bytes(body[: len(body) // 2])  # cut short by a crash
    assert store.write_final(key, body) is True
    assert final.read_bytes() == body
    assert _leftovers(tmp_path) == []


def test_the_unnamed_file_is_used_where_the_file_system_has_it(tmp_path: Path) -> None:
    fd = staging.write_unnamed(tmp_path, b"x" * 5000)
    if fd is None:
        pytest.skip("no O_TMPFILE on this file system")
    try:
        assert list(tmp_path.iterdir()) == []  # written, and still without a name
        staging.link_unnamed(fd, tmp_path / "named")
        with pytest.raises(FileExistsError):
            staging.link_unnamed(fd, tmp_path / "named")
    finally:
        os.close(fd)
    assert (tmp_path / "named").read_bytes() == b"x" * 5000


def _write_and_die(root: Path, body: bytes, key: str) -> None:
    real = staging.write_all
    calls = [0]

    def die_midway(*args: object) -> bool:
        calls[0] += 1
        if calls[0] == 2:  # one buffer written, the rest not
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)  # type: ignore[arg-type]

    staging.write_all = die_midway  # type: ignore[assignment]
    FileOriginalStore(root).write_final(key, body)


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named temporary"])
def test_a_process_killed_while_writing_leaves_nothing(tmp_path: Path, unnamed: bool) -> None:
    root = tmp_path / "originals"
    FileOriginalStore(root)  # (its directories)
    body, key = _body(8 << 20)  # several of the writer's buffers
    if not unnamed:
        # The fallback's temporary file is what a kill leaves; this shows the test
        # sees it (and that the unnamed file is why the other case leaves nothing).
        original = originals_module.write_unnamed
        originals_module.write_unnamed = lambda *_: None  # type: ignore[assignment]
    try:
        proc = mp.get_context("fork").Process(target=_write_and_die, args=(root, body, key))
        proc.start()
        proc.join(timeout=60)
    finally:
        if not unnamed:
            originals_module.write_unnamed = original  # type: ignore[assignment]
    assert proc.exitcode == -signal.SIGKILL
    assert not FileOriginalStore(root).exists(key)
    if unnamed:
        assert _leftovers(tmp_path) == []
    else:
        assert [p.suffix for p in _leftovers(tmp_path)] == [".final"]
