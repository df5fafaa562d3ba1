"""Order-related processing steps: reconciliation keys and webhook notices (pure parts).

Reconciliation runs in the ``instance`` job, after the C-STORE was acknowledged
(never in its critical path): :func:`order_keys` reads what the modality copied
from the worklist (PS3.4 K.6.1.2.3; IHE RAD TF-2 4.8.4.1.3 Request Attributes
Sequence), and ``services.orders.OrderService.reconcile`` links the study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from core.orders import OrderRecord, OrderStatus

__all__ = ["OrderKeys", "order_keys", "status_notice"]

_FHIR_STATUS = {
    OrderStatus.SCHEDULED: "active",
    OrderStatus.IN_PROGRESS: "active",
    OrderStatus.COMPLETED: "completed",
    OrderStatus.DISCONTINUED: "revoked",
    OrderStatus.CANCELLED: "revoked",
}


@dataclass(frozen=True, slots=True)
class OrderKeys:
    """What links an instance to its order."""

    study_instance_uid: str
    accession_number: str
    requested_procedure_id: str


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def order_keys(ds: Dataset) -> OrderKeys:
    """Study Instance UID, Accession Number and Requested Procedure ID of an instance.

    The Requested Procedure ID is in the Request Attributes Sequence (0040,0275)
    of the series (PS3.3 C.7.3.1); the first item that has one wins.
    """
    procedure = ""
    for item in ds.get("RequestAttributesSequence") or []:
        procedure = _text(item, "RequestedProcedureID")
        if procedure:
            break
    accession = _text(ds, "AccessionNumber")
    if not accession:
        for item in ds.get("RequestAttributesSequence") or []:
            accession = _text(item, "AccessionNumber")
            if accession:
                break
    return OrderKeys(_text(ds, "StudyInstanceUID"), accession, procedure)


def status_notice(rec: OrderRecord, event: str) -> dict[str, Any]:
    """The small JSON a webhook receives for one order version (no patient data)."""
    return {
        "resourceType": "ServiceRequest",
        "id": rec.id,
        "versionId": str(rec.version),
        "event": event,
        "status": _FHIR_STATUS[rec.status],
        "procedureStatus": str(rec.status),
        "accessionNumber": rec.accession_number,
        "studyInstanceUid": rec.study_instance_uid,
        "imagingStudyUid": rec.linked_study_uid or None,
        "lastUpdated": rec.updated_at.isoformat(),
    }
