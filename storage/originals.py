"""Content-addressed originals on a local file system.

Layout ``<root>/ab/cd/<sha256>.dcm``: the path comes from the SHA-256 of the data set
as received, never from patient data, and two fan-out levels keep directories small
(as Orthanc's storage area does with its UUIDs). Files arrive in ``<root>/.staging``
on the same file system so that publishing is an atomic ``rename``; the caller fsyncs
the file, :meth:`FileOriginalStore.sync` fsyncs the directories that gained a name,
so an acknowledged original survives a power cut.

Every flush costs a device round trip (1.5-3 ms each on this machine kind, whether or
not the journal has anything left to commit), and on one association an instance's
latency is the sum of its flushes (issue 19). So: the 256 first-level fan-out
directories are made, and made durable, when the store opens (ahead of need: a new
second-level directory then costs one fsync of its parent, never one of the root),
and :meth:`FileOriginalStore.sync` issues the fsyncs of a batch's directories at
once from a small pool of threads: they are independent (nothing is acknowledged
until all have returned), and the file system answers them with one journal commit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from core.errors import NotFoundError, OutOfResourcesError
from core.settings import Settings
from storage._flush import SharedFlush
from storage.abc import OriginalStore

__all__ = [
    "FileOriginalStore",
    "clear_staging",
    "flush_pool",
    "fsync_all",
    "fsync_dir",
    "open_originals",
    "staging_dir",
]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FANOUT = [f"{i:02x}" for i in range(256)]

#: A content key: the SHA-256 of a data set, 64 lowercase hexadecimal digits.
_CONTENT_KEY = re.compile("[0-9a-f]{64}")

_flush_pool: ThreadPoolExecutor | None = None
_flush_pool_lock = threading.Lock()


def flush_pool() -> ThreadPoolExecutor:
    """Threads that wait in fsync (the GIL is released there), shared by the stores
    of a process; started on first use, so after any fork."""
    global _flush_pool
    if _flush_pool is None:
        with _flush_pool_lock:
            if _flush_pool is None:
                _flush_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
    return _flush_pool


def _after_fork() -> None:
    global _flush_pool, _flush_pool_lock
    _flush_pool = None  # the parent's threads do not exist in the child
    _flush_pool_lock = threading.Lock()  # nor does a parent thread that held it


os.register_at_fork(after_in_child=_after_fork)


def fsync_all(paths: list[Path]) -> None:
    """fsync every directory in ``paths``, concurrently; raise the first failure
    once all have returned (so none is still running when the caller goes on)."""
    if len(paths) <= 1:
        for path in paths:
            fsync_dir(path)
        return
    futures = [flush_pool().submit(fsync_dir, path) for path in paths[1:]]
    errors: list[BaseException] = []
    try:
        fsync_dir(paths[0])
    except OSError as exc:
        errors.append(exc)
    for future in futures:
        failure = future.exception()
        if failure is not None:
            errors.append(failure)
    if errors:
        raise errors[0]


class FileOriginalStore:
    """:class:`storage.abc.OriginalStore` on a directory."""

    def __init__(self, root: Path, *, fsync: bool = True, staging: Path | None = None) -> None:
        self.root = root
        self.fsync = fsync
        # ``staging`` must be on the same file system (default ``<root>/.staging``).
        self._staging = staging or root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._dirty_dirs: set[Path] = set()
        self._dirty_lock = threading.Lock()
        self._shared_sync = SharedFlush(self._sync_dirty)
        if fsync:
            self._make_fanout()

    def _make_fanout(self) -> None:
        """Create the first fan-out level ahead of need and make its entries durable.

        The root is fsynced even when every directory existed: another process on this
        store may have created some a moment ago without having synced the root yet.
        After this, every ``<root>/ab`` is a durable entry, so a new ``ab/cd`` needs only
        ``ab`` synced.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for name in _FANOUT:
                (self.root / name).mkdir(exist_ok=True)
            fsync_dir(self.root)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise OutOfResourcesError("original store full or read-only") from exc
            raise

    @property
    def has_local_paths(self) -> bool:
        return True

    def staging_dir(self) -> Path:
        return self._staging

    def path(self, key: str) -> Path:
        if _CONTENT_KEY.fullmatch(key) is None:
            raise NotFoundError("not a content key")
        return self.root / key[:2] / key[2:4] / f"{key}.dcm"

    def commit(self, staged: Path, key: str, *, defer_sync: bool = False) -> bool:
        final = self.path(key)
        parent = final.parent
        try:
            if parent not in self._known_dirs:
                try:
                    parent.mkdir(exist_ok=True)
                except FileNotFoundError:  # first level removed since the store opened
                    parent.mkdir(parents=True, exist_ok=True)
                    self._dirty(self.root)
                # The fan-out directory must itself be a durable entry (made here, or by
                # another process that may not have synced it yet).
                self._dirty(parent.parent)
                self._known_dirs.add(parent)
            if final.exists():
                staged.unlink(missing_ok=True)
                return False
            os.replace(staged, final)
            self._dirty(parent)
            if not defer_sync:
                self.sync()
        except OSError as exc:
            with contextlib.suppress(OSError):
                staged.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise OutOfResourcesError("original store full or read-only") from exc
            raise
        return True

    def _dirty(self, *dirs: Path) -> None:
        if self.fsync:
            with self._dirty_lock:
                self._dirty_dirs.update(dirs)

    def sync(self) -> None:
        """fsync every directory that gained an entry before this call.

        All at once (:func:`fsync_all`): the caller acknowledges nothing before this
        returns, so their order does not matter (a crash between them leaves at worst an
        empty fan-out directory). Receiving threads that call it together share one
        round (:class:`storage._flush.SharedFlush`): a round already running may have
        taken their directories from the set before they were synced, so they wait for
        it and for the next round, which one of them runs for all.
        """
        self._shared_sync()

    def _sync_dirty(self) -> None:
        with self._dirty_lock:
            dirs = list(self._dirty_dirs)
            self._dirty_dirs.clear()
        try:
            fsync_all(dirs)
        except OSError as exc:
            with self._dirty_lock:
                self._dirty_dirs.update(dirs)  # still not known durable: try again next time
            raise OutOfResourcesError("cannot make originals durable") from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return self.path(key).open("rb")
        except FileNotFoundError as exc:
            raise NotFoundError("original missing") from exc

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


