"""The durable path every instance takes, from C-STORE and STOW-RS alike.

Blob first, index second, undo on failure (Orthanc ``ServerContext``): validate the
header, fsync the staged file, publish it under its content key, then index it with a
``pending`` processing job. Only when :meth:`Archive.accept` returns may the caller
acknowledge (C-STORE 0x0000, STOW 200). Refused files are moved to the quarantine
with a reason file for inspection.

The DICOM JSON kept for WADO-RS ``/metadata`` is computed by the instance job, off
the acknowledgement path (it costs as much as the rest of the header parsing).

Index writes are group-committed (:class:`_GroupCommit`): the receiving thread that
finds no commit running writes every instance queued meanwhile in one transaction.
The flushes are taken off that serial path (issue 19): each thread makes its new
directory entries durable before it queues, and a leader flushes the WAL after handing
leadership on; both flushes are shared by the threads that need one at the same moment
(:class:`storage._flush.SharedFlush`). Per instance the order stays: staged file
fsynced → published → directories fsynced → row committed → WAL flushed → answered.

Where the process has an original journal (storage/journal.py: receivers and the API,
``storage.journal_mb``), an instance received in memory takes one data flush instead of
the first three steps, and the WAL flush: record appended → ``fdatasync``'ed → row
committed with the record's mark and location → answered; its file is written out when
the receiver is idle (storage/journal.py). An instance the journal cannot take now (too
large, no free segment) takes the file path above.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    UncompressedTransferSyntaxes,
)

from core.errors import (
    InvalidDatasetError,
    OutOfResourcesError,
    RejectedInstanceError,
    ServiceError,
)
from core.header import IMPLICIT_VR_LE, DatasetStructureError, check_structure, scan_header
from core.instance import (
    INT_KEYWORDS,
    TEXT_KEYWORDS,
    DatasetValues,
    HeaderSource,
    InstanceRecord,
    record_from,
)
from core.logging import correlation_id
from core.settings import Settings
from storage.abc import AddOutcome, MetadataIndex, NewInstance, OriginalStore
from storage.journal import JournalRecord, OriginalJournal, Ticket, location
from storage.originals import FileOriginalStore
from storage.staging import StagedFile, StagedWriter, stage_part10

__all__ = ["AcceptHook", "Accepted", "Archive", "check_pixel_data", "make_journal"]

logger = logging.getLogger(__name__)

_PIXEL_DATA = Tag(0x7FE00010)
_DEFLATED = DeflatedExplicitVRLittleEndian
_EXPLICIT_LE = ExplicitVRLittleEndian
_BIG_ENDIAN = ExplicitVRBigEndian
_LONG_HEADER_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"UN"})
_CHUNK = 1 << 20


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DatasetReader:
    """``read(offset, n)`` over a staged data set: from memory when the file or the head
    kept there holds the bytes, else ``pread`` from the file (opened only if needed)."""

    def __init__(self, staged: StagedFile) -> None:
        self._head = staged.head
        self._body = staged.body
        self._path = staged.path
        self._base = staged.dataset_offset
        self._fd: int | None = None

    def __enter__(self) -> Callable[[int, int], bytes]:
        return self.read

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, offset: int, n: int) -> bytes:
        if self._body is not None:
            start = self._base + offset
            return bytes(self._body[start : start + n])
        if offset + n <= len(self._head):
            return self._head[offset : offset + n]
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY)
        return os.pread(self._fd, n, self._base + offset)


def make_journal(originals: FileOriginalStore, base: str, total_bytes: int) -> OriginalJournal:
    """An original journal (storage/journal.py) for this process under ``originals``,
    not opened yet (:meth:`Archive.open_journal`): eight segments of ``total_bytes / 8``."""
    segments = 8
    return OriginalJournal(
        originals.root, base, segment_bytes=max(1 << 20, total_bytes // segments),
        segments=segments,
    )


def _arrival(calling_ae: str, received: datetime) -> bytes:
    """What a journal record keeps of an instance's arrival, for a replay."""
    return json.dumps(
        {"ae": calling_ae[:64], "at": received.isoformat(), "cid": correlation_id.get()[:128]},
        separators=(",", ":"),
    ).encode()


