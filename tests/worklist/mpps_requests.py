"""MPPS request builders shared by the MPPS tests."""

from __future__ import annotations

from pydicom.dataset import Dataset

from worklist.mpps import Create, Set, StepRef

UID = "1.2.826.0.1.3680043.10.1234.99.1"
REF = StepRef("A1", "RPA1", "SPSA1", "1.2.826.0.1.3680043.10.1234.1")


def create_dataset(
    ref: StepRef,
    *,
    patient_name: object,
    patient_id: object,
    status: str = "IN PROGRESS",
    start_time: str = "090500",
) -> Dataset:
    """An MPPS N-CREATE attribute list on CT1 reporting on the scheduled step ``ref``
    (PS3.4 F.7.2.1)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PerformedProcedureStepStatus = status
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.Modality = "CT"
    ds.PerformedStationAETitle = "CT1"
    ds.PerformedProcedureStepStartDate = "20261125"
    ds.PerformedProcedureStepStartTime = start_time
    ssa = Dataset()
    ssa.AccessionNumber = ref.accession_number
    ssa.RequestedProcedureID = ref.requested_procedure_id
    ssa.ScheduledProcedureStepID = ref.scheduled_procedure_step_id
    ssa.StudyInstanceUID = ref.study_instance_uid
    ds.ScheduledStepAttributesSequence = [ssa]
    ds.PerformedSeriesSequence = []
    return ds


def n_create(status: str = "IN PROGRESS") -> Create:
    return Create(
        UID, create_dataset(REF, patient_name="NGUYỄN^VĂN AN", patient_id="PA1", status=status)
    )


def n_set(
    status: str | None = "COMPLETED", *, series: int = 1, end: bool = True, **extra: object
) -> Set:
    ds = Dataset()
    if status is not None:
        ds.PerformedProcedureStepStatus = status
    if end:
        ds.PerformedProcedureStepEndDate = "20261125"
        ds.PerformedProcedureStepEndTime = "093000"
    items = []
    for n in range(series):
        s = Dataset()
        s.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.1234.99.2.{n}"
        s.ProtocolName = "CHEST"
        s.ReferencedImageSequence = []
        items.append(s)
    ds.PerformedSeriesSequence = items
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return Set(UID, ds)