def staging_dir(settings: Settings, name: str = "") -> Path:
    """Where received files are staged: ``<originals_dir>/.staging[/<name>]``.

    Receivers that share one originals directory (several hosts, or ports, on one
    store) each stage in their own ``name``d subdirectory, so that one receiver's
    start-up clean-up never removes another's files in flight.
    """
    assert settings.storage.originals_dir is not None
    root = settings.storage.originals_dir / ".staging"
    return root / name if name else root


def clear_staging(staging: Path) -> int:
    """Remove the files left in one process's staging directory; how many.

    Whatever is there was never acknowledged (a crash mid-receive or mid-STOW): the
    sender got no success and sends it again. Call it only before the process that
    owns ``staging`` accepts anything; subdirectories (other receivers') are kept.
    """
    removed = 0
    for leftover in staging.glob("*"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


def open_originals(settings: Settings, *, staging_name: str = "") -> OriginalStore:
    """Originals on the local file system (default), or in object storage when
    ``storage.originals_url`` is an fsspec URL; staging stays local either way."""
    storage = settings.storage
    assert storage.originals_dir is not None
    staging = staging_dir(settings, staging_name)
    url = storage.originals_url
    if url.startswith("file://"):
        root = Path(url.removeprefix("file://"))
        return FileOriginalStore(
            root,
            fsync=storage.fsync,
            staging=root / ".staging" / staging_name if staging_name else None,
        )
    if url:
        from storage.objectstore import ObjectOriginalStore

        return ObjectOriginalStore(
            url,
            staging=staging,
            cache=storage.originals_dir / ".cache",
            storage_options=storage.storage_options,
        )
    return FileOriginalStore(storage.originals_dir, fsync=storage.fsync, staging=staging)