#: Uncompressed encodings (PS3.5 A.1-A.3, A.5): pydicom's list.
_NATIVE = frozenset(UncompressedTransferSyntaxes)


class AcceptHook(Protocol):
    """Something the service layer does with some instances as they are accepted (an
    IHE IOCM rejection note, services/rejection.py), registered by the composition root.

    ``before_index`` sees the validated header and the staged file before anything is
    published: raising :class:`ServiceError` refuses the instance (it is quarantined);
    a returned callable runs once the instance is indexed, before the sender hears
    "stored" (its ServiceError fails the store, and a re-send runs it again).
    """

    #: The SOP Classes it acts on (``before_index`` is called for these only); ``None``
    #: (or no such attribute) for every instance.
    sop_classes: frozenset[str] | None

    def before_index(
        self, record: InstanceRecord, path: Path, calling_ae: str
    ) -> Callable[[], None] | None: ...


@dataclass(frozen=True, slots=True)
class Accepted:
    record: InstanceRecord
    outcome: AddOutcome
    key: str


def check_pixel_data(
    src: HeaderSource,
    length: int | None,
    value_tell: int | None,
    transfer_syntax_uid: str,
    file_size: int,
) -> None:
    """Refuse native Pixel Data shorter than Rows × Columns × Frames × Samples × Bits.

    PS3.5 8.1.1: native pixel data has a defined length that must hold every pixel. A
    truncated object is not a valid instance of its SOP Class (PS3.4 B.2.3 0xC000).
    ``length`` and ``value_tell`` are the encoded length of (7FE0,0010) and the file
    offset of its value (``None``: no Pixel Data).
    """
    if length is None or length == 0xFFFFFFFF:
        return
    if transfer_syntax_uid == _DEFLATED:
        return  # offsets are in the inflated stream; pydicom already read it whole
    if value_tell is not None and value_tell + length > file_size:
        raise InvalidDatasetError("Pixel Data truncated: file ends inside the element")
    if transfer_syntax_uid not in _NATIVE:
        return
    rows, cols = src.get_int("Rows"), src.get_int("Columns")
    bits = src.get_int("BitsAllocated")
    if rows is None or cols is None or bits is None:
        raise InvalidDatasetError("Image Pixel attributes missing or invalid")
    spp = src.get_int("SamplesPerPixel") or 1
    frames = src.get_int("NumberOfFrames") or 1
    if src.get_text("PhotometricInterpretation") == "YBR_FULL_422":
        spp = 2  # PS3.3 C.7.6.3.1.2: CB and CR are horizontally subsampled by 2
    expected_bits = rows * cols * spp * frames * bits
    expected = (expected_bits + 7) // 8
    if length < expected:
        raise InvalidDatasetError(f"Pixel Data truncated: {length} of {expected} bytes")


@dataclass(slots=True)
class _Waiter:
    item: NewInstance
    event: threading.Event
    lead: bool = False
    outcome: AddOutcome | None = None
    error: BaseException | None = None


