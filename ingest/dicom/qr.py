"""Thin pynetdicom adapters for Query/Retrieve (PS3.4 C) and Storage Commitment (PS3.4 J).

They translate only: identifiers go to :class:`services.query_retrieve.QueryRetrieveService`,
a :class:`~core.errors.ServiceError` becomes its DIMSE status with a PHI-free Error
Comment, anything else is a bug that pynetdicom answers (0xC311/0xC511/0xC611) and logs.

pynetdicom allows one handler per intervention event, and Modality Worklist also
answers C-FIND on this AE: :func:`handle_find` serves the Query/Retrieve information
models and hands every other SOP Class to ``fallback``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from io import BytesIO
from typing import TYPE_CHECKING, Any, Literal

import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from core.errors import ServiceError
from ingest.dicom import _retrieve
from ingest.dicom._retrieve import RetrieveGate, retrieve_contexts
from services.query_retrieve import (
    FIND_MODELS,
    GET_MODELS,
    MOVE_MODELS,
    EncodedInstance,
    QueryRetrieveService,
    RetrieveItem,
)

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from core.settings import RemoteAE

__all__ = [
    "RetrieveGate",
    "handle_find",
    "handle_get",
    "handle_move",
    "handlers",
    "presentation_contexts",
    "retrieve_contexts",
]

logger = logging.getLogger(__name__)

#: A SOP Class UID never proposed (a UID of the 2.25 UUID arc, PS3.5 B.2).
_NO_CONTEXT = "2.25.1"

FindHandler = Callable[["Event"], Iterator[tuple[Any, Any]]]
DestinationLookup = Callable[[str], "RemoteAE | None"]


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO; our messages carry no PHI
    return ds


def _sop_class(event: Event) -> str:
    return str(event.request.AffectedSOPClassUID or "")


def handle_find(
    event: Event, service: QueryRetrieveService, fallback: FindHandler | None = None
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND: Patient/Study Root Query/Retrieve FIND (PS3.4 C.4.1.3.1).

    One Pending response per match (0xFF01 when some matching keys were not
    applied), Cancel (0xFE00) once a C-CANCEL-FIND arrives, Out of Resources (0xA700)
    past the configured number of matches.
    """
    sop_class = _sop_class(event)
    model = FIND_MODELS.get(sop_class)
    if model is None:
        if fallback is None:
            yield _status(0x0122, "SOP Class not supported"), None
            return
        yield from fallback(event)
        return
    calling = event.assoc.requestor.ae_title
    try:
        request = service.parse_find(event.identifier, model)
    except ServiceError as exc:
        logger.warning("C-FIND from %s refused: %s", calling, exc.title)
        yield _status(exc.dimse_status, _retrieve.comment(exc)), None
        return
    pending = _retrieve.PENDING_WARNING if request.unsupported else _retrieve.PENDING
    sent = 0
    try:
        for response in service.find(request):
            if event.is_cancelled:
                logger.info("C-FIND from %s cancelled after %d matches", calling, sent)
                yield _retrieve.CANCEL, None
                return
            yield pending, response
            sent += 1
    except ServiceError as exc:
        logger.warning("C-FIND from %s stopped after %d: %s", calling, sent, exc.title)
        yield _status(exc.dimse_status, _retrieve.comment(exc)), None
        return
    logger.info("C-FIND %s level from %s: %d matches", request.level, calling, sent)


def _refuse(code: int, comment: str) -> tuple[int | Dataset, Dataset | None]:
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = ""
    return _status(code, comment), ds


def _record(service: QueryRetrieveService, event: Event, kind: Literal["move", "get"],
            destination: str,
            items: list[RetrieveItem]) -> None:
    requestor = event.assoc.requestor
    service.record_retrieve(
        kind,
        calling_ae=str(requestor.ae_title),
        address=str(requestor.address),
        destination=destination,
        items=items,
    )


