"""Patient identity changes as values (IHE PIR; pure, standard library only).

The record system tells us who a patient is and when two records are one person:
HL7 v2.5.1 chapter 3 ADT (A01 admit, A04 register and A08 update demographics; A40
merge patient, identifier list; A47 change patient identifier list) over MLLP or the
order inbox, or FHIR R4 ``Patient`` update and the ``$merge`` operation. Each edge
turns its message into one :data:`PatientCommand`; the application layer
(:class:`PatientIdentity`, implemented in ``services/patients.py``) applies it to
every store (indexed patients and studies, worklist items, orders, lab results),
audits it with before/after, and can undo a merge.

This module is the contract between the edges and that service: edges import only
these values and the protocol, never the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ChangePatientIdentifier",
    "Demographics",
    "MergePatients",
    "PatientChange",
    "PatientCommand",
    "PatientIdentity",
    "PatientRef",
    "UpdatePatient",
]


@dataclass(frozen=True, slots=True)
class PatientRef:
    """A patient identifier within its assigning authority (PID-3.1 / PID-3.4;
    DICOM Patient ID (0010,0020) and Issuer of Patient ID (0010,0021)).

    An empty ``issuer`` means the hospital's default issuer: the service resolves it
    from its settings, the edges pass what the message said.
    """

    patient_id: str
    issuer: str = ""


@dataclass(frozen=True, slots=True)
class Demographics:
    """What a demographics update carries, already in DICOM form.

    ``name`` is a DICOM PN (``Family^Given^Middle^Prefix^Suffix``, PS3.5 6.2),
    ``birth_date`` a DA (``YYYYMMDD``), ``sex`` a CS (``M``, ``F``, ``O`` or empty;
    PS3.3 C.7.1.1). ``None`` means "not sent, keep what we hold"; an empty string
    means "sent empty" (HL7 ``""`` deletes, v2.5.1 2.5.3).
    """

    name: str | None = None
    birth_date: str | None = None
    sex: str | None = None


@dataclass(frozen=True, slots=True)
class UpdatePatient:
    """A01/A04/A08 or FHIR ``Patient`` update: set this patient's demographics."""

    patient: PatientRef
    demographics: Demographics


@dataclass(frozen=True, slots=True)
class MergePatients:
    """A40 (MRG-1 → PID-3) or FHIR ``$merge``: ``obsolete`` becomes ``surviving``.

    ``demographics`` are the surviving patient's, when the message carried them.
    """

    surviving: PatientRef
    obsolete: PatientRef
    demographics: Demographics | None = None


@dataclass(frozen=True, slots=True)
class ChangePatientIdentifier:
    """A47 (MRG-1 → PID-3): the same patient, known from now on as ``new``."""

    old: PatientRef
    new: PatientRef


PatientCommand = UpdatePatient | MergePatients | ChangePatientIdentifier


@dataclass(frozen=True, slots=True)
class PatientChange:
    """What one applied command did; ``change_id`` names it for review and undo."""

    change_id: str
    kind: str  # "update" | "merge" | "change-identifier" | "undo"
    studies: int = 0
    orders: int = 0
    worklist_items: int = 0
    lab_results: int = 0


class PatientIdentity(Protocol):
    """The patient identity service as the edges see it.

    ``source`` says where the command came from (``"hl7-mllp"``, ``"hl7-inbox"``,
    ``"fhir"``, ``"api"``), ``agent`` who sent it (MSH-3 sending application, a user
    or API key id): both go into the audit entry, never a name or an identifier.
    Raises :class:`core.errors.NotFoundError` for an unknown patient where the
    command needs one, :class:`core.errors.InvalidQueryError` for a command that
    makes no sense (merging a patient into itself), :class:`core.errors.DuplicateError`
    for an identifier change onto an identifier another patient holds (HL7 Table 0357
    205 "duplicate key identifier": that is a merge).
    """

    def apply(self, command: PatientCommand, *, source: str, agent: str) -> PatientChange: ...

    def undo(self, change_id: str, *, source: str, agent: str) -> PatientChange: ...
