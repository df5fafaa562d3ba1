"""The SQLite writers' lock keeps no descriptor of a thread that has ended.

Every C-STORE association and HTTP request may run on its own thread; a descriptor left
open per thread once pushed a long test session past ``select()``'s FD_SETSIZE (1024),
where pynetdicom's transport fails and associations abort.
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

from storage.index.sqlite import WriteLock


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_each_threads_descriptor_is_closed_when_the_thread_ends(tmp_path: Path) -> None:
    lock = WriteLock(str(tmp_path / "index.db.writelock"))
    before = _open_fds()

    def write() -> None:
        with lock.held():
            pass

    for _ in range(200):
        t = threading.Thread(target=write)
        t.start()
        t.join()
    gc.collect()
    assert _open_fds() - before < 5  # was +200: one per thread that ever wrote


def test_threads_still_exclude_each_other(tmp_path: Path) -> None:
    lock = WriteLock(str(tmp_path / "index.db.writelock"))
    inside = 0
    most = 0
    guard = threading.Lock()

    def write() -> None:
        nonlocal inside, most
        for _ in range(50):
            with lock.held():
                with guard:
                    inside += 1
                    most = max(most, inside)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1


def test_close_releases_every_descriptor(tmp_path: Path) -> None:
    lock = WriteLock(str(tmp_path / "index.db.writelock"))
    before = _open_fds()
    release = threading.Event()
    entered = threading.Barrier(4)

    def write_and_wait() -> None:
        with lock.held():
            pass
        entered.wait()
        release.wait()

    threads = [threading.Thread(target=write_and_wait) for _ in range(3)]
    for t in threads:
        t.start()
    entered.wait()
    assert _open_fds() - before >= 3  # live threads keep theirs
    lock.close()
    assert _open_fds() - before < 1
    release.set()
    for t in threads:
        t.join()
    with lock.held():  # usable again: this thread opens a fresh descriptor
        pass
