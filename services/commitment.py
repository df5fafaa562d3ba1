"""Storage Commitment Push Model (PS3.4 Annex J), the use case: what may be committed.

An instance is committed only when it is durable and intact: it is in the index (a
row is written only after the original's fsync and rename, see
:mod:`storage.archive`), its SOP Class is the one the SCU names, and its stored
original still hashes to its content key (:func:`processing.integrity.verify_original`).
Everything else is listed in the Failed SOP Sequence with a Failure Reason of PS3.4
Table J.3.2-1 / PS3.7 C: 0x0112 no such object instance, 0x0119 class-instance
conflict, 0x0110 processing failure (missing or corrupted original).

A request accepted is owed its N-EVENT-REPORT even across a restart:
:class:`CommitmentQueue` keeps it in the index with a ``commit`` job before the
N-ACTION is answered. The receiver delivers at once; when it cannot (the SCU does
not listen yet, the receiver stops), the worker runs the job later
(:meth:`CommitmentQueue.run_job`): it decides again and sends the report on a new
association to the SCU's AE, with backoff, until ``max_attempts``. Then the job is
``failed``: the dead-letter list of owed reports (:mod:`services.commitment_reports`), kept
with its request and last error until someone retries it from the admin API, as
forwarding's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from core.errors import InvalidDatasetError, NotFoundError, PeerUnavailableError, ServiceError
from processing.integrity import verify_original
from storage.abc import Job, OriginalStore, StoredInstance
from storage.index import qr as qr_index

if TYPE_CHECKING:
    from core.settings import RemoteAE
    from storage.index.sql import SqlIndex

__all__ = [
    "CLASS_INSTANCE_CONFLICT",
    "NO_SUCH_OBJECT",
    "PROCESSING_FAILURE",
    "CommitRequest",
    "CommitResult",
    "CommitmentQueue",
    "CommitmentService",
    "parse_request",
    "send_report",
]

logger = logging.getLogger(__name__)

#: Failure Reason values (PS3.4 J.3.3.1.1, codes of PS3.7 Annex C).
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
_MAX_REFERENCES = 65_535


class InstanceLookup(Protocol):
    def get_instance(self, sop_instance_uid: str) -> StoredInstance: ...


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """An N-ACTION Storage Commitment Request (PS3.4 J.3.2.1.1)."""

    transaction_uid: str
    references: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID)


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What the N-EVENT-REPORT says (PS3.4 J.3.3.1.1)."""

    transaction_uid: str
    committed: tuple[tuple[str, str], ...]
    failed: tuple[tuple[str, str, int], ...]  # (class, instance, Failure Reason)

    @property
    def event_type_id(self) -> int:
        """1: all committed; 2: some failed (PS3.4 Table J.3-2)."""
        return 2 if self.failed else 1

    def to_dataset(self) -> Dataset:
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        if self.committed:
            ds.ReferencedSOPSequence = DicomSequence([
                _ref(cls, uid) for cls, uid in self.committed
            ])
        if self.failed:
            items = []
            for cls, uid, reason in self.failed:
                item = _ref(cls, uid)
                item.FailureReason = reason
                items.append(item)
            ds.FailedSOPSequence = DicomSequence(items)
        return ds


