"""What both Query/Retrieve transports share: the pynetdicom handlers (:mod:`.qr`) and
the plain-socket association (:mod:`.qr_association`).

Status codes and Error Comments (PS3.4 C.4.1.1.4, C.4.2.1.5), the cap on retrieves
running at once, the contexts proposed to a move destination, reading originals for
sub-operations, and P-DATA-TF framing of an encoded message (PS3.8 9.3.5, E.2).
"""

from __future__ import annotations

import logging
import struct
import threading

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import PresentationContext, build_context

from core.errors import ServiceError
from services.query_retrieve import EncodedInstance, QueryRetrieveService, RetrieveItem

__all__ = [
    "CANCEL",
    "PENDING",
    "PENDING_WARNING",
    "REFUSED_SUBOPS",
    "SYNTAXES",
    "RetrieveGate",
    "comment",
    "encoded",
    "load",
    "p_data_tf",
    "retrieve_contexts",
]

logger = logging.getLogger(__name__)

PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00
#: PS3.4 C.4.2.1.5: Refused: Out of Resources - Unable to perform sub-operations.
REFUSED_SUBOPS = 0xA702
SYNTAXES: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]


def comment(exc: ServiceError) -> str:
    """The Error Comment of a refusal (LO, 64 characters; our messages carry no PHI)."""
    return (str(exc) or exc.title)[:64]


class RetrieveGate:
    """A cap on C-MOVE/C-GET running at once in this process (issue 16 §2), shared by
    both transports."""

    def __init__(self, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)

    def try_enter(self) -> bool:
        return self._slots.acquire(blocking=False)

    def leave(self) -> None:
        self._slots.release()


def retrieve_contexts(items: list[RetrieveItem]) -> list[PresentationContext]:
    """What to propose to a move destination: each SOP Class in its stored transfer
    syntax, and uncompressed (PS3.5 A.1, A.2) for destinations that accept only that.

    At most 128 contexts (PS3.8 9.3.2.2); the SOP classes beyond are not proposed and
    their sub-operations fail, listed in the Failed SOP Instance UID List.
    """
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for item in items:
        own = item.transfer_syntax_uid
        if own not in SYNTAXES[:2]:
            wanted[(item.sop_class_uid, (own,))] = None
        wanted[(item.sop_class_uid, tuple(SYNTAXES[:2]))] = None
    return [build_context(sop, list(ts)) for sop, ts in list(wanted)[:128]]


def load(service: QueryRetrieveService, item: RetrieveItem) -> Dataset | None:
    """The decoded original (coerced to the index's patient), or None if unreadable."""
    try:
        return service.load(item)
    except (ServiceError, OSError, ValueError):
        logger.error("original of %s not readable for retrieve", item.sop_instance_uid,
                     exc_info=True)
        return None


def encoded(service: QueryRetrieveService, item: RetrieveItem) -> EncodedInstance | None:
    """The stored bytes to send as they are, or None (then :func:`load`)."""
    try:
        return service.encoded(item)
    except (ServiceError, OSError, ValueError):
        return None  # load() reads it again and reports


def p_data_tf(
    data: bytes, context_id: int, max_pdu: int, *, command: bool
) -> list[bytes | memoryview]:
    """P-DATA-TF PDUs of one PDV each carrying ``data`` (PS3.8 9.3.5, E.2), as
    pynetdicom's ``encode_msg`` cuts them: fragments of the peer's Maximum Length less
    the PDV header (6 bytes), the last one flagged; built with ``struct``, as
    pynetdicom's PDU objects cost about a millisecond per CT image."""
    if not data and not command:
        return []  # as pynetdicom: no data set PDV for an empty data set
    size = max(1, max_pdu - 6) if max_pdu else max(1, len(data))
    view = memoryview(data)
    out: list[bytes | memoryview] = []
    flags = 0x01 if command else 0x00
    for start in range(0, max(1, len(data)), size):
        fragment = view[start:start + size]
        last = start + size >= len(data)
        pdv = len(fragment) + 2
        out.append(struct.pack(">BBLLBB", 0x04, 0x00, pdv + 4, pdv, context_id,
                               flags | (0x02 if last else 0x00)))
        out.append(fragment)
    return out
