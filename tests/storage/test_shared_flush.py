"""SharedFlush (storage/_flush.py): concurrent callers share flushes, and none returns
before a flush that began after its call (issue 19: the originals' directory fsyncs and
the index's WAL flush, taken off the group commit's serial path)."""

from __future__ import annotations

import threading
import time

import pytest

from storage._flush import SharedFlush


class _Disk:
    """Writes count up; a flush makes durable what was written when it began."""

    def __init__(self, fail: bool = False) -> None:
        self.lock = threading.Lock()
        self.written = 0
        self.durable = 0
        self.flushes = 0
        self.running = 0
        self.overlapped = False
        self.fail = fail

    def write(self) -> int:
        with self.lock:
            self.written += 1
            return self.written

    def flush(self) -> None:
        with self.lock:
            seen = self.written
            self.flushes += 1
            self.running += 1
            self.overlapped |= self.running > 1
        time.sleep(0.002)
        with self.lock:
            self.running -= 1
        if self.fail:
            raise OSError(5, "I/O error")
        with self.lock:
            self.durable = max(self.durable, seen)


def test_each_caller_returns_after_a_flush_that_covers_its_write() -> None:
    disk = _Disk()
    shared = SharedFlush(disk.flush)
    late: list[tuple[int, int]] = []

    def client() -> None:
        for _ in range(20):
            mine = disk.write()
            shared()
            if disk.durable < mine:
                late.append((mine, disk.durable))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not late
    assert not disk.overlapped
    assert disk.flushes < 160  # shared: fewer flushes than calls


def test_a_failed_flush_fails_its_waiters_and_the_next_call_flushes_again() -> None:
    disk = _Disk(fail=True)
    shared = SharedFlush(disk.flush)
    errors: list[BaseException] = []

    def client() -> None:
        disk.write()
        try:
            shared()
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4  # nobody is told "durable"
    disk.fail = False
    mine = disk.write()
    shared()
    assert disk.durable >= mine


def test_a_single_caller_flushes_inline() -> None:
    calls: list[str] = []
    shared = SharedFlush(lambda: calls.append(threading.current_thread().name))
    shared()
    shared()
    assert calls == [threading.current_thread().name] * 2

    def broken() -> None:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        SharedFlush(broken)()
