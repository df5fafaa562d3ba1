"""Receiving a data set to disk: Part-10 file written as it streams in, hashed on the way.

The SHA-256 covers only the data set bytes (not the File Meta Information, PS3.10
7.1), so the same instance sent by two modalities, or by C-STORE and STOW-RS, has
one key and is stored once. The meta we write is canonical (no Source AE, no
timestamps) so equal keys mean equal files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import mmap
import os
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from core.errors import InvalidDatasetError, OutOfResourcesError

__all__ = [
    "HEAD_BYTES",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION",
    "StagedFile",
    "StagedWriter",
    "open_direct",
    "part10_prefix",
    "read_file_meta",
    "stage_part10",
    "write_all",
    "write_file",
]

# pydicom's root (1.2.826.0.1.3680043.8.498) with our own suffix until pacslab has a root.
IMPLEMENTATION_CLASS_UID = f"{PYDICOM_IMPLEMENTATION_UID.rsplit('.', 2)[0]}.77.1"
IMPLEMENTATION_VERSION = "PACSLAB_01"


def _meta_element(tag_elem: int, vr: bytes, value: bytes) -> bytes:
    # Explicit VR Little Endian, group 0002 (PS3.10 7.1, PS3.5 7.1.2).
    if vr in (b"OB", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", 0x0002, tag_elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_elem, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


_VERSION_NAME = IMPLEMENTATION_VERSION.encode("ascii")
_VERSION_NAME += b" " * (len(_VERSION_NAME) % 2)


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1) for one instance.

    Encoded by hand: it runs once per received instance, and building a pydicom
    ``FileMetaDataset`` (with its value validation) cost a third of the receive path.
    ``tests/storage/test_staging.py`` checks the bytes against pydicom's own writer.
    """
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _ui(sop_class_uid)),
            _meta_element(0x0003, b"UI", _ui(sop_instance_uid)),
            _meta_element(0x0010, b"UI", _ui(transfer_syntax_uid)),
            _meta_element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _meta_element(0x0013, b"SH", _VERSION_NAME),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


#: How much of each data set's start is kept in memory for the header read
#: (:func:`core.header.scan_header`); headers before Pixel Data are far smaller.
HEAD_BYTES = 65536


@dataclass(frozen=True, slots=True)
class StagedFile:
    """A complete Part-10 file in the staging area, not yet published."""

    path: Path
    key: str  # SHA-256 hex of the data set bytes
    size: int  # bytes of the whole file
    dataset_offset: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    #: The data set's first bytes (up to HEAD_BYTES), as received.
    head: bytes = b""
    #: ``head`` is the whole data set.
    head_complete: bool = False
    #: The data set's last 8 bytes (where encapsulated Pixel Data ends, PS3.5 A.4).
    tail: bytes = b""
    #: The whole file, when it was kept in memory (``StagedWriter(in_memory=True)``):
    #: then nothing is at ``path`` until :meth:`ensure_file` writes it there.
    body: bytes | memoryview | None = None
    #: The pooled page-aligned buffer ``body`` is a view of, until :meth:`release`.
    buffer: mmap.mmap | None = field(default=None, compare=False, repr=False)

    def aligned_body(self) -> memoryview | None:
        """``body`` zero-padded to whole 4 KiB pages, in its page-aligned buffer (what
        direct I/O can write without a copy); None when it is not in one."""
        if self.buffer is None or self.body is None or len(self.body) > len(self.buffer):
            return None
        # (the buffer is whole pages: padding never runs past it)
        return memoryview(self.buffer)[: _padded(self.buffer, len(self.body), True)]

    def release(self) -> None:
        """Give the in-memory buffer back to the pool (the caller is done with
        ``body``: the archive, once it has accepted or refused the instance)."""
        buf = self.buffer
        if buf is None:
            return
        body = self.body
        object.__setattr__(self, "buffer", None)
        object.__setattr__(self, "body", None)
        if isinstance(body, memoryview):
            with contextlib.suppress(BufferError):  # (still exported: dropped with it)
                body.release()
        _POOL.give(buf)

    def ensure_file(self) -> Path:
        """``path``, written from ``body`` first if the file is only in memory."""
        if self.body is not None and not self.path.exists():
            write_file(self.path, self.body)
        return self.path

    def open(self) -> BinaryIO:
        """The whole Part-10 file, from memory or from ``path``."""
        if self.body is not None:
            return io.BytesIO(self.body)
        return self.path.open("rb")

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


