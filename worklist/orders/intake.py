"""Apply one HL7 v2 order message and say how it went (shared by MLLP and the inbox).

The answer is an original-mode ACK (HL7 v2.5.1 2.9.2): ``AA`` when every order of
the message was applied, ``AE`` when its content is wrong or conflicts with what we
hold (unknown order for XO, order already started for CA…), ``AR`` when we do not
take this kind of message or cannot process anything now (index unavailable: the
sender should try again later).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from core.errors import (
    DuplicateError,
    NotFoundError,
    OrderMessageError,
    OutOfResourcesError,
    ProcedureStepStateError,
    ServiceError,
)
from core.logging import new_id
from core.orders import OrderRecord
from worklist.orders.hl7v2 import build_ack, control_id, parse_message, placed_orders

if TYPE_CHECKING:
    from storage.orders import OrderService

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


class Hl7OrderIntake:
    """Parse, apply and acknowledge HL7 v2 order messages.

    Parameters
    ----------
    service : OrderService
        Applies the orders.
    clock : callable, optional
        MSH-7 of ACKs (tests pass a fixed time).
    """

    def __init__(
        self, service: OrderService, *, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.service = service
        self.clock = clock or datetime.now
        self._ids = itertools.count(1)
        self._prefix = new_id()[:8]

    def _ack_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def handle(self, raw: bytes, *, source: str = "hl7") -> IntakeResult:
        """Apply one message; never raises for bad input (the ACK says why)."""
        try:
            msg = parse_message(raw)
            placed = placed_orders(msg, source=source)
        except OrderMessageError as exc:
            logger.warning("HL7 message %s refused: %s", control_id(raw) or "-", exc)
            ack = build_ack(
                raw, exc.ack_code, error=exc, now=self.clock(), ack_control_id=self._ack_id()
            )
            return IntakeResult(ack, exc.ack_code, control_id(raw), exc)
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
            return IntakeResult(ack, err.ack_code, msg.control_id, err, tuple(done))
        except Exception:
            logger.error("HL7 message %s failed", msg.control_id, exc_info=True)
            err = OrderMessageError("application internal error", hl7_code=207, ack_code="AR")
            ack = build_ack(msg, "AR", error=err, now=self.clock(), ack_control_id=self._ack_id())
            return IntakeResult(ack, "AR", msg.control_id, err, tuple(done))
        logger.info("HL7 message %s: %d order(s) applied", msg.control_id, len(done))
        ack = build_ack(msg, "AA", now=self.clock(), ack_control_id=self._ack_id())
        return IntakeResult(ack, "AA", msg.control_id, None, tuple(done))
