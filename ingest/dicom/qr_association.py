"""Query/Retrieve C-FIND, C-MOVE, C-GET on the plain-socket association (PS3.4 C.4.1-C.4.3).

Why not pynetdicom here (issue 16): its DUL and reactor threads hand every message
through queues polled with 1 ms sleeps, which was most of a C-FIND's 62 ms p99 on a
100k-instance index (the SQL takes 0.24 ms), and C-MOVE sub-operations needed a
stack of workarounds of its internals (:mod:`.qr`) to send stored bytes at all.
:class:`~ingest.dicom.association.FastAssociation` reads the request and its
identifier; :class:`PlainQueryRetrieve` answers it with the same service calls as
the pynetdicom handlers (:func:`.qr.handle_find`, :func:`.qr.handle_move`), each
response in one ``sendall``, and checks for a C-CANCEL-RQ between responses without
waiting (PS3.7 9.3.2.3). C-MOVE sub-operations go out on our own Storage SCU
(:class:`~ingest.dicom.storescu.StorageScu`), the stored bytes as they are.

C-GET (PS3.4 C.4.3) is served here too when ``serve_get``: its sub-operations go out
on the requestor's own association, on the storage contexts it took the SCP role for
(SCP/SCU Role Selection, PS3.7 D.3.3.4), and a C-CANCEL-RQ may arrive between them or
before a C-STORE-RSP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from io import BytesIO
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext, build_context

from core.errors import ServiceError
from ingest.dicom._retrieve import (
    CANCEL,
    PENDING,
    PENDING_WARNING,
    REFUSED_SUBOPS,
    SYNTAXES,
    RetrieveGate,
    comment,
    encoded,
    load,
    retrieve_contexts,
)
from ingest.dicom.association import AbortError, FastAssociation
from ingest.dicom.audit import identifier_patient_key, record_dimse
from ingest.dicom.dimse import (
    C_FIND_RQ,
    C_FIND_RSP,
    C_GET_RQ,
    C_GET_RSP,
    C_MOVE_RQ,
    C_MOVE_RSP,
    Command,
    encode_response,
    encode_store_rq,
)
from ingest.dicom.storescu import StorageScu
from services.query_retrieve import (
    FIND_MODELS,
    GET_MODELS,
    MOVE_MODELS,
    EncodedInstance,
    QueryRetrieveService,
    RetrieveItem,
)

if TYPE_CHECKING:
    from core.settings import RemoteAE

__all__ = ["PlainQueryRetrieve"]

logger = logging.getLogger(__name__)

#: PS3.4 C.4.2.1.5: Refused: Move Destination unknown (also what pynetdicom answers
#: when the destination cannot be associated with).
_UNKNOWN_DESTINATION = 0xA801
#: PS3.4 C.4.2.1.5: Warning: sub-operations complete, one or more failures.
_SUBOPS_WARNING = 0xB000
#: C-STORE warnings (PS3.4 B.2.3): coercion, elements discarded, data set mismatch.
_STORE_WARNINGS = frozenset({0x0001, 0xB000, 0xB006, 0xB007})

DestinationLookup = Callable[[str], "RemoteAE | None"]


class _Sender(Protocol):
    """Where C-STORE sub-operations go: :class:`StorageScu` (C-MOVE) or the
    requestor's association (:class:`_SameAssociation`, C-GET)."""

    def context_for(self, sop_class_uid: str, transfer_syntax_uid: str) -> int | None: ...

    def next_message_id(self) -> int: ...

    def store(self, context_id: int, command: bytes, data_set: bytes,
              while_waiting: Callable[[], None] | None = None) -> int: ...


class _SameAssociation:
    """C-GET sub-operations on the requestor's association (PS3.4 C.4.3.3.1): the
    accepted storage contexts it took the SCP role for."""

    def __init__(self, assoc: FastAssociation, operation_id: int) -> None:
        self.assoc = assoc
        self.operation_id = operation_id
        self._by_syntax = {
            (abstract, ts): cx
            for cx, (abstract, ts) in assoc.accepted.items()
            if cx in assoc.scu_contexts
        }
        self._message_id = operation_id  # ours count on from the C-GET's

    def context_for(self, sop_class_uid: str, transfer_syntax_uid: str) -> int | None:
        return self._by_syntax.get((sop_class_uid, transfer_syntax_uid))

    def next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def store(self, context_id: int, command: bytes, data_set: bytes,
              while_waiting: Callable[[], None] | None = None) -> int:
        return self.assoc.store_on_this(
            context_id, command, data_set, self._message_id, self.operation_id, while_waiting
        )


