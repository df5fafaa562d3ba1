"""The original journal: received instances made durable with one data flush (issue 19).

Why. On one association an instance's latency is the sum of its flushes, and
publishing a new file durably costs several (the file's data, its inode and the
directory that gained its name, each a commit of the file system's own journal),
besides creating, writing and renaming it. Measured on this machine kind, writing each
instance once into a zero-filled, pre-allocated file and ``fdatasync``-ing it (a pure
data flush: no block is allocated, no size changes) made ``pacslab serve`` 1.2-1.4x
faster on one association (benchmarks/test_dicom_ingest.py); writing the ordinary file
as well, even with no flush and even after the acknowledgement, took all of that back
(two device writes per instance). So a
burst of instances stays in the journal while it arrives, and is written out as
ordinary files once the receiver is idle, the way PostgreSQL checkpoints its WAL.

Layout, per receiving process (``<originals>/.journal/<name>/``, locked with ``flock``):
``segments`` files of ``segment_bytes`` each, zero-filled when the process starts (in
the background: until one is ready, instances take the file path) and reused until it
stops, when they are removed. A segment's first page is its header; a record is a page
with its header (magic, key, length, data set offset, sequence number, CRC) and a little
JSON about its arrival, then the whole Part-10 file padded to 4 KiB pages, written with
direct I/O from the receiver's page-aligned buffer where the file system allows it (no
page-cache copy, and nothing for the ``fdatasync`` to write back). After its
``fdatasync`` the archive indexes the instance, with the record's *mark* (below) and
location (``<name>/<segment>:<offset>:<length>:<data set offset>``) in the same
transaction. :class:`storage.originals.FileOriginalStore` serves a key whose file is not
there yet from that record, checked against its SHA-256 (a segment may have been reused
since the location was read). The location was a symbolic link per instance until
2026-12-04: creating an inode cost a fifth of a receiver's CPU (ext4 without a journal
scans its recently deleted inodes on every allocation, measured with ``perf``), and the
index row is written anyway.

A segment is written out when the receiver has been idle for ``idle_s`` (or when none
is free): each record the index still references becomes its ordinary file, one
``syncfs`` makes them all durable, and the segment is free again (its marks dropped).
When no segment is free, :meth:`OriginalJournal.append` declines and the instance takes
the old path (its own file, fsynced): a long transfer slows to the old rate, it never
waits.

Since the record is durable before the index row is written, the row's own flush is
left out (issue 19: one flush per instance on one association, not two). The row is
committed without flushing the index's WAL, with a *mark* ``(journal id, seq)`` in the
same transaction; a power cut may lose the last such commits, never a record. Before a
segment is freed, its checkpoint flushes the index (:meth:`JournalOwner.sync`), so
what is written out is indexed durably, and the segment's header is then erased
durably, so its records are never read again.

After a crash, a process that finds the journal of one that
is gone (its lock free, no ``clean`` mark) *replays* every record of that journal's
last incarnation that has no mark (its commit was lost, or never made: the index
decides again, as on arrival), writes out every other record the index references,
syncs, and marks it clean. A record torn by the crash fails its CRC or its hash and
was never acknowledged (the ``fdatasync`` precedes the index row, which precedes the
answer). Records of a segment's earlier rounds are told apart by the segment header
(written when the segment is taken, made durable by its first record's flush): its
journal id and first sequence number.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import io
import json
import logging
import mmap
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

from storage._flush import SharedFlush, fsync_dir
from storage.staging import open_direct, write_all

__all__ = [
    "HEADER_BYTES",
    "JournalOwner",
    "JournalRecord",
    "OriginalJournal",
    "Ticket",
    "parse_location",
    "read_record",
    "read_records",
    "syncfs",
]

logger = logging.getLogger(__name__)

_MAGIC = b"PLJ2"
#: magic, key (SHA-256, 32 bytes), file length, data set offset, sequence number,
#: metadata length, CRC-32 of the rest and of the metadata (which follows it, in the
#: same page)
_HEADER = struct.Struct("<4s32sQIQII")
#: The records of a journal written before marks existed (no segment header, no
#: metadata): indexed durably when they were written, so only ever written out.
_LEGACY_MAGIC = b"PLJ1"
_LEGACY = struct.Struct("<4s32sQII")
#: A record's first page: its header, then its metadata; the Part-10 file follows on
#: the next page, so that both can be written with direct I/O from page-aligned memory.
HEADER_BYTES = 4096
_LEGACY_HEADER_BYTES = 64
_SEGMENT_MAGIC = b"PLS2"
#: magic, journal id (16 bytes), first sequence number of this round, CRC-32
_SEGMENT = struct.Struct("<4s16sQI")
_MAX_META = HEADER_BYTES - _HEADER.size
_ALIGN = 4096
_ZERO_CHUNK = 4 << 20
_ZEROS = bytes(4096)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


_libc: ctypes.CDLL | None = None


def syncfs(path: Path) -> None:
    """Flush every dirty page and inode of the file system holding ``path``
    (Linux ``syncfs(2)``; ``sync(2)`` where the C library lacks it)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(_libc, "syncfs", None)
    if fn is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Ticket:
    """Where one record was written."""

    segment: int
    offset: int
    length: int  # of the Part-10 file
    dataset_offset: int
    seq: int = 0  # its sequence number in the journal's incarnation (its mark)