class _GroupCommit:
    """Group commit of index rows by leader and followers: many instances, one
    transaction, one WAL flush, and no extra thread.

    The first receiver to arrive while no commit runs becomes the leader: it writes
    every instance queued so far in one transaction, hands leadership to the oldest
    instance queued meanwhile (whose transaction then runs while this one's is being
    flushed), makes its own commit durable (``index.sync_instances``, one flush shared
    with a leader flushing at the same moment) and only then wakes its followers with
    their outcomes. A committer thread did the same with two thread hand-offs per
    instance, which cost more GIL switching than the transaction itself when one or two
    associations were active. The originals' directories are made durable by each
    instance's own thread before it queues (:meth:`Archive.accept`), so neither that
    flush nor the WAL's holds up the next transaction.

    Across receiver processes there is no group commit: each commits its own rows.
    One writer process for all of them was built and measured (issue 19): it cut the
    index's CPU per instance by a third in a synthetic run (0.40-0.45 ms against
    0.60-0.67 ms with four receivers, whose page caches each commit of another process
    empties), but ``pacslab serve`` with four ``storescu`` associations on two cores
    took 308-394 instances/s against 387-495 without it (three interleaved pairs): two
    more process hand-offs per instance on a busy machine cost more than they saved.
    """

    def __init__(self, index: MetadataIndex, max_batch: int) -> None:
        self.index = index
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._busy = False  # a leader is committing; False only when the queue is empty

    def submit(self, item: NewInstance) -> AddOutcome:
        me = _Waiter(item, threading.Event())
        with self._lock:
            self._queue.append(me)
            if not self._busy:
                self._busy = me.lead = True
        if not me.lead:
            me.event.wait()
        if me.lead:
            self._lead()
        if me.error is not None:
            raise me.error
        assert me.outcome is not None
        return me.outcome

    def _lead(self) -> None:
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        committed = False
        try:
            outcomes = self.index.add_instances([w.item for w in batch], sync=False)
            committed = True
        except BaseException as exc:  # every waiter must hear about it
            for w in batch:
                w.error = exc
        else:
            for w, outcome in zip(batch, outcomes, strict=True):
                w.outcome = outcome
        with self._lock:
            successor = self._queue[0] if self._queue else None
            if successor is not None:
                successor.lead = True
            else:
                self._busy = False
        if successor is not None:
            successor.event.set()
        # Journaled instances only: their marks make the commit recoverable from the
        # journal, whose records are durable already (storage/journal.py).
        if committed and not all(w.item.journal_mark for w in batch):
            try:
                self.index.sync_instances()
            except BaseException as exc:  # committed, not known durable: not "stored"
                for w in batch:
                    w.error, w.outcome = exc, None
        for w in batch:
            w.lead = False
            w.event.set()


