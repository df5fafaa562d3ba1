"""MPPS request builders shared by the MPPS tests."""

from __future__ import annotations

from pydicom.dataset import Dataset

from worklist.mpps import Create, Set, StepRef

UID = "1.2.826.0.1.3680043.10.1234.99.1"
REF = StepRef("A1", "RPA1", "SPSA1", "1.2.826.0.1.3680043.10.1234.1")


def n_create(status: str = "IN PROGRESS") -> Create:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PerformedProcedureStepStatus = status
    ds.PatientName = "NGUYỄN^VĂN AN"
    ds.PatientID = "PA1"
    ds.Modality = "CT"
    ds.PerformedStationAETitle = "CT1"
    ds.PerformedProcedureStepStartDate = "20261125"
    ds.PerformedProcedureStepStartTime = "090500"
    ssa = Dataset()
    ssa.AccessionNumber = REF.accession_number
    ssa.RequestedProcedureID = REF.requested_procedure_id
    ssa.ScheduledProcedureStepID = REF.scheduled_procedure_step_id
    ssa.StudyInstanceUID = REF.study_instance_uid
    ds.ScheduledStepAttributesSequence = [ssa]
    ds.PerformedSeriesSequence = []
    return Create(UID, ds)


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