@dataclass(frozen=True, slots=True)
class JournalRecord:
    key: str
    body: bytes  # the whole Part-10 file
    #: Its sequence number; 0 for a record of the old format (indexed durably).
    seq: int = 0
    #: What the archive kept of the arrival (calling AE title, time, correlation id),
    #: for a replay.
    meta: dict[str, str] = field(default_factory=dict)


class JournalOwner(Protocol):
    """What the journal asks of the archive that owns it (storage/archive.py)."""

    def write_out(self, records: list[JournalRecord]) -> None:
        """Write the records the index references as ordinary files (not durable yet)."""

    def replay(self, records: list[JournalRecord]) -> None:
        """Index records whose index commit was lost, in this order, as on arrival
        (durably, with their files)."""

    def marked(self, journal: str) -> set[int]:
        """The sequence numbers of ``journal``'s records whose index commit is there."""

    def forget(self, journal: str, upto: int | None) -> None:
        """Drop the marks of ``journal`` (those below ``upto``, or all)."""

    def sync(self) -> None:
        """Make every index commit made so far durable."""


def _encode_header(key: str, length: int, dataset_offset: int, seq: int, meta: bytes) -> bytes:
    """A record's first page: header, metadata, zeros."""
    raw = bytes.fromhex(key)
    crc = zlib.crc32(meta, zlib.crc32(
        _HEADER.pack(_MAGIC, raw, length, dataset_offset, seq, len(meta), 0)[:-4]))
    head = _HEADER.pack(_MAGIC, raw, length, dataset_offset, seq, len(meta), crc) + meta
    return head + bytes(HEADER_BYTES - len(head))


_local = threading.local()


def _page(data: bytes) -> memoryview:
    """``data`` (one page) in page-aligned memory, for direct I/O (one per thread)."""
    page: mmap.mmap | None = getattr(_local, "page", None)
    if page is None:
        page = _local.page = mmap.mmap(-1, _ALIGN)
    page[:] = data
    return memoryview(page)


def _encode_segment(journal: str, first_seq: int) -> bytes:
    packed = _SEGMENT.pack(_SEGMENT_MAGIC, bytes.fromhex(journal), first_seq, 0)[:-4]
    head = packed + struct.pack("<I", zlib.crc32(packed))
    return head + bytes(_ALIGN - len(head))


def segment_journal(fp: io.BufferedReader) -> tuple[str, int] | None:
    """``(journal id, first sequence number)`` of an open segment's current round, or
    None when it has no header (free, erased, or of the old format)."""
    fp.seek(0)
    head = fp.read(_SEGMENT.size)
    if len(head) < _SEGMENT.size:
        return None
    magic, raw, first, crc = _SEGMENT.unpack(head)
    if magic != _SEGMENT_MAGIC or crc != zlib.crc32(head[:-4]):
        return None
    return raw.hex(), int(first)


