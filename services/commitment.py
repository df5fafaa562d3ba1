"""Storage Commitment Push Model (PS3.4 Annex J), the use case: what may be committed.

An instance is committed only when it is durable and intact: it is in the index (a
row is written only after the original's fsync and rename, see
:mod:`storage.archive`), its SOP Class is the one the SCU names, and its stored
original still hashes to its content key (:func:`processing.integrity.verify_original`).
Everything else is listed in the Failed SOP Sequence with a Failure Reason of PS3.4
Table J.3.2-1 / PS3.7 C: 0x0112 no such object instance, 0x0119 class-instance
conflict, 0x0110 processing failure (missing or corrupted original).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from core.errors import InvalidDatasetError, NotFoundError
from processing.integrity import verify_original
from storage.abc import OriginalStore, StoredInstance

__all__ = [
    "CLASS_INSTANCE_CONFLICT",
    "NO_SUCH_OBJECT",
    "PROCESSING_FAILURE",
    "CommitRequest",
    "CommitResult",
    "CommitmentService",
    "parse_request",
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
