"""STOW-RS (PS3.18 10.5): each part through the same durable path as C-STORE.

The request body has been spooled to a file in the staging area; its parts are read
from a memory map, each staged with :func:`storage.staging.stage_part10` and handed to
:meth:`storage.archive.Archive.accept` (validate, fsync, publish, index, or
quarantine). The response follows PS3.18 10.5.3: ReferencedSOPSequence for stored
instances, FailedSOPSequence with FailureReason (the DIMSE status of the
:class:`core.errors.ServiceError`, PS3.4 B.2.3) for the others, and status 200 (all
stored), 202 (some failed) or 409 (all failed), as orthanc-dicomweb does; 507 when all
failed for lack of space (0xA700).
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread

from api.dicomweb._multipart import content_type_params, iter_parts
from core.errors import (
    InvalidDatasetError,
    InvalidQueryError,
    OutOfResourcesError,
    ServiceError,
    SOPClassMismatchError,
)
from storage.archive import Archive
from storage.staging import StagedFile, stage_part10

__all__ = ["StowResult", "store_body"]

logger = logging.getLogger(__name__)

CALLING_AE = "STOW"


@dataclass
class StowResult:
    """What a STOW-RS request stored and refused, and its response."""

    stored: list[tuple[str, str, str, str]] = field(default_factory=list)  # cls, sop, study, series
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # class, instance, reason

    @property
    def status(self) -> int:
        """200 all stored, 202 some, 409 none (PS3.18 Table 10.5.3-1); when none was
        stored only for lack of resources (0xA700: disk full, index away), the
        OutOfResourcesError status (507), so the peer knows to retry rather than fix
        its instances."""
        if not self.failed:
            return 200
        if self.stored:
            return 202
        if all(reason == OutOfResourcesError.dimse_status for *_, reason in self.failed):
            return OutOfResourcesError.http_status
        return 409

    def response(self, base: str, study_instance_uid: str | None) -> dict[str, Any]:
        """The Store Instances Response Module (PS3.18 Table 10.5.3-2) in DICOM JSON."""
        out: dict[str, Any] = {}
        studies = {st for _, _, st, _ in self.stored}
        study = study_instance_uid or (next(iter(studies)) if len(studies) == 1 else None)
        if study:
            out["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study}"]}
        if self.failed:
            out["00081198"] = {
                "vr": "SQ",
                "Value": [
                    {
                        **_uid_pair(cls, inst),
                        "00081197": {"vr": "US", "Value": [reason]},
                    }
                    for cls, inst, reason in self.failed
                ],
            }
        if self.stored:
            out["00081199"] = {
                "vr": "SQ",
                "Value": [
                    {
                        **_uid_pair(cls, inst),
                        "00081190": {
                            "vr": "UR",
                            "Value": [f"{base}/studies/{st}/series/{se}/instances/{inst}"],
                        },
                    }
                    for cls, inst, st, se in self.stored
                ],
            }
        return out


def _uid_pair(cls: str, inst: str) -> dict[str, Any]:
    def ui(value: str) -> dict[str, Any]:
        return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}

    return {"00081150": ui(cls), "00081155": ui(inst)}


class _Reader:
    """A file-like view of one part of the memory map (no copy of the whole part)."""

    def __init__(self, buf: mmap.mmap, start: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, start, end

    def read(self, size: int = -1) -> bytes:
        stop = self.end if size < 0 else min(self.end, self.pos + size)
        data = self.buf[self.pos : stop]
        self.pos = stop
        return data


def _check_study(staged: StagedFile, study_instance_uid: str) -> tuple[str, str]:
    """Study and Series Instance UID of a staged file; refuse another study (0xA900)."""
    try:
        with staged.open() as fp:
            ds = dcmread(
                fp,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SeriesInstanceUID"],
            )
        study = str(ds.get("StudyInstanceUID", "") or "")
        series = str(ds.get("SeriesInstanceUID", "") or "")
    except Exception as exc:  # the Archive reports unreadable files itself
        raise InvalidDatasetError(f"cannot parse data set: {type(exc).__name__}") from exc
    if study_instance_uid and study != study_instance_uid:
        raise SOPClassMismatchError("Study Instance UID differs from the request's")
    return study, series


def store_body(
    archive: Archive,
    body: Path,
    content_type: str,
    *,
    study_instance_uid: str | None = None,
) -> StowResult:
    """Store every part of a spooled multipart/related body.

    Raises
    ------
    InvalidQueryError
        The body is not a parsable multipart/related message, or has no part (400).
    """
    _main, params = content_type_params(content_type)
    boundary = params.get("boundary", "")
    if not boundary:
        raise InvalidQueryError("multipart/related without a boundary parameter")
    default_type = params.get("type", "application/dicom").lower()
    result = StowResult()
    size = body.stat().st_size
    if size == 0:
        raise InvalidQueryError("empty request body")
    with body.open("rb") as fp, mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        parts = list(iter_parts(buf, boundary))
        if not parts:
            raise InvalidQueryError("multipart body without parts")
        for part in parts:
            part_type = content_type_params(part.headers.get("content-type", default_type))[0]
            if part_type != "application/dicom":
                result.failed.append(("", "", InvalidDatasetError.dimse_status))
                continue
            _store_part(archive, buf, part.start, part.end, study_instance_uid, result)
    return result


def _store_part(
    archive: Archive,
    buf: mmap.mmap,
    start: int,
    end: int,
    study_instance_uid: str | None,
    result: StowResult,
) -> None:
    try:
        # Archive.accept fsyncs the staged file itself (when configured to).
        staged = stage_part10(
            archive.staging_dir(),
            _Reader(buf, start, end),
            fsync=False,
            in_memory=archive.in_memory_staging,
        )
    except ServiceError as exc:
        result.failed.append(("", "", exc.dimse_status))
        return
    cls, inst = staged.sop_class_uid, staged.sop_instance_uid
    try:
        study, series = _check_study(staged, study_instance_uid or "")
    except ServiceError as exc:
        staged.discard()
        logger.warning("STOW-RS instance %s refused: %s", inst, exc.title)
        result.failed.append((cls, inst, exc.dimse_status))
        return
    try:
        archive.accept(staged, calling_ae=CALLING_AE)
    except ServiceError as exc:
        logger.warning("STOW-RS instance %s refused: %s", inst, exc.title)
        result.failed.append((cls, inst, exc.dimse_status))
        return
    result.stored.append((cls, inst, study, series))