def _intact(body: bytes, dataset_offset: int, key: str) -> bool:
    """Whether ``body`` is the whole original of ``key`` (its data set's SHA-256): a
    record torn by a crash, or overwritten since its location was read, is not."""
    return hashlib.sha256(memoryview(body)[dataset_offset:]).hexdigest() == key


def read_records(
    path: Path, end: int | None = None, *, journal: str | None = None
) -> Iterator[JournalRecord]:
    """The whole records of one segment's current round (up to ``end``): a segment
    header naming ``journal`` (when given), a sequence number from the header's on,
    header CRC right and the data set's SHA-256 equal to the key (a record torn by a
    crash fails one or the other; what a reused segment still holds of an earlier round
    has a smaller sequence number). A segment without a header yields the records of
    the old format it may hold, and nothing else; ``journal=""`` only those."""
    with path.open("rb") as fp:
        file_size = os.fstat(fp.fileno()).st_size
        size = file_size if end is None else min(end, file_size)
        current = segment_journal(fp)
        if current is None:
            yield from _legacy_records(fp, size, file_size)
            return
        if journal is not None and current[0] != journal:
            return
        first = current[1]
        offset = _ALIGN
        while offset + HEADER_BYTES <= size:
            fp.seek(offset)
            head = fp.read(HEADER_BYTES)
            magic, raw, length, data_off, seq, meta_len, crc = _HEADER.unpack(
                head[: _HEADER.size])
            if not (
                magic == _MAGIC
                and seq >= first
                and data_off <= length
                and meta_len <= _MAX_META
                and offset + HEADER_BYTES + length <= file_size
            ):
                offset += _ALIGN
                continue
            meta = head[_HEADER.size : _HEADER.size + meta_len]
            body = fp.read(length)
            if (
                crc == zlib.crc32(meta, zlib.crc32(head[: _HEADER.size - 4]))
                and _intact(body, data_off, raw.hex())
            ):
                yield JournalRecord(raw.hex(), body, int(seq), _parse_meta(meta))
                offset += HEADER_BYTES + _aligned(length)
            else:
                offset += _ALIGN


def _first_seq(path: Path) -> int:
    """Where a segment's current round starts in its journal's sequence (0: none)."""
    with path.open("rb") as fp:
        current = segment_journal(fp)
    return current[1] if current else 0


def _parse_meta(raw: bytes) -> dict[str, str]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _legacy_records(fp: io.BufferedReader, size: int, file_size: int) -> Iterator[JournalRecord]:
    offset = 0
    while offset + _LEGACY_HEADER_BYTES <= size:
        fp.seek(offset)
        head = fp.read(_LEGACY.size)
        magic, raw, length, data_off, crc = _LEGACY.unpack(head)
        if not (
            magic == _LEGACY_MAGIC
            and crc == zlib.crc32(head[:-4])
            and data_off <= length
            and offset + _LEGACY_HEADER_BYTES + length <= file_size
        ):
            offset += _ALIGN
            continue
        fp.seek(offset + _LEGACY_HEADER_BYTES)
        body = fp.read(length)
        if _intact(body, data_off, raw.hex()):
            yield JournalRecord(raw.hex(), body)
            offset += _aligned(_LEGACY_HEADER_BYTES + length)
        else:
            offset += _ALIGN


def location(name: str, ticket: Ticket) -> str:
    """Where a record is, as the index keeps it with the record's mark."""
    return f"{name}/{ticket.segment}:{ticket.offset}:{ticket.length}:{ticket.dataset_offset}"


