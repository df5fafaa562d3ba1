"""Order intake and order life cycle over the index: one service for every entry point.

HL7 v2 (``worklist/orders``), FHIR R4 (``api/routes/fhir_orders.py``), MPPS
(``worklist/scp.py`` effects) and the processing worker (reconciliation) all change
orders. Those edges never import each other (STYLE.md §1), so the one service they
share is a use case of the application layer, built once by the composition root
(``pacslab.wiring.build_order_service``) and handed to each edge.

The decisions are pure functions at the top of this module (:func:`schedule`,
:func:`merge_change`, :func:`cancelled`, :func:`with_step_status`), tested
directly; :class:`OrderService` reads, decides and writes through
:class:`~storage.index.orders.SqlOrderStore`, which compares and sets the order's
version so concurrent writers never lose an update.

Scheduling follows IHE RAD TF-2 4.4 (the Department System Scheduler assigns
Accession Number, Requested Procedure ID, Scheduled Procedure Step IDs and the Study
Instance UID) and PS3.3 C.4.10-C.4.12 for the values.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from core.audit import AuditEntry, patient_key
from core.errors import (
    DuplicateError,
    NotFoundError,
    PreconditionFailedError,
    ProcedureStepStateError,
)
from core.logging import correlation_id
from core.orders import (
    OrderAction,
    OrderRecord,
    OrderStatus,
    PlacedOrder,
    ScheduledProcedureStep,
    SpsStatus,
    WorklistItem,
    derive_status,
)
from storage.index.orders import SqlOrderStore
from storage.index.patients import SqlPatientStore

if TYPE_CHECKING:
    from core.settings import OrdersSettings
    from storage.audit import AuditLog
    from storage.index.orders import OrderVersion, StudyLink
    from storage.index.sql import SqlIndex

__all__ = [
    "OrderKeys",
    "OrderService",
    "cancelled",
    "merge_change",
    "order_keys",
    "order_service",
    "schedule",
    "status_notice",
    "with_step_status",
]

logger = logging.getLogger(__name__)

_FINAL_STEPS = frozenset({SpsStatus.COMPLETED, SpsStatus.DISCONTINUED})
_CAS_RETRIES = 5


# --------------------------------------------------------------------------- pure


def _fill_step(step: ScheduledProcedureStep, step_id: str, settings: OrdersSettings) -> Any:
    modality = step.modality or settings.default_modality
    station = step.station_ae_title or settings.station_by_modality.get(modality, "")
    return replace(
        step, step_id=step.step_id or step_id, modality=modality, station_ae_title=station
    )


def schedule(
    placed: PlacedOrder, pk: int, settings: OrdersSettings, *, study_uid: str
) -> WorklistItem:
    """The worklist item a new order becomes, every identifier assigned.

    Parameters
    ----------
    placed : PlacedOrder
        The order as sent. Identifiers it carries are kept.
    pk : int
        The order's row key: unique, so the identifiers derived from it are too.
        Accession Number ``<prefix><pk:08d>`` (SH, 16 characters), Requested
        Procedure ID ``RP<pk>``, step ids ``SPS<pk>.<n>`` (SH).
    settings : OrdersSettings
        Default modality and stations.
    study_uid : str
        A freshly generated Study Instance UID, used unless the order has one
        (IHE RAD TF-2 4.4.4.1.2: generated at scheduling).
    """
    o = placed.order
    order = replace(
        o,
        accession_number=o.accession_number or f"{settings.accession_prefix}{pk:08d}",
        requested_procedure_id=o.requested_procedure_id or f"RP{pk}",
        study_instance_uid=o.study_instance_uid or study_uid,
        version=1,
    )
    steps = placed.steps or (
        ScheduledProcedureStep("", "", "", datetime.now().replace(microsecond=0)),
    )
    filled = tuple(_fill_step(s, f"SPS{pk}.{n}", settings) for n, s in enumerate(steps, 1))
    return WorklistItem(patient=placed.patient, order=order, steps=filled)


def merge_change(
    current: WorklistItem, placed: PlacedOrder, pk: int, settings: OrdersSettings
) -> WorklistItem:
    """The item after an order change (HL7 ORC-1 ``XO``; FHIR PUT).

    Identifiers assigned at scheduling stay (Accession Number, Requested Procedure
    ID, Study Instance UID: images may already carry them). Demographics and
    procedure take the new values. A new step matches an old one by step id, else by
    position; it keeps the old id and status. Old steps that have started stay even
    if the change leaves them out (the modality is using them).
    """
    o = placed.order
    order = replace(
        o,
        accession_number=current.order.accession_number,
        requested_procedure_id=current.order.requested_procedure_id,
        study_instance_uid=current.order.study_instance_uid,
        version=current.order.version,
    )
    old = list(current.steps)
    by_id = {s.step_id: s for s in old}
    used: set[str] = set()
    steps: list[ScheduledProcedureStep] = []
    next_n = len(old) + 1
    for n, new in enumerate(placed.steps or current.steps):
        match = by_id.get(new.step_id) if new.step_id else None
        if match is None and not new.step_id and n < len(old) and old[n].step_id not in used:
            match = old[n]
        if match is not None:
            used.add(match.step_id)
            steps.append(
                replace(
                    _fill_step(new, match.step_id, settings),
                    step_id=match.step_id,
                    status=match.status,
                )
            )
        else:
            steps.append(_fill_step(new, f"SPS{pk}.{next_n}", settings))
            next_n += 1
    for s in old:
        if s.step_id not in used and s.status is not SpsStatus.SCHEDULED:
            steps.append(s)
    return WorklistItem(patient=placed.patient, order=order, steps=tuple(steps))


def cancelled(item: WorklistItem) -> WorklistItem:
    """The item after a cancel: every step not yet final is DISCONTINUED (off the worklist)."""
    steps = tuple(
        s if s.status in _FINAL_STEPS else replace(s, status=SpsStatus.DISCONTINUED)
        for s in item.steps
    )
    return replace(item, steps=steps)


def with_step_status(
    item: WorklistItem, step_id: str, status: SpsStatus
) -> tuple[WorklistItem, bool]:
    """Set step ``step_id`` (every unfinished step when empty) to ``status``.

    Returns the item and whether anything changed. A final step does not move.
    """
    changed = False
    steps = []
    for s in item.steps:
        wanted = not step_id or s.step_id == step_id
        if wanted and s.status not in _FINAL_STEPS and s.status is not status:
            s = replace(s, status=status)
            changed = True
        steps.append(s)
    return replace(item, steps=tuple(steps)), changed


def _check_version(rec: OrderRecord | None, expected: int | None) -> None:
    """Refuse a version-aware update of an order that is not at ``expected``
    (RFC 9110 §13.1.1: ``If-Match`` on a missing resource is false too)."""
    if expected is None:
        return
    if rec is None:
        raise PreconditionFailedError("no such ServiceRequest to match If-Match")
    if rec.version != expected:
        raise PreconditionFailedError("the ServiceRequest changed since that version")


def _same_request(placed: PlacedOrder, rec: OrderRecord) -> bool:
    """Whether a repeated new order asks for what we already have (a resent message)."""
    item = rec.item
    if placed.patient != item.patient:
        return False
    o, c = placed.order, item.order
    if (o.requested_procedure_code, o.requested_procedure_description) != (
        c.requested_procedure_code,
        c.requested_procedure_description,
    ):
        return False
    want = [(s.modality, s.start, s.description) for s in placed.steps]
    have = [(s.modality, s.start, s.description) for s in item.steps]
    return not want or want == have


# ------------------------------------------------------------ received instances
# Reconciliation runs in the ``instance`` job, after the C-STORE was acknowledged
# (never in its critical path): :func:`order_keys` reads what the modality copied from
# the worklist (PS3.4 K.6.1.2.3; IHE RAD TF-2 4.8.4.1.3 Request Attributes Sequence)
# and :meth:`OrderService.reconcile` links the study.

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


# ------------------------------------------------------------------------ service


class OrderService:
    """Places, changes and cancels orders; follows MPPS; links received studies.

    Parameters
    ----------
    store : SqlOrderStore
        Where orders live.
    settings : OrdersSettings
        Scheduling defaults and reconciliation choices.
    new_id, new_uid : callable, optional
        Public id and Study Instance UID factories (tests make them predictable).
    patients : SqlPatientStore, optional
        Where merges are looked up: an order arriving under the identifier of a patient
        merged into another (IHE PIR A40, FHIR ``$merge``) is placed for the surviving
        patient, as images and lab results sent late are (issue 17).
    audit, patient_secret
        The action log and the key of its patient references: each such redirection
        appends an ``order.patient-merged`` entry (keyed references, never an id).
    default_issuer
        What an order without an issuer (PID-3.4) means (``lab.patient_issuer``).
    """

    def __init__(
        self,
        store: SqlOrderStore,
        settings: OrdersSettings,
        *,
        new_id: Callable[[], str] | None = None,
        new_uid: Callable[[], str] | None = None,
        patients: SqlPatientStore | None = None,
        audit: AuditLog | None = None,
        patient_secret: bytes = b"",
        default_issuer: str = "",
    ) -> None:
        self.store = store
        self.settings = settings
        self.patients = patients
        self.audit = audit
        self.patient_secret = patient_secret
        self.default_issuer = default_issuer
        self._new_id = new_id or (lambda: uuid.uuid4().hex)
        root = settings.uid_root or None
        self._new_uid = new_uid or (lambda: str(generate_uid(prefix=root)))

    # -- intake -----------------------------------------------------------------

    def submit(self, placed: PlacedOrder) -> OrderRecord:
        """Apply an order message keyed by its placer order number (HL7 ORC-1)."""
        match placed.action:
            case OrderAction.NEW:
                return self.place(placed)
            case OrderAction.CHANGE:
                return self.change(placed)
            case _:
                return self.cancel(placed)

    def place(self, placed: PlacedOrder, *, public_id: str | None = None) -> OrderRecord:
        """Schedule a new order.

        Raises
        ------
        DuplicateError
            An order with this placer number exists and asks for something else
            (a resent identical message returns the existing order instead).
        """
        placed, merged_from = self._follow_merge(placed)
        if placed.placer_order_number:
            existing = self.store.find(placer=placed.placer_order_number)
            if existing is not None:
                if existing.status is not OrderStatus.CANCELLED and _same_request(placed, existing):
                    return existing
                raise DuplicateError(f"order {placed.placer_order_number} exists")
        rec = self.store.create(
            public_id=public_id or self._new_id(),
            placer=placed.placer_order_number,
            filler=placed.filler_order_number,
            source=placed.source,
            build=lambda pk: schedule(placed, pk, self.settings, study_uid=self._new_uid()),
            status=lambda item: derive_status(item.steps),
        )
        logger.info("order %s placed (accession %s)", rec.id, rec.accession_number)
        self._audit_merged(rec, placed, merged_from)
        return rec

    # -- merged patients (IHE PIR, issue 17) --------------------------------------

    def _follow_merge(self, placed: PlacedOrder) -> tuple[PlacedOrder, tuple[str, str] | None]:
        """``placed`` for the surviving patient when its patient was merged away, and
        the obsolete ``(id, issuer)`` it named (None: not merged). The survivor's
        identity and demographics are the record system's: they replace the order's."""
        p = placed.patient
        if self.patients is None or not p.id:
            return placed, None
        issuers = [p.issuer] if p.issuer else list(dict.fromkeys([self.default_issuer, ""]))
        surv = self.patients.surviving(p.id[:64], [i[:64] for i in issuers])
        if surv is None:
            return placed, None
        birth = p.birth_date
        if len(surv.birth_date) == 8 and surv.birth_date.isdigit():
            with contextlib.suppress(ValueError):
                birth = datetime.strptime(surv.birth_date, "%Y%m%d").date()
        patient = replace(
            p,
            id=surv.patient_id,
            issuer=surv.issuer,
            name=surv.name or p.name,
            birth_date=birth,
            sex=surv.sex or p.sex,
        )
        return replace(placed, patient=patient), (p.id, p.issuer)

    def _audit_merged(
        self, rec: OrderRecord, placed: PlacedOrder, merged_from: tuple[str, str] | None
    ) -> None:
        """One action-log entry for an order placed for the survivor of a merge: the
        keyed obsolete and surviving references, never an identifier. A side effect:
        logs and carries on."""
        if merged_from is None:
            return
        logger.info("order %s: its patient was merged into another; placed for the survivor",
                    rec.id)
        if self.audit is None:
            return
        def key(pid: str, issuer: str) -> str:
            return patient_key(self.patient_secret, pid, issuer) if self.patient_secret else ""

        try:
            surviving = key(placed.patient.id, placed.patient.issuer)
            self.audit.record(AuditEntry(
                action="U",
                event_type="order.patient-merged",
                outcome="0",
                agent=(placed.source or "orders")[:128],
                agent_type="system",
                source=placed.source[:64],
                resource=f"ServiceRequest/{rec.id}",
                patient_key=surviving,
                correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details({
                    "order": rec.id,
                    "before": {"patient": key(*merged_from)},
                    "after": {"patient": surviving},
                }),
            ))
        except Exception:
            logger.error("order redirection not recorded in the action log", exc_info=True)

    def _current(self, placed: PlacedOrder, public_id: str | None) -> OrderRecord:
        rec = (
            self.store.find(public_id=public_id)
            if public_id is not None
            else self.store.find(placer=placed.placer_order_number)
        )
        if rec is None:
            raise NotFoundError(f"no order {public_id or placed.placer_order_number}")
        return rec

    def change(
        self,
        placed: PlacedOrder,
        *,
        public_id: str | None = None,
        expected_version: int | None = None,
    ) -> OrderRecord:
        """Apply a change to an order not yet closed (see :func:`merge_change`).

        With ``expected_version`` (FHIR ``If-Match``) the change applies only to that
        version: the store's compare-and-set on the version makes the check and the
        write one step, so a concurrent writer turns it into a 412, never a lost update.

        Raises
        ------
        NotFoundError
            No such order.
        PreconditionFailedError
            The order is not at ``expected_version``.
        ProcedureStepStateError
            The order is completed, discontinued or cancelled.
        """
        placed, merged_from = self._follow_merge(placed)
        for _ in range(_CAS_RETRIES):
            rec = self._current(placed, public_id)
            _check_version(rec, expected_version)
            if rec.status in (
                OrderStatus.COMPLETED,
                OrderStatus.DISCONTINUED,
                OrderStatus.CANCELLED,
            ):
                raise ProcedureStepStateError(f"order {rec.id} is {rec.status}")
            item = merge_change(rec.item, placed, self._pk_hint(rec), self.settings)
            try:
                out = self.store.update(
                    rec,
                    item,
                    derive_status(item.steps),
                    event="changed",
                    source=placed.source,
                    filler=placed.filler_order_number or None,
                )
            except ProcedureStepStateError:
                continue
            logger.info("order %s changed (version %d)", out.id, out.version)
            self._audit_merged(out, placed, merged_from)
            return out
        raise ProcedureStepStateError("order changed concurrently; retry")

    @staticmethod
    def _pk_hint(rec: OrderRecord) -> int:
        # New step ids continue the ones scheduling derived from the row key.
        for s in rec.item.steps:
            head = s.step_id.removeprefix("SPS").split(".")[0]
            if s.step_id.startswith("SPS") and head.isascii() and head.isdigit():
                return int(head)
        return abs(hash(rec.id)) % 10**8

    def cancel(
        self,
        placed: PlacedOrder | None = None,
        *,
        public_id: str | None = None,
        source: str = "",
        expected_version: int | None = None,
    ) -> OrderRecord:
        """Cancel an order that has not started (HL7 ORC-1 ``CA``; FHIR ``revoked``).

        A cancel for an order we never saw is kept as a cancelled order, so that a
        late "new order" for the same placer number cannot put it on the worklist.

        Raises
        ------
        ProcedureStepStateError
            The procedure has started or is over (HL7 would answer ``UC``).
        """
        for _ in range(_CAS_RETRIES):
            rec = (
                self.store.find(public_id=public_id)
                if public_id is not None
                else self.store.find(placer=placed.placer_order_number)
                if placed
                else None
            )
            if rec is None:
                if placed is None:
                    raise NotFoundError(f"no order {public_id}")
                _check_version(None, expected_version)
                tombstone = self.store.create(
                    public_id=public_id or self._new_id(),
                    placer=placed.placer_order_number,
                    filler=placed.filler_order_number,
                    source=placed.source,
                    build=lambda pk: cancelled(
                        schedule(placed, pk, self.settings, study_uid=self._new_uid())
                    ),
                    status=lambda _item: OrderStatus.CANCELLED,
                    event="cancelled",
                )
                logger.info("cancel for unknown order kept as %s", tombstone.id)
                return tombstone
            _check_version(rec, expected_version)
            if rec.status is OrderStatus.CANCELLED:
                return rec
            if rec.status is not OrderStatus.SCHEDULED:
                raise ProcedureStepStateError(f"order {rec.id} is {rec.status}; not cancelled")
            try:
                out = self.store.update(
                    rec,
                    cancelled(rec.item),
                    OrderStatus.CANCELLED,
                    event="cancelled",
                    source=source or (placed.source if placed else ""),
                )
            except ProcedureStepStateError:
                continue
            logger.info("order %s cancelled", out.id)
            return out
        raise ProcedureStepStateError("order changed concurrently; retry")

    def put(
        self, public_id: str, placed: PlacedOrder, *, expected_version: int | None = None
    ) -> tuple[OrderRecord, bool]:
        """Create or update the order with this public id (FHIR update-as-create).

        ``expected_version`` (FHIR ``If-Match``, R4 http.html#concurrency): update only
        that version; with no order yet there is no version to match, so no create.

        Returns the order and whether it was created.
        """
        if self.store.find(public_id=public_id) is None:
            _check_version(None, expected_version)
            if placed.action is OrderAction.CANCEL:
                return self.cancel(placed, source=placed.source), True
            return self.place(placed, public_id=public_id), True
        if placed.action is OrderAction.CANCEL:
            out = self.cancel(
                public_id=public_id, source=placed.source, expected_version=expected_version
            )
            return out, False
        return self.change(placed, public_id=public_id, expected_version=expected_version), False

    # -- reads ------------------------------------------------------------------

    def get(self, public_id: str) -> OrderRecord:
        rec = self.store.find(public_id=public_id)
        if rec is None:
            raise NotFoundError(f"no order {public_id}")
        return rec

    def search(self, **criteria: Any) -> list[OrderRecord]:
        """See :meth:`SqlOrderStore.search`."""
        return self.store.search(**criteria)

    def history(self, public_id: str) -> list[OrderVersion]:
        return self.store.history(public_id)

    # -- MPPS -------------------------------------------------------------------

    def step_status(
        self,
        *,
        accession: str,
        procedure_id: str,
        step_id: str,
        status: SpsStatus,
        study_uid: str = "",
    ) -> OrderRecord | None:
        """Follow an MPPS (PS3.4 F.7; IHE RAD TF-2 4.7): the step, then the order, change.

        Returns the order, or None when the MPPS names no order we know (an
        unscheduled procedure: PS3.4 F.7.2.1.1 allows empty references).
        """
        for _ in range(_CAS_RETRIES):
            rec = None
            if accession:
                rec = self.store.find(accession=accession)
            if rec is None and study_uid:
                rec = self.store.find(study_uid=study_uid)
            if rec is None and procedure_id:
                rec = self.store.find(procedure_id=procedure_id)
            if rec is None:
                logger.warning("MPPS for unknown order (accession %s)", accession or "-")
                return None
            item, changed = with_step_status(rec.item, step_id, status)
            if not changed:
                return rec
            try:
                out = self.store.update(
                    rec, item, derive_status(item.steps), event="step", source="mpps"
                )
            except ProcedureStepStateError:
                continue
            logger.info("order %s is %s after MPPS", out.id, out.status)
            return out
        raise ProcedureStepStateError("order changed concurrently; retry")

    # -- reconciliation ---------------------------------------------------------

    def reconcile(
        self, study_uid: str, *, accession: str = "", procedure_id: str = ""
    ) -> StudyLink:
        """Link a received study to its order, or list it as unmatched.

        Keys tried in order: Study Instance UID (generated at scheduling, so exact),
        Accession Number, Requested Procedure ID (PS3.4 K.6.1.2.3 / IHE RAD TF-2
        4.8.4.1.3: what the modality copied from the worklist). Cheap when the study
        is already known: one indexed read.
        """
        link = self.store.get_link(study_uid)
        if link is not None and (link.order_id or link.linked_at is not None):
            return link
        candidates: list[tuple[str, OrderRecord | None]] = [
            ("study_instance_uid", self.store.find(study_uid=study_uid)),
        ]
        if accession:
            candidates.append(("accession_number", self.store.find(accession=accession)))
        if procedure_id:
            candidates.append(
                ("requested_procedure_id", self.store.find(procedure_id=procedure_id))
            )
        matched_by, order = next(
            (
                (how, rec)
                for how, rec in candidates
                if rec is not None and rec.status is not OrderStatus.CANCELLED
            ),
            ("", None),
        )
        if link is not None and order is None:
            return link  # still unmatched
        self._link(study_uid, order, matched_by, accession=accession, procedure_id=procedure_id)
        out = self.store.get_link(study_uid)
        assert out is not None
        return out

    def link(self, study_uid: str, public_id: str) -> StudyLink:
        """Link a (typically unmatched) study to an order by hand.

        Raises
        ------
        NotFoundError
            No such order, or no such study in the index.
        DuplicateError
            The study is linked to another order already.
        """
        order = self.get(public_id)
        link = self.store.get_link(study_uid)
        if link is not None and link.order_id:
            if link.order_id == public_id:
                return link
            raise DuplicateError(f"study {study_uid} is linked to another order")
        if link is None and not self.store.study_patient(study_uid):
            raise NotFoundError(f"no study {study_uid}")
        self._link(
            study_uid,
            order,
            "manual",
            accession=link.accession_number if link else "",
            procedure_id=link.requested_procedure_id if link else "",
        )
        out = self.store.get_link(study_uid)
        assert out is not None
        return out

    def unmatched(self, *, limit: int = 100, offset: int = 0) -> list[StudyLink]:
        return self.store.unmatched(limit=limit, offset=offset)

    def _link(
        self,
        study_uid: str,
        order: OrderRecord | None,
        matched_by: str,
        *,
        accession: str,
        procedure_id: str,
    ) -> None:
        original = self.store.study_patient(study_uid)
        claimed = self.store.record_link(
            study_uid,
            accession=accession,
            procedure_id=procedure_id,
            order=order,
            matched_by=matched_by,
            original=original,
        )
        if not claimed or order is None:
            if order is None and claimed:
                logger.info("study %s matches no order; listed as unmatched", study_uid)
            return
        if self.settings.demographics_from_order:
            self.store.adopt_patient(study_uid, order.item)
        self._images_arrived(order.id, study_uid)
        logger.info("study %s linked to order %s by %s", study_uid, order.id, matched_by)

    def _images_arrived(self, public_id: str, study_uid: str) -> None:
        for _ in range(_CAS_RETRIES):
            rec = self.get(public_id)
            if rec.linked_study_uid == study_uid:
                return
            try:
                self.store.update(
                    rec,
                    rec.item,
                    rec.status,
                    event="images",
                    source="dicom",
                    linked_study_uid=study_uid,
                )
                return
            except ProcedureStepStateError:
                continue
        logger.warning("order %s: images-arrived not recorded (concurrent changes)", public_id)


def order_service(
    index: SqlIndex,
    settings: OrdersSettings,
    *,
    audit: AuditLog | None = None,
    patient_secret: bytes = b"",
    default_issuer: str = "",
) -> OrderService:
    """The order service over ``index``: the one construction rule for every process
    (webhook jobs are queued only when ``orders.webhook_url`` is set; orders for a
    merged-away patient go to the survivor, audited in ``audit``)."""
    return OrderService(
        SqlOrderStore(index, webhook=bool(settings.webhook_url)),
        settings,
        patients=SqlPatientStore(index),
        audit=audit,
        patient_secret=patient_secret,
        default_issuer=default_issuer,
    )
