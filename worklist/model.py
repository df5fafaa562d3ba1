"""Worklist items as values, and their Modality Worklist attributes (PS3.4 K.6.1.2.2).

A :class:`WorklistItem` is one Requested Procedure of one order for one patient, with
one or more :class:`ScheduledProcedureStep`. Each step is one *worklist entry*: a
C-FIND response carries exactly one step in its Scheduled Procedure Step Sequence
(PS3.4 Table K.6-1, remark on (0040,0100)).

Which attribute comes from which field is written once, in the tables of
:mod:`worklist._attributes`; :func:`to_dataset` and the matcher in
:mod:`worklist.query` both read those tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import date, datetime

from pydicom.dataset import Dataset

# The values themselves live in core (shared with storage and api); re-exported here.
from core.orders import (
    OFFERED,
    Code,
    Order,
    Patient,
    ScheduledProcedureStep,
    SpsStatus,
    WorklistItem,
)

__all__ = [
    "OFFERED",
    "Code",
    "Order",
    "Patient",
    "ScheduledProcedureStep",
    "SpsStatus",
    "WorklistItem",
    "from_dataset",
    "iter_entries",
    "make_item",
    "to_dataset",
]


def to_dataset(item: WorklistItem, sps: ScheduledProcedureStep) -> Dataset:
    """Return every Modality Worklist attribute of one worklist entry.

    Parameters
    ----------
    item : WorklistItem
        The requested procedure.
    sps : ScheduledProcedureStep
        The step of ``item`` this entry is about; the Scheduled Procedure Step
        Sequence holds it as its single item (PS3.4 Table K.6-1).

    Returns
    -------
    pydicom.dataset.Dataset
        The attributes of PS3.4 Table K.6-1 we keep, with their VRs; Type 2
        attributes without a value are present and empty. Specific Character Set is
        ``ISO_IR 192`` when any value is not ASCII. The dataset has no file meta:
        it is a C-FIND identifier, or the body of a DCMTK ``.wl`` file.
    """
    from worklist._attributes import full_dataset

    return full_dataset(item, sps)


def from_dataset(ds: Dataset) -> WorklistItem:
    """Build a :class:`WorklistItem` from a full worklist dataset (inverse of :func:`to_dataset`).

    Each item of the Scheduled Procedure Step Sequence becomes one step, so a
    dataset carrying several steps (as some RIS exports do) is accepted.
    """

    def text(d: Dataset, keyword: str) -> str:
        value = d.get(keyword, "")
        return "" if value is None else str(value)

    def code(d: Dataset) -> Code:
        return Code(
            text(d, "CodeValue"),
            text(d, "CodingSchemeDesignator"),
            text(d, "CodeMeaning"),
            text(d, "CodingSchemeVersion"),
        )

    def day(value: str) -> date | None:
        return datetime.strptime(value, "%Y%m%d").date() if value else None

    def number(d: Dataset, keyword: str) -> float | None:
        value = d.get(keyword)
        return None if value in (None, "") else float(value)

    patient = Patient(
        name=text(ds, "PatientName"),
        id=text(ds, "PatientID"),
        issuer=text(ds, "IssuerOfPatientID"),
        birth_date=day(text(ds, "PatientBirthDate")),
        sex=text(ds, "PatientSex"),
        weight_kg=number(ds, "PatientWeight"),
        size_m=number(ds, "PatientSize"),
        medical_alerts=text(ds, "MedicalAlerts"),
        allergies=text(ds, "Allergies"),
        pregnancy_status=None if ds.get("PregnancyStatus") is None else int(ds.PregnancyStatus),
        special_needs=text(ds, "SpecialNeeds"),
        patient_state=text(ds, "PatientState"),
        confidentiality=text(ds, "ConfidentialityConstraintOnPatientDataDescription"),
    )
    codes = list(ds.get("RequestedProcedureCodeSequence") or [])
    order = Order(
        accession_number=text(ds, "AccessionNumber"),
        requested_procedure_id=text(ds, "RequestedProcedureID"),
        requested_procedure_description=text(ds, "RequestedProcedureDescription"),
        requested_procedure_code=code(codes[0]) if codes else None,
        study_instance_uid=text(ds, "StudyInstanceUID"),
        referring_physician=text(ds, "ReferringPhysicianName"),
        requesting_physician=text(ds, "RequestingPhysician"),
        admission_id=text(ds, "AdmissionID"),
        current_location=text(ds, "CurrentPatientLocation"),
        priority=text(ds, "RequestedProcedurePriority"),
        transport_arrangements=text(ds, "PatientTransportArrangements"),
    )
    steps = []
    for s in ds.get("ScheduledProcedureStepSequence") or []:
        start_time = text(s, "ScheduledProcedureStepStartTime").replace(":", "") or "000000"
        start_time = (start_time.split(".")[0] + "000000")[:6]
        steps.append(
            ScheduledProcedureStep(
                step_id=text(s, "ScheduledProcedureStepID"),
                station_ae_title=text(s, "ScheduledStationAETitle"),
                modality=text(s, "Modality"),
                start=datetime.strptime(
                    text(s, "ScheduledProcedureStepStartDate") + start_time, "%Y%m%d%H%M%S"
                ),
                description=text(s, "ScheduledProcedureStepDescription"),
                station_name=text(s, "ScheduledStationName"),
                location=text(s, "ScheduledProcedureStepLocation"),
                performing_physician=text(s, "ScheduledPerformingPhysicianName"),
                protocol_codes=tuple(code(c) for c in s.get("ScheduledProtocolCodeSequence") or []),
                status=SpsStatus(text(s, "ScheduledProcedureStepStatus") or "SCHEDULED"),
                contrast_agent=text(s, "RequestedContrastAgent"),
                pre_medication=text(s, "PreMedication"),
                comments=text(s, "CommentsOnTheScheduledProcedureStep"),
            )
        )
    return WorklistItem(patient=patient, order=order, steps=tuple(steps))


def make_item(
    accession_number: str,
    *,
    patient_name: str = "DOE^JANE",
    patient_id: str | None = None,
    steps: Sequence[ScheduledProcedureStep] | None = None,
    station_ae_title: str = "CT1",
    modality: str = "CT",
    start: datetime | None = None,
    study_instance_uid: str | None = None,
    **order_fields: object,
) -> WorklistItem:
    """Build a complete :class:`WorklistItem` for tests and fixtures.

    Unspecified values are derived from ``accession_number`` so that items stay
    distinct: patient id ``P<accession>``, requested procedure id ``RP<accession>``,
    one step ``SPS<accession>`` and a Study Instance UID under the DICOM example root.
    """
    digits = str(int("".join(ch for ch in accession_number if "0" <= ch <= "9") or "0"))
    if steps is None:
        steps = [
            ScheduledProcedureStep(
                step_id=f"SPS{accession_number}",
                station_ae_title=station_ae_title,
                modality=modality,
                start=start or datetime(2026, 11, 25, 9, 0),
                description=f"{modality} examination",
                station_name=f"{station_ae_title} room",
                protocol_codes=(Code(f"{modality}P1", "99PACSLAB", f"{modality} protocol"),),
            )
        ]
    order = Order(
        accession_number=accession_number,
        requested_procedure_id=f"RP{accession_number}",
        requested_procedure_description=f"{modality} procedure",
        requested_procedure_code=Code(f"{modality}RP", "99PACSLAB", f"{modality} procedure"),
        study_instance_uid=study_instance_uid or f"1.2.826.0.1.3680043.10.1234.{digits}",
        referring_physician="REFERRER^ROBERT",
        priority="ROUTINE",
    )
    if order_fields:
        order = replace(order, **order_fields)  # type: ignore[arg-type]
    patient = Patient(
        name=patient_name,
        id=patient_id or f"P{accession_number}",
        issuer="HOSP",
        birth_date=date(1980, 1, 2),
        sex="F",
    )
    return WorklistItem(patient=patient, order=order, steps=tuple(steps))


def iter_entries(
    items: Iterable[WorklistItem],
) -> Iterable[tuple[WorklistItem, ScheduledProcedureStep]]:
    """Yield every (item, step) pair: the worklist entries of PS3.4 K.6.1.2.1."""
    for item in items:
        for sps in item.steps:
            yield item, sps