def _ref(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def parse_request(action_information: Dataset | None) -> CommitRequest:
    """The Transaction UID and references of an N-ACTION (PS3.4 Table J.3-1).

    Raises :class:`InvalidDatasetError` when the Transaction UID or the Referenced
    SOP Sequence is missing (answered 0x0120 Missing Attribute by the handler).
    """
    if action_information is None:
        raise InvalidDatasetError("no Action Information")
    uid = str(action_information.get("TransactionUID", "") or "").strip()
    if not uid:
        raise InvalidDatasetError("Transaction UID is missing")
    seq = action_information.get("ReferencedSOPSequence")
    if not seq:
        raise InvalidDatasetError("Referenced SOP Sequence is missing or empty")
    if len(seq) > _MAX_REFERENCES:
        raise InvalidDatasetError("too many references in one request")
    refs = tuple(
        (
            str(item.get("ReferencedSOPClassUID", "") or ""),
            str(item.get("ReferencedSOPInstanceUID", "") or ""),
        )
        for item in seq
    )
    return CommitRequest(uid, refs)


class CommitmentService:
    """Decide, instance by instance, whether pacslab takes responsibility for it."""

    def __init__(self, index: InstanceLookup, originals: OriginalStore) -> None:
        self.index = index
        self.originals = originals

    def check(self, request: CommitRequest) -> CommitResult:
        committed: list[tuple[str, str]] = []
        failed: list[tuple[str, str, int]] = []
        for sop_class, uid in request.references:
            reason = self._reason(sop_class, uid)
            if reason is None:
                committed.append((sop_class, uid))
            else:
                failed.append((sop_class, uid, reason))
        logger.info(
            "storage commitment %s: %d committed, %d failed",
            request.transaction_uid, len(committed), len(failed),
        )
        return CommitResult(request.transaction_uid, tuple(committed), tuple(failed))

    def _reason(self, sop_class: str, uid: str) -> int | None:
        if not uid:
            return NO_SUCH_OBJECT
        try:
            inst = self.index.get_instance(uid)
        except NotFoundError:
            return NO_SUCH_OBJECT
        if sop_class != inst.sop_class_uid:
            return CLASS_INSTANCE_CONFLICT
        try:
            verify_original(self.originals, inst)
        except (InvalidDatasetError, OSError):
            logger.error("storage commitment: original of %s does not verify", uid)
            return PROCESSING_FAILURE
        return None

    def check_all(self, requests: Sequence[CommitRequest]) -> list[CommitResult]:
        return [self.check(r) for r in requests]


def send_report(
    result: CommitResult, remote: RemoteAE, *, ae_title: str, calling: str, timeout_s: float
) -> bool:
    """The N-EVENT-REPORT on a new association to the SCU, where we propose the SCP
    role of the SOP Class (PS3.4 J.3.3, PS3.7 D.3.3.4); True if answered 0x0000."""
    from pynetdicom import AE, build_role
    from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    assoc = ae.associate(remote.host, remote.port, ae_title=calling, ext_neg=[role])
    if not assoc.is_established:
        return False
    try:
        return send_event_report(assoc, result, "a new association")
    finally:
        assoc.release()


def send_event_report(assoc: Any, result: CommitResult, where: str) -> bool:
    """The N-EVENT-REPORT of ``result`` on an established association (PS3.4 J.3.3),
    the request's own or a new one; True if the SCU answered 0x0000."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StorageCommitmentPushModel,
        StorageCommitmentPushModelInstance,
    )

    try:
        status, _ = assoc.send_n_event_report(
            result.to_dataset(),
            result.event_type_id,
            StorageCommitmentPushModel,
            StorageCommitmentPushModelInstance,
        )
    except Exception:
        logger.warning("N-EVENT-REPORT on %s failed", where, exc_info=True)
        return False
    return bool(status) and int(status.get("Status", 0xFFFF)) == 0x0000


class CommitmentQueue:
    """The owed reports, kept in the index (see the module docstring).

    ``grace_s``: how long the receiver has to deliver before the worker may;
    ``retry_base_s``/``retry_max_s``/``max_attempts``: the worker's backoff, as
    forwarding's.
    """

    def __init__(
        self,
        index: SqlIndex,
        service: CommitmentService,
        destinations: Callable[[str], RemoteAE | None],
        *,
        ae_title: str,
        timeout_s: float = 10.0,
        grace_s: float = 120.0,
        retry_base_s: float = 30.0,
        retry_max_s: float = 3600.0,
        max_attempts: int = 20,
        sender: Callable[..., bool] = send_report,
    ) -> None:
        self.index = index
        self.service = service
        self.destinations = destinations
        self.ae_title = ae_title
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.max_attempts = max_attempts
        self.sender = sender

    def remember(self, request: CommitRequest, calling: str, *, correlation_id: str = "") -> int:
        """Keep ``request`` until its report is delivered; its job id."""
        return qr_index.queue_commitment(
            self.index,
            request.transaction_uid,
            calling,
            json.dumps(request.references),
            delay_s=self.grace_s,
            correlation_id=correlation_id,
        )

    def delivered(self, transaction_uid: str, how: str) -> None:
        qr_index.settle_commitment(self.index, transaction_uid, how)

    def undelivered(self, transaction_uid: str, error: str) -> None:
        """The receiver gave up; the job stays pending for the worker."""
        qr_index.note_commitment_error(self.index, transaction_uid, error)

    def run_job(self, job: Job) -> Mapping[str, Any]:
        """The worker's ``commit`` job: decide again, send on a new association."""
        kept = qr_index.commitment_request(self.index, job.target)
        if kept is None:
            return {"delivered": "before"}  # settled since the job was claimed
        calling, refs = kept
        request = CommitRequest(job.target, tuple((str(c), str(u)) for c, u in json.loads(refs)))
        remote = self.destinations(calling)
        if remote is None:
            raise ServiceError(f"no address configured for AE {calling}")
        result = self.service.check(request)
        if self.sender(result, remote, ae_title=self.ae_title, calling=calling,
                       timeout_s=self.timeout_s):
            self.delivered(job.target, "worker")
            return {"delivered": "worker", "committed": len(result.committed),
                    "failed": len(result.failed)}
        if job.attempts >= self.max_attempts:
            # The dead-letter list (report_jobs) shows this as the last error.
            raise ServiceError(
                f"{calling} at {remote.host}:{remote.port} took no N-EVENT-REPORT "
                f"in {job.attempts} tries"
            )
        exc = PeerUnavailableError(f"{calling} did not take the N-EVENT-REPORT")
        exc.retry_in_s = float(min(self.retry_max_s,
                                   self.retry_base_s * 2.0 ** max(0, job.attempts - 1)))
        raise exc