def _translate(exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return OutOfResourcesError("no space left for originals")
    return exc


_BLOCK = 4096  # O_DIRECT alignment of buffer, offset and length (any logical block ≤ 4 KiB)
_BUFFER = 2 << 20
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


class _BufferPool:
    """Page-aligned buffers (anonymous mmaps) reused across writers: a fresh 2 MiB map
    per instance would cost its page faults every time."""

    def __init__(self, keep: int = 8) -> None:
        self._free: list[mmap.mmap] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, _BUFFER)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)
                return
        with contextlib.suppress(BufferError):  # a view still exported: unmapped with it
            buf.close()


_POOL = _BufferPool()
_PROC_FD = Path("/proc/self/fd")


def open_direct(path: Path, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """``os.open`` with ``O_DIRECT`` where the file system allows it; whether it did
    (the staged files here, the original journal's segments)."""
    if _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, mode), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode), False


def _open_for_writing(path: Path) -> tuple[int, bool]:
    """A new file at ``path``: with ``O_DIRECT`` where the file system allows it."""
    return open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)


def write_all(fd: int, buf: mmap.mmap, length: int, direct: bool) -> bool:
    """Write ``buf[:length]``; whether direct I/O is still on (a file system may refuse it
    only at the first write, and then the file carries on buffered)."""
    out = memoryview(buf)[:length]
    try:
        written = 0
        while written < length:
            try:
                written += os.write(fd, out[written:])
            except OSError as exc:
                if not (direct and exc.errno == errno.EINVAL and written == 0):
                    raise
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
                direct = False
    finally:
        out.release()
    return direct


