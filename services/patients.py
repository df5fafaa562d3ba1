"""Patient identity from the record system (IHE PIR; issue 17): the application layer.

:class:`PatientIdentityService` implements :class:`core.patients.PatientIdentity`.
Each command (HL7 v2.5.1 ADT A01/A04/A08 update, A40 merge, A47 identifier change,
FHIR ``Patient`` update and ``$merge``) is applied to every store of the index in
one transaction (:class:`storage.index.patients.SqlPatientStore`): patient and study
rows, name search words, orders and their worklist items, lab results and reports.
Each change is kept with the before/after values of every row it touched, so that
``undo`` restores the former state exactly, and is written to the hash-chained action
log with keyed patient references only (never a name or an identifier).

Coercion on the way out (PS3.4 C.4.2.1.4.1 / IHE PIR "the Image Manager shall
return the updated demographics"): the stored originals are never rewritten; every
read path asks :func:`current_patient_attributes` for the study's patient as the
index holds it now and applies :func:`core.coercion.coerce_patient_module` (or
:func:`core.coercion.coerce_patient_json` for WADO-RS ``/metadata``).
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom import dcmread

from core.audit import AuditEntry, patient_key
from core.coercion import PatientAttributes, coerce_patient_module, json_differences
from core.errors import InvalidQueryError
from core.logging import correlation_id
from core.patients import (
    ChangePatientIdentifier,
    Demographics,
    MergePatients,
    PatientChange,
    PatientCommand,
    PatientRef,
    UpdatePatient,
)
from storage.index.patients import PatientRow, SqlPatientStore, StoredChange

if TYPE_CHECKING:
    from storage.audit import AuditLog
    from storage.index.sql import SqlIndex

__all__ = [
    "PatientIdentityService",
    "PatientLinks",
    "coerced_part10",
    "current_patient_attributes",
]

logger = logging.getLogger(__name__)

_MAX_ID = 64  # LO (PS3.5 Table 6.2-1): Patient ID and Issuer of Patient ID
_MAX_PN = 324
_SEXES = frozenset({"", "M", "F", "O"})


def _attributes(row: PatientRow) -> PatientAttributes:
    # An empty Patient ID is indexed under a per-study pseudo issuer (storage.index.sql).
    issuer = "" if row.issuer.startswith("study:") else row.issuer
    return PatientAttributes(row.name, row.patient_id, issuer, row.birth_date, row.sex)


def current_patient_attributes(
    index: SqlIndex, study_instance_uid: str
) -> PatientAttributes | None:
    """The Patient module values a study's instances carry now (after updates and
    merges), from the index; ``None`` for a study the index does not hold.

    Every read path (WADO-RS retrieve and ``/metadata``, C-MOVE/C-GET, export) passes
    this to :func:`core.coercion.coerce_patient_module`.
    """
    row = SqlPatientStore(index).study_patient(study_instance_uid)
    return None if row is None else _attributes(row)


def coerced_part10(
    source: Path | bytes, current: PatientAttributes, *, metadata: str = ""
) -> bytes | None:
    """The Part-10 bytes of ``source`` (a stored original's path, or bytes already
    transcoded) with ``current``'s Patient module, or None when it carries those
    values already (send the original as it is, bit for bit).

    ``metadata``: the instance's DICOM JSON from the index, when there is one, so an
    unchanged instance is recognised without opening its file.
    """
    if metadata and metadata != "{}":
        differences = json_differences(metadata, current)
        if differences == []:
            return None
    fp: BinaryIO = source.open("rb") if isinstance(source, Path) else io.BytesIO(source)
    with fp:
        ds = dcmread(fp)
    if not coerce_patient_module(ds, current):
        return None
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass(frozen=True, slots=True)
class PatientLinks:
    """FHIR ``Patient.link`` of one patient row: merged into / merged from."""

    replaced_by: int | None
    replaces: tuple[int, ...]


def _check_ref(ref: PatientRef) -> None:
    for value in (ref.patient_id, ref.issuer):
        if len(value) > _MAX_ID or any(c in value for c in "\\\x00\r\n"):
            raise InvalidQueryError("a Patient ID or issuer is not a DICOM LO value")
    if not ref.patient_id.strip():
        raise InvalidQueryError("the patient has no identifier")


def _check_demographics(d: Demographics) -> dict[str, str | None]:
    if d.name is not None and (len(d.name) > _MAX_PN or any(c in d.name for c in "\\\x00\r\n")):
        raise InvalidQueryError("the name is not a DICOM PN value")
    if (
        d.birth_date is not None
        and d.birth_date
        and not (len(d.birth_date) == 8 and d.birth_date.isdigit())
    ):
        raise InvalidQueryError("the birth date is not a DICOM DA value (YYYYMMDD)")
    sex = None if d.sex is None else d.sex.strip().upper()
    if sex is not None and sex not in _SEXES:
        raise InvalidQueryError("sex is M, F, O or empty")
    return {"name": d.name, "birth_date": d.birth_date, "sex": sex}


class PatientIdentityService:
    """:class:`core.patients.PatientIdentity` over the SQL index.

    Parameters
    ----------
    index
        The index whose tables (and write queue) the changes use.
    audit, patient_secret
        The action log and the key of its patient references (``core.audit.patient_key``).
    default_issuer
        The hospital's assigning authority (``lab.patient_issuer``): what an empty
        issuer in a command means. Rows indexed without an issuer (images whose
        Issuer of Patient ID is absent) are matched too.
    """

    def __init__(
        self,
        index: SqlIndex,
        *,
        audit: AuditLog | None = None,
        patient_secret: bytes = b"",
        default_issuer: str = "",
    ) -> None:
        self.store = SqlPatientStore(index)
        self.audit = audit
        self.patient_secret = patient_secret
        self.default_issuer = default_issuer

    # -- the protocol ---------------------------------------------------------------

    def apply(
        self,
        command: PatientCommand,
        *,
        source: str,
        agent: str,
        expected_version: int | None = None,
    ) -> PatientChange:
        """Apply ``command`` to every store, record and audit it (see module doc).

        ``expected_version`` (FHIR ``If-Match``, updates and identifier changes only):
        the patient's :meth:`version` the caller read; another one is refused with
        :class:`~core.errors.PreconditionFailedError` (412), in the change's own
        transaction.
        """
        change_id = uuid.uuid4().hex
        if isinstance(command, UpdatePatient):
            _check_ref(command.patient)
            demo = _check_demographics(command.demographics)
            stored, row = self.store.update(
                change_id,
                command.patient.patient_id,
                self._issuers(command.patient),
                demo,
                source=source,
                agent=agent,
                expected_version=expected_version,
            )
            keys = {"patient": self._key(row.patient_id, row.issuer)}
            before, after = keys, keys
        elif isinstance(command, MergePatients):
            _check_ref(command.surviving)
            _check_ref(command.obsolete)
            demo_m = (
                None if command.demographics is None else _check_demographics(command.demographics)
            )
            stored, keep, old = self.store.merge(
                change_id,
                (command.surviving.patient_id, self._issuers(command.surviving)),
                (command.obsolete.patient_id, self._issuers(command.obsolete)),
                demo_m,
                source=source,
                agent=agent,
            )
            old_key = self._key(command.obsolete.patient_id, old.issuer if old else "")
            before = {"obsolete": old_key, "surviving": self._key(keep.patient_id, keep.issuer)}
            after = {"patient": before["surviving"], "replaces": old_key}
            row = keep
        elif isinstance(command, ChangePatientIdentifier):
            _check_ref(command.old)
            _check_ref(command.new)
            stored, row = self.store.change_identifier(
                change_id,
                (command.old.patient_id, self._issuers(command.old)),
                (command.new.patient_id, self._issuers(command.new)),
                new_issuer=command.new.issuer or None,
                source=source,
                agent=agent,
                expected_version=expected_version,
            )
            before = {"patient": self._key(command.old.patient_id, self._old_issuer(stored))}
            after = {"patient": self._key(row.patient_id, row.issuer)}
        else:  # pragma: no cover - the union is closed
            raise InvalidQueryError("unknown patient command")
        self._audit(stored, before, after, main=after.get("patient", ""))
        return _change(stored)

    def undo(self, change_id: str, *, source: str, agent: str) -> PatientChange:
        """Restore what ``change_id`` changed (409 when a later change touched the
        same rows: undo that one first)."""
        if not change_id or len(change_id) > 32 or not change_id.isalnum():
            raise InvalidQueryError("not a change id")
        stored = self.store.undo(change_id, uuid.uuid4().hex, source=source, agent=agent)
        keys = [
            self._key(p.patient_id, p.issuer)
            for p in (self.store.patient(pk) for pk in stored.patient_pks)
            if p is not None
        ]
        self._audit(stored, {"change": change_id}, {"patients": keys}, main=keys[0] if keys else "")
        return _change(stored)

    # -- review -----------------------------------------------------------------------

    def changes(
        self, *, patient_pk: int | None = None, limit: int = 100, offset: int = 0
    ) -> list[StoredChange]:
        return self.store.changes(patient_pk=patient_pk, limit=limit, offset=offset)

    def change(self, change_id: str) -> StoredChange:
        return self.store.change(change_id)

    def links(self, patient_pk: int) -> PatientLinks:
        up, down = self.store.links(patient_pk)
        return PatientLinks(up, tuple(down))

    def link_states(self, patient_pks: Sequence[int]) -> dict[int, tuple[PatientLinks, int]]:
        """:meth:`links` and :meth:`version` of many patients at once (a search page)."""
        return {
            pk: (PatientLinks(up, tuple(down)), version)
            for pk, (up, down, version) in self.store.link_states(patient_pks).items()
        }

    def patient(self, patient_pk: int) -> PatientRow | None:
        return self.store.patient(patient_pk)

    def version(self, patient_pk: int) -> int:
        """The FHIR ``meta.versionId`` of a patient (1 + the changes that involved it)."""
        return self.store.version(patient_pk)

    def find(self, ref: PatientRef) -> PatientRow | None:
        """The patient row ``ref`` names (an empty issuer: the hospital's, or none)."""
        return self.store.find(ref.patient_id, self._issuers(ref))

    # -- helpers ------------------------------------------------------------------------

    def _issuers(self, ref: PatientRef) -> list[str]:
        """Issuers ``ref`` may be indexed under, the one to create with first."""
        if ref.issuer:
            return [ref.issuer]
        return list(dict.fromkeys([self.default_issuer, ""]))

    @staticmethod
    def _old_issuer(stored: StoredChange) -> str:
        for _, before, _after in stored.rows.get("rows", {}).get("patients", []):
            if "issuer" in before:
                return str(before["issuer"])
        return ""

    def _key(self, patient_id: str, issuer: str) -> str:
        return patient_key(self.patient_secret, patient_id, issuer) if self.patient_secret else ""

    def _audit(
        self, stored: StoredChange, before: dict[str, Any], after: dict[str, Any], *, main: Any
    ) -> None:
        """One action-log entry: keyed references and counts, never names or IDs
        (PS3.15 A.5.3.10 Patient Record, "U"). A side effect: logs and carries on."""
        if self.audit is None:
            return
        try:
            self.audit.record(
                AuditEntry(
                    action="U",
                    event_type=f"patient.{stored.kind}",
                    outcome="0",
                    agent=stored.agent[:128] or stored.source,
                    agent_type="system" if stored.source.startswith("hl7") else "user",
                    source=stored.source[:64],
                    resource=f"PatientChange/{stored.change_id}",
                    patient_key=str(main or ""),
                    correlation_id=correlation_id.get()[:32],
                    detail=AuditEntry.details(
                        {
                            "change": stored.change_id,
                            "undoes": stored.undoes,
                            "before": before,
                            "after": after,
                            **{k: v for k, v in stored.summary.items()},
                        }
                    ),
                )
            )
        except Exception:
            logger.error("patient change not recorded in the action log", exc_info=True)
        logger.info(
            "patient change %s (%s): %s studies, %s orders, %s lab results",
            stored.change_id,
            stored.kind,
            stored.summary.get("studies"),
            stored.summary.get("orders"),
            stored.summary.get("lab_results"),
        )


def _change(stored: StoredChange) -> PatientChange:
    return PatientChange(
        change_id=stored.change_id,
        kind=stored.kind,
        studies=int(stored.summary.get("studies", 0)),
        orders=int(stored.summary.get("orders", 0)),
        worklist_items=int(stored.summary.get("orders", 0)),
        lab_results=int(stored.summary.get("lab_results", 0)),
    )