def handle_move(
    event: Event,
    service: QueryRetrieveService,
    destinations: DestinationLookup,
    gate: RetrieveGate,
) -> Iterator[Any]:
    """EVT_C_MOVE (PS3.4 C.4.2.3.1): C-STORE sub-operations to a configured AE.

    pynetdicom's protocol: yield the destination ``(host, port, kwargs)`` (``(None,
    None)`` for an unknown AE: 0xA801), then the number of sub-operations, then one
    ``(0xFF00, dataset)`` per instance; pynetdicom sends the Pending responses with
    the remaining/completed/failed/warning counts and the final one with the Failed
    SOP Instance UID List (PS3.4 C.4.2.1.4). Refusals after the destination is known
    still come after the count, as the protocol has no earlier place for them.
    """
    calling = event.assoc.requestor.ae_title
    dest_ae = str(event.move_destination or "").strip()
    remote = destinations(dest_ae)
    if remote is None:
        logger.warning("C-MOVE from %s to unknown destination %s", calling, dest_ae)
        yield None, None
        return
    model = MOVE_MODELS.get(_sop_class(event))
    items: list[RetrieveItem] = []
    refusal: tuple[int, str] | None = None
    if model is None:
        refusal = (0x0122, "SOP Class not supported")
    else:
        try:
            items = service.plan_retrieve(event.identifier, model)
        except ServiceError as exc:
            refusal = (exc.dimse_status, _retrieve.comment(exc))
    if refusal is None and not items:
        yield remote.host, remote.port
        yield 0
        _record(service, event, "move", dest_ae, items)
        return
    entered = refusal is None and gate.try_enter()
    if refusal is None and not entered:
        refusal = (_retrieve.REFUSED_SUBOPS, "Too many retrieves at once; try again later")
    try:
        contexts = retrieve_contexts(items) if items else [build_context(Verification)]
        yield remote.host, remote.port, {
            "contexts": contexts,
            "evt_handlers": [(evt.EVT_ESTABLISHED, _busy_sender)],
        }
        if refusal is not None:
            logger.warning("C-MOVE from %s refused: %s", calling, refusal[1])
            yield 1
            yield _refuse(*refusal)
            return
        yield len(items)
        logger.info("C-MOVE from %s to %s: %d instances", calling, dest_ae, len(items))
        yield from _sub_operations(event, service, items)
        _record(service, event, "move", dest_ae, items)
    finally:
        if entered:
            gate.leave()


#: pynetdicom's DUL thread sleeps 1 ms whenever its queue is momentarily empty; a
#: C-STORE sub-operation is cut into one P-DATA PDU per peer Maximum Length (16 KiB
#: for DCMTK tools), and the encoder refills the queue a little slower than the DUL
#: empties it, so a 512 KiB CT image waited up to 32 ms in sleeps. While sub-operations
#: run, the loop sleeps 50 us instead (measured: C-MOVE of 100 CT images x3).
_SENDING_LOOP_DELAY_S = 0.00005


def _tighten(assoc: Any) -> None:
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = _SENDING_LOOP_DELAY_S
    _no_delay(dul)
    _send_encoded_as_stored(assoc)


def _no_delay(dul: Any) -> None:
    """TCP_NODELAY on the association's socket: a C-STORE request is written in one
    send (:func:`_write_message`), and with Nagle on its last, short segment waited
    for the ACK of the others, which the peer delays (~40 ms on Linux): a C-MOVE of
    300 CT images took 20 s instead of 3 (measured against DCMTK storescp)."""
    raw = getattr(getattr(dul, "socket", None), "socket", None)
    if raw is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _busy_sender(event: Event) -> None:
    """EVT_ESTABLISHED of our association to a move destination (see above)."""
    _tighten(event.assoc)


