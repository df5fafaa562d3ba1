"""The drop-folder shell behind every watched inbox (lab profiles, HL7 orders).

One folder, files dropped in it by others (SMB, SFTP, an analyzer's export job). The
rules of when a file is complete and which names are read are pure
(:mod:`core.dropfiles`); this module does the disk side, treating every entry as
hostile:

- **Only regular files inside the folder are read.** Entries are judged by
  ``lstat``; a file is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a symlink swapped in
  fails, a FIFO never blocks) and judged again by ``fstat`` on the open descriptor
  (no check-then-use race). Symlinks, FIFOs, devices, sockets and directories are
  moved aside to ``rejected/`` as they are (a symlink's link, never its target),
  with a reason file, and never read.
- **Bounded.** A file larger than ``max_bytes`` is refused unread; reading stops at
  ``max_bytes + 1`` bytes whatever the size said.
- **Complete only.** Renamed from a temporary name, or quiet (size, mtime, inode)
  over two looks ``stable_s`` apart, no process holding it open for writing (a
  read lease, Linux ``F_SETLEASE``), and the format's end marker present (the
  ``check`` callback). A file still incomplete ``incomplete_s`` after it went quiet
  is rejected with its reason, never filed as complete.
- **Unchanged when filed.** :meth:`DropFolder.unchanged` hashes the file again
  before the caller commits: a file that changed while being read is read again.
- **Every odd entry once.** Names that cannot be read or filed as they are, and
  temporary names abandoned for ``abandoned_s``, are set aside once with a reason
  under a derived name; nothing is retried forever.
- **Reason first.** A reason/summary file is written atomically (temporary name,
  fsync, rename, directory fsync) *before* the file moves beside it, so a crash
  never leaves a filed file without its reason.

Names may carry patient data: this module logs hashes and counts, never names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from core.dropfiles import Stability, filed_name, name_verdict, printable_name, safe_name

__all__ = [
    "MAX_TRIES",
    "PROCESSED",
    "REJECTED",
    "DropFile",
    "DropFolder",
    "DropLimits",
    "SetAside",
    "fsync_dir",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

PROCESSED: Final = "processed"
REJECTED: Final = "rejected"
_OWN = (PROCESSED, REJECTED)
_CHUNK = 1 << 20
#: Failures on one entry before it is set aside.
MAX_TRIES: Final = 3
_OPEN_FLAGS = (
    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
)


@dataclass(frozen=True, slots=True)
class DropLimits:
    """How long to wait and how much to read.

    Attributes
    ----------
    max_bytes : int
        Larger files are rejected (read at most ``max_bytes + 1`` bytes).
    stable_s : float
        Quiet period before an unrenamed file is read.
    incomplete_s : float
        A quiet file still incomplete (no end marker, or open for writing) this long
        is rejected.
    abandoned_s : float
        A temporary name (``.x``, ``x.tmp``) untouched this long is set aside.
    two_looks : bool
        See :class:`core.dropfiles.Stability`.
    """

    max_bytes: int = 64 * 1024 * 1024
    stable_s: float = 1.0
    incomplete_s: float = 900.0
    abandoned_s: float = 3600.0
    two_looks: bool = True


@dataclass(frozen=True, slots=True)
class DropFile:
    """A complete regular file, read: its bytes and what it looked like."""

    name: str
    path: Path
    raw: bytes
    sha256: str
    signature: tuple[int, int, int, int]  # dev, inode, size, mtime_ns


@dataclass(frozen=True, slots=True)
class SetAside:
    """An entry the shell moved to ``rejected/`` itself (never or only partly read)."""

    name: str
    destination: Path | None
    reason: str
    kind: str  # symlink, fifo, device, socket, directory, name, abandoned, large, incomplete
    sha256: str = ""


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, body: Mapping[str, Any]) -> None:
    """Write ``body`` as JSON: temporary name, fsync, rename, directory fsync."""
    tmp = path.with_name(f".{path.name[:200]}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fp:
            json.dump(body, fp, ensure_ascii=False, indent=2, default=str)
            fp.write("\n")
            fp.flush()
            os.fsync(fp.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special"


_NOT_REGULAR = {
    "symlink": "a symbolic link, not a regular file: never followed",
    "fifo": "a FIFO (named pipe), not a regular file: never opened",
    "device": "a device node, not a regular file: never opened",
    "socket": "a socket, not a regular file: never opened",
    "directory": "a directory, not a file: not read",
    "special": "not a regular file: never opened",
}


def writer_active(fd: int) -> bool | None:
    """Does any process hold the file open for writing? None when we cannot tell.

    A read lease (Linux ``fcntl(F_SETLEASE, F_RDLCK)``) is refused with ``EAGAIN``
    while the file is open for writing anywhere on this machine; it needs the file
    owner or ``CAP_LEASE`` and a local file system (else None: quietness decides).
    The lease is dropped at once; should a writer open the file in between, the
    break signal is ``SIGURG`` (ignored by default) rather than ``SIGIO`` (which
    would end the process).
    """
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return True
        return None
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


@dataclass(slots=True)
class _Waiting:
    signature: tuple[int, int, int, int]
    since: float
    reason: str


@dataclass(slots=True)
class DropFolder:
    """One watched folder: finds, reads and files its files (see the module docstring).

    Parameters
    ----------
    folder : Path
        The inbox; ``processed/`` and ``rejected/`` are created inside it.
    limits : DropLimits
    check : callable, optional
        ``check(raw)`` returns why the bytes are a cut file, or None
        (:func:`core.dropfiles.astm_incomplete` and friends).
    clock, mono : callable
        Wall and monotonic clocks (tests may pass others).
    """

    folder: Path
    limits: DropLimits = field(default_factory=DropLimits)
    check: Callable[[bytes], str | None] | None = None
    clock: Callable[[], float] = time.time
    mono: Callable[[], float] = time.monotonic
    _stability: Stability = field(init=False)
    # Insertion-ordered (a dict): files are read in the order they were found.
    _pending: dict[str, None] = field(default_factory=dict, init=False)
    _waiting: dict[str, _Waiting] = field(default_factory=dict, init=False)
    _kept: set[str] = field(default_factory=set, init=False)
    _failures: dict[str, int] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self._stability = Stability(self.limits.stable_s, two_looks=self.limits.two_looks)
        for sub in (self.folder, self.processed, self.rejected):
            sub.mkdir(parents=True, exist_ok=True)

    @property
    def processed(self) -> Path:
        return self.folder / PROCESSED

    @property
    def rejected(self) -> Path:
        return self.folder / REJECTED

    @property
    def busy(self) -> bool:
        """Files are waiting to become complete."""
        with self._lock:
            return bool(self._pending)

    # -- finding -------------------------------------------------------------------

    def notify(self, name: str, *, renamed: bool = False) -> None:
        """An entry appeared or changed; ``renamed``: from a temporary name."""
        if name in _OWN or "/" in name or name in self._kept:
            return
        verdict = name_verdict(name)
        if verdict.kind == "wait":
            return
        with self._lock:
            self._pending.setdefault(name)
            if renamed and verdict.kind == "read":
                self._stability.renamed(name)

    def rescan(self) -> list[SetAside]:
        """List the folder: queue candidates, set aside abandoned temporary names.

        Entries are judged by ``lstat`` only: nothing here opens a file.
        """
        aside: list[SetAside] = []
        now = self.clock()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                name = entry.name
                if name in _OWN or name in self._kept:
                    continue
                if name_verdict(name).kind != "wait":
                    self.notify(name)
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if now - st.st_mtime >= self.limits.abandoned_s:
                    aside.append(self.set_aside(
                        name, "abandoned",
                        f"a temporary name left untouched for {self.limits.abandoned_s:g} s "
                        "(a writer that never renamed it)",
                    ))
        return aside

    def failed(self, name: str, reason: str, *, sha256: str = "") -> SetAside | None:
        """Count a failure on ``name``: it waits for the next rescan, and the
        :data:`MAX_TRIES`-th failure sets it aside (never retried forever)."""
        self.forget(name)
        tries = self._failures[name] = self._failures.get(name, 0) + 1
        logger.warning(
            "inbox %s: entry %s failed (%d of %d tries)", self.folder.name, safe_name(name),
            tries, MAX_TRIES, exc_info=True,
        )
        if tries < MAX_TRIES:
            return None
        del self._failures[name]
        return self.set_aside(name, "failed", f"{reason} (after {tries} tries)", sha256=sha256)

    def forget(self, name: str) -> None:
        with self._lock:
            self._pending.pop(name, None)
            self._stability.forget(name)
            self._waiting.pop(name, None)

    def retry(self, name: str) -> None:
        """Look at ``name`` again from the start (it changed while being read)."""
        self.forget(name)
        with self._lock:
            self._pending.setdefault(name)

    # -- reading -------------------------------------------------------------------

    def poll(self) -> Iterator[DropFile | SetAside]:
        """Look at each pending entry once; yield the files ready and what was set aside."""
        with self._lock:
            names = list(self._pending)
        for name in names:
            try:
                item = self._look(name)
            except OSError as exc:
                # An I/O error on one entry never holds up the others.
                item = self.failed(name, f"cannot be read: {exc.strerror or type(exc).__name__}")
                if item is None:
                    continue
            if item is not None:
                yield item

    def _look(self, name: str) -> DropFile | SetAside | None:
        path = self.folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.forget(name)
            return None
        verdict = name_verdict(name)
        if verdict.kind == "reject":
            return self.set_aside(name, "name", verdict.reason)
        kind = _kind(st.st_mode)
        if kind != "file":
            return self.set_aside(name, kind, _NOT_REGULAR[kind])
        if st.st_size > self.limits.max_bytes:
            return self.set_aside(name, "large", self._too_large(st.st_size))
        with self._lock:
            quiet = self._stability.observe(
                name, size=st.st_size, mtime_ns=st.st_mtime_ns, wall=self.clock(),
                mono=self.mono(), inode=st.st_ino,
            )
        if not quiet:
            return None
        return self._read_complete(name, st)

    def _too_large(self, size: int) -> str:
        return f"larger than the inbox limit of {self.limits.max_bytes} bytes ({size} or more)"

    def _read_complete(self, name: str, seen: os.stat_result) -> DropFile | SetAside | None:
        fd = self._open(name)
        if fd is None:
            self.forget(name)
            return None
        try:
            st = os.fstat(fd)
            kind = _kind(st.st_mode)
            if kind != "file":  # swapped after the lstat
                return self.set_aside(name, kind, _NOT_REGULAR[kind])
            if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino):
                self.retry(name)
                return None
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            renamed = self._stability.is_renamed(name)
            if not renamed and writer_active(fd):
                return self._incomplete(name, signature, "the file is still open for writing")
            raw = _read_bounded(fd, self.limits.max_bytes)
            if len(raw) > self.limits.max_bytes:
                return self.set_aside(name, "large", self._too_large(len(raw)))
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                self.retry(name)  # changed while being read
                return None
        finally:
            os.close(fd)
        reason = self.check(raw) if self.check is not None else None
        if reason is not None:
            return self._incomplete(name, signature, reason)
        with self._lock:
            self._pending.pop(name, None)
            self._stability.forget(name)
            self._waiting.pop(name, None)
        sha = hashlib.sha256(raw).hexdigest()
        return DropFile(name, self.folder / name, raw, sha, signature)

    def _incomplete(
        self, name: str, signature: tuple[int, int, int, int], reason: str
    ) -> SetAside | None:
        """Wait for the rest; past ``incomplete_s`` quiet and incomplete, reject."""
        now = self.mono()
        with self._lock:
            waiting = self._waiting.get(name)
            if waiting is None or waiting.signature != signature:
                self._waiting[name] = _Waiting(signature, now, reason)
                # Quiet again only after a new quiet period: the file may still grow.
                self._stability.forget(name)
                return None
            if now - waiting.since < self.limits.incomplete_s:
                return None
        return self.set_aside(
            name, "incomplete",
            f"incomplete after {self.limits.incomplete_s:g} s: {reason}; never filed as complete",
        )

    def read(self, name: str) -> DropFile | SetAside | None:
        """Read ``name`` now, without waiting for quietness (tools and recovery).

        None when it is gone. Non-regular entries and odd names are set aside.
        """
        verdict = name_verdict(name)
        if verdict.kind == "reject":
            return self.set_aside(name, "name", verdict.reason)
        try:
            st = os.lstat(self.folder / name)
        except FileNotFoundError:
            return None
        kind = _kind(st.st_mode)
        if kind != "file":
            return self.set_aside(name, kind, _NOT_REGULAR[kind])
        with self._lock:
            self._stability.renamed(name)
        return self._read_complete(name, st)

    def _open(self, name: str) -> int | None:
        try:
            return os.open(self.folder / name, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink swapped in after the lstat
                return None
            raise

    def unchanged(self, drop: DropFile) -> bool:
        """Is the file still exactly what was read? (hash again, before committing)"""
        fd = self._open(drop.name)
        if fd is None:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return False
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != drop.signature:
                return False
            raw = _read_bounded(fd, self.limits.max_bytes)
        finally:
            os.close(fd)
        return hashlib.sha256(raw).hexdigest() == drop.sha256

    # -- filing --------------------------------------------------------------------

    def file(
        self,
        name: str,
        dest: str,
        sha256: str,
        body: Mapping[str, Any] | None,
        *,
        suffix: str = "",
        filed_as: str | None = None,
    ) -> Path:
        """Write the report beside the filed file, then move the file there.

        ``dest`` is :data:`PROCESSED` or :data:`REJECTED`; the report is
        ``<filed name><suffix>`` and names the file it belongs to (no report when
        ``body`` is None).
        """
        folder = self.folder / dest
        target = filed_as or filed_name(name, sha256, lambda n: os.path.lexists(folder / n))
        if body is not None:
            report = dict(body) | {"filed_as": target, "filed_at": datetime.now(UTC).isoformat()}
            write_json_atomic(folder / f"{target}{suffix}", report)
        os.rename(self.folder / name, folder / target)  # the entry itself, never a target
        fsync_dir(folder)
        fsync_dir(self.folder)
        self.forget(name)
        self._failures.pop(name, None)
        return folder / target

    def set_aside(self, name: str, kind: str, reason: str, *, sha256: str = "") -> SetAside:
        """Move an entry to ``rejected/`` as it is, with its reason, once."""
        verdict = name_verdict(name)
        filed_as: str | None = None
        if verdict.kind == "reject":
            filed_as = safe_name(name, kind if kind != "name" else "file")
        body = {
            "status": "rejected",
            "file": printable_name(name),
            "kind": kind,
            "reason": reason,
            "sha256": sha256,
            "read": False if kind != "incomplete" else "read, never filed as complete",
        }
        dest: Path | None
        try:
            if filed_as is not None and os.path.lexists(self.rejected / filed_as):
                filed_as = filed_name(filed_as, hashlib.sha256(
                    f"{time.time_ns()}".encode()).hexdigest(),
                    lambda n: os.path.lexists(self.rejected / n))
            dest = self.file(name, REJECTED, sha256, body, suffix=".error.json",
                             filed_as=filed_as)
        except OSError as exc:
            # Cannot move it (a mount point, a busy directory): keep the reason once
            # and stop looking at it.
            dest = None
            report = self.rejected / f"{safe_name(name, 'kept')}.error.json"
            if not report.exists():
                with contextlib.suppress(OSError):
                    write_json_atomic(report, body | {"kept_in_inbox": True,
                                                      "move_error": exc.strerror or ""})
            self.forget(name)
            self._kept.add(name)
        logger.warning(
            "inbox %s: an entry was set aside (%s) [%s]",
            self.folder.name, kind, safe_name(name),
        )
        return SetAside(name, dest, reason, kind, sha256)


def _read_bounded(fd: int, limit: int) -> bytes:
    """At most ``limit + 1`` bytes from ``fd`` (one more than allowed tells "too large")."""
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
