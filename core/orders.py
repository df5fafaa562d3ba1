"""Orders and worklist items as values (pure; standard library only).

These were born in :mod:`worklist.model` and moved here so that the SQL order store
(``storage/index/orders.py``), the order intake service (``services/orders.py``), the
API and the worklist share one definition without importing each other
(STYLE.md §1: domain values live in ``core``). :mod:`worklist.model` re-exports them.

A :class:`WorklistItem` is one Requested Procedure of one order for one patient, with
one or more :class:`ScheduledProcedureStep` (PS3.3 C.4.10-C.4.12; PS3.4 K.6.1.2.2).
What the record system sends, before we schedule it, is a :class:`PlacedOrder`
(HL7 v2.5.1 chapter 4 ORC/OBR, or FHIR R4 ServiceRequest); what the index keeps is
an :class:`OrderRecord`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any

__all__ = [
    "CLOSED",
    "OFFERED",
    "Code",
    "Order",
    "OrderAction",
    "OrderRecord",
    "OrderStatus",
    "Patient",
    "PlacedOrder",
    "ScheduledProcedureStep",
    "SpsStatus",
    "WorklistItem",
    "derive_status",
    "item_from_json",
    "item_to_json",
    "with_steps",
]


class SpsStatus(enum.StrEnum):
    """Scheduled Procedure Step Status (0040,0020), PS3.3 C.4.10 Defined Terms we use."""

    SCHEDULED = "SCHEDULED"
    ARRIVED = "ARRIVED"
    STARTED = "STARTED"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


#: Steps a modality may still pick from the worklist.
OFFERED: frozenset[SpsStatus] = frozenset({SpsStatus.SCHEDULED, SpsStatus.ARRIVED})


@dataclass(frozen=True, slots=True)
class Code:
    """A coded entry (PS3.3 Table 8.8-1 Code Sequence Macro, basic attributes)."""

    value: str
    scheme: str
    meaning: str
    scheme_version: str = ""


@dataclass(frozen=True, slots=True)
class Patient:
    """Patient Identification, Demographic and Medical modules (PS3.3 C.2, C.2.3-5).

    ``name`` is the DICOM PN string (``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX``).
    """

    name: str
    id: str
    issuer: str = ""
    birth_date: date | None = None
    sex: str = ""
    weight_kg: float | None = None
    size_m: float | None = None
    medical_alerts: str = ""
    allergies: str = ""
    pregnancy_status: int | None = None  # (0010,21C0) US: 1 no, 2 possible, 3 yes, 4 unknown
    special_needs: str = ""
    patient_state: str = ""
    confidentiality: str = ""


@dataclass(frozen=True, slots=True)
class Order:
    """Imaging Service Request, Requested Procedure and Visit (PS3.3 C.4.11, C.4.12, C.3.2).

    ``version`` is ours, not DICOM's: it counts updates of the order so a store can
    refuse a stale write.
    """

    accession_number: str
    requested_procedure_id: str
    requested_procedure_description: str = ""
    requested_procedure_code: Code | None = None
    study_instance_uid: str = ""
    referring_physician: str = ""
    requesting_physician: str = ""
    admission_id: str = ""
    current_location: str = ""
    priority: str = ""  # (0040,1003): STAT, HIGH, ROUTINE, MEDIUM, LOW
    transport_arrangements: str = ""
    version: int = 1


@dataclass(frozen=True, slots=True)
class ScheduledProcedureStep:
    """One item of the Scheduled Procedure Step Sequence (PS3.3 C.4.10)."""

    step_id: str
    station_ae_title: str
    modality: str
    start: datetime
    description: str = ""
    station_name: str = ""
    location: str = ""
    performing_physician: str = ""
    protocol_codes: tuple[Code, ...] = ()
    status: SpsStatus = SpsStatus.SCHEDULED
    contrast_agent: str = ""
    pre_medication: str = ""
    comments: str = ""


@dataclass(frozen=True, slots=True)
class WorklistItem:
    """A Requested Procedure with its patient, order and scheduled steps."""

    patient: Patient
    order: Order
    steps: tuple[ScheduledProcedureStep, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a worklist item needs at least one scheduled procedure step")

    @property
    def key(self) -> tuple[str, str]:
        """Identity of the item: (Accession Number, Requested Procedure ID)."""
        return (self.order.accession_number, self.order.requested_procedure_id)

    def with_step_status(self, step_id: str, status: SpsStatus) -> WorklistItem:
        """Return a copy with step ``step_id`` set to ``status``."""
        steps = tuple(replace(s, status=status) if s.step_id == step_id else s for s in self.steps)
        return replace(self, steps=steps, order=replace(self.order, version=self.order.version + 1))


class OrderStatus(enum.StrEnum):
    """Where an order stands, as the record system sees it.

    Derived from its steps (:func:`derive_status`) except ``cancelled``, which only
    the placer sets (HL7 v2.5.1 ORC-1 ``CA``; FHIR R4 ``ServiceRequest.status =
    revoked``). FHIR R4 RequestStatus has no "in progress": the API renders
    ``in-progress`` as ``active`` plus an extension (see ``api/routes/fhir_orders.py``).
    """

    SCHEDULED = "scheduled"
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    DISCONTINUED = "discontinued"
    CANCELLED = "cancelled"


#: Statuses after which nothing but a new order changes the procedure.
CLOSED: frozenset[OrderStatus] = frozenset(
    {OrderStatus.COMPLETED, OrderStatus.DISCONTINUED, OrderStatus.CANCELLED}
)


class OrderAction(enum.StrEnum):
    """What the placer asks for (HL7 v2.5.1 Table 0119 Order Control Codes we accept)."""

    NEW = "NW"
    CHANGE = "XO"
    CANCEL = "CA"


@dataclass(frozen=True, slots=True)
class PlacedOrder:
    """An order as the record system sends it, before we schedule it.

    ``order.accession_number``, ``order.requested_procedure_id``,
    ``order.study_instance_uid`` and each step's ``step_id`` may be empty: the order
    service assigns them at scheduling (IHE RAD TF-2 4.4: the Department System
    Scheduler assigns Accession Number, Requested Procedure ID, Study Instance UID
    and Scheduled Procedure Step ID).

    Attributes
    ----------
    action : OrderAction
        New, change or cancel (ORC-1).
    placer_order_number : str
        The placer's identifier of the order (ORC-2 / OBR-2 entity identifier; FHIR
        ``ServiceRequest.identifier`` of type PLAC). Orders are keyed on it.
    patient, order, steps
        Demographics as ordered, the requested procedure and its steps.
    filler_order_number : str
        ORC-3 when the placer already knows ours.
    source : str
        ``hl7``, ``fhir`` or ``api``: where the order came from (kept with each version).
    """

    action: OrderAction
    placer_order_number: str
    patient: Patient
    order: Order
    steps: tuple[ScheduledProcedureStep, ...] = ()
    filler_order_number: str = ""
    source: str = ""


@dataclass(frozen=True, slots=True)
class OrderRecord:
    """An order as the index keeps it (the current version).

    Attributes
    ----------
    id : str
        Our public id (FHIR ``ServiceRequest.id``).
    item : WorklistItem
        Patient as ordered, requested procedure and scheduled steps, with every
        identifier assigned.
    status : OrderStatus
        See :class:`OrderStatus`.
    version : int
        Counts changes; each one is kept in the order's history.
    linked_study_uid : str
        Study Instance UID of received images linked to this order, if any.
    """

    id: str
    placer_order_number: str
    filler_order_number: str
    item: WorklistItem
    status: OrderStatus
    version: int
    source: str
    created_at: datetime
    updated_at: datetime
    linked_study_uid: str = ""

    @property
    def accession_number(self) -> str:
        return self.item.order.accession_number

    @property
    def study_instance_uid(self) -> str:
        return self.item.order.study_instance_uid


def derive_status(steps: Iterable[ScheduledProcedureStep]) -> OrderStatus:
    """The order status its steps imply (IHE RAD TF-2 4.7: MPPS drives order status).

    Any step started, or some steps done while others wait: ``in-progress``. All
    steps final with at least one completed: ``completed``; all discontinued:
    ``discontinued``. Otherwise ``scheduled``.
    """
    statuses = [s.status for s in steps]
    final = {SpsStatus.COMPLETED, SpsStatus.DISCONTINUED}
    if statuses and all(s in final for s in statuses):
        if SpsStatus.COMPLETED in statuses:
            return OrderStatus.COMPLETED
        return OrderStatus.DISCONTINUED
    if any(s in final or s is SpsStatus.STARTED for s in statuses):
        return OrderStatus.IN_PROGRESS
    return OrderStatus.SCHEDULED


# ------------------------------------------------------------------ JSON snapshots


def _code_json(code: Code | None) -> dict[str, str] | None:
    if code is None:
        return None
    return {
        "value": code.value,
        "scheme": code.scheme,
        "meaning": code.meaning,
        "scheme_version": code.scheme_version,
    }


def _code_from(d: Mapping[str, Any] | None) -> Code | None:
    if not d:
        return None
    return Code(d["value"], d["scheme"], d["meaning"], d.get("scheme_version", ""))


def item_to_json(item: WorklistItem) -> dict[str, Any]:
    """A JSON-ready snapshot of ``item`` (what each order version keeps)."""
    p, o = item.patient, item.order
    return {
        "patient": {
            "name": p.name,
            "id": p.id,
            "issuer": p.issuer,
            "birth_date": p.birth_date.isoformat() if p.birth_date else None,
            "sex": p.sex,
            "weight_kg": p.weight_kg,
            "size_m": p.size_m,
            "medical_alerts": p.medical_alerts,
            "allergies": p.allergies,
            "pregnancy_status": p.pregnancy_status,
            "special_needs": p.special_needs,
            "patient_state": p.patient_state,
            "confidentiality": p.confidentiality,
        },
        "order": {
            "accession_number": o.accession_number,
            "requested_procedure_id": o.requested_procedure_id,
            "requested_procedure_description": o.requested_procedure_description,
            "requested_procedure_code": _code_json(o.requested_procedure_code),
            "study_instance_uid": o.study_instance_uid,
            "referring_physician": o.referring_physician,
            "requesting_physician": o.requesting_physician,
            "admission_id": o.admission_id,
            "current_location": o.current_location,
            "priority": o.priority,
            "transport_arrangements": o.transport_arrangements,
            "version": o.version,
        },
        "steps": [
            {
                "step_id": s.step_id,
                "station_ae_title": s.station_ae_title,
                "modality": s.modality,
                "start": s.start.isoformat(),
                "description": s.description,
                "station_name": s.station_name,
                "location": s.location,
                "performing_physician": s.performing_physician,
                "protocol_codes": [_code_json(c) for c in s.protocol_codes],
                "status": str(s.status),
                "contrast_agent": s.contrast_agent,
                "pre_medication": s.pre_medication,
                "comments": s.comments,
            }
            for s in item.steps
        ],
    }


def item_from_json(d: Mapping[str, Any]) -> WorklistItem:
    """Inverse of :func:`item_to_json`."""
    p, o = dict(d["patient"]), dict(d["order"])
    birth = p.pop("birth_date", None)
    patient = Patient(birth_date=date.fromisoformat(birth) if birth else None, **p)
    code = _code_from(o.pop("requested_procedure_code", None))
    order = Order(requested_procedure_code=code, **o)
    steps = []
    for s in d["steps"]:
        s = dict(s)
        steps.append(
            ScheduledProcedureStep(
                start=datetime.fromisoformat(s.pop("start")),
                status=SpsStatus(s.pop("status")),
                protocol_codes=tuple(
                    c for c in (_code_from(x) for x in s.pop("protocol_codes", ())) if c
                ),
                **s,
            )
        )
    return WorklistItem(patient=patient, order=order, steps=tuple(steps))


def with_steps(item: WorklistItem, steps: Iterable[ScheduledProcedureStep]) -> WorklistItem:
    """``item`` with its steps replaced (order version untouched: the store counts)."""
    return replace(item, steps=tuple(steps))
