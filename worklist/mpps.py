"""Modality Performed Procedure Step as a pure state machine (PS3.4 Annex F.7).

:func:`apply` is STYLE.md example D: it returns the step after an N-CREATE or N-SET,
or raises a :class:`~core.errors.ServiceError` whose DIMSE status the shell sends.
:func:`transition` also returns the *effects* of the change, the way distributed's
``WorkerState`` returns instructions; the shell saves the step and then hands the
effects to an :class:`~worklist.ports.EffectSink`.

States (PS3.4 Table F.1-3)::

    (none) --N-CREATE IN PROGRESS--> IN PROGRESS --N-SET COMPLETED----> COMPLETED
                                       |   ^                         (final)
                                       +---+ N-SET IN PROGRESS
                                       +------N-SET DISCONTINUED----> DISCONTINUED
                                                                     (final)
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, replace

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from core.errors import (
    DuplicateError,
    InvalidAttributeValueError,
    MissingAttributeError,
    NotFoundError,
    ProcedureStepStateError,
)
from worklist.model import SpsStatus

__all__ = [
    "NOT_ALLOWED_IN_SET",
    "Create",
    "Effect",
    "MppsRequest",
    "MppsStatus",
    "OrderStatusChanged",
    "ProcedureStep",
    "SeriesCompleted",
    "Set",
    "StepRef",
    "apply",
    "effects",
    "restore_step",
    "transition",
]

#: Error Comment PS3.4 Table F.7.2-2 prescribes for an N-SET on a final step.
NO_LONGER_UPDATABLE = "Performed Procedure Step Object may no longer be updated"
#: Error ID (0000,0903) that goes with it.
NO_LONGER_UPDATABLE_ID = 0xA710


class MppsStatus(enum.StrEnum):
    """Performed Procedure Step Status (0040,0252), PS3.3 C.4.14 Enumerated Values."""

    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


FINAL: frozenset[MppsStatus] = frozenset({MppsStatus.COMPLETED, MppsStatus.DISCONTINUED})

#: Attributes PS3.4 Table F.7.2-1 marks "Not allowed" in N-SET (top level). We accept
#: them when the value is unchanged, as modalities often resend the whole dataset.
NOT_ALLOWED_IN_SET: frozenset[int] = frozenset(
    int(Tag(keyword))
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "ScheduledStepAttributesSequence",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "ReferencedPatientSequence",
        "AdmissionID",
        "PerformedProcedureStepID",
        "PerformedStationAETitle",
        "PerformedStationName",
        "PerformedLocation",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "Modality",
        "StudyID",
    )
)


@dataclass(frozen=True, slots=True)
class Create:
    """An N-CREATE of the MPPS SOP Class (PS3.4 F.7.2.1)."""

    sop_instance_uid: str
    attributes: Dataset


@dataclass(frozen=True, slots=True)
class Set:
    """An N-SET of the MPPS SOP Class (PS3.4 F.7.2.2)."""

    sop_instance_uid: str
    modifications: Dataset


MppsRequest = Create | Set


@dataclass(frozen=True, slots=True)
class StepRef:
    """A scheduled step an MPPS reports on (an item of Scheduled Step Attributes Sequence)."""

    accession_number: str
    requested_procedure_id: str
    scheduled_procedure_step_id: str
    study_instance_uid: str


@dataclass(frozen=True, slots=True)
class OrderStatusChanged:
    """The scheduled step ``step`` moved to ``status`` (STARTED, COMPLETED, DISCONTINUED)."""

    mpps_uid: str
    step: StepRef
    status: SpsStatus


@dataclass(frozen=True, slots=True)
class SeriesCompleted:
    """The modality will add nothing more to these series (PS3.4 F.7.2.2.2)."""

    mpps_uid: str
    series_instance_uids: tuple[str, ...]


Effect = OrderStatusChanged | SeriesCompleted


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _status(ds: Dataset) -> MppsStatus:
    value = _text(ds, "PerformedProcedureStepStatus")
    if not value:
        raise MissingAttributeError("Performed Procedure Step Status missing")
    try:
        return MppsStatus(value)
    except ValueError:
        raise InvalidAttributeValueError("Performed Procedure Step Status invalid") from None


_TEXT_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})


def _materialize(ds: Dataset, non_ascii: list[bool]) -> Dataset:
    """Copy with every element converted (text decoded with its own character set)."""
    out = Dataset()
    for elem in ds:  # iterating converts raw elements with ds's Specific Character Set
        if elem.VR == "SQ":
            out.add_new(elem.tag, "SQ", [_materialize(item, non_ascii) for item in elem.value])
            continue
        if elem.VR in _TEXT_VRS and elem.value is not None:
            values = elem.value if isinstance(elem.value, list) else [elem.value]
            if not all(str(v).isascii() for v in values):
                non_ascii.append(True)
        out.add(copy.deepcopy(elem))
    return out


def _own_copy(ds: Dataset) -> Dataset:
    """A private, decoded copy; UTF-8 when any text is not ASCII (F.7.2.2.3)."""
    non_ascii: list[bool] = []
    out = _materialize(ds, non_ascii)
    if non_ascii:
        out.SpecificCharacterSet = "ISO_IR 192"
    elif "SpecificCharacterSet" in out:
        del out.SpecificCharacterSet
    return out


@dataclass(frozen=True, slots=True)
class ProcedureStep:
    """A Modality Performed Procedure Step SOP Instance.

    ``attributes`` is the full current attribute list (a private copy: do not
    mutate). ``version`` counts accepted N-CREATE/N-SETs, for compare-and-set saves.
    """

    sop_instance_uid: str
    status: MppsStatus
    attributes: Dataset
    version: int = 1

    @classmethod
    def in_progress(cls, req: Create) -> ProcedureStep:
        """The step an N-CREATE makes (PS3.4 F.7.2.1.3).

        Raises
        ------
        InvalidAttributeValueError
            Performed Procedure Step Status is not IN PROGRESS (0x0106).
        MissingAttributeError
            Performed Procedure Step Status is absent (0x0120).
        """
        status = _status(req.attributes)
        if status is not MppsStatus.IN_PROGRESS:
            raise InvalidAttributeValueError("N-CREATE status must be IN PROGRESS")
        return cls(req.sop_instance_uid, status, _own_copy(req.attributes))

    def updated(self, req: Set) -> ProcedureStep:
        """The step after an N-SET (PS3.4 F.7.2.2).

        Raises
        ------
        InvalidAttributeValueError
            The N-SET changes an attribute Table F.7.2-1 does not allow, or sets an
            unknown status (0x0106).
        MissingAttributeError
            The step would become final without the Final State attributes of Table
            F.7.2-1 (0x0120).
        """
        mods = _own_copy(req.modifications)
        merged = copy.deepcopy(self.attributes)
        for elem in mods:
            tag = int(elem.tag)
            if tag == 0x00080005:
                continue  # character set: decided once for the merged dataset below
            if tag in NOT_ALLOWED_IN_SET:
                if tag in merged and merged[tag].value == elem.value:
                    continue
                raise InvalidAttributeValueError(f"{elem.keyword} may not be changed by N-SET")
            merged[tag] = elem
        status = _status(merged) if "PerformedProcedureStepStatus" in mods else self.status
        if status in FINAL:
            _check_final_state(merged, status)
        merged = _own_copy(merged)
        return replace(self, status=status, attributes=merged, version=self.version + 1)

    @property
    def scheduled_steps(self) -> tuple[StepRef, ...]:
        """The scheduled steps this MPPS performs; unscheduled cases give none."""
        refs = []
        for item in self.attributes.get("ScheduledStepAttributesSequence") or []:
            ref = StepRef(
                accession_number=_text(item, "AccessionNumber"),
                requested_procedure_id=_text(item, "RequestedProcedureID"),
                scheduled_procedure_step_id=_text(item, "ScheduledProcedureStepID"),
                study_instance_uid=_text(item, "StudyInstanceUID"),
            )
            if ref.accession_number or ref.scheduled_procedure_step_id:
                refs.append(ref)
        return tuple(refs)

    @property
    def series_instance_uids(self) -> tuple[str, ...]:
        """Series listed in Performed Series Sequence (0040,0340)."""
        uids = (
            _text(s, "SeriesInstanceUID")
            for s in self.attributes.get("PerformedSeriesSequence") or []
        )
        return tuple(u for u in uids if u)


def _check_final_state(ds: Dataset, status: MppsStatus) -> None:
    """PS3.4 Table F.7.2-1 "Final State" column, for the attributes we rely on."""
    for keyword in ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime"):
        if not _text(ds, keyword):
            raise MissingAttributeError(f"{keyword} required before {status}")
    series = ds.get("PerformedSeriesSequence") or []
    if status is MppsStatus.COMPLETED and not series:
        raise MissingAttributeError("PerformedSeriesSequence required before COMPLETED")
    for item in series:
        if not _text(item, "SeriesInstanceUID"):
            raise MissingAttributeError("SeriesInstanceUID required in PerformedSeriesSequence")


def apply(step: ProcedureStep | None, req: MppsRequest) -> ProcedureStep:
    """Return the step after an N-CREATE or N-SET, or raise a ServiceError.

    Parameters
    ----------
    step : ProcedureStep or None
        The stored step with ``req.sop_instance_uid``, if any.
    req : Create or Set
        The request.

    Raises
    ------
    NotFoundError
        N-SET of an unknown SOP Instance (0x0112, PS3.7 10.1.3).
    DuplicateError
        N-CREATE of an existing SOP Instance (0x0111, PS3.7 10.1.5).
    ProcedureStepStateError
        N-SET after COMPLETED or DISCONTINUED (0x0110, PS3.4 F.7.2.2.3, Table F.7.2-2).
    InvalidAttributeValueError, MissingAttributeError
        See :meth:`ProcedureStep.in_progress` and :meth:`ProcedureStep.updated`.
    """
    match step, req:
        case None, Create():
            return ProcedureStep.in_progress(req)
        case None, Set():
            raise NotFoundError(f"no MPPS {req.sop_instance_uid}")
        case ProcedureStep(), Create():
            raise DuplicateError(f"MPPS {req.sop_instance_uid} exists")
        case ProcedureStep(status=MppsStatus.IN_PROGRESS), Set():
            return step.updated(req)
        case _:
            raise ProcedureStepStateError(NO_LONGER_UPDATABLE)


_SPS_STATUS = {
    MppsStatus.IN_PROGRESS: SpsStatus.STARTED,
    MppsStatus.COMPLETED: SpsStatus.COMPLETED,
    MppsStatus.DISCONTINUED: SpsStatus.DISCONTINUED,
}


def effects(before: ProcedureStep | None, after: ProcedureStep) -> tuple[Effect, ...]:
    """What a transition from ``before`` to ``after`` means for orders and series.

    * Creation: every referenced scheduled step is STARTED.
    * COMPLETED or DISCONTINUED: every referenced step takes that status, and the
      listed series are complete (no more instances, F.7.2.2.2).
    * An N-SET that stays IN PROGRESS changes nothing outside the step.
    """
    if before is not None and before.status == after.status:
        return ()
    out: list[Effect] = [
        OrderStatusChanged(after.sop_instance_uid, ref, _SPS_STATUS[after.status])
        for ref in after.scheduled_steps
    ]
    if after.status in FINAL and after.series_instance_uids:
        out.append(SeriesCompleted(after.sop_instance_uid, after.series_instance_uids))
    return tuple(out)


def transition(
    step: ProcedureStep | None, req: MppsRequest
) -> tuple[ProcedureStep, tuple[Effect, ...]]:
    """:func:`apply`, plus the :func:`effects` of the change."""
    after = apply(step, req)
    return after, effects(step, after)


def restore_step(
    sop_instance_uid: str, status: str, attributes: Dataset, version: int
) -> ProcedureStep:
    """Rebuild a stored step (what ``storage.index.orders.SqlMppsRepository`` is given).

    Raises
    ------
    ValueError
        ``status`` is not a Performed Procedure Step Status we store.
    """
    return ProcedureStep(sop_instance_uid, MppsStatus(status), attributes, version)
