"""Export a study or a series as a ZIP file-set with a DICOMDIR (PS3.10, PS3.11).

The ZIP holds ``DICOMDIR`` at its root and each instance as a PS3.10 file under a
STD-GEN-CD File ID (PS3.11 D.3.2: ``DICOM/PT000000/ST000000/SE000000/IM000000``,
components of at most 8 characters from ``A-Z 0-9 _``), so unpacking it onto a
disc or a USB stick gives a General Purpose file-set any DICOM viewer opens.
Originals are copied bit for bit (in the transfer syntax they were received in;
STD-GEN-CD proper names Explicit VR Little Endian, which is what modalities send us
almost always); with ``deidentify`` each instance is de-identified per PS3.15 E.1
(:mod:`services.deidentify`) and re-encoded.

Streaming, in two passes: :meth:`ExportService.plan` reads the index and every
instance's header (never pixel data) and builds the DICOMDIR, which references
File IDs only, so it is complete before any file is sent; :meth:`ExportService.stream`
then yields the ZIP (DICOMDIR first, then the files, one chunk at a time) through
``zipstream-ng``. Nothing is held but one instance at a time (one 1 MiB chunk for
originals). Why ``zipstream-ng``: it writes ZIP64 as soon as an archive needs it,
stores entries (DICOM pixel data hardly deflates, and deflating would cost the CPU
the transfer needs) and, when every entry's size is known in advance (originals),
computes the archive's exact size before the first byte, so HTTP can send a
``Content-Length`` and a browser shows real download progress. ``stream-zip`` cannot
tell the size, and for stored entries it buffers each file to learn its CRC; the
standard library's ``zipfile`` would need a hand-made writer and size arithmetic.

Every instance is read through :meth:`ExportService.open_original`, the one place
where a read of an original (``OriginalStore.open``, as WADO-RS metadata and
C-GET/C-MOVE read them) is coerced to the patient as the index holds it now (IHE PIR,
issue 17: after an update or a merge, an exported study carries the current
demographics, as WADO-RS and C-MOVE send them; :func:`services.patients.coerced_part10`,
the replaced values in the Original Attributes Sequence, PS3.3 C.12.1.1.9.1). The
stored originals stay bit-exact; the DICOMDIR's records carry the current values too,
and the action-log entry counts the coerced instances. A de-identified export is not
coerced: the profile replaces the Patient module anyway.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite

from core.audit import AuditEntry, patient_key
from core.coercion import PatientAttributes, coerce_patient_module, patient_differences
from core.errors import InvalidDatasetError, InvalidQueryError, NotFoundError
from core.logging import correlation_id
from services.deidentify import Deidentifier
from services.dicomdir import FileSetMember, build_dicomdir, slim
from services.patients import coerced_part10, current_patient_attributes

if TYPE_CHECKING:
    from storage.abc import OriginalStore
    from storage.audit import AuditLog
    from storage.index.sql import MetadataRow, SqlIndex

__all__ = [
    "ExportPlan",
    "ExportProgress",
    "ExportRequest",
    "ExportService",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_HEADER_BYTES = 1 << 16
#: (7FE0,0010) Pixel Data, as its tag is written in a Little Endian data set.
_PIXEL_DATA_LE = b"\xe0\x7f\x10\x00"

State = Literal["planning", "streaming", "done", "failed"]


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """What to export: a study, or one series of it, optionally de-identified."""

    study_instance_uid: str
    series_instance_uid: str | None = None
    deidentify: bool = False


@dataclass(slots=True)
class ExportProgress:
    """How far one export is; read by another thread while the export runs.

    ``bytes_total`` is the ZIP's size when known before streaming (originals),
    ``None`` otherwise (de-identified instances are re-encoded on the way).
    """

    export_id: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    state: State = "planning"
    instances_total: int = 0
    instances_done: int = 0
    bytes_total: int | None = None
    bytes_done: int = 0
    started: float = field(default_factory=time.time)
    error: str = ""

    def public(self) -> dict[str, object]:
        """The progress as JSON-able values (no UIDs, no PHI)."""
        return {
            "id": self.export_id,
            "state": self.state,
            "instances_total": self.instances_total,
            "instances_done": self.instances_done,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class _Entry:
    row: MetadataRow
    file_id: tuple[str, ...]
    size: int | None  # of the original; None when unknown, re-encoded or coerced
    coerce: bool = False  # its Patient module is not the current one (issue 17)


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """Everything decided before the first byte: the DICOMDIR and where each file goes."""

    request: ExportRequest
    entries: tuple[_Entry, ...]
    dicomdir: bytes
    deidentifier: Deidentifier | None
    patient_id: str  # for the action log's keyed patient reference (the current one)
    #: The study's patient as the index holds it now (None: de-identified, or unknown).
    current: PatientAttributes | None = None
    patient_issuer: str = ""

    @property
    def coerced(self) -> int:
        """How many instances go out with the current Patient module, not the stored."""
        return sum(1 for e in self.entries if e.coerce)

    @property
    def arcnames(self) -> list[str]:
        return ["DICOMDIR", *("/".join(e.file_id) for e in self.entries)]


def _component(prefix: str, n: int) -> str:
    """A File ID component: 2 letters and 6 digits (PS3.10 8.2: 1-8 of A-Z, 0-9, _)."""
    if n >= 1_000_000:
        raise InvalidDatasetError("more than 999999 entries on one level of a file-set")
    return f"{prefix}{n:06d}"


def _instance_number(header: Dataset) -> int:
    try:
        return int(header.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        return 0


class ExportService:
    """Plan and stream study/series exports (the use case; no HTTP, no files of ours).

    Parameters
    ----------
    index
        Where the study's current instances are listed.
    originals
        The stored Part-10 files.
    max_instances
        Larger studies are refused (export them by series): the plan holds one small
        header per instance (``qr.max_retrieve_instances``, as a C-MOVE's cap).
    audit, patient_secret
        The action log: one entry per export (who, which study, how many instances,
        de-identified or not; the patient only as a keyed reference).
    """

    def __init__(
        self,
        index: SqlIndex,
        originals: OriginalStore,
        *,
        audit: AuditLog | None = None,
        patient_secret: bytes = b"",
        max_instances: int = 65_535,
    ) -> None:
        self.max_instances = max_instances
        self.index = index
        self.originals = originals
        self.audit = audit
        self.patient_secret = patient_secret

    def open_original(
        self, row: MetadataRow, current: PatientAttributes | None = None
    ) -> BinaryIO:
        """The stored original of ``row``, as WADO-RS and C-GET/C-MOVE send it: with
        ``current`` (the study's patient now, :func:`current_patient_attributes`), its
        Patient module coerced to those values (:func:`coerced_part10`); the original
        itself when it carries them already, or without ``current``."""
        if current is None:
            return self.originals.open(row.blob_key)
        if self.originals.has_local_paths:
            source: Path | bytes = self.originals.path(row.blob_key)
        else:
            with self.originals.open(row.blob_key) as fp:
                source = fp.read()
        try:
            coerced = coerced_part10(source, current, metadata=row.metadata_json)
        except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
            raise InvalidDatasetError(f"stored instance {row.sop_instance_uid} unreadable") from exc
        if coerced is not None:
            return BytesIO(coerced)
        return BytesIO(source) if isinstance(source, bytes) else self.originals.open(row.blob_key)

    def _header(self, row: MetadataRow) -> Dataset:
        """The data set up to its pixel data, from one read of the first 64 KiB when the
        header fits (as ``core/header.py`` reads at ingest), else from the file."""
        try:
            with self.open_original(row) as fp:
                head = fp.read(_HEADER_BYTES)
                if _PIXEL_DATA_LE in head or len(head) < _HEADER_BYTES:
                    ds = dcmread(BytesIO(head), stop_before_pixels=True)
                    if "SOPInstanceUID" in ds and "SeriesInstanceUID" in ds:
                        return ds
                fp.seek(0)
                return dcmread(fp, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
            raise InvalidDatasetError(f"stored instance {row.sop_instance_uid} unreadable") from exc

    def plan(
        self,
        request: ExportRequest,
        progress: ExportProgress | None = None,
        *,
        seed: bytes | None = None,
    ) -> ExportPlan:
        """Read the index and the headers; build the DICOMDIR (PS3.3 F).

        Raises :class:`core.errors.NotFoundError` for an unknown study or series.
        ``seed`` fixes the de-identification mapping (tests); a fresh random one
        otherwise, so two exports of a study are not linkable by their UIDs.
        """
        rows = self.index.instance_metadata(request.study_instance_uid, request.series_instance_uid)
        if not rows:
            raise NotFoundError("no such study or series")
        if progress is not None:
            progress.instances_total = len(rows)
        deidentifier = Deidentifier(seed or secrets.token_bytes(32)) if request.deidentify else None
        if len(rows) > self.max_instances:
            raise InvalidQueryError(
                f"more than {self.max_instances} instances; export the study by series"
            )
        # The patient now (updates, merges: issue 17); a de-identified export is not
        # coerced, the profile replaces the Patient module.
        current = (
            None
            if deidentifier is not None
            else current_patient_attributes(self.index, request.study_instance_uid)
        )
        headers: list[Dataset] = []
        coerce: list[bool] = []
        patient_id = ""
        for row in rows:
            header = self._header(row)
            if not headers:
                patient_id = str(header.get("PatientID", "") or "")
            if deidentifier is not None:
                deidentifier.apply(header)
            differs = current is not None and bool(patient_differences(header, current))
            if differs:
                assert current is not None
                coerce_patient_module(header, current)  # the DICOMDIR's records too
            coerce.append(differs)
            headers.append(slim(header))
        if current is not None:
            patient_id = current.patient_id
        # Series in index order, instances by Instance Number within each series.
        by_series: dict[str, list[tuple[MetadataRow, Dataset]]] = {}
        coerced_uids: set[str] = set()
        for row, header, differs in zip(rows, headers, coerce, strict=True):
            by_series.setdefault(row.series_instance_uid, []).append((row, header))
            if differs:
                coerced_uids.add(row.sop_instance_uid)
        entries: list[_Entry] = []
        members: list[FileSetMember] = []
        local = self.originals.has_local_paths and deidentifier is None
        for s, items in enumerate(by_series.values()):
            items.sort(key=lambda item: _instance_number(item[1]))
            for i, (row, header) in enumerate(items):
                file_id = (
                    "DICOM",
                    _component("PT", 0),
                    _component("ST", 0),
                    _component("SE", s),
                    _component("IM", i),
                )
                differs = row.sop_instance_uid in coerced_uids
                size = (
                    os.stat(self.originals.path(row.blob_key)).st_size
                    if local and not differs
                    else None
                )
                entries.append(_Entry(row, file_id, size, differs))
                members.append(FileSetMember(header, file_id, row.transfer_syntax_uid))
        dicomdir = build_dicomdir(members, file_set_id="PACSLAB")
        return ExportPlan(
            request,
            tuple(entries),
            dicomdir,
            deidentifier,
            patient_id,
            current,
            current.issuer if current is not None else "",
        )

    def _original_chunks(
        self, row: MetadataRow, current: PatientAttributes | None = None
    ) -> Iterator[bytes]:
        with self.open_original(row, current) as fp:
            while chunk := fp.read(_CHUNK):
                yield chunk

    def _deidentified(self, plan: ExportPlan, row: MetadataRow) -> bytes:
        assert plan.deidentifier is not None
        try:
            with self.open_original(row) as fp:
                ds = dcmread(fp)
        except (InvalidDicomError, EOFError, ValueError) as exc:
            raise InvalidDatasetError(f"stored instance {row.sop_instance_uid} unreadable") from exc
        plan.deidentifier.apply(ds)
        out = BytesIO()
        dcmwrite(out, ds, enforce_file_format=True)
        return out.getvalue()

    def stream(
        self,
        plan: ExportPlan,
        progress: ExportProgress | None = None,
        *,
        agent: str = "",
        agent_type: Literal["user", "apikey", "system", "anonymous"] = "system",
        source: str = "",
    ) -> Iterator[bytes]:
        """The ZIP, chunk by chunk; the action-log entry is written when it ends.

        ``progress`` (if given) counts instances and bytes as they are yielded.
        """
        progress = progress or ExportProgress()
        zs = self._zip(plan, progress)
        if zs.sized:
            progress.bytes_total = len(zs)
        progress.instances_total = len(plan.entries)
        progress.state = "streaming"
        outcome = "8"
        try:
            for chunk in zs:
                progress.bytes_done += len(chunk)
                yield chunk
            progress.state = "done"
            outcome = "0"
        except GeneratorExit:
            progress.state, progress.error = "failed", "client went away"
            raise
        except Exception as exc:
            progress.state, progress.error = "failed", type(exc).__name__
            raise
        finally:
            self._record(plan, progress, outcome, agent, agent_type, source)

    def _zip(self, plan: ExportPlan, progress: ExportProgress) -> Any:
        """The archive's ZipStream; entries are read only while it is iterated."""
        from zipstream import ZIP_STORED, ZipStream

        zs = ZipStream(
            compress_type=ZIP_STORED, sized=all(e.size is not None for e in plan.entries)
        )
        zs.add(plan.dicomdir, "DICOMDIR")

        def counted(entry: _Entry) -> Iterator[bytes]:
            if plan.deidentifier is not None:
                yield self._deidentified(plan, entry.row)
            else:
                yield from self._original_chunks(entry.row, plan.current if entry.coerce else None)
            progress.instances_done += 1

        for entry in plan.entries:
            zs.add(counted(entry), "/".join(entry.file_id), size=entry.size)
        return zs

    def size(self, plan: ExportPlan) -> int | None:
        """The ZIP's exact size when every entry's size is known, else ``None``."""
        zs = self._zip(plan, ExportProgress())
        return len(zs) if zs.sized else None

    def _record(
        self,
        plan: ExportPlan,
        progress: ExportProgress,
        outcome: str,
        agent: str,
        agent_type: Literal["user", "apikey", "system", "anonymous"],
        source: str,
    ) -> None:
        request = plan.request
        logger.info(
            "export %s of study %s%s: %d/%d instances, %d bytes, deidentified=%s",
            progress.state,
            request.study_instance_uid,
            f" series {request.series_instance_uid}" if request.series_instance_uid else "",
            progress.instances_done,
            len(plan.entries),
            progress.bytes_done,
            request.deidentify,
        )
        if self.audit is None:
            return
        resource = f"Study/{request.study_instance_uid}"
        if request.series_instance_uid:
            resource += f"/Series/{request.series_instance_uid}"
        try:
            self.audit.record(
                AuditEntry(
                    action="R",
                    event_type="export",  # PS3.15 A.5.3.5 Export (DCM 110106)
                    outcome=outcome,
                    outcome_desc=progress.state,
                    agent=(agent or "system")[:128],
                    agent_type=agent_type,
                    source=source[:64],
                    resource=resource[:256],
                    patient_key=patient_key(
                        self.patient_secret, plan.patient_id, plan.patient_issuer
                    )
                    if self.patient_secret
                    else "",
                    correlation_id=correlation_id.get()[:32],
                    detail=AuditEntry.details(
                        {
                            "instances": progress.instances_done,
                            "bytes": progress.bytes_done,
                            "deidentified": request.deidentify,
                            # instances sent with the current Patient module (issue 17)
                            "coerced": plan.coerced,
                            "export_id": progress.export_id,
                        }
                    ),
                )
            )
        except Exception:
            logger.error("export not recorded in the action log", exc_info=True)

    def write(self, request: ExportRequest, path: Path, **stream_args: object) -> ExportProgress:
        """Export to a file: written beside it under a temporary name, then renamed."""
        progress = ExportProgress()
        plan = self.plan(request, progress)
        part = path.with_name(f".{path.name}.part")
        try:
            with part.open("wb") as out:
                for chunk in self.stream(plan, progress, **stream_args):  # type: ignore[arg-type]
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(part, path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return progress
