"""IHE IOCM (Imaging Object Change Management): rejecting instances, and purging them.

The use case behind three edges: a KOS rejection note received over C-STORE or STOW-RS
(IHE RAD TF-2 4.66 "Rejection Note Stored"; the note is stored and indexed as usual,
its evidence is rejected), the admin API ``/admin/rejections`` and the ``pacslab
purge-rejected`` command. The index does the hiding (storage/index/rejection.py): a
rejected instance is gone from QIDO-RS, C-FIND, WADO, C-MOVE/C-GET, FHIR and the
viewer at once, and a later C-STORE of it is refused (0xA771,
:class:`core.errors.RejectedInstanceError`), unless it was rejected because its
retention ended ("Data Retention Policy Expired", 113039), which then restores it.

Rejected instances stay on disk: deleted only by :meth:`RejectionService.purge`, an
explicit action written to the action log. A 113039 rejection, and the purge of what it
rejected, are refused while the study's retention class says it must be kept
(:meth:`storage.retention.RetentionStore.check_delete`, the rule study deletion obeys).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from core.audit import AuditEntry
from core.errors import InvalidDatasetError
from core.logging import correlation_id
from core.rejection import (
    KOS_SOP_CLASS_UID,
    MAX_REFERENCES,
    REJECTION_CODES,
    RETENTION_EXPIRED,
    RejectedRef,
    RejectionNote,
    parse_rejection_code,
    parse_rejection_note,
)
from core.settings import RetentionSettings
from storage.index.rejection import (
    Applied,
    Purged,
    RejectionRow,
    apply_rejection,
    conflicting_refs,
    current_refs,
    list_rejections,
    purge_rejected,
)
from storage.retention import RetentionStore

if TYPE_CHECKING:
    from core.instance import InstanceRecord
    from storage.abc import OriginalStore
    from storage.audit import AuditLog
    from storage.index.sql import SqlIndex

__all__ = ["PurgeReport", "RejectionService"]

logger = logging.getLogger(__name__)

#: A rejection note larger than this is not read (a KOS is a few kilobytes per
#: hundred references; MAX_REFERENCES of them fit well below it).
_MAX_NOTE_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """What a purge deleted, and what it kept because retention forbids deleting it."""

    purged: Purged
    kept_for_retention: int


class RejectionService:
    """Reject, list and purge (IHE RAD TF-1 37, TF-2 4.66); an :class:`AcceptHook`."""

    def __init__(
        self,
        index: SqlIndex,
        originals: OriginalStore | None = None,
        *,
        audit: AuditLog | None = None,
        retention: RetentionSettings | None = None,
    ) -> None:
        self.index = index
        self.originals = originals
        self.audit = audit
        self.retention = RetentionStore(index.engine, retention or RetentionSettings())

    # -- the receiver's hook (storage.archive.AcceptHook) -------------------------

    #: Only KOS documents can be rejection notes: other instances are not shown to the
    #: hook (nor written out of memory for it).
    sop_classes: frozenset[str] | None = frozenset({KOS_SOP_CLASS_UID})

    def before_index(
        self, record: InstanceRecord, path: Path, calling_ae: str
    ) -> Callable[[], None] | None:
        """A KOS rejection note: checked now (refused if unusable), applied once indexed."""
        if record.sop_class_uid != KOS_SOP_CLASS_UID:
            return None
        if path.stat().st_size > _MAX_NOTE_BYTES:
            raise InvalidDatasetError("Key Object Selection document too large")
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise InvalidDatasetError("Key Object Selection document unreadable") from exc
        note = parse_rejection_note(ds)
        if note is None:
            return None
        if record.study_instance_uid != note.refs[0].study_instance_uid:
            raise InvalidDatasetError("rejection note evidence names another study")
        conflicts = conflicting_refs(self.index, note.refs)
        if conflicts:
            # dcm4chee-arc refuses such a note too (its 0xA773 "class-instance conflict").
            raise InvalidDatasetError(
                f"rejection note names {conflicts} instances under other UIDs than stored"
            )
        self._check_retention(note.code, note.refs)
        caller = calling_ae or "STOW-RS"

        def apply() -> None:
            applied = apply_rejection(
                self.index,
                note.refs,
                note.code,
                source="kos",
                note_uid=note.sop_instance_uid,
                by=caller,
            )
            self._audit_rejection(applied, note.code, agent=caller, agent_type="ae", note=note)

        return apply

    # -- the API ------------------------------------------------------------------

    def reject(
        self,
        study: str,
        *,
        series: str | None = None,
        sops: Sequence[str] = (),
        code: str,
        by: str,
        agent_type: str = "user",
    ) -> Applied:
        """Reject a study, one of its series, or instances of it (their current
        versions); NotFoundError if none is current, InvalidDatasetError for a code
        outside CID 7011, RetentionError for 113039 before retention ended."""
        code = parse_rejection_code(code)
        if len(sops) > MAX_REFERENCES:
            raise InvalidDatasetError("too many instances in one rejection")
        refs = current_refs(self.index, study, series, sops)
        self._check_retention(code, refs)
        applied = apply_rejection(self.index, refs, code, source="api", by=by)
        self._audit_rejection(applied, code, agent=by, agent_type=agent_type, note=None)
        return applied

    def rejections(
        self,
        *,
        study: str | None = None,
        code: str | None = None,
        purged: bool | None = None,
        limit: int = 1000,
    ) -> list[RejectionRow]:
        return list_rejections(self.index, study=study, code=code, purged=purged, limit=limit)

    def purge(
        self,
        *,
        by: str,
        codes: Sequence[str] = (),
        study: str | None = None,
        agent_type: str = "user",
        today: date | None = None,
    ) -> PurgeReport:
        """Delete the versions and originals of rejected instances (all codes, or
        ``codes``; one study or all). 113039 rejections are purged only once the
        study's retention ended; the others are purged when asked (their objects
        were never valid records of the patient: wrong patient, unusable)."""
        wanted = [parse_rejection_code(c) for c in codes] or list(REJECTION_CODES)
        day = today or datetime.now(UTC).date()
        rows = [
            r
            for c in wanted
            for r in list_rejections(
                self.index, study=study, code=c, purged=False, limit=MAX_REFERENCES
            )
        ]
        allowed: list[str] = []
        kept = 0
        expired: dict[str, bool] = {}
        for r in rows:
            if r.code == RETENTION_EXPIRED:
                if r.study_instance_uid not in expired:
                    expired[r.study_instance_uid] = self._retention_over(r.study_instance_uid, day)
                if not expired[r.study_instance_uid]:
                    kept += 1
                    continue
            allowed.append(r.sop_instance_uid)
        purged = purge_rejected(self.index, allowed, self.originals)
        self._record(
            AuditEntry(
                action="D",
                event_type="iocm.purge",
                outcome="0",
                agent=by[:128],
                agent_type=agent_type,  # type: ignore[arg-type]
                resource="Rejections",
                correlation_id=correlation_id.get()[:32],
                outcome_desc=f"{purged.instances} instances purged"[:64],
                detail=AuditEntry.details(
                    {
                        "codes": wanted,
                        "study_instance_uid": study or "",
                        "instances": purged.instances,
                        "versions": purged.versions,
                        "originals": purged.originals,
                        "kept_for_retention": kept,
                    }
                ),
            )
        )
        return PurgeReport(purged, kept)

    # -- helpers ------------------------------------------------------------------

    def _retention_over(self, study: str, today: date) -> bool:
        from core.errors import RetentionError

        try:
            self.retention.check_delete("study", study, today)
        except RetentionError:
            return False
        return True

    def _check_retention(self, code: str, refs: Sequence[RejectedRef]) -> None:
        """113039 says the retention period ended: refuse it while it has not
        (dcm4chee-arc answers such a note with a failure too)."""
        if code != RETENTION_EXPIRED:
            return
        today = datetime.now(UTC).date()
        for study in sorted({r.study_instance_uid for r in refs}):
            self.retention.check_delete("study", study, today)

    def _audit_rejection(
        self,
        applied: Applied,
        code: str,
        *,
        agent: str,
        agent_type: str,
        note: RejectionNote | None,
    ) -> None:
        self._record(
            AuditEntry(
                action="U",
                event_type="iocm.reject",
                outcome="0",
                agent=agent[:128],
                agent_type=agent_type,  # type: ignore[arg-type]
                resource=(
                    f"Study/{applied.studies[0]}" if len(applied.studies) == 1 else "Studies"
                )[:256],
                correlation_id=correlation_id.get()[:32],
                outcome_desc=f"{code} {REJECTION_CODES[code]}"[:64],
                detail=AuditEntry.details(
                    {
                        "code": code,
                        "source": "kos" if note else "api",
                        "note_uid": note.sop_instance_uid if note else "",
                        "recorded": applied.recorded,
                        "hidden": applied.hidden,
                        "studies": list(applied.studies),
                    }
                ),
            )
        )

    def _record(self, entry: AuditEntry) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record(entry)
        except Exception:  # a side effect: log and carry on (STYLE.md §5)
            logger.error("IOCM audit entry not recorded", exc_info=True)
