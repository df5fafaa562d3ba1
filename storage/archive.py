"""The durable path every instance takes, from C-STORE and STOW-RS alike.

Blob first, index second, undo on failure (Orthanc ``ServerContext``): validate the
header, fsync the staged file, publish it under its content key, then index it with a
``pending`` processing job. Only when :meth:`Archive.accept` returns may the caller
acknowledge (C-STORE 0x0000, STOW 200). Refused files are moved to the quarantine
with a reason file for inspection.

The DICOM JSON kept for WADO-RS ``/metadata`` is computed by the instance job, off
the acknowledgement path (it costs as much as the rest of the header parsing).

Index writes are group-committed: one committer thread per process takes every
instance that arrived while the previous transaction was committing and writes them in
one transaction (one WAL fsync for many instances), then wakes their receivers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from core.errors import InvalidDatasetError, ServiceError
from core.instance import InstanceRecord, instance_record
from core.logging import correlation_id
from core.settings import Settings
from storage.abc import AddOutcome, MetadataIndex, NewInstance, OriginalStore
from storage.staging import StagedFile

__all__ = ["Accepted", "Archive", "check_pixel_data"]

logger = logging.getLogger(__name__)

_PIXEL_DATA = Tag(0x7FE00010)
_DEFLATED = "1.2.840.10008.1.2.1.99"
_NATIVE = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
}


@dataclass(frozen=True, slots=True)
class Accepted:
    record: InstanceRecord
    outcome: AddOutcome
    key: str


def check_pixel_data(ds: Dataset, transfer_syntax_uid: str, file_size: int) -> None:
    """Refuse native Pixel Data shorter than Rows × Columns × Frames × Samples × Bits.

    PS3.5 8.1.1: native pixel data has a defined length that must hold every pixel. A
    truncated object is not a valid instance of its SOP Class (PS3.4 B.2.3 0xC000).
    """
    # The raw element (not converted, value possibly deferred) has the encoded length.
    raw = ds._dict.get(_PIXEL_DATA)
    if raw is None:
        return
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if length is None or length == 0xFFFFFFFF:
        return
    if transfer_syntax_uid == _DEFLATED:
        return  # offsets are in the inflated stream; pydicom already read it whole
    if tell is not None and tell + length > file_size:
        raise InvalidDatasetError("Pixel Data truncated: file ends inside the element")
    if transfer_syntax_uid not in _NATIVE:
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidDatasetError("Image Pixel attributes missing or invalid") from exc
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        spp = 2  # PS3.3 C.7.6.3.1.2: CB and CR are horizontally subsampled by 2
    expected_bits = rows * cols * spp * frames * bits
    expected = (expected_bits + 7) // 8
    if length < expected:
        raise InvalidDatasetError(f"Pixel Data truncated: {length} of {expected} bytes")


class _Committer(threading.Thread):
    """Group commit of index rows: many instances, one transaction."""

    def __init__(self, index: MetadataIndex, max_batch: int) -> None:
        super().__init__(name="pacslab-index-committer", daemon=True)
        self.index = index
        self.max_batch = max_batch
        self.queue: queue.Queue[tuple[NewInstance, Future[AddOutcome]] | None] = queue.Queue()

    def run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                outcomes = self.index.add_instances([item for item, _ in batch])
            except BaseException as exc:  # every waiter must hear about it
                for _, fut in batch:
                    fut.set_exception(exc)
            else:
                for (_, fut), outcome in zip(batch, outcomes, strict=True):
                    fut.set_result(outcome)
            if stop:
                return

    def submit(self, item: NewInstance) -> AddOutcome:
        fut: Future[AddOutcome] = Future()
        self.queue.put((item, fut))
        return fut.result()


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
    ) -> None:
        self.originals = originals
        self.index = index
        self.quarantine = quarantine
        self.fsync = fsync
        self._committer = _Committer(index, max_batch)
        self._committer.start()

    @classmethod
    def from_settings(
        cls, settings: Settings, index: MetadataIndex, *, staging_name: str = ""
    ) -> Archive:
        """The archive of ``settings``' stores over ``index`` (C-STORE and STOW alike)."""
        from storage.originals import open_originals

        assert settings.storage.quarantine_dir is not None
        return cls(
            open_originals(settings, staging_name=staging_name),
            index,
            quarantine=settings.storage.quarantine_dir,
            fsync=settings.storage.fsync,
        )

    def staging_dir(self) -> Path:
        return self.originals.staging_dir()

    def accept(
        self, staged: StagedFile, *, calling_ae: str = "", check_request_uids: bool = True
    ) -> Accepted:
        """Make a staged file durable and indexed, or quarantine it and raise.

        Raises
        ------
        ServiceError
            With the DIMSE/HTTP mapping of the failure; the file is then in the
            quarantine (or removed, for resource failures).
        """
        try:
            record = self._read(staged, check_request_uids)
            if self.fsync:
                fd = os.open(staged.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except ServiceError as exc:
            self._quarantine(staged, exc, calling_ae)
            raise
        except OSError:
            staged.discard()
            raise
        created = self.originals.commit(staged.path, staged.key)
        item = NewInstance(
            record=record,
            blob_key=staged.key,
            size=staged.size,
            calling_ae=calling_ae,
            received_at=datetime.now(UTC),
            correlation_id=correlation_id.get(),
        )
        try:
            outcome = self._committer.submit(item)
        except Exception:
            if created:
                self._undo_blob(staged.key)
            raise
        if outcome.status == "replaced":
            logger.warning(
                "SOP Instance %s re-sent with other content: version %d is current, "
                "earlier versions kept",
                record.sop_instance_uid,
                outcome.version,
            )
        return Accepted(record, outcome, staged.key)

    def _read(self, staged: StagedFile, check_request_uids: bool) -> InstanceRecord:
        try:
            with staged.path.open("rb") as fp:
                ds = dcmread(fp, defer_size=1024)
                rec = instance_record(
                    ds,
                    transfer_syntax_uid=staged.transfer_syntax_uid,
                    expected_sop_class_uid=staged.sop_class_uid if check_request_uids else None,
                    expected_sop_instance_uid=staged.sop_instance_uid
                    if check_request_uids
                    else None,
                )
                check_pixel_data(ds, staged.transfer_syntax_uid, staged.size)
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
            os.replace(staged.path, target)
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
        self._committer.queue.put(None)
        self._committer.join(timeout=10)