def _padded(buf: mmap.mmap, n: int, direct: bool) -> int:
    """How much of ``buf`` to write for its first ``n`` bytes: under direct I/O whole
    blocks, the rest of the last one zeroed (the caller then cuts the file to size)."""
    length = -(-n // _BLOCK) * _BLOCK if direct else n
    buf[n:length] = bytes(length - n)
    return length


def write_file(path: Path, data: bytes | memoryview, *, fsync: bool = False) -> None:
    """Write ``data`` as a new file at ``path`` the way :class:`StagedWriter` does
    (direct I/O from a page-aligned buffer, the last block padded, then the file cut
    to size); on failure nothing is left at ``path``."""
    fd, direct = _open_for_writing(path)
    try:
        _write_body(fd, direct, data, fsync=fsync)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def write_unnamed(directory: Path, data: bytes | memoryview) -> int | None:
    """A file in ``directory`` that has no name yet (Linux ``O_TMPFILE``), holding
    ``data``: its open descriptor, for :func:`link_unnamed`; None where the file system
    cannot make one (the caller then writes a named temporary file). A process killed
    before the file is linked leaves nothing behind: no temporary name to clean up."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if not tmpfile or not _PROC_FD.is_dir():  # (linked through /proc: link_unnamed)
        return None
    try:
        fd, direct = open_direct(directory, tmpfile | os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise
    _write_body(fd, direct, data, fsync=False)
    return fd


def link_unnamed(fd: int, path: Path) -> None:
    """Give the file of :func:`write_unnamed` the name ``path`` (``FileExistsError`` if
    one is there; the file appears whole or not at all)."""
    # linkat(..., AT_SYMLINK_FOLLOW), as open(2) shows for O_TMPFILE; os.link calls
    # plain link(2), which would link the /proc entry itself, unless given a dir fd.
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(_PROC_FD / str(fd), path.name, dst_dir_fd=parent, follow_symlinks=True)
    finally:
        os.close(parent)


def _write_body(fd: int, direct: bool, data: bytes | memoryview, *, fsync: bool) -> None:
    """``data`` into the new file ``fd``; the descriptor is closed if this raises."""
    buf = _POOL.take()
    try:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            n = min(len(view) - pos, _BUFFER)  # (padding only the last: whole blocks)
            buf[:n] = view[pos : pos + n]
            direct = write_all(fd, buf, _padded(buf, n, direct), direct)
            pos += n
        os.ftruncate(fd, len(view))
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    finally:
        _POOL.give(buf)


class StagedWriter:
    """Write one data set to ``staging/<random>.part`` fragment by fragment.

    The file is written with ``O_DIRECT`` from a page-aligned buffer where the file
    system allows it (falling back to ordinary writes otherwise, e.g. on tmpfs): the
    bytes go from our buffer to the device without a page-cache copy. Measured here
    for 512 KiB files, a buffered write plus fsync cost 1.3-1.5 ms of CPU, a direct one
    0.36 ms; and a write-once archive has no use for those pages in the cache. The
    last block is padded for the device, then the file is truncated to its real size.

    ``fsync`` happens in :meth:`finish` or later by the caller (the archive fsyncs
    after validating), in the receiving thread, so parallel associations overlap their
    flushes (the journal groups them).
    """

    def __init__(
        self,
        staging: Path,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        *,
        in_memory: bool = False,
    ) -> None:
        self._ids = (sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        # In memory: the file is created only if the data set outgrows one buffer, so an
        # instance the archive journals (storage/journal.py) never touches staging.
        self._in_memory = in_memory
        self._direct = False
        self.path = staging / f"{uuid.uuid4().hex}.part"
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self._tail = b""
        prefix = part10_prefix(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        self._offset = len(prefix)
        self._size = len(prefix)
        self._fd: int | None = None
        self._buf: mmap.mmap | None = None
        self._fill = 0
        try:
            if not in_memory:
                self._fd, self._direct = _open_for_writing(self.path)
            self._buf = _POOL.take()
            self._put(prefix)
        except OSError as exc:
            self.abort()
            raise _translate(exc) from exc

    def _put(self, data: bytes | memoryview) -> None:
        """Copy into the buffer, writing out every full buffer."""
        assert self._buf is not None
        view = memoryview(data)
        while view:
            n = min(len(view), _BUFFER - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == _BUFFER:
                self._write_out(_BUFFER)
                self._fill = 0

    def _write_out(self, length: int) -> None:
        if self._fd is None:  # in memory until now
            self._fd, self._direct = _open_for_writing(self.path)
        assert self._buf is not None
        self._direct = write_all(self._fd, self._buf, length, self._direct)

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._put(data)
        except OSError as exc:
            self.abort()
            raise _translate(exc) from exc
        self._account(data)

    def receive(self, recv_exactly: Callable[[memoryview], None], size: int) -> None:
        """Take the next ``size`` bytes of the data set straight from the network into
        the write buffer (``recv_exactly`` fills a view or raises): the copy
        :meth:`write` makes is the kernel's own here.

        If the file cannot be written, every byte is still consumed (the association
        stays in step) and OutOfResourcesError is raised at the end.
        """
        assert self._buf is not None
        failure: OSError | None = None
        while size:
            n = min(size, _BUFFER - self._fill)
            view = memoryview(self._buf)[self._fill : self._fill + n]
            try:
                recv_exactly(view)
                if failure is None:
                    self._account(view)
            finally:
                view.release()
            size -= n
            self._fill += n
            if self._fill == _BUFFER:
                if failure is None:
                    try:
                        self._write_out(_BUFFER)
                    except OSError as exc:
                        failure = exc
                self._fill = 0
        if failure is not None:
            self.abort()
            raise _translate(failure) from failure

    def _account(self, data: bytes | memoryview) -> None:
        if len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]
        self._tail = (self._tail + bytes(data[-8:]))[-8:]
        self._hash.update(data)
        self._size += len(data)

    def finish(self, *, fsync: bool = True) -> StagedFile:
        assert self._buf is not None
        body: bytes | memoryview | None = None
        kept: mmap.mmap | None = None
        if self._in_memory and self._fd is None:
            # A view, not a copy: the buffer goes with the staged file until its
            # release (the journal writes it to the device as it is).
            kept = self._buf
            body = memoryview(kept)[: self._fill]
            self._fill = 0
        try:
            if body is None and self._fd is None:
                self._fd, self._direct = _open_for_writing(self.path)
            if self._fill:
                assert self._fd is not None
                padded = self._direct  # whole blocks only: pad, then cut the file to size
                self._write_out(_padded(self._buf, self._fill, self._direct))
                if padded:
                    os.ftruncate(self._fd, self._size)
                self._fill = 0
            if self._fd is not None:
                if fsync:
                    os.fsync(self._fd)
                os.close(self._fd)
        except OSError as exc:
            self.abort()
            raise _translate(exc) from exc
        self._fd = None
        if kept is not None:
            self._buf = None  # (the staged file's now)
        self._release()
        cls, inst, ts = self._ids
        data_size = self._size - self._offset
        return StagedFile(
            self.path,
            self._hash.hexdigest(),
            self._size,
            self._offset,
            cls,
            inst,
            ts,
            bytes(self._head),
            data_size <= HEAD_BYTES,
            self._tail,
            body,
            kept,
        )

    def _release(self) -> None:
        if self._buf is not None:
            _POOL.give(self._buf)
            self._buf = None

    def abort(self) -> None:
        """Remove the partial file: nothing half-written is left behind."""
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # type: ignore[arg-type]
        self._fd = None
        if getattr(self, "_buf", None) is not None:
            self._release()
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})


def read_file_meta(head: bytes) -> tuple[dict[int, bytes], int]:
    """File Meta elements (PS3.10 7.1, Explicit VR Little Endian) and where the data set
    starts. Parsed by hand: the group length may be absent or wrong in what peers send,
    so elements are read until the group changes."""
    if len(head) < 132 or head[128:132] != b"DICM":
        raise InvalidDatasetError("not a DICOM Part-10 file (no DICM prefix)")
    pos = 132
    found: dict[int, bytes] = {}
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return found, pos
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                break
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if length == 0xFFFFFFFF or start + length > len(head):
            break
        found[elem] = head[start : start + length]
        pos = start + length
    raise InvalidDatasetError("File Meta Information truncated or too long")


class Readable(Protocol):
    """A binary stream: a file, or a view of one part of a STOW-RS body."""

    def read(self, size: int = -1, /) -> bytes: ...


def stage_part10(
    staging: Path,
    fp: Readable,
    *,
    fsync: bool = True,
    chunk_size: int = 1 << 20,
    in_memory: bool = False,
) -> StagedFile:
    """Stage a Part-10 file read from ``fp`` (STOW-RS parts, files on disk).

    Only the data set is kept as it came: the File Meta Information is rewritten
    canonically by :class:`StagedWriter`, so the content key equals the one a C-STORE of
    the same data set gets.

    Raises
    ------
    InvalidDatasetError
        Not a Part-10 file, or its meta lacks the SOP Class/Instance or Transfer Syntax
        UID (PS3.10 7.1 Type 1 elements).
    """
    head = fp.read(65536)
    meta, offset = read_file_meta(head)

    def uid(elem: int, name: str) -> str:
        value = meta.get(elem, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        if not value:
            raise InvalidDatasetError(f"File Meta Information lacks {name}")
        return value

    writer = StagedWriter(
        staging,
        uid(0x0002, "MediaStorageSOPClassUID"),
        uid(0x0003, "MediaStorageSOPInstanceUID"),
        uid(0x0010, "TransferSyntaxUID"),
        in_memory=in_memory,
    )
    try:
        writer.write(memoryview(head)[offset:])
        while chunk := fp.read(chunk_size):
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.finish(fsync=fsync)
