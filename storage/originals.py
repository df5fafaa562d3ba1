"""Content-addressed originals on a local file system.

Layout ``<root>/ab/cd/<sha256>.dcm``: the path comes from the SHA-256 of the data set
as received, never from patient data, and two fan-out levels keep directories small
(as Orthanc's storage area does with its UUIDs). Files arrive in ``<root>/.staging``
on the same file system so that publishing is an atomic ``rename``; the caller fsyncs
the file, :meth:`FileOriginalStore.commit` fsyncs the directory that gained the name,
so an acknowledged original survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path
from typing import BinaryIO

from core.errors import NotFoundError, OutOfResourcesError
from core.settings import Settings
from storage.abc import OriginalStore

__all__ = ["FileOriginalStore", "clear_staging", "fsync_dir", "open_originals", "staging_dir"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    @property
    def has_local_paths(self) -> bool:
        return True

    def staging_dir(self) -> Path:
        return self._staging

    def path(self, key: str) -> Path:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise NotFoundError("not a content key")
        return self.root / key[:2] / key[2:4] / f"{key}.dcm"

    def commit(self, staged: Path, key: str, *, defer_sync: bool = False) -> bool:
        final = self.path(key)
        parent = final.parent
        try:
            if parent not in self._known_dirs:
                parent.mkdir(parents=True, exist_ok=True)
                # New fan-out directories must themselves be durable entries.
                self._dirty(parent.parent, parent.parent.parent)
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
        """fsync every directory that gained an entry since the last sync.

        Deepest first, so a new fan-out directory's own entries are durable before its
        name in its parent is. When several receivers commit at once, one sync covers
        them all (on ext4 the first fsync commits the journal, the rest find nothing to
        do).
        """
        with self._dirty_lock:
            dirs = sorted(self._dirty_dirs, key=lambda d: len(d.parts), reverse=True)
            self._dirty_dirs.clear()
        try:
            for directory in dirs:
                fsync_dir(directory)
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
