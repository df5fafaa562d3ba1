"""Apply one HL7 v2 order message and say how it went (shared by MLLP and the inbox).

The answer is an original-mode ACK (HL7 v2.5.1 2.9.2): ``AA`` when every order of
the message was applied, ``AE`` when its content is wrong or conflicts with what we
hold (unknown order for XO, order already started for CA…), ``AR`` when we do not
take this kind of message or cannot process anything now (index unavailable: the
sender should try again later).

With an ``audit`` log, every message appends one entry (issue 7 §2), whatever its
ACK: the sending application (MSH-3, as a calling AE title is for DICOM) is the
agent, the MLLP peer or the inbox folder where it came from, the keyed reference of
the PID-3 patient (:func:`core.audit.patient_key`) the patient, and the order ids,
control id and ACK code the detail, never a name or an identifier.

ADT (IHE PIR; HL7 v2.5.1 chapter 3: A01/A04/A08 update, A40 merge, A47 change
identifier) goes the same way when a :class:`~core.patients.PatientIdentity` is
given: :func:`worklist.orders.adt.patient_commands` reads the commands and the
service applies them, in message order. ``AA`` when all were applied; ``AE`` with
ERR-3 204 (unknown key identifier) for an unknown patient and the ERR-2 location of
the pair that named it, or the parser's code; ``AR`` when the service cannot work
now (index unavailable), so the sender retries. Without a service, ADT is refused
with ``AR`` 200 (unsupported message type), as any message we do not take. Its
audit entry (``hl7.adt``) names the change ids, never a name or an identifier.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from core.audit import AuditEntry, patient_key
from core.errors import (
    DuplicateError,
    NotFoundError,
    OrderMessageError,
    OutOfResourcesError,
    PeerUnavailableError,
    ProcedureStepStateError,
    ServiceError,
)
from core.logging import correlation_id, new_id
from core.orders import OrderAction, OrderRecord, PlacedOrder
from core.patients import (
    MergePatients,
    PatientChange,
    PatientCommand,
    PatientIdentity,
    PatientRef,
    UpdatePatient,
)
from worklist.orders.adt import ADT_TYPES, patient_commands
from worklist.orders.hl7v2 import (
    ACCEPTED_TYPES,
    Message,
    build_ack,
    control_id,
    parse_message,
    placed_orders,
    sending_application,
)

if TYPE_CHECKING:
    from services.orders import OrderService
    from storage.audit import AuditLog

__all__ = ["Hl7OrderIntake", "IntakeResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IntakeResult:
    """What one message did: the ACK to send, the error if any, the orders touched."""

    ack: bytes
    code: str
    control_id: str
    error: OrderMessageError | None = None
    orders: tuple[OrderRecord, ...] = field(default=())
    changes: tuple[PatientChange, ...] = field(default=())


def _as_order_error(exc: ServiceError) -> OrderMessageError:
    # HL7 Table 0357: 204 unknown key, 205 duplicate key, 206 record locked,
    # 207 application internal error.
    if isinstance(exc, NotFoundError):
        return OrderMessageError(str(exc), where="ORC^1^2", hl7_code=204)
    if isinstance(exc, DuplicateError):
        return OrderMessageError(str(exc), where="ORC^1^2", hl7_code=205)
    if isinstance(exc, ProcedureStepStateError):
        return OrderMessageError(str(exc), where="ORC^1^1", hl7_code=207)
    if isinstance(exc, OutOfResourcesError):
        return OrderMessageError(str(exc), hl7_code=206, ack_code="AR")
    return OrderMessageError(str(exc) or exc.title, hl7_code=207)


def _as_adt_error(exc: ServiceError, where: str) -> OrderMessageError:
    """A patient identity service refusal as an ACK error (HL7 Table 0357)."""
    if isinstance(exc, NotFoundError):
        return OrderMessageError(str(exc) or "unknown patient", where=where, hl7_code=204)
    if isinstance(exc, DuplicateError):
        # A47: the new identifier (PID-3 of the pair) is already someone else's.
        segment, _, rest = where.partition("^")
        pid3 = f"PID^{rest.split('^')[0]}^3" if segment == "MRG" else where
        return OrderMessageError(str(exc), where=pid3, hl7_code=205)
    if isinstance(exc, OutOfResourcesError | PeerUnavailableError):
        return OrderMessageError(str(exc) or exc.title, hl7_code=206, ack_code="AR")
    # InvalidQueryError (merging a patient into itself) and the rest: Table 0357 has
    # no "business rule" code; 207 with the service's explanation in ERR-8.
    return OrderMessageError(str(exc) or exc.title, where=where, hl7_code=207)


class Hl7OrderIntake:
    """Parse, apply and acknowledge HL7 v2 order messages.

    Parameters
    ----------
    service : OrderService
        Applies the orders.
    clock : callable, optional
        MSH-7 of ACKs (tests pass a fixed time).
    audit : AuditLog, optional
        The action log; each message appends an entry (see the module docstring).
    patient_secret : bytes
        Keys the log's patient references.
    patients : PatientIdentity, optional
        Applies ADT messages; without it they are refused (``AR``).
    """

    def __init__(
        self,
        service: OrderService,
        *,
        clock: Callable[[], datetime] | None = None,
        audit: AuditLog | None = None,
        patient_secret: bytes = b"",
        patients: PatientIdentity | None = None,
    ) -> None:
        self.service = service
        self.patients = patients
        self._accepted = ACCEPTED_TYPES | ADT_TYPES if patients is not None else ACCEPTED_TYPES
        self.clock = clock or datetime.now
        self.audit = audit
        self.patient_secret = patient_secret
        self._ids = itertools.count(1)
        self._prefix = new_id()[:8]

    def _ack_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def handle(
        self, raw: bytes, *, source: str = "hl7", peer: str = "", file_sha256: str = ""
    ) -> IntakeResult:
        """Apply one message; never raises for bad input (the ACK says why).

        ``peer`` (the MLLP client address, or the inbox folder) and ``file_sha256``
        (for a dropped file) only go to the action log.
        """
        try:
            msg = parse_message(raw, accepted=self._accepted)
        except OrderMessageError as exc:
            result = self._refused(raw, exc)
            self._audit(raw, result, (), peer=peer, file_sha256=file_sha256)
            return result
        if msg.type[0] == "ADT" and self.patients is not None:
            result, ref = self._apply_adt(msg, self.patients, raw, source, peer)
            self._audit_adt(raw, result, ref, event=msg.type[1], peer=peer, file_sha256=file_sha256)
            return result
        result, placed = self._apply(msg, raw, source)
        self._audit(raw, result, placed, peer=peer, file_sha256=file_sha256)
        return result

    def refuse(self, head: bytes, error: OrderMessageError, *, peer: str = "") -> IntakeResult:
        """Answer a message refused before it was read (too large): ``error.ack_code``.

        ``head`` is its first bytes: MSH gives the ACK's MSA-2 and echoed fields.
        """
        ack = build_ack(
            head, error.ack_code, error=error, now=self.clock(), ack_control_id=self._ack_id()
        )
        result = IntakeResult(ack, error.ack_code, control_id(head), error)
        self._audit(head, result, (), peer=peer, file_sha256="")
        return result

    def _refused(self, raw: bytes, exc: OrderMessageError) -> IntakeResult:
        """The answer to a message refused for what it says (parse or mapping error)."""
        logger.warning("HL7 message %s refused: %s", control_id(raw) or "-", exc)
        ack = build_ack(
            raw, exc.ack_code, error=exc, now=self.clock(), ack_control_id=self._ack_id()
        )
        return IntakeResult(ack, exc.ack_code, control_id(raw), exc)

    def _apply_adt(
        self, msg: Message, patients: PatientIdentity, raw: bytes, source: str, peer: str
    ) -> tuple[IntakeResult, PatientRef | None]:
        """Apply an ADT message's commands in order; the result and its patient.

        Commands applied before one fails stay applied (each is a change of its own,
        audited and undoable by the service); the ACK's ERR names the one that failed.
        """
        try:
            commands = patient_commands(msg)
        except OrderMessageError as exc:
            return self._refused(raw, exc), None
        ref = _patient_of(commands[0].command)
        origin = "hl7-inbox" if source == "hl7-file" else "hl7-mllp"
        agent = (sending_application(raw) or peer or "unknown")[:128]
        done: list[PatientChange] = []
        err: OrderMessageError | None = None
        try:
            for item in commands:
                try:
                    done.append(patients.apply(item.command, source=origin, agent=agent))
                except ServiceError as exc:
                    err = _as_adt_error(exc, item.where)
                    break
        except Exception:
            logger.error("HL7 message %s failed", msg.control_id, exc_info=True)
            err = OrderMessageError("application internal error", hl7_code=207, ack_code="AR")
        if err is not None:
            # The service's text may name the patient: the log gets the code and place only.
            logger.warning(
                "HL7 message %s not applied: %s at %s", msg.control_id, err.hl7_code, err.where
            )
            ack = build_ack(
                msg, err.ack_code, error=err, now=self.clock(), ack_control_id=self._ack_id()
            )
            return IntakeResult(ack, err.ack_code, msg.control_id, err, changes=tuple(done)), ref
        logger.info("HL7 message %s: %d patient change(s) applied", msg.control_id, len(done))
        ack = build_ack(msg, "AA", now=self.clock(), ack_control_id=self._ack_id())
        return IntakeResult(ack, "AA", msg.control_id, None, changes=tuple(done)), ref

    def _apply(
        self, msg: Message, raw: bytes, source: str
    ) -> tuple[IntakeResult, Sequence[PlacedOrder]]:
        """The result, and the orders the message placed (none when it did not map)."""
        try:
            placed = placed_orders(msg, source=source)
        except OrderMessageError as exc:
            return self._refused(raw, exc), ()
        done: list[OrderRecord] = []
        try:
            for order in placed:
                done.append(self.service.submit(order))
        except ServiceError as exc:
            err = _as_order_error(exc)
            logger.warning("HL7 message %s not applied: %s", msg.control_id, err)
            ack = build_ack(
                msg, err.ack_code, error=err, now=self.clock(), ack_control_id=self._ack_id()
            )
            return IntakeResult(ack, err.ack_code, msg.control_id, err, tuple(done)), placed
        except Exception:
            logger.error("HL7 message %s failed", msg.control_id, exc_info=True)
            err = OrderMessageError("application internal error", hl7_code=207, ack_code="AR")
            ack = build_ack(msg, "AR", error=err, now=self.clock(), ack_control_id=self._ack_id())
            return IntakeResult(ack, "AR", msg.control_id, err, tuple(done)), placed
        logger.info("HL7 message %s: %d order(s) applied", msg.control_id, len(done))
        ack = build_ack(msg, "AA", now=self.clock(), ack_control_id=self._ack_id())
        return IntakeResult(ack, "AA", msg.control_id, None, tuple(done)), placed

    def record_refused_file(self, file_sha256: str, *, peer: str, reason: str) -> None:
        """Log a dropped file refused before any message of it reached :meth:`handle`."""
        if self.audit is None:
            return
        try:
            self.audit.record(AuditEntry(
                action="C", event_type="hl7.order", outcome="4",
                outcome_desc=f"rejected: {reason}"[:64], agent=(peer or "unknown")[:128],
                agent_type="system", source=peer[:64], resource=f"HL7File/{file_sha256}",
                correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details({"file_sha256": file_sha256}),
            ))
        except Exception:
            logger.error("HL7 order audit entry not recorded", exc_info=True)

    def _audit(
        self,
        raw: bytes,
        result: IntakeResult,
        placed: Sequence[PlacedOrder],
        *,
        peer: str,
        file_sha256: str,
    ) -> None:
        """Queue an order message's entry: the order ids and the keyed PID-3 patient."""
        patient = placed[0].patient if placed else None
        orders = [o.id for o in result.orders]
        self._record(
            raw, result, peer=peer, file_sha256=file_sha256,
            event_type="hl7.order",
            action=_ACTIONS.get(placed[0].action, "C") if placed else "C",
            patient=(patient.id, patient.issuer) if patient is not None else None,
            detail={"orders": orders},
            resource=f"ServiceRequest/{orders[0]}" if len(orders) == 1 else "",
        )

    def _audit_adt(
        self,
        raw: bytes,
        result: IntakeResult,
        ref: PatientRef | None,
        *,
        event: str,
        peer: str,
        file_sha256: str,
    ) -> None:
        """Queue an ADT message's entry: the change ids and the keyed patient (the
        surviving or new one), never a name or an identifier."""
        changes = [c.change_id for c in result.changes]
        self._record(
            raw, result, peer=peer, file_sha256=file_sha256,
            event_type="hl7.adt", action="U",
            patient=(ref.patient_id, ref.issuer) if ref is not None else None,
            detail={"event": event, "changes": changes,
                    "kinds": [c.kind for c in result.changes]},
            resource=f"PatientChange/{changes[0]}" if len(changes) == 1 else "",
        )

    def _record(
        self,
        raw: bytes,
        result: IntakeResult,
        *,
        peer: str,
        file_sha256: str,
        event_type: str,
        action: str,
        patient: tuple[str, str] | None,
        detail: dict[str, object],
        resource: str,
    ) -> None:
        """One entry per message, whatever its kind (issue 7 §2): the sending
        application as agent, the ACK as outcome, the keyed patient, never a name or an
        identifier. A side effect, so it logs and carries on."""
        if self.audit is None:
            return
        try:
            key = patient_key(self.patient_secret, *patient) if patient is not None else ""
            full: dict[str, object] = {"control_id": result.control_id, "ack": result.code,
                                       **detail}
            if result.error is not None:
                full["hl7_error_code"] = result.error.hl7_code
                full["where"] = result.error.where or ""
            if file_sha256:
                full["file_sha256"] = file_sha256
            self.audit.record(AuditEntry(
                action=action,
                event_type=event_type,
                outcome=_outcome(result),
                outcome_desc=f"{result.code} {result.error.hl7_code}" if result.error
                else result.code,
                agent=(sending_application(raw) or peer or "unknown")[:128],
                agent_type="system",
                source=peer[:64],
                resource=(resource or f"HL7Message/{result.control_id}")[:256],
                patient_key=key,
                correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details(full),
            ))
        except Exception:
            logger.error("HL7 %s audit entry not recorded", event_type, exc_info=True)


def _patient_of(command: PatientCommand) -> PatientRef:
    """The patient an ADT message is about after it: the updated, surviving or new one."""
    if isinstance(command, UpdatePatient):
        return command.patient
    if isinstance(command, MergePatients):
        return command.surviving
    return command.new


#: FHIR R4 AuditEvent.action per order control: a cancel updates the order's status.
_ACTIONS = {OrderAction.NEW: "C", OrderAction.CHANGE: "U", OrderAction.CANCEL: "U"}


def _outcome(result: IntakeResult) -> str:
    """AuditEvent.outcome: 0 for AA; 8 when we could not process it (an AR with Table
    0357 206 record locked or 207 internal error); 4 when the sender was refused."""
    if result.code == "AA":
        return "0"
    if result.code == "AR" and result.error is not None and result.error.hl7_code in (206, 207):
        return "8"
    return "4"