class Archive:
    """Validate, store and index received instances; quarantine the refused ones."""

    def __init__(
        self,
        originals: OriginalStore,
        index: MetadataIndex,
        *,
        quarantine: Path,
        fsync: bool = True,
        max_batch: int = 64,
        max_inflated_bytes: int = 4 << 30,
        max_inflate_ratio: int = 200,
        journal: OriginalJournal | None = None,
    ) -> None:
        #: Where instances received in memory are made durable first (storage/journal.py);
        #: taken and recovered by :meth:`open_journal`, once the hooks are registered.
        self.journal = journal
        if journal is not None:
            journal.owner = self
        if isinstance(originals, FileOriginalStore) and originals.index is None:
            originals.index = index  # (it reads journaled originals: storage/originals.py)
        self.max_inflated_bytes = max_inflated_bytes
        self.max_inflate_ratio = max_inflate_ratio
        self.originals = originals
        self.index = index
        self.quarantine = quarantine
        self.fsync = fsync
        self._group = _GroupCommit(index, max_batch)
        #: Registered by the composition root (pacslab/wiring.py, api/app.py).
        self.hooks: list[AcceptHook] = []

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        index: MetadataIndex,
        *,
        staging_name: str = "",
        journal: bool = False,
    ) -> Archive:
        """The archive of ``settings``' stores over ``index`` (C-STORE and STOW alike)."""
        from storage.originals import open_originals

        assert settings.storage.quarantine_dir is not None
        originals = open_originals(settings, staging_name=staging_name, index=index)
        original_journal = None
        if (
            journal
            and settings.storage.fsync
            and settings.storage.journal_mb > 0
            and isinstance(originals, FileOriginalStore)
        ):
            original_journal = make_journal(
                originals, staging_name or "local", settings.storage.journal_mb << 20
            )
        return cls(
            originals,
            index,
            quarantine=settings.storage.quarantine_dir,
            fsync=settings.storage.fsync,
            max_inflated_bytes=settings.dicom.max_inflated_bytes,
            max_inflate_ratio=settings.dicom.max_inflate_ratio,
            journal=original_journal,
        )

    def open_journal(self, *, background: bool = True) -> None:
        """Take this process's original journal: what it and the journals of stopped
        processes hold is replayed or written out (storage/journal.py), then its
        segments are prepared in the background (or before this returns). Called by the
        composition root once the hooks are registered: a replay runs them."""
        if self.journal is None:
            return
        self.journal.open()
        if not background:
            self.journal.prepare()
        self.journal.start(prepare=background)

    # -- the journal's owner (storage.journal.JournalOwner) ---------------------------

    def write_out(self, records: list[JournalRecord]) -> None:
        originals = self.originals
        assert isinstance(originals, FileOriginalStore)
        for record in records:
            # Only what the index references: never acknowledged (or deleted since)
            # is not an original.
            if self.index.blob_referenced(record.key):
                originals.write_final(record.key, record.body)

    def replay(self, records: list[JournalRecord]) -> None:
        """Accept ``records`` again, as they arrived (their calling AE title, time and
        correlation id), through the file path: the journal is not taking records yet.
        A refusal is what it would have been on arrival (logged, quarantined)."""
        for record in records:
            meta = record.meta
            try:
                received = datetime.fromisoformat(meta.get("at", ""))
            except ValueError:
                received = datetime.now(UTC)
            token = correlation_id.set(meta.get("cid", "-"))
            try:
                staged = stage_part10(self.staging_dir(), io.BytesIO(record.body),
                                      fsync=False, in_memory=True)
                self.accept(staged, calling_ae=meta.get("ae", ""), check_request_uids=False,
                            received_at=received)
            except ServiceError as exc:
                logger.warning("journaled original %s refused on replay: %s",
                               record.key[:12], exc)
            finally:
                correlation_id.reset(token)

    def marked(self, journal: str) -> set[int]:
        return self.index.journal_marks(journal)

    def forget(self, journal: str, upto: int | None) -> None:
        self.index.forget_journal_marks(journal, upto)

    def sync(self) -> None:
        self.index.sync_instances()

    @property
    def in_memory_staging(self) -> bool:
        """Whether receivers should keep instances in memory (:class:`StagedWriter`
        ``in_memory``): they are journaled, not staged as files."""
        return self.journal is not None

    def staging_dir(self) -> Path:
        return self.originals.staging_dir()

    def accept(
        self,
        staged: StagedFile,
        *,
        calling_ae: str = "",
        check_request_uids: bool = True,
        received_at: datetime | None = None,
    ) -> Accepted:
        """Make a staged file durable and indexed, or quarantine it and raise. An
        in-memory staged file's buffer is released when this returns.

        Raises
        ------
        ServiceError
            With the DIMSE/HTTP mapping of the failure; the file is then in the
            quarantine (or removed, for resource failures).
        """
        try:
            return self._accept(staged, calling_ae, check_request_uids, received_at)
        finally:
            staged.release()

    def _accept(
        self,
        staged: StagedFile,
        calling_ae: str,
        check_request_uids: bool,
        received_at: datetime | None,
    ) -> Accepted:
        after: list[Callable[[], None]] = []
        ticket: Ticket | None = None
        received = received_at or datetime.now(UTC)
        try:
            record = self._read(staged, check_request_uids)
            for hook in self.hooks:
                classes = getattr(hook, "sop_classes", None)
                if classes is not None and record.sop_class_uid not in classes:
                    continue  # (so an instance kept in memory is not written out for it)
                then = hook.before_index(record, staged.ensure_file(), calling_ae)
                if then is not None:
                    after.append(then)
            if self.journal is not None and staged.body is not None:
                ticket = self.journal.append(
                    staged.key, staged.body, staged.dataset_offset,
                    _arrival(calling_ae, received), aligned=staged.aligned_body(),
                )
            if ticket is None:
                staged.ensure_file()
                if self.fsync:
                    _fsync_file(staged.path)
        except ServiceError as exc:
            self._quarantine(staged, exc, calling_ae)
            raise
        except OSError:
            staged.discard()
            raise
        if ticket is not None:
            created = self._journaled(staged, ticket)
        else:
            created = self.originals.commit(staged.path, staged.key, defer_sync=True)
        item = NewInstance(
            record=record,
            blob_key=staged.key,
            size=staged.size,
            calling_ae=calling_ae,
            received_at=received,
            correlation_id=correlation_id.get(),
            # A journaled instance's commit needs no flush of its own (storage/journal.py).
            journal_mark=(
                (self.journal.id, ticket.seq, location(self.journal.name, ticket))
                if ticket is not None and self.journal is not None else None
            ),
        )
        try:
            try:
                # The new directory entries durable before the index row: in this thread,
                # one round of fsyncs shared with the threads publishing at the same moment.
                if ticket is None:
                    self.originals.sync()
                outcome = self._group.submit(item)
            except Exception:
                if created:
                    self._undo_blob(staged.key)
                raise
            if outcome.status == "refused":
                # IHE IOCM: rejected before, sent again (the index decided, in the insert's
                # transaction). Not quarantined: the sender is told, nothing is kept.
                if created:
                    self._undo_blob(staged.key)
                raise RejectedInstanceError(f"rejected before (code {outcome.reason})")
        finally:
            # Given back once the index has decided: the journal writes out only what
            # the index references, so it must not look at this record before then.
            if ticket is not None and self.journal is not None:
                self.journal.done(ticket)
        for then in after:
            then()
        if outcome.status == "replaced":
            logger.warning(
                "SOP Instance %s re-sent with other content: version %d is current, "
                "earlier versions kept",
                record.sop_instance_uid,
                outcome.version,
            )
        return Accepted(record, outcome, staged.key)

    def _journaled(self, staged: StagedFile, ticket: Ticket) -> bool:
        """Make a journaled instance durable (its record's ``fdatasync``) before the
        index row names it; always False: nothing to undo if the index refuses it (a
        record no instance references is neither served nor written out)."""
        journal = self.journal
        assert journal is not None
        try:
            journal.sync(ticket)
        except OSError as exc:
            journal.done(ticket)
            staged.discard()
            raise OutOfResourcesError("cannot make the original durable") from exc
        staged.discard()  # a file a hook asked for (ensure_file), if any
        return False

    def _read(self, staged: StagedFile, check_request_uids: bool) -> InstanceRecord:
        def record(src: HeaderSource) -> InstanceRecord:
            return record_from(
                src,
                transfer_syntax_uid=staged.transfer_syntax_uid,
                expected_sop_class_uid=staged.sop_class_uid if check_request_uids else None,
                expected_sop_instance_uid=staged.sop_instance_uid if check_request_uids else None,
            )

        if staged.transfer_syntax_uid == _DEFLATED:
            inflated = self._inflate(staged)
            try:
                return self._read_encoded(inflated, record, _EXPLICIT_LE)
            finally:
                inflated.discard()
        return self._read_encoded(staged, record, staged.transfer_syntax_uid)

    def _read_encoded(
        self,
        staged: StagedFile,
        record: Callable[[HeaderSource], InstanceRecord],
        transfer_syntax_uid: str,
    ) -> InstanceRecord:
        """Check the structure, read the header, check Pixel Data: refuse, never cut.

        ``transfer_syntax_uid`` is how ``staged``'s bytes are encoded (Explicit VR
        Little Endian for an inflated Deflated data set).
        """
        implicit = transfer_syntax_uid == IMPLICIT_VR_LE
        little = transfer_syntax_uid != _BIG_ENDIAN
        data_end = staged.size - staged.dataset_offset
        # The header as received, in memory (most instances); pydicom when unsure.
        with _DatasetReader(staged) as read:
            try:
                values = (
                    scan_header(
                        staged.head,
                        transfer_syntax_uid,
                        text_keywords=TEXT_KEYWORDS,
                        int_keywords=INT_KEYWORDS,
                        complete=staged.head_complete,
                        tail=staged.tail,
                        check_sequences=True,
                    )
                    if staged.head
                    else None
                )
                if values is None:
                    check_structure(read, 0, data_end, implicit=implicit, little=little)
                elif values.pixel_data is not None:
                    # The walk checked every element before Pixel Data; the rest (the
                    # pixel value, its fragments, anything after it) is checked here
                    # from the element's header on: a few header reads, no values.
                    element = values.pixel_data
                    header = 12 if element.vr in _LONG_HEADER_VRS else 8
                    check_structure(
                        read, element.value_offset - header, data_end, implicit=implicit
                    )
            except DatasetStructureError as exc:
                raise InvalidDatasetError(str(exc)) from exc
            except OSError as exc:
                raise InvalidDatasetError("data set unreadable") from exc
        if values is not None:
            rec = record(values)
            pixel = values.pixel_data
            check_pixel_data(
                values,
                pixel.length if pixel else None,
                staged.dataset_offset + pixel.value_offset if pixel else None,
                transfer_syntax_uid,
                staged.size,
            )
            return rec
        try:
            with staged.open() as fp:
                ds = dcmread(fp, defer_size=1024)
                src = DatasetValues(ds)
                rec = record(src)
                # The raw element (not converted, value deferred) has the encoded length.
                raw = ds._dict.get(_PIXEL_DATA)
                check_pixel_data(
                    src,
                    getattr(raw, "length", None),
                    getattr(raw, "value_tell", None),
                    transfer_syntax_uid,
                    staged.size,
                )
        except ServiceError:
            raise
        except (
            InvalidDicomError,
            EOFError,
            ValueError,
            KeyError,
            TypeError,
            OverflowError,
            NotImplementedError,
            AttributeError,
            IndexError,
        ) as exc:
            raise InvalidDatasetError(f"cannot parse data set: {type(exc).__name__}") from exc
        return rec

    def _inflate(self, staged: StagedFile) -> StagedFile:
        """Inflate a Deflated Explicit VR Little Endian data set (PS3.5 A.5) to a
        staging file of its own, incrementally and within the configured bounds.

        pydicom inflates the whole data set in memory; a few MB that inflate to GBs
        (a deflate bomb) must be refused after reading at most the bound, with memory
        bounded by one chunk.

        Raises
        ------
        InvalidDatasetError
            Not a valid raw deflate stream, or larger than the bounds.
        """
        compressed = staged.size - staged.dataset_offset
        cap = min(self.max_inflated_bytes, self.max_inflate_ratio * compressed + (1 << 20))
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        writer = StagedWriter(
            staged.path.parent, staged.sop_class_uid, staged.sop_instance_uid, _EXPLICIT_LE
        )
        total = 0
        try:
            with staged.open() as fp:
                fp.seek(staged.dataset_offset)
                pending = b""
                while True:
                    if not pending:
                        pending = fp.read(_CHUNK)
                        if not pending:
                            break
                    # max_length: never more than one chunk of output per call.
                    out = inflater.decompress(pending, _CHUNK)
                    pending = inflater.unconsumed_tail
                    total += len(out)
                    if total > cap:
                        raise InvalidDatasetError("Deflated data set inflates past the limit")
                    writer.write(out)
                    if inflater.eof:
                        break
                out = inflater.flush()
                total += len(out)
                if total > cap:
                    raise InvalidDatasetError("Deflated data set inflates past the limit")
                writer.write(out)
            if not inflater.eof:
                raise InvalidDatasetError("Deflated data set truncated")
        except zlib.error as exc:
            writer.abort()
            raise InvalidDatasetError("Deflated data set is not a deflate stream") from exc
        except BaseException:
            writer.abort()
            raise
        return writer.finish(fsync=False)

    def _undo_blob(self, key: str) -> None:
        # Delete only a blob no index row uses: a concurrent receiver may have indexed the
        # same content meanwhile. If the index cannot say, keep the file (an orphan is
        # harmless; a missing acknowledged original is not).
        try:
            referenced = self.index.blob_referenced(key)
        except Exception:
            return
        if not referenced:
            with contextlib.suppress(OSError):
                self.originals.delete(key)

    def _quarantine(self, staged: StagedFile, exc: ServiceError, calling_ae: str) -> None:
        """Keep a refused file for inspection, with why (no patient data in the reason)."""
        try:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            stem = f"{time.strftime('%Y%m%dT%H%M%S')}_{uuid.uuid4().hex[:8]}"
            target = self.quarantine / f"{stem}.dcm"
            os.replace(staged.ensure_file(), target)
            reason = {
                "status": f"0x{exc.dimse_status:04X}",
                "title": exc.title,
                "detail": str(exc),
                "calling_ae": calling_ae,
                "sop_class_uid": staged.sop_class_uid,
                "sop_instance_uid": staged.sop_instance_uid,
                "transfer_syntax_uid": staged.transfer_syntax_uid,
                "received_at": datetime.now(UTC).isoformat(),
                "correlation_id": correlation_id.get(),
            }
            (self.quarantine / f"{stem}.reason.json").write_text(json.dumps(reason, indent=2))
        except OSError:
            logger.error("could not quarantine a refused file", exc_info=True)
            staged.discard()

    def close(self) -> None:
        """Stop the original journal (commits run in the receiving threads)."""
        if self.journal is not None:
            self.journal.close()
