"""Composition root: build each service's parts from Settings (STYLE.md §1).

The one place that knows every concrete class. Each process (receiver child, worker,
API) calls these once at start.
"""

from __future__ import annotations

from collections.abc import Callable

from core.settings import RemoteAE, Settings
from ingest.service import IngestService
from services.commitment import CommitmentQueue, CommitmentService
from services.orders import OrderService, order_service
from services.patients import PatientIdentityService
from services.rejection import RejectionService
from storage.archive import Archive
from storage.audit import AuditLog, load_secret
from storage.index.sql import SqlIndex
from storage.originals import open_originals as build_originals
from storage.originals import staging_dir

__all__ = [
    "build_archive",
    "build_audit",
    "build_index",
    "build_ingest",
    "build_order_service",
    "build_originals",
    "build_patient_identity",
    "staging_dir",
]


def build_index(settings: Settings, *, migrate: bool | None = None) -> SqlIndex:
    section = settings.index
    if migrate is not None:
        section = section.model_copy(update={"migrate": migrate})
    return SqlIndex(section)


def build_archive(
    settings: Settings,
    index: SqlIndex | None = None,
    *,
    staging_name: str = "",
    audit: AuditLog | None = None,
    journal: bool = False,
) -> Archive:
    """``journal``: for a process that receives instances for long (a receiver, the
    API), the original journal (storage/journal.py); not for a one-off command."""
    idx = index or build_index(settings)
    archive = Archive.from_settings(settings, idx, staging_name=staging_name, journal=journal)
    # IHE IOCM: a KOS rejection note is applied as it is stored (C-STORE and STOW-RS).
    archive.hooks.append(
        RejectionService(idx, archive.originals, audit=audit, retention=settings.retention)
    )
    # Taken (and what a crash left in it replayed) only now: a replay runs the hooks.
    archive.open_journal()
    return archive


def build_audit(settings: Settings, index: SqlIndex) -> tuple[AuditLog, bytes]:
    """The action log on ``index``'s database and the patient-reference secret."""
    assert settings.audit.patient_key_file is not None
    return (
        AuditLog(index.engine, settings.audit, url=index.url),
        load_secret(settings.audit.patient_key_file),
    )


def build_ingest(
    settings: Settings,
    index: SqlIndex | None = None,
    *,
    staging_name: str = "",
    journal: bool = False,
) -> IngestService:
    idx = index or build_index(settings)
    audit, secret = build_audit(settings, idx)
    return IngestService(
        build_archive(settings, idx, staging_name=staging_name, audit=audit, journal=journal),
        audit=audit,
        patient_secret=secret,
    )


def build_order_service(
    settings: Settings,
    index: SqlIndex,
    *,
    audit: AuditLog | None = None,
    patient_secret: bytes = b"",
) -> OrderService:
    """The order service over ``index`` (webhook jobs queued when a URL is set). With
    ``audit``, an order placed for the survivor of a merge is recorded there."""
    return order_service(
        index,
        settings.orders,
        audit=audit,
        patient_secret=patient_secret,
        default_issuer=settings.lab.patient_issuer,
    )


def build_patient_identity(
    settings: Settings,
    index: SqlIndex,
    *,
    audit: AuditLog | None = None,
    patient_secret: bytes | None = None,
) -> PatientIdentityService:
    """The patient identity service (IHE PIR, issue 17) over ``index``: what the ADT
    reader, the FHIR ``Patient`` routes and the review API call. An empty issuer in a
    command means the hospital's own (``lab.patient_issuer``)."""
    if audit is None or patient_secret is None:
        audit, patient_secret = build_audit(settings, index)
    return PatientIdentityService(
        index,
        audit=audit,
        patient_secret=patient_secret,
        default_issuer=settings.lab.patient_issuer,
    )


def build_commitment_queue(
    settings: Settings,
    index: SqlIndex,
    decisions: CommitmentService,
    lookup: Callable[[str], RemoteAE | None],
) -> CommitmentQueue:
    """The owed N-EVENT-REPORTs, shared by the receivers and the worker (issue 16 §3):
    the worker may send one once the receiver had six timeouts' worth to do it."""
    qr = settings.qr
    timeout = qr.connect_timeout_s
    return CommitmentQueue(index, decisions, lookup, ae_title=settings.dicom.ae_title,
                           timeout_s=timeout, grace_s=6 * timeout + 10,
                           retry_base_s=qr.commit_retry_base_s,
                           retry_max_s=qr.commit_retry_max_s,
                           max_attempts=qr.commit_max_attempts)