class _ReadAhead:
    """The next original, read while the peer handles the current C-STORE (between
    our ``sendall`` and its response), in the same thread.

    A reading thread (as :mod:`.qr` uses) parsed the header holding the GIL just when
    the C-STORE-RSP arrived: the sending thread then waited out the interpreter's
    switch interval (5 ms) for it, longer than the peer took to store an instance.
    """

    def __init__(self, service: QueryRetrieveService, items: list[RetrieveItem]) -> None:
        self.service = service
        self.items = items
        self._n = -1
        self._value: EncodedInstance | None = None

    def fill(self, n: int) -> None:
        if n < len(self.items) and n != self._n:
            self._value, self._n = encoded(self.service, self.items[n]), n

    def get(self, n: int) -> EncodedInstance | None:
        self.fill(n)
        return self._value


class PlainQueryRetrieve:
    """The ``on_request`` of a :class:`FastAssociation`: C-FIND, C-MOVE and C-GET.

    Parameters
    ----------
    service
        The Q/R use cases, the same instance the pynetdicom handlers call.
    destinations
        Move Destination AE title -> where it listens (settings and admin API).
    gate
        The cap on retrieves at once, shared with the pynetdicom handlers.
    ae_title, max_pdu, connect_timeout_s, acse_timeout_s, dimse_timeout_s
        Our side of the association to a move destination.
    """

    def __init__(
        self,
        service: QueryRetrieveService,
        destinations: DestinationLookup,
        gate: RetrieveGate,
        *,
        ae_title: str,
        max_pdu: int,
        connect_timeout_s: float,
        acse_timeout_s: float,
        dimse_timeout_s: float,
        serve_get: bool = True,
    ) -> None:
        self.serve_get = serve_get
        self.service = service
        self.destinations = destinations
        self.gate = gate
        self.ae_title = ae_title
        self.max_pdu = max_pdu
        self.connect_timeout_s = connect_timeout_s
        self.acse_timeout_s = acse_timeout_s
        self.dimse_timeout_s = dimse_timeout_s

    @property
    def sop_classes(self) -> frozenset[str]:
        """The Patient and Study Root FIND and MOVE (and GET) models served here."""
        return frozenset([*FIND_MODELS, *MOVE_MODELS, *(GET_MODELS if self.serve_get else ())])

    def contexts(self) -> list[PresentationContext]:
        return [build_context(UID(uid), SYNTAXES) for uid in sorted(self.sop_classes)]

    def __call__(
        self, assoc: FastAssociation, command: Command, context_id: int, identifier: bytes
    ) -> None:
        abstract, ts = assoc.accepted[context_id]
        if command.command_field == C_FIND_RQ:
            _Operation(self, assoc, command, context_id, ts, abstract).find(identifier)
        elif command.command_field == C_MOVE_RQ:
            _Operation(self, assoc, command, context_id, ts, abstract).move(identifier)
        elif command.command_field == C_GET_RQ and self.serve_get:
            _Operation(self, assoc, command, context_id, ts, abstract).get(identifier)
        else:
            raise AbortError(0x02, f"unsupported DIMSE command 0x{command.command_field:04X}")


