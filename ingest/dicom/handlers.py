"""Thin adapters between the DICOM transports and :class:`IngestService` (STYLE.md §8 A).

They only translate: a :class:`ServiceError` becomes its DIMSE status with a short
ErrorComment free of patient data; anything else is a bug and propagates (pynetdicom
answers 0xC211 and logs it; the fast path aborts the association).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from core.errors import ServiceError
from ingest.dicom.dimse import Command
from storage.staging import StagedWriter, stage_part10

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from ingest.service import IngestService

__all__ = ["handle_echo", "handle_store", "status_dataset", "store_staged"]

logger = logging.getLogger(__name__)


def _comment(exc: ServiceError) -> str:
    # ErrorComment is LO (64 chars): the specific reason says more than the class title.
    return (str(exc) or exc.title)[:64]


def store_staged(
    service: IngestService, writer: StagedWriter, command: Command, calling_ae: str
) -> tuple[int, str]:
    """Fast-path C-STORE: finish the staged file and hand it to ingest."""
    try:
        staged = writer.finish(fsync=False)  # the archive fsyncs after validating
        service.accept_instance(staged, calling_ae=calling_ae)
    except ServiceError as exc:
        return exc.dimse_status, _comment(exc)
    return 0x0000, ""


def status_dataset(status: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def handle_store(event: Event, service: IngestService) -> int | Dataset:
    """EVT_C_STORE for associations pynetdicom serves (TLS, mixed services).

    pynetdicom wrote the data set to a Part-10 file whose meta carries the request's
    Affected SOP Class/Instance UIDs and the context's transfer syntax; it is staged
    the way STOW-RS parts are (:func:`storage.staging.stage_part10`).
    """
    try:
        with open(event.dataset_path, "rb") as src:
            staged = stage_part10(
                service.archive.staging_dir(),
                src,
                fsync=False,
                in_memory=service.archive.in_memory_staging,
            )
        service.accept_instance(staged, calling_ae=event.assoc.requestor.ae_title)
    except ServiceError as exc:
        return status_dataset(exc.dimse_status, _comment(exc))
    finally:
        with contextlib.suppress(OSError):
            event.dataset_path.unlink()
    return 0x0000


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: Verification SOP Class (PS3.4 A.4) always succeeds."""
    return 0x0000
