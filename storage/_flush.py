"""One flush shared by the threads that need it at the same moment (issue 19).

A flush (an ``fsync`` of directories, an ``fdatasync`` of the index's WAL) makes
durable everything written before it *began*. Threads that ask while one is running
cannot rely on it (their writes may have come after it began); they wait for it to
end and then share the next one, which one of them runs for all. So N concurrent
callers cost at most two flushes, not N, and none returns before a flush that began
after its call has succeeded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["SharedFlush", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SharedFlush:
    """Calls of :meth:`__call__` share runs of ``flush`` (module docstring).

    Runs never overlap. A caller returns once a run that began after its call has
    succeeded, or raises the error of the run it waited for when that one failed
    (and no later one has succeeded).
    """

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._cond = threading.Condition(threading.Lock())
        self._started = 0  # runs begun
        self._done = 0  # runs ended, successfully or not
        self._ok = 0  # the latest run that succeeded
        self._running = False
        self._error: BaseException | None = None  # of run ``_done``, if it failed

    def __call__(self) -> None:
        with self._cond:
            # The first run to begin from now on: the next one (a running one began
            # before this call).
            need = self._started + 1
            while True:
                if self._ok >= need:
                    return
                if self._done >= need and self._error is not None:
                    raise self._error
                if not self._running:
                    self._running = True
                    self._started += 1
                    run = self._started
                    break
                self._cond.wait()
        error: BaseException | None = None
        try:
            self._flush()
        except BaseException as exc:
            error = exc
        with self._cond:
            self._running = False
            self._done = run
            if error is None:
                self._ok = run
            self._error = error
            self._cond.notify_all()
        if error is not None:
            raise error
