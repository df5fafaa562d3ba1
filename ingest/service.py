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
from ingest.store_audit import StoreKey, TransferSummaries, TransferSummary
from storage.archive import Accepted, Archive
from storage.audit import AuditLog
from storage.staging import StagedFile

__all__ = ["IngestService"]

logger = logging.getLogger(__name__)


class IngestService:
    """Accept instances; with ``audit``, log them (PS3.15 A.5.3 DICOM Instances Transferred).

    What an association stores of a study is one entry (:mod:`ingest.store_audit`),
    written when the association ends (:meth:`association_ended`, called by both
    transports) or once it has been open ``audit.store_summary_s``; a refused
    instance is an entry of its own, with its status. Entries are queued after the
    archive's decision and never delay the acknowledgement
    (:class:`storage.audit.AuditLog` writes from its own thread).
    """

    def __init__(self, archive: Archive, *, audit: AuditLog | None = None,
                 patient_secret: bytes = b"") -> None:
        self.archive = archive
        self.audit = audit
        self.patient_secret = patient_secret
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        max_age = audit.settings.store_summary_s if audit is not None else 0.0
        self.summaries = TransferSummaries(max_age)
        self._sweep_stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def _audit_refused(self, staged: StagedFile, calling_ae: str, status: int,
                       desc: str) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record(AuditEntry(
                action="C", event_type="dicom.c-store", outcome=outcome_for_dimse(status),
                outcome_desc=f"0x{status:04X} {desc}"[:64], agent=calling_ae[:128],
                agent_type="ae", resource=f"Instance/{staged.sop_instance_uid}"[:256],
                correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details({"sop_class_uid": staged.sop_class_uid}),
            ))
        except Exception:  # a side effect: log and carry on (STYLE.md §5)
            logger.error("C-STORE audit entry not recorded", exc_info=True)

    def _audit_stored(self, staged: StagedFile, calling_ae: str, accepted: Accepted) -> None:
        if self.audit is None or not self.audit.enabled:
            return
        try:
            rec = accepted.record
            key = StoreKey(
                association=correlation_id.get(),
                calling_ae=calling_ae,
                study_instance_uid=rec.study_instance_uid,
                patient_key=patient_key(self.patient_secret, rec.patient_id,
                                        rec.issuer_of_patient_id),
                outcome_desc=f"0x0000 {accepted.outcome.status}",
            )
            self._write(self.summaries.add(key, staged.sop_class_uid))
            self._ensure_sweeper()
        except Exception:  # a side effect: log and carry on (STYLE.md §5)
            logger.error("C-STORE audit entry not recorded", exc_info=True)

    def _write(self, summaries: list[TransferSummary]) -> None:
        if self.audit is not None:
            for summary in summaries:
                self.audit.record(summary.entry())

    def association_ended(self) -> None:
        """Write the entries of the association that ended (the current correlation
        id's). Both transports call it; a side effect that never raises."""
        try:
            self._write(self.summaries.ended(correlation_id.get()))
        except Exception:
            logger.error("C-STORE audit entries not recorded", exc_info=True)

    def _ensure_sweeper(self) -> None:
        # Started on the first summary, so a process that never stores runs no thread.
        if self._sweeper is None and self.summaries.max_age_s > 0:
            with self._lock:
                if self._sweeper is None:
                    self._sweeper = threading.Thread(
                        target=self._sweep, name="pacslab-store-audit", daemon=True)
                    self._sweeper.start()

    def _sweep(self) -> None:
        """Write the summaries of transfers open ``store_summary_s`` (an association
        that stays open between studies still gets its entries on time)."""
        period = max(self.summaries.max_age_s / 2, 0.05)
        while not self._sweep_stop.wait(period):
            try:
                self._write(self.summaries.due())
            except Exception:
                logger.error("C-STORE audit entries not recorded", exc_info=True)

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
        """Write the open summaries and the queued audit entries (the archive is closed
        by its owner)."""
        self._sweep_stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        self._write(self.summaries.drain())
        if self.audit is not None:
            self.audit.close()

    def accept_instance(self, staged: StagedFile, *, calling_ae: str) -> Accepted:
        """Store and index one received instance (PS3.4 B.2.2), or raise ServiceError."""
        try:
            accepted = self.archive.accept(staged, calling_ae=calling_ae)
        except ServiceError as exc:
            self._audit_refused(staged, calling_ae, exc.dimse_status, exc.title)
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
        self._audit_stored(staged, calling_ae, accepted)
        with self._lock:
            self.counts[accepted.outcome.status] += 1
        logger.debug(
            "instance %s from %s %s", staged.sop_instance_uid, calling_ae, accepted.outcome.status
        )
        return accepted
