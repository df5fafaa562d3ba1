"""Content-addressed originals on a local file system.

Layout ``<root>/ab/cd/<sha256>.dcm``: the path comes from the SHA-256 of the data set
as received, never from patient data, and two fan-out levels keep directories small
(as Orthanc's storage area does with its UUIDs). Files arrive in ``<root>/.staging``
on the same file system so that publishing is an atomic ``rename``; the caller fsyncs
the file, :meth:`FileOriginalStore.sync` fsyncs the directories that gained a name,
so an acknowledged original survives a power cut.

An original may also still be in a receiver's original journal (storage/journal.py),
not yet written out as its file: the index then keeps the record's location, while an
instance references the key (:class:`PendingIndex`; a store given none sees files only).
:meth:`FileOriginalStore.open` and :meth:`FileOriginalStore.exists` find it there,
:meth:`FileOriginalStore.path` writes the file first (for callers that need one),
:meth:`FileOriginalStore.delete` makes the index forget it too; once no instance
references the key, the record is neither served nor written out.

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
import io
import os
import re
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

from core.errors import NotFoundError, OutOfResourcesError
from core.settings import Settings
from storage._flush import SharedFlush, fsync_dir
from storage.abc import OriginalStore
from storage.journal import read_record
from storage.staging import link_unnamed, write_file, write_unnamed

__all__ = [
    "FileOriginalStore",
    "PendingIndex",
    "clear_staging",
    "flush_pool",
    "fsync_all",
    "fsync_dir",
    "open_originals",
    "staging_dir",
]


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


class PendingIndex(Protocol):
    """Where the index says originals not written out yet are (storage.abc.MetadataIndex
    ``journal_locations``, ``pending_originals``, ``drop_journal_locations``)."""

    def journal_locations(self, blob_key: str) -> list[str]: ...

    def pending_originals(self) -> list[tuple[str, str]]: ...

    def drop_journal_locations(self, blob_key: str) -> None: ...


class FileOriginalStore:
    """:class:`storage.abc.OriginalStore` on a directory."""

    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        staging: Path | None = None,
        index: PendingIndex | None = None,
    ) -> None:
        self.root = root
        #: Where originals still in an original journal are found (module docstring).
        self.index = index
        self.fsync = fsync
        # ``staging`` must be on the same file system (default ``<root>/.staging``).
        self._staging = staging or root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()  # made, and their entries made durable
        self._made_dirs: set[Path] = set()  # made for the journal (its checkpoint syncs)
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

    def _path(self, key: str) -> Path:
        if _CONTENT_KEY.fullmatch(key) is None:
            raise NotFoundError("not a content key")
        return self.root / key[:2] / key[2:4] / f"{key}.dcm"

    def path(self, key: str) -> Path:
        """The original's file; one still in the original journal (storage/journal.py)
        is written there first, so callers that need a file have one."""
        final = self._path(key)
        if not final.exists():
            body = self._journaled(key)
            if body is not None:
                with contextlib.suppress(OSError):
                    self.write_final(key, body)
        return final

    def _journaled(self, key: str) -> bytes | None:
        """The whole file of ``key`` from an original journal, if the index names a
        record there that still holds it (a segment may have been reused since)."""
        if self.index is None or _CONTENT_KEY.fullmatch(key) is None:
            return None
        for where in self.index.journal_locations(key):
            body = read_record(self.root / ".journal", where, key)
            if body is not None:
                return body
        return None

    def _fanout(self, final: Path, *, track: bool = True) -> None:
        """Make ``final``'s fan-out directory; with ``track``, note the directories
        :meth:`sync` must make durable (without, a journal checkpoint does)."""
        parent = final.parent
        if not track and parent in self._made_dirs:
            return
        if parent not in self._known_dirs:
            try:
                parent.mkdir(exist_ok=True)
            except FileNotFoundError:  # first level removed since the store opened
                parent.mkdir(parents=True, exist_ok=True)
                if track:
                    self._dirty(self.root)
            # The fan-out directory must itself be a durable entry (made here, or by
            # another process that may not have synced it yet).
            if track:
                self._dirty(parent.parent)
                self._known_dirs.add(parent)
            else:
                self._made_dirs.add(parent)

    def commit(self, staged: Path, key: str, *, defer_sync: bool = False) -> bool:
        final = self._path(key)
        parent = final.parent
        with _publishing(staged):
            self._fanout(final)
            if _same_file(final, staged):
                staged.unlink(missing_ok=True)
                return False
            os.replace(staged, final)
            self._dirty(parent)
            if not defer_sync:
                self.sync()
        return True

    def write_final(self, key: str, body: bytes) -> bool:
        """Write ``body`` (the whole Part-10 file) as the original of ``key``, without
        any flush: it is in the original journal (storage/journal.py), whose checkpoint
        makes it durable. Whether a file was created (False: this content was there).

        The file is complete before it has its name, so a reader never sees part of
        it: written unnamed in its directory and then linked (``O_TMPFILE``; a process
        killed meanwhile, the worker reading an original of the journal say, leaves
        nothing behind), or under a temporary name in staging and renamed where the
        file system cannot. A file already there is kept only if it is this content (one
        left damaged by a crash before its journal record was whole is replaced).
        """
        final = self._path(key)
        tmp = self._staging / f"{uuid.uuid4().hex}.final"
        with _publishing(tmp):
            self._fanout(final, track=False)
            if _same_content(final, body):
                return False
            fd = write_unnamed(final.parent, body)
            if fd is None:
                write_file(tmp, body)
            else:
                try:
                    try:
                        link_unnamed(fd, final)
                        return True
                    except FileExistsError:  # written meanwhile, or the damaged one
                        if _same_content(final, body):
                            return False
                    link_unnamed(fd, tmp)  # replaced below, as the fallback's file
                finally:
                    os.close(fd)
            os.replace(tmp, final)
        return True

    def write_out_pending(self) -> int:
        """Write every original still only in an original journal as its ordinary
        file (not durable: the journal's checkpoint does that), for a reader of the
        directory tree such as a backup; how many."""
        if self.index is None:
            return 0
        count = 0
        for key, where in self.index.pending_originals():
            if _CONTENT_KEY.fullmatch(key) is None or self._path(key).exists():
                continue
            body = read_record(self.root / ".journal", where, key)
            if body is not None and self.write_final(key, body):
                count += 1
        return count

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
        final = self._path(key)
        try:
            return final.open("rb")
        except FileNotFoundError:
            pass
        body = self._journaled(key)
        if body is not None:
            return io.BytesIO(body)
        try:  # written out from the journal meanwhile
            return final.open("rb")
        except FileNotFoundError as exc:
            raise NotFoundError("original missing") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).exists() or self._journaled(key) is not None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        # A journaled copy is no longer served either (and not written out once no
        # instance references the key: callers delete those rows first).
        if self.index is not None and _CONTENT_KEY.fullmatch(key) is not None:
            self.index.drop_journal_locations(key)


@contextlib.contextmanager
def _publishing(source: Path) -> Iterator[None]:
    """Publishing ``source`` as an original: if that fails, ``source`` is removed, and a
    full or read-only file system is :class:`OutOfResourcesError` (DIMSE 0xA700)."""
    try:
        yield
    except OSError as exc:
        with contextlib.suppress(OSError):
            source.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise OutOfResourcesError("original store full or read-only") from exc
        raise


def _same_content(path: Path, body: bytes) -> bool:
    """Whether the file at ``path`` holds exactly ``body``."""
    try:
        with path.open("rb") as fp:
            if os.fstat(fp.fileno()).st_size != len(body):
                return False
            return fp.read() == body
    except FileNotFoundError:
        return False


def _same_file(path: Path, other: Path) -> bool:
    """Whether ``path`` exists with the bytes of ``other`` (a re-sent instance: kept
    only if whole; equal keys mean equal files, as the meta is written canonically)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size != other.stat().st_size:
        return False
    return _same_content(path, other.read_bytes())


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


def open_originals(
    settings: Settings, *, staging_name: str = "", index: PendingIndex | None = None
) -> OriginalStore:
    """Originals on the local file system (default), or in object storage when
    ``storage.originals_url`` is an fsspec URL; staging stays local either way. Give
    the ``index`` where originals still in a receiver's journal must be read."""
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
            index=index,
        )
    if url:
        from storage.objectstore import ObjectOriginalStore

        return ObjectOriginalStore(
            url,
            staging=staging,
            cache=storage.originals_dir / ".cache",
            storage_options=storage.storage_options,
        )
    return FileOriginalStore(storage.originals_dir, fsync=storage.fsync, staging=staging,
                             index=index)