class _Encoded(Dataset):
    """What :func:`_sub_operations` yields for an original sent as it is stored.

    pynetdicom's C-MOVE/C-GET service classes take only Datasets and hand them to
    ``send_c_store`` (which re-encodes them); this one carries the stored bytes
    (:class:`EncodedInstance`) and the two UIDs pynetdicom reads (the failed list),
    and the association's ``send_c_store`` is wrapped to send those bytes
    (:func:`_send_encoded_as_stored`). ``fallback`` loads the decoded instance when
    no context in the stored transfer syntax was accepted.
    """

    def __init__(self, encoded: EncodedInstance, fallback: Callable[[], Dataset | None]) -> None:
        super().__init__()
        self.SOPClassUID = encoded.sop_class_uid
        self.SOPInstanceUID = encoded.sop_instance_uid
        object.__setattr__(self, "_encoded", encoded)
        object.__setattr__(self, "_fallback", fallback)


#: The as-stored path is written against pynetdicom 3's internals (below).
_ENCODED_PATH = pynetdicom.__version__.startswith("3.")
#: What :func:`_send_encoded` uses of pynetdicom 3.0's Association beyond its API.
_PYNETDICOM_INTERNALS = ("_reactor_checkpoint", "_is_paused", "_get_valid_context",
                         "_check_received_status", "_handle_no_response", "dul", "dimse")


