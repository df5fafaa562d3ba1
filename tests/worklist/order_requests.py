"""Order and worklist request builders shared by the order, audit and load tests."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset

from core.orders import derive_status
from storage.index.orders import SqlOrderStore
from worklist.model import WorklistItem

START = datetime(2026, 11, 25, 9, 30)
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def service_request(
    placer: str,
    family: str = "NGUYỄN",
    *,
    patient_id: str | None = None,
    modality: str = "CT",
    station: str = "CT1",
) -> dict[str, Any]:
    """A FHIR R4 ServiceRequest with its Patient contained, as the record system places one."""
    return {
        "resourceType": "ServiceRequest",
        "contained": [
            {
                "resourceType": "Patient",
                "id": "p",
                "identifier": [
                    {"system": "urn:oid:1.2.3.4", "value": patient_id or f"PID-{placer}"}
                ],
                "name": [{"family": family, "given": ["VĂN AN"]}],
                "gender": "male",
                "birthDate": "1980-01-02",
            }
        ],
        "identifier": [
            {"type": {"coding": [{"system": V2_0203, "code": "PLAC"}]}, "value": placer}
        ],
        "status": "active",
        "intent": "order",
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]
        },
        "orderDetail": [
            {"coding": [{"system": DCM, "code": modality}]}
        ],
        "locationCode": [{"coding": [{"system": "urn:pacslab:ae-title", "code": station}]}],
        "subject": {"reference": "#p"},
        "occurrenceDateTime": START.astimezone().isoformat(),
    }


def mwl_query(**top: str) -> Dataset:
    """A Modality Worklist query for station CT1 on 2026-11-25, returning the usual keys."""
    q = Dataset()
    q.SpecificCharacterSet = "ISO_IR 192"
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "RequestedProcedureID",
        "StudyInstanceUID",
    ):
        setattr(q, keyword, top.get(keyword, ""))
    sps = Dataset()
    sps.ScheduledStationAETitle = "CT1"
    sps.ScheduledProcedureStepStartDate = "20261125"
    for keyword in ("ScheduledProcedureStepStartTime", "Modality", "ScheduledProcedureStepID"):
        setattr(sps, keyword, "")
    q.ScheduledProcedureStepSequence = [sps]
    return q


def place_items(store: SqlOrderStore, items: Iterable[WorklistItem], *, source: str) -> None:
    """Store worklist items as orders ``order-<n>`` / placer ``PL<n>``, as given."""
    for n, item in enumerate(items):
        store.create(
            public_id=f"order-{n}",
            placer=f"PL{n}",
            filler="",
            source=source,
            build=lambda _pk, item=item: item,
            status=lambda it: derive_status(it.steps),
        )