class _Operation:
    """One C-FIND, C-MOVE or C-GET request being answered."""

    def __init__(
        self,
        owner: PlainQueryRetrieve,
        assoc: FastAssociation,
        command: Command,
        context_id: int,
        transfer_syntax: str,
        abstract: str,
    ) -> None:
        self.owner = owner
        self.service = owner.service
        self.assoc = assoc
        self.command = command
        self.context_id = context_id
        self.ts = UID(transfer_syntax)
        self.abstract = abstract
        self.patient_key = ""
        self.pending = 0  # pending responses sent (the action log's "matches")

    # -- shared ----------------------------------------------------------------------

    def _decode(self, data: bytes) -> Dataset:
        """The identifier in the context's transfer syntax, every element parsed now
        (pydicom parses lazily: a malformed value must fail here, not mid-answer)."""
        ds = decode(BytesIO(data), self.ts.is_implicit_VR, self.ts.is_little_endian,
                    self.ts.is_deflated)
        for elem in ds.iterall():
            _ = elem.value
        return ds

    def _encode(self, ds: Dataset) -> bytes:
        raw = encode(ds, self.ts.is_implicit_VR, self.ts.is_little_endian, self.ts.is_deflated)
        if raw is None:
            raise ValueError("identifier not encodable")
        return raw

    def _send(self, field: int, status: int, error_comment: str = "",
              data: Dataset | None = None,
              counts: tuple[int | None, int, int, int] | None = None) -> None:
        body = self._encode(data) if data is not None else b""
        cmd = encode_response(field, self.command, status, error_comment,
                              has_dataset=data is not None, counts=counts)
        self.assoc.send_message(self.context_id, cmd, body)
        if status in (PENDING, PENDING_WARNING):
            self.pending += 1

    def _audit(self, event_type: str, status: int) -> None:
        """The entry the pynetdicom path's DIMSE audit hooks write (:mod:`.audit`)."""
        log = self.service.audit
        if log is None:
            return
        try:
            record_dimse(
                log,
                event_type=event_type,
                action="E" if event_type == "dicom.c-find" else "R",
                status=status,
                calling_ae=self.assoc.calling_ae,
                address=self.assoc.peer.rsplit(":", 1)[0],
                resource=f"SOPClass/{self.command.affected_sop_class_uid}",
                patient_key=self.patient_key,
                detail={"sop_class_uid": self.command.affected_sop_class_uid,
                        "matches": self.pending},
            )
        except Exception:
            logger.error("DIMSE audit: response not recorded", exc_info=True)

    def _identifier(self, data: bytes) -> Dataset | None:
        try:
            ds = self._decode(data)
        except Exception:
            # Hostile or broken bytes: a failure status, never a crash.
            logger.warning("identifier from %s not decodable", self.assoc.calling_ae)
            return None
        try:
            self.patient_key = identifier_patient_key(self.service.patient_secret, ds)
        except Exception:
            self.patient_key = ""  # the action log names no patient rather than fail
        return ds

    # -- C-FIND (PS3.4 C.4.1.3.1) ------------------------------------------------------

    def find(self, data: bytes) -> None:
        """One Pending response per match (0xFF01 when some matching keys were not
        applied, PS3.4 C.4.1.1.4), Cancel (0xFE00) once a C-CANCEL-RQ arrives, Out of
        Resources (0xA700) past the configured number of matches, then the final."""
        status, text = self._find(data)
        self._send(C_FIND_RSP, status, text)
        self._audit("dicom.c-find", status)

    def _find(self, data: bytes) -> tuple[int, str]:
        sop_class = self.command.affected_sop_class_uid
        model = FIND_MODELS.get(sop_class)
        calling = self.assoc.calling_ae
        if model is None or sop_class != self.abstract:
            return 0x0122, "SOP Class not supported"
        identifier = self._identifier(data)
        if identifier is None:
            return 0xC310, "Unable to decode the identifier"  # as pynetdicom answers
        try:
            request = self.service.parse_find(identifier, model)
        except ServiceError as exc:
            logger.warning("C-FIND from %s refused: %s", calling, exc.title)
            return exc.dimse_status, comment(exc)
        pending = PENDING_WARNING if request.unsupported else PENDING
        sent = 0
        try:
            for response in self.service.find(request):
                if self.assoc.cancelled(self.command.message_id):
                    logger.info("C-FIND from %s cancelled after %d matches", calling, sent)
                    return CANCEL, ""
                self._send(C_FIND_RSP, pending, data=response)
                sent += 1
        except ServiceError as exc:
            logger.warning("C-FIND from %s stopped after %d: %s", calling, sent, exc.title)
            return exc.dimse_status, comment(exc)
        logger.info("C-FIND %s level from %s: %d matches", request.level, calling, sent)
        return 0x0000, ""

    # -- C-MOVE (PS3.4 C.4.2.3.1) ------------------------------------------------------

    def move(self, data: bytes) -> None:
        """C-STORE sub-operations to the Move Destination, a Pending response with the
        sub-operation counts after each (PS3.4 C.4.2.1.5), the final one with the
        Failed SOP Instance UID List when any failed (C.4.2.1.4.2)."""
        status = self._move(data)
        self._audit("dicom.c-move", status)

    def _refuse(self, status: int, text: str, field: int = C_MOVE_RSP) -> int:
        self._send(field, status, text, counts=(None, 0, 0, 0))
        return status

    def _move(self, data: bytes) -> int:
        calling = self.assoc.calling_ae
        dest_ae = self.command.move_destination.strip()
        remote = self.owner.destinations(dest_ae) if dest_ae else None
        if remote is None:
            logger.warning("C-MOVE from %s to unknown destination %s", calling, dest_ae)
            return self._refuse(_UNKNOWN_DESTINATION, "Move destination unknown")
        sop_class = self.command.affected_sop_class_uid
        model = MOVE_MODELS.get(sop_class)
        if model is None or sop_class != self.abstract:
            return self._refuse(0x0122, "SOP Class not supported")
        identifier = self._identifier(data)
        if identifier is None:
            return self._refuse(0xC510, "Unable to decode the identifier")
        try:
            items = self.service.plan_retrieve(identifier, model)
        except ServiceError as exc:
            logger.warning("C-MOVE from %s refused: %s", calling, exc.title)
            return self._refuse(exc.dimse_status, comment(exc))
        if not items:
            self._record(dest_ae, items)
            self._send(C_MOVE_RSP, 0x0000, counts=(None, 0, 0, 0))
            return 0x0000
        if not self.owner.gate.try_enter():
            return self._refuse(REFUSED_SUBOPS, "Too many retrieves at once; try again later")
        try:
            try:
                scu = StorageScu.associate(
                    remote.host,
                    remote.port,
                    calling_ae=self.owner.ae_title,
                    called_ae=dest_ae,
                    contexts=retrieve_contexts(items),
                    max_pdu=self.owner.max_pdu,
                    connect_timeout_s=self.owner.connect_timeout_s,
                    acse_timeout_s=self.owner.acse_timeout_s,
                    dimse_timeout_s=self.owner.dimse_timeout_s,
                )
            except OSError as exc:  # refused, aborted, unreachable, silent
                logger.warning("C-MOVE from %s: destination %s not associated: %s",
                               calling, dest_ae, exc)
                return self._refuse(_UNKNOWN_DESTINATION, "Move destination not reachable")
            logger.info("C-MOVE from %s to %s: %d instances", calling, dest_ae, len(items))
            return self._sub_operations(scu, dest_ae, items, C_MOVE_RSP)
        finally:
            self.owner.gate.leave()

    # -- C-GET (PS3.4 C.4.3.3.1) -------------------------------------------------------

    def get(self, data: bytes) -> None:
        """C-STORE sub-operations on this association, responses as for C-MOVE."""
        status = self._get(data)
        self._audit("dicom.c-get", status)

    def _get(self, data: bytes) -> int:
        calling = self.assoc.calling_ae
        sop_class = self.command.affected_sop_class_uid
        model = GET_MODELS.get(sop_class)
        if model is None or sop_class != self.abstract:
            return self._refuse(0x0122, "SOP Class not supported", C_GET_RSP)
        identifier = self._identifier(data)
        if identifier is None:
            return self._refuse(0xC410, "Unable to decode the identifier", C_GET_RSP)
        try:
            items = self.service.plan_retrieve(identifier, model)
        except ServiceError as exc:
            logger.warning("C-GET from %s refused: %s", calling, exc.title)
            return self._refuse(exc.dimse_status, comment(exc), C_GET_RSP)
        if not items:
            self._send(C_GET_RSP, 0x0000, counts=(None, 0, 0, 0))
            return 0x0000
        if not self.owner.gate.try_enter():
            return self._refuse(REFUSED_SUBOPS, "Too many retrieves at once; try again later",
                                C_GET_RSP)
        try:
            logger.info("C-GET from %s: %d instances", calling, len(items))
            sender = _SameAssociation(self.assoc, self.command.message_id)
            return self._sub_operations(sender, calling, items, C_GET_RSP)
        finally:
            self.owner.gate.leave()

    def _sub_operations(self, scu: _Sender, dest_ae: str, items: list[RetrieveItem],
                        field: int) -> int:
        completed = failed = warning = 0
        failed_uids: list[str] = []
        remaining = len(items)
        cancelled = False
        attempted: list[RetrieveItem] = []
        ahead = _ReadAhead(self.service, items)
        usable = True
        try:
            for n, item in enumerate(items):
                current = ahead.get(n)
                if self.assoc.cancelled(self.command.message_id):
                    cancelled = True
                    break
                attempted.append(item)
                status: int | None = None
                if usable:
                    try:
                        status = self._store(scu, item, current, field,
                                             partial(ahead.fill, n + 1))
                    except OSError as exc:
                        # The destination went away or stopped answering: this and
                        # every later sub-operation fail (PS3.4 C.4.2.3.1).
                        logger.warning("C-MOVE to %s: association lost: %s", dest_ae,
                                       type(exc).__name__)
                        usable = False
                remaining -= 1
                if status is None or (status != 0x0000 and status not in _STORE_WARNINGS):
                    failed += 1
                    failed_uids.append(item.sop_instance_uid)
                elif status == 0x0000:
                    completed += 1
                else:
                    warning += 1
                self._send(field, PENDING, counts=(remaining, completed, failed, warning))
        finally:
            if isinstance(scu, StorageScu):
                # Released before the final response, as pynetdicom does: once the
                # requestor reads it, the destination has everything (PS3.8 9.3.6).
                if usable:
                    scu.release()
                else:
                    scu.abort()
        if attempted:
            self._record(dest_ae, attempted, "move" if field == C_MOVE_RSP else "get")
        listed = Dataset()
        listed.FailedSOPInstanceUIDList = failed_uids or ""
        if cancelled:
            logger.info("retrieve from %s cancelled, %d left", self.assoc.calling_ae, remaining)
            self._send(field, CANCEL, data=listed,
                       counts=(remaining, completed, failed, warning))
            return CANCEL
        if not failed and not warning:
            final = 0x0000
            self._send(field, final, counts=(None, completed, failed, warning))
            return final
        final = REFUSED_SUBOPS if failed == len(items) else _SUBOPS_WARNING
        self._send(field, final, data=listed, counts=(None, completed, failed, warning))
        return final

    def _store(self, scu: _Sender, item: RetrieveItem, stored: EncodedInstance | None,
               field: int, while_waiting: Callable[[], None]) -> int | None:
        """One C-STORE sub-operation; None when it cannot be sent (nothing went out)."""
        payload = self._payload(scu, item, stored)
        if payload is None:
            return None
        context_id, data_set = payload
        move = field == C_MOVE_RSP  # PS3.7 9.3.1.1: Move Originator only for a C-MOVE
        command = encode_store_rq(
            scu.next_message_id(),
            item.sop_class_uid,
            item.sop_instance_uid,
            move_originator_aet=self.assoc.calling_ae if move else "",
            move_originator_id=self.command.message_id if move else None,
        )
        return scu.store(context_id, command, data_set, while_waiting)

    def _payload(self, scu: _Sender, item: RetrieveItem, stored: EncodedInstance | None
                 ) -> tuple[int, bytes] | None:
        """The context and data set bytes of a sub-operation.

        The stored bytes as they are, in a context of their own transfer syntax (PS3.7
        9.3.1: the data set of a C-STORE is the encoded data set). Otherwise (the
        destination accepted only another transfer syntax, or the patient is coerced
        to the index's, issue 17) the decoded instance, encoded by pydicom in its own
        syntax or, if that is uncompressed, in an accepted uncompressed one (PS3.5
        A.1, A.2); we never transcode pixel data, so a compressed instance without a
        context of its own syntax fails (listed in the Failed SOP Instance UID List).
        """
        if stored is not None:
            cx = scu.context_for(item.sop_class_uid, stored.transfer_syntax_uid)
            if cx is not None:
                return cx, stored.data_set
        ds = load(self.service, item)
        if ds is None:
            return None
        meta = getattr(ds, "file_meta", None)
        own = UID(str(getattr(meta, "TransferSyntaxUID", "") or item.transfer_syntax_uid))
        candidates: list[UID] = [own]
        if own in SYNTAXES:
            candidates += [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        for syntax in candidates:
            cx = scu.context_for(item.sop_class_uid, str(syntax))
            if cx is None:
                continue
            try:
                raw: Any = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian,
                                  syntax.is_deflated)
            except Exception:
                raw = None
            if raw is None:
                logger.error("%s not encodable in %s", item.sop_instance_uid, syntax.name)
                return None
            return cx, bytes(raw)
        logger.warning("C-MOVE: no accepted context for %s in %s", item.sop_class_uid, own.name)
        return None

    def _record(self, dest_ae: str, items: list[RetrieveItem],
                kind: Literal["move", "get"] = "move") -> None:
        self.service.record_retrieve(
            kind,
            calling_ae=self.assoc.calling_ae,
            address=self.assoc.peer.rsplit(":", 1)[0],
            destination=dest_ae,
            items=items,
        )