def _send_encoded_as_stored(assoc: Any) -> None:
    """Wrap ``assoc.send_c_store`` so an :class:`_Encoded` goes out as stored.

    Measured on a C-MOVE of a 512 x 512 CT: parsing the original and re-encoding it
    (pixel data included) took about 19 ms an instance, reading its bytes about 1 ms.
    Sent unchanged in a context of its own transfer syntax (PS3.7 9.3.1, the data set
    of a C-STORE is the encoded data set), or decoded by pynetdicom otherwise.
    """
    original = getattr(assoc, "send_c_store", None)
    if original is None or getattr(assoc, "_pacslab_encoded", False):
        return
    if not all(hasattr(assoc, name) for name in _PYNETDICOM_INTERNALS):
        return  # another pynetdicom: every instance goes the decoded way

    def send_c_store(
        dataset: Any,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset:
        if isinstance(dataset, _Encoded):
            encoded: EncodedInstance = object.__getattribute__(dataset, "_encoded")
            context = _stored_context(assoc, encoded)
            if context is not None:
                return _send_encoded(assoc, context, encoded, msg_id, priority,
                                     originator_aet, originator_id)
            loaded = object.__getattribute__(dataset, "_fallback")()
            if loaded is None:
                raise ValueError("original not readable")  # a failed sub-operation
            dataset = loaded
        sent: Dataset = original(dataset, msg_id=msg_id, priority=priority,
                                 originator_aet=originator_aet, originator_id=originator_id)
        return sent

    assoc.send_c_store = send_c_store
    assoc._pacslab_encoded = True


def _stored_context(assoc: Any, encoded: EncodedInstance) -> Any:
    try:
        return assoc._get_valid_context(
            encoded.sop_class_uid, encoded.transfer_syntax_uid, "scu", allow_conversion=False
        )
    except ValueError:
        return None


def _send_encoded(
    assoc: Any,
    context: PresentationContext,
    encoded: EncodedInstance,
    msg_id: int,
    priority: int,
    originator_aet: str | None,
    originator_id: int | None,
) -> Dataset:
    """``Association.send_c_store`` (pynetdicom 3.0) with the data set given encoded."""
    if not assoc.is_established:
        raise RuntimeError("association released before the C-STORE sub-operation")
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = priority
    req.MoveOriginatorApplicationEntityTitle = originator_aet
    req.MoveOriginatorMessageID = originator_id
    req.AffectedSOPClassUID = UID(encoded.sop_class_uid)
    req.AffectedSOPInstanceUID = UID(encoded.sop_instance_uid)
    req.DataSet = BytesIO(encoded.data_set)
    if assoc.is_requestor:
        # C-MOVE: our association to the destination; its reactor stays paused
        # until the release (see _pause_reactor).
        _pause_reactor(assoc)
        _write_message(assoc, req, int(context.context_id or 0))
        _cx_id, rsp = assoc.dimse.get_msg(block=True)
    else:
        # C-GET: the reactor is the thread running this handler; pause it as
        # pynetdicom does.
        assoc._reactor_checkpoint.clear()
        try:
            while not assoc._is_paused:
                time.sleep(0.0001)
            _write_message(assoc, req, int(context.context_id or 0))
            _cx_id, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    status: Dataset = assoc._check_received_status(rsp)
    return status


#: How long the association reactor must be seen waiting to be known paused.
_PAUSED_FOR_S = 0.005


def _pause_reactor(assoc: Any) -> None:
    """Keep the reactor of our association to a move destination paused.

    pynetdicom's reactor thread takes any DIMSE message off the queue unless it is
    paused; ``send_c_store`` clears its checkpoint and waits until the reactor says
    it is paused, but the reactor sets that flag just before waiting, so a reactor
    that had already passed the checkpoint can still take the C-STORE response.
    With the request written at once (``_write_message``) the response came that
    fast now and then: a sub-operation waited out the DIMSE timeout (60 s), measured
    as one C-MOVE of 300 instances in four. Here the checkpoint stays cleared until
    ``release`` (which pauses it itself), and the reactor is known paused once its
    flag has held for a few milliseconds: it clears the flag right after waiting.
    """
    checkpoint = assoc._reactor_checkpoint
    if getattr(assoc, "_pacslab_paused", False) and not checkpoint.is_set():
        return
    checkpoint.clear()
    deadline = time.monotonic() + 1.0
    since: float | None = None
    while time.monotonic() < deadline:
        if not assoc._is_paused:
            since = None
        elif since is None:
            since = time.monotonic()
        elif time.monotonic() - since >= _PAUSED_FOR_S:
            break
        time.sleep(0.0002)
    assoc._pacslab_paused = True


def _write_message(assoc: Any, req: C_STORE, context_id: int) -> None:
    """Write a C-STORE request's P-DATA-TF PDUs to the socket in one send.

    pynetdicom hands each PDU (a 512 x 512 CT is 33 of them at DCMTK's 16 KiB) to its
    DUL thread through a queue, one per reactor turn, the two threads taking turns
    on the GIL; on a busy machine that was most of a sub-operation's time. The PDUs
    are cut as pynetdicom's ``encode_msg`` cuts them (:func:`_retrieve.p_data_tf`),
    written under a lock the DUL's writes take too (:func:`_serialised_socket`), once it
    has nothing queued, so no PDU of another message comes between them (PS3.8 9.3.1).
    The state machine stays in Sta6: sending P-DATA does not change the state (PS3.8
    9.2, DT-1).
    """
    dul = assoc.dul
    lock, raw_send = _serialised_socket(dul)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    msg.context_id = context_id
    evt.trigger(assoc, evt.EVT_DIMSE_SENT, {"message": msg})
    command = encode(msg.command_set, True, True)
    if command is None:
        raise ValueError("C-STORE command set not encodable")
    max_pdu = int(assoc.dimse.maximum_pdu_size)
    payload = b"".join([
        *_retrieve.p_data_tf(command, context_id, max_pdu, command=True),
        *_retrieve.p_data_tf(req.DataSet.getvalue() if req.DataSet else b"", context_id, max_pdu,
                    command=False),
    ])
    while dul.to_provider_queue.queue:
        time.sleep(0.0001)
    with lock:
        raw_send(payload)


def _serialised_socket(dul: Any) -> tuple[threading.Lock, Callable[[bytes], None]]:
    """A lock around the DUL socket's ``send`` (installed once per association) and
    the unwrapped ``send``."""
    installed = getattr(dul, "_pacslab_send", None)
    if installed is not None:
        return installed  # type: ignore[no-any-return]
    lock = threading.Lock()
    sock = dul.socket
    original: Callable[[bytes], None] = sock.send

    def send(bytestream: bytes) -> None:
        with lock:
            original(bytestream)

    sock.send = send
    dul._pacslab_send = (lock, original)
    return lock, original


def _sub_operations(
    event: Event, service: QueryRetrieveService, items: list[RetrieveItem]
) -> Iterator[tuple[int | Dataset, Any]]:
    # The next original is read while the current one is on the wire (its file read
    # and header parse are a millisecond or two of each sub-operation).
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieve-read")
    try:
        yield from _sub_operations_reading_ahead(event, service, items, pool)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _sub_operations_reading_ahead(
    event: Event,
    service: QueryRetrieveService,
    items: list[RetrieveItem],
    pool: ThreadPoolExecutor,
) -> Iterator[tuple[int | Dataset, Any]]:
    def read(item: RetrieveItem) -> Future[EncodedInstance | None] | None:
        return pool.submit(_retrieve.encoded, service, item) if _ENCODED_PATH else None

    ahead = read(items[0]) if items else None
    for n, item in enumerate(items):
        current, ahead = ahead, read(items[n + 1]) if n + 1 < len(items) else None
        if event.is_cancelled:
            yield _retrieve.CANCEL, None
            return
        encoded = current.result() if current is not None else None
        if encoded is not None:
            yield _retrieve.PENDING, _Encoded(encoded, partial(_retrieve.load, service, item))
            continue
        ds = _retrieve.load(service, item)
        # An unreadable original is a failed sub-operation listed by its UID (PS3.4
        # C.4.2.1.4.2): pynetdicom lists the UID of a Dataset whose C-STORE raised,
        # and a Dataset of a SOP Class no context was negotiated for raises at once,
        # before anything is sent.
        yield _retrieve.PENDING, ds if ds is not None else _unsendable(item)


def _unsendable(item: RetrieveItem) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = _NO_CONTEXT
    ds.SOPInstanceUID = item.sop_instance_uid
    return ds


def handle_get(
    event: Event, service: QueryRetrieveService, gate: RetrieveGate
) -> Iterator[Any]:
    """EVT_C_GET (PS3.4 C.4.3.3.1): C-STORE sub-operations on the same association.

    The SCU must have proposed the storage SOP classes with the SCP role (PS3.7
    D.3.3.4 SCP/SCU Role Selection); a sub-operation without such a context fails and
    is listed in the Failed SOP Instance UID List.
    """
    calling = event.assoc.requestor.ae_title
    model = GET_MODELS.get(_sop_class(event))
    if model is None:
        yield 1
        yield _refuse(0x0122, "SOP Class not supported")
        return
    try:
        items = service.plan_retrieve(event.identifier, model)
    except ServiceError as exc:
        logger.warning("C-GET from %s refused: %s", calling, exc.title)
        yield 1
        yield _refuse(exc.dimse_status, _retrieve.comment(exc))
        return
    if not items:
        yield 0
        return
    if not gate.try_enter():
        yield 1
        yield _refuse(_retrieve.REFUSED_SUBOPS, "Too many retrieves at once; try again later")
        return
    try:
        yield len(items)
        _tighten(event.assoc)
        logger.info("C-GET from %s: %d instances", calling, len(items))
        yield from _sub_operations(event, service, items)
        _record(service, event, "get", str(calling), items)
    finally:
        gate.leave()


def presentation_contexts() -> list[PresentationContext]:
    """SCP contexts of the Patient and Study Root FIND, MOVE and GET models."""
    return [
        build_context(UID(uid), _retrieve.SYNTAXES)
        for uid in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS)
    ]


def handlers(
    service: QueryRetrieveService,
    destinations: DestinationLookup,
    *,
    max_concurrent: int,
    fallback_find: FindHandler | None = None,
    gate: RetrieveGate | None = None,
) -> list[tuple[Any, ...]]:
    """``evt_handlers`` entries for the shared AE (see the module docstring); ``gate``
    is shared with the plain-socket path when it serves Q/R too."""
    gate = gate or RetrieveGate(max_concurrent)
    return [
        (evt.EVT_C_FIND, handle_find, [service, fallback_find]),
        (evt.EVT_C_MOVE, handle_move, [service, destinations, gate]),
        (evt.EVT_C_GET, handle_get, [service, gate]),
    ]
