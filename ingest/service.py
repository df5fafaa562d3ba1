"""IngestService: what the DICOM receiver does with an instance once it is on disk.

The durable path itself (validate, fsync, publish, index, quarantine) is
:class:`storage.archive.Archive`, shared with STOW-RS; this service adds the
receiver's bookkeeping and logs without patient data.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from core.audit import AuditEntry, outcome_for_dimse, patient_key
from core.errors import ServiceError
from core.logging import correlation_id
from storage.archive import Accepted, Archive
from storage.audit import AuditLog
from storage.staging import StagedFile

__all__ = ["IngestService"]

logger = logging.getLogger(__name__)


class IngestService:
    """Accept instances; with ``audit``, log each one (PS3.15 A.5.3.2 Instances Transferred).

    The log entry is queued after the archive's decision and never delays the
    acknowledgement (:class:`storage.audit.AuditLog` writes from its own thread).
    """

    def __init__(self, archive: Archive, *, audit: AuditLog | None = None,
                 patient_secret: bytes = b"") -> None:
        self.archive = archive
        self.audit = audit
        self.patient_secret = patient_secret
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _audit(self, staged: StagedFile, calling_ae: str, status: int, desc: str,
               accepted: Accepted | None) -> None:
        if self.audit is None:
            return
        try:
            rec = accepted.record if accepted is not None else None
            key = (patient_key(self.patient_secret, rec.patient_id, rec.issuer_of_patient_id)
                   if rec is not None else "")
            detail = {"sop_class_uid": staged.sop_class_uid}
            if rec is not None:
                detail["study_instance_uid"] = rec.study_instance_uid
            self.audit.record(AuditEntry(
                action="C", event_type="dicom.c-store", outcome=outcome_for_dimse(status),
                outcome_desc=f"0x{status:04X} {desc}"[:64], agent=calling_ae[:128],
                agent_type="ae", resource=f"Instance/{staged.sop_instance_uid}"[:256],
                patient_key=key, correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details(detail),
            ))
        except Exception:  # a side effect: log and carry on (STYLE.md §5)
            logger.error("C-STORE audit entry not recorded", exc_info=True)

    def record_refused_association(
        self,
        calling_ae: str,
        peer: str,
        *,
        reason: str,
        called_ae: str = "",
        code: tuple[int, int, int] | None = None,
    ) -> None:
        """Log an association we refused for who asked (PS3.15 A.5.3 User Authentication:
        a calling AE title we do not know is a failed login of a node; a failed TLS
        handshake is a Security Alert). ``code`` is the A-ASSOCIATE-RJ's (result,
        source, reason), PS3.8 9.3.4. A side effect: logs and carries on."""
        if self.audit is None:
            return
        try:
            detail: dict[str, object] = {"reason": reason}
            if code is not None:
                detail["result"], detail["result_source"], detail["diagnostic"] = code
            self.audit.record(AuditEntry(
                action="E",
                event_type="dicom.tls-failed" if reason == "tls" else "dicom.association-rejected",
                outcome="4", outcome_desc=f"association rejected: {reason}"[:64],
                agent=(calling_ae or "unknown")[:128], agent_type="ae", source=peer[:64],
                resource=f"AE/{called_ae}"[:256] if called_ae else "",
                correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details(detail),
            ))
        except Exception:  # a side effect: log and carry on (STYLE.md §5)
            logger.error("refused association not recorded", exc_info=True)

    def close(self) -> None:
        """Write the queued audit entries (the archive is closed by its owner)."""
        if self.audit is not None:
            self.audit.close()

    def accept_instance(self, staged: StagedFile, *, calling_ae: str) -> Accepted:
        """Store and index one received instance (PS3.4 B.2.2), or raise ServiceError."""
        try:
            accepted = self.archive.accept(staged, calling_ae=calling_ae)
        except ServiceError as exc:
            self._audit(staged, calling_ae, exc.dimse_status, exc.title, None)
            with self._lock:
                self.counts["refused"] += 1
            logger.warning(
                "instance %s from %s refused: %s (%s)",
                staged.sop_instance_uid,
                calling_ae,
                exc.title,
                exc,
            )
            raise
        self._audit(staged, calling_ae, 0x0000, accepted.outcome.status, accepted)
        with self._lock:
            self.counts[accepted.outcome.status] += 1
        logger.debug(
            "instance %s from %s %s", staged.sop_instance_uid, calling_ae, accepted.outcome.status
        )
        return accepted