def parse_location(target: str) -> tuple[str, int, int, int, int] | None:
    """``(journal name, segment, offset, length, data set offset)`` of a record's
    location, or None when it is not one."""
    name, sep, rest = target.partition("/")
    parts = rest.split(":")
    if not sep or not name or "." in name or len(parts) != 4:
        return None
    try:
        segment, offset, length, dataset_offset = (int(p) for p in parts)
    except ValueError:
        return None
    return name, segment, offset, length, dataset_offset


def segment_path(journals: Path, name: str, segment: int) -> Path:
    return journals / name / f"seg-{segment:03d}"


def read_record(journals: Path, where: str, key: str) -> bytes | None:
    """The whole original of ``key`` from the record at ``where`` (a location the index
    keeps) under ``journals``, if that record still holds it."""
    parsed = parse_location(where)
    if parsed is None:
        return None
    name, segment, offset, length, dataset_offset = parsed
    try:
        with segment_path(journals, name, segment).open("rb") as fp:
            # (a location naming more than the segment holds is not ours to allocate for)
            if offset + HEADER_BYTES + length > os.fstat(fp.fileno()).st_size:
                return None
            body = os.pread(fp.fileno(), length, offset + HEADER_BYTES)
    except OSError:
        return None
    if len(body) != length or not _intact(body, dataset_offset, key):
        return None
    return body


def _mark_clean(directory: Path) -> None:
    """Everything ``directory`` holds is written out and durable (a clean stop)."""
    (directory / "clean").touch()
    fsync_dir(directory)


def _read_id(directory: Path) -> str:
    """The id of the journal's last incarnation ("" for none, or the old format)."""
    try:
        raw = (directory / "id").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return raw if len(raw) == 32 and all(c in "0123456789abcdef" for c in raw) else ""


def _write_id(directory: Path, journal: str) -> None:
    tmp = directory / "id.new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, journal.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / "id")
    fsync_dir(directory)


class _Stopped(Exception):
    """The journal was closed while a segment was being made."""


class OriginalJournal:
    """One process's journal (module docstring)."""

    def __init__(
        self,
        root: Path,
        base: str,
        *,
        segment_bytes: int,
        segments: int,
        owner: JournalOwner | None = None,
        idle_s: float = 1.0,
    ) -> None:
        self.journals = root / ".journal"
        self.base = base
        self.name = ""  # ``<base>-<n>``: the first such journal no live process holds
        self.directory = self.journals
        self.segment_bytes = _aligned(segment_bytes)
        self.idle_s = idle_s
        #: The archive: writes out, replays, keeps the marks (set before :meth:`open`).
        self.owner = owner
        #: This incarnation's id (hex), new at each :meth:`open`; records' marks name it.
        self.id = ""
        self._seq = 0
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        #: Signalled when a segment's last record in flight is indexed, for a checkpoint
        #: waiting on it. Apart from ``_cond`` (same lock) so that the checkpoint thread
        #: is not woken by every instance: that cost a thread switch per instance.
        self._drained = threading.Condition(lock)
        self._fds: list[int | None] = [None] * segments
        self._direct = [False] * segments  # opened with O_DIRECT
        self._ready = [False] * segments
        self._fill = [0] * segments  # bytes written; 0 = free
        self._inflight = [0] * segments
        self._last_seq = [0] * segments  # of the segment's current round
        self._current: int | None = None
        self._last_append = 0.0
        self._closed = False
        self._lock_fd: int | None = None
        self._flushes = [SharedFlush(partial(self._fdatasync, i)) for i in range(segments)]
        self._threads: list[threading.Thread] = []

    # -- opening ------------------------------------------------------------------

    def open(self) -> int:
        """Take a journal (``<base>-0``, ``-1``, …: the first no live process holds),
        replay what it and the journals of stopped processes hold that the index lost,
        write out what it references (nothing after a clean stop), and make sure they
        are durable files before anything new is appended. How many records were read."""
        self.journals.mkdir(parents=True, exist_ok=True)
        for n in range(1024):
            directory = self.journals / f"{self.base}-{n}"
            directory.mkdir(exist_ok=True)
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock_fd, self.directory, self.name = fd, directory, directory.name
            break
        else:
            raise OSError("no original journal free")
        previous = _read_id(self.directory)
        count = self._recover(self.directory, previous)
        # A new incarnation: the segments' old rounds are not its records. Durably
        # before the old marks go, or a crash between would replay written-out records.
        self.id = uuid.uuid4().hex
        _write_id(self.directory, self.id)
        if previous:
            self._owned().forget(previous, None)
        for other in sorted(self.journals.iterdir()):
            if other != self.directory and other.is_dir():
                count += self._adopt(other)
        # Appends may now overwrite what was written out: the "clean" mark must be gone
        # first, durably, or a crash could leave new records behind a mark saying none.
        clean = self.directory / "clean"
        if clean.exists():
            clean.unlink()
            fsync_dir(self.directory)
        return count

    def _owned(self) -> JournalOwner:
        if self.owner is None:
            raise RuntimeError("original journal without an owner")
        return self.owner

    def _recover(self, directory: Path, journal: str) -> int:
        """Replay and write out the records of ``directory``'s last incarnation
        ``journal`` (locked by the caller) unless it was closed cleanly; they are
        durable when this returns."""
        if (directory / "clean").exists():
            return 0
        owner = self._owned()
        marked = owner.marked(journal) if journal else set()
        count = lost = 0
        # Round by round in sequence order (one segment's records in memory at a time):
        # a replay must see the instances in the order they arrived.
        for seg in sorted(directory.glob("seg-*[0-9]"), key=_first_seq):
            records = list(read_records(seg, journal=journal))
            # Stored, maybe answered, and its index commit lost with the power (or
            # never made): the index decides again, durably.
            replay = [r for r in records if r.seq and r.seq not in marked]
            if replay:
                owner.replay(replay)
            owner.write_out([r for r in records if not r.seq or r.seq in marked])
            count += len(records)
            lost += len(replay)
        if count:  # (no syncfs at every start for a journal that held nothing)
            syncfs(self.journals)
            logger.warning("wrote out %d journaled originals after a stop, %d of them "
                           "indexed again (their index commit was lost)", count, lost)
        return count

    def _adopt(self, directory: Path) -> int:
        if (directory / "clean").exists():
            return 0  # stopped cleanly (or just taken by a process that will remove it)
        if not any(directory.glob("seg-*")):
            # Nothing to recover; and not locked for nothing: a process starting at
            # this moment may have made the directory and not yet locked it.
            return 0
        try:
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live process's journal
            journal = _read_id(directory)
            count = self._recover(directory, journal)
            _mark_clean(directory)
            if journal:
                self._owned().forget(journal, None)
            for seg in directory.glob("seg-*"):  # its disk back, as at a clean stop
                seg.unlink(missing_ok=True)
            return count
        finally:
            os.close(fd)

    def prepare(self) -> None:
        """Make the segments (zero-filled, durable) and open them; blocking. The service
        runs it in a background thread: appends decline until a segment is ready."""
        for i in range(len(self._fds)):
            path = segment_path(self.journals, self.name, i)
            if self._closed:
                return
            if not (path.exists() and path.stat().st_size == self.segment_bytes):
                self._make(path)
            fd, direct = open_direct(path, os.O_RDWR | os.O_CLOEXEC)
            with self._cond:
                if self._closed:
                    os.close(fd)
                    return
                self._fds[i] = fd
                self._direct[i] = direct
                self._ready[i] = True

    def _make(self, path: Path) -> None:
        """Zero-fill a segment under a temporary name, then make it durable under its
        own. With direct I/O where the file system allows it: gigabytes of zeros would
        otherwise crowd the page cache and make the closing fsync long."""
        tmp = path.with_suffix(".new")
        fd, direct = open_direct(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
        zeros = mmap.mmap(-1, _ZERO_CHUNK)  # page-aligned, and zero
        try:
            for offset in range(0, self.segment_bytes, _ZERO_CHUNK):
                if self._closed:
                    raise _Stopped
                direct = write_all(fd, zeros, min(_ZERO_CHUNK, self.segment_bytes - offset),
                                   direct)
            os.fsync(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk, or stopping: give the space back
            raise
        finally:
            os.close(fd)
            zeros.close()
        os.replace(tmp, path)
        fsync_dir(self.directory)

    def start(self, *, prepare: bool = True) -> None:
        """Write out idle segments, and (``prepare``) make the segments, in background
        threads."""
        jobs = [(self._checkpoints, "journal-checkpoint")]
        if prepare:
            jobs.append((self._prepare_logged, "journal-prepare"))
        for target, name in jobs:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _prepare_logged(self) -> None:
        try:
            self.prepare()
        except _Stopped:
            pass
        except OSError:
            logger.warning("original journal unavailable: instances take the file path",
                           exc_info=True)

    # -- writing ------------------------------------------------------------------

    def append(
        self,
        key: str,
        body: bytes | memoryview,
        dataset_offset: int,
        meta: bytes = b"",
        *,
        aligned: memoryview | None = None,
    ) -> Ticket | None:
        """Write one record (not yet durable: :meth:`sync`); None when it cannot be
        taken now. Every ticket returned must be given back with :meth:`done`.
        ``meta`` (up to 4 KiB) is kept for a replay (:meth:`JournalOwner.replay`).
        ``aligned``: ``body`` zero-padded to whole pages in page-aligned memory, which
        direct I/O writes without a copy (a segment opened with ``O_DIRECT`` takes
        nothing else)."""
        if len(meta) > _MAX_META:
            return None
        need = HEADER_BYTES + _aligned(len(body))
        if need + _ALIGN > self.segment_bytes or not self.id:
            return None
        with self._cond:
            if self._closed:
                return None
            seg = self._current
            if seg is None or self._fill[seg] + need > self.segment_bytes:
                seg = self._take_segment()
                if seg is None:
                    self._cond.notify_all()  # none free: write out the full ones now
                    return None
            direct = self._direct[seg]
            if direct and (aligned is None or len(aligned) != need - HEADER_BYTES):
                return None
            offset = self._fill[seg]
            self._fill[seg] += need
            self._inflight[seg] += 1
            self._seq += 1
            self._last_seq[seg] = self._seq
            self._last_append = time.monotonic()
            fd = self._fds[seg]
            ticket = Ticket(seg, offset, len(body), dataset_offset, self._seq)
        assert fd is not None
        head = _encode_header(key, len(body), dataset_offset, ticket.seq, meta)
        parts: list[bytes | memoryview]
        if direct:
            # From the receiver's own buffer to the device: no page-cache copy, and
            # the fdatasync has no dirty pages to write, only the device to flush.
            assert aligned is not None
            parts = [_page(head), aligned]
        else:
            # Whole pages only: a page written in part would first be read from the
            # device (the segment's pages are not cached: it was zero-filled directly).
            parts = [head, body, _ZEROS[: need - HEADER_BYTES - len(body)]]
        try:
            written = os.pwritev(fd, parts, offset)
        except OSError:
            written = -1
        except BaseException:
            self.done(ticket)
            raise
        if written != need:
            # (an I/O error: the instance takes the file path, which reports its own)
            logger.error("write to original journal %s failed", self.name)
            self.done(ticket)
            return None
        return ticket

    def _take_segment(self) -> int | None:
        """Start a round in a free segment (under the lock): its header names this
        incarnation and the round's first sequence number, written before any of its
        records, so the first record's flush makes it durable."""
        seg = next((i for i, ready in enumerate(self._ready)
                    if ready and self._fill[i] == 0 and i != self._current), None)
        if seg is None:
            return None
        fd = self._fds[seg]
        assert fd is not None
        try:
            os.pwrite(fd, _page(_encode_segment(self.id, self._seq + 1)), 0)
        except OSError:
            logger.error("write to original journal %s failed", self.name)
            return None
        self._current = seg
        self._fill[seg] = _ALIGN
        return seg

    def _fdatasync(self, seg: int) -> None:
        fd = self._fds[seg]
        if fd is None:
            raise OSError("original journal closed")
        os.fdatasync(fd)

    def sync(self, ticket: Ticket) -> None:
        """Make the record durable (one ``fdatasync`` shared with the threads that
        need one of the same segment at the same moment)."""
        self._flushes[ticket.segment]()

    def done(self, ticket: Ticket) -> None:
        """The record is indexed (or given up)."""
        with self._cond:
            self._inflight[ticket.segment] -= 1
            if not self._inflight[ticket.segment]:
                self._drained.notify_all()

    # -- writing out --------------------------------------------------------------

    def _checkpoints(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                self._cond.wait(timeout=max(0.05, self.idle_s / 4))
                if self._closed:
                    return
                due = self._due()
            if due:
                try:
                    self.checkpoint(due)
                except Exception:  # (the index's errors too: this thread must go on)
                    logger.error("writing out the original journal failed; retrying",
                                 exc_info=True)
                    time.sleep(1.0)

    def _due(self) -> list[int]:
        """Segments to write out now (under the lock): all used ones once idle, the full
        ones when no segment is free."""
        used = [i for i, fill in enumerate(self._fill) if fill]
        if not used:
            return []
        if time.monotonic() - self._last_append >= self.idle_s:
            return used
        free = any(ready and not fill for ready, fill in zip(self._ready, self._fill, strict=True))
        if not free:
            return [i for i in used if i != self._current]
        return []

    def checkpoint(self, segments: list[int] | None = None) -> int:
        """Write out ``segments`` (default: every used one) and free them; how many
        records they held (the owner writes out those the index references)."""
        with self._cond:
            if segments is None:
                segments = [i for i, fill in enumerate(self._fill) if fill]
            for seg in segments:
                if seg == self._current:
                    self._current = None  # appends go on in another segment
            while any(self._inflight[seg] for seg in segments):
                self._drained.wait()
            ends = {seg: self._fill[seg] for seg in segments}
            upto = max((self._last_seq[seg] for seg in segments), default=0) + 1
        if not segments:
            return 0  # (no syncfs: a stop with nothing journaled stays instant)
        owner = self._owned()
        # Every index commit of these records durable first: once the segments are
        # erased, nothing could replay one a power cut had undone.
        owner.sync()
        count = 0
        for seg in segments:
            records = list(read_records(segment_path(self.journals, self.name, seg), ends[seg],
                                        journal=self.id))
            owner.write_out(records)
            count += len(records)
        syncfs(self.journals)
        # Then the rounds' headers erased, durably: their records are never read again
        # (after a crash, not replayed once their marks are gone).
        for seg in segments:
            fd = self._fds[seg]
            if fd is None:
                raise OSError("original journal closed")
            os.pwrite(fd, _page(_ZEROS), 0)
            os.fdatasync(fd)
        try:
            owner.forget(self.id, upto)
        except Exception:  # marks left behind are harmless: the next start drops them
            logger.warning("could not drop the original journal's marks", exc_info=True)
        with self._cond:
            for seg in segments:
                self._fill[seg] = 0
        return count

    def close(self) -> None:
        """Write out what the journal holds and stop: what a stopped service leaves is
        ordinary files. The segments are then removed (their disk is given back; the
        next start zero-fills new ones in the background, taking the file path until
        the first is ready)."""
        with self._cond:
            closing = not self._closed
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)
        clean = False
        if closing and self._lock_fd is not None:
            try:
                self.checkpoint()
                _mark_clean(self.directory)
                clean = True
            except Exception:  # (OSError, or the index unavailable)
                logger.error("could not write out the original journal at stop; the next "
                             "start will", exc_info=True)
        with self._cond:
            fds, self._fds = self._fds, [None] * len(self._fds)
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if clean:  # (marked clean first: a crash meanwhile leaves nothing to read)
            for i in range(len(fds)):
                with contextlib.suppress(OSError):
                    segment_path(self.journals, self.name, i).unlink()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
