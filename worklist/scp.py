"""pynetdicom shell for Modality Worklist C-FIND and MPPS N-CREATE/N-SET.

Handlers only translate: they parse with :mod:`worklist.query` or
:mod:`worklist.mpps`, call the storage ports, and turn a
:class:`~core.errors.ServiceError` into a status with a PHI-free Error Comment.
Anything else is a bug and falls through to pynetdicom, which logs it and answers
0xC311 (C-FIND) or 0x0110 (N-CREATE/N-SET).

The composition root registers :func:`handlers` and :func:`presentation_contexts` on
the AE that also runs the storage SCP; :func:`build_ae` makes a stand-alone AE for a
worklist-only process. Nothing here starts a server at import.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    Verification,
)

from core.errors import OutOfResourcesError, ProcedureStepStateError, ServiceError
from worklist._attributes import Entry, UnboundedValueError
from worklist._wire import Unencodable, raw_response
from worklist.mpps import NO_LONGER_UPDATABLE_ID, Create, Effect, Set, transition
from worklist.query import MatchOptions, WorklistQuery, build_query, matching_entries, project

if TYPE_CHECKING:
    from pynetdicom.dimse_primitives import N_CREATE, N_SET
    from pynetdicom.events import Event

    from core.settings import DicomSettings, WorklistSettings
    from worklist.ports import EffectSink, MppsRepository, WorklistSource

__all__ = [
    "build_ae",
    "handle_conn_open",
    "handle_find",
    "handle_n_create",
    "handle_n_set",
    "handlers",
    "presentation_contexts",
]

logger = logging.getLogger(__name__)

_PENDING = 0xFF00
_PENDING_UNSUPPORTED_KEYS = 0xFF01
_CANCEL = 0xFE00
_NOT_AUTHORIZED = 0x0124  # PS3.7 C.5.x "Refused: Not Authorized"
_TOO_MANY = "Too many matches; narrow the query"


def handle_conn_open(event: Event) -> None:
    """EVT_CONN_OPEN: turn off Nagle's algorithm on the association's socket.

    pynetdicom writes a DIMSE command and its data set in separate sends; with
    Nagle on, the second waits for the peer's delayed ACK (~40 ms on Linux) on every
    C-FIND response. A notification handler: it logs and carries on.
    """
    sock = getattr(event.assoc.dul.socket, "socket", None) if event.assoc.dul.socket else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        logger.warning("could not set TCP_NODELAY", exc_info=True)


def _status(code: int, comment: str, error_id: int | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    # Error Comment is LO: 64 characters (PS3.7 C.4). Our messages carry no PHI.
    status.ErrorComment = comment[:64]
    if error_id is not None:
        status.ErrorID = error_id
    return status


def _error_status(exc: ServiceError) -> Dataset:
    error_id = NO_LONGER_UPDATABLE_ID if isinstance(exc, ProcedureStepStateError) else None
    return _status(exc.dimse_status, str(exc) or exc.title, error_id)


def _encoder(event: Event) -> Callable[[WorklistQuery, Entry], Dataset]:
    """How responses are built for the request's presentation context.

    Little Endian transfer syntaxes (all a modality proposes in practice) get
    pre-encoded raw elements (:mod:`worklist._wire`), which pynetdicom copies
    instead of re-encoding element by element; anything else, and any response the
    raw encoder cannot write, gets a pydicom Dataset. Both carry the same
    projection of the entry.
    """
    context = getattr(event, "context", None)
    syntax = getattr(context, "transfer_syntax", None)
    if syntax is None or not syntax.is_little_endian:
        return lambda query, entry: project(query, entry).to_dataset()
    implicit = bool(syntax.is_implicit_VR)

    def encode(query: WorklistQuery, entry: Entry) -> Dataset:
        projection = project(query, entry)
        try:
            return raw_response(projection, implicit_vr=implicit)
        except Unencodable:
            return projection.to_dataset()

    return encode


def handle_find(
    event: Event, source: WorklistSource, settings: WorklistSettings | MatchOptions
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND for the Modality Worklist Information Model (PS3.4 K.4.1.3).

    Yields one Pending (0xFF00, or 0xFF01 when some keys are not supported) per
    matching scheduled step, then lets pynetdicom send Success. A C-CANCEL ends the
    matching with 0xFE00; more than ``max_results`` matches end with 0xA700.
    """
    options = (
        settings if isinstance(settings, MatchOptions) else MatchOptions.from_settings(settings)
    )
    calling = event.assoc.requestor.ae_title
    if not _allowed(calling, getattr(settings, "allowed_calling_aes", ())):
        logger.warning("C-FIND from %s refused: calling AE not allowed", calling)
        yield _status(_NOT_AUTHORIZED, "Calling AE not allowed"), None
        return
    try:
        query = build_query(event.identifier, options)
    except ServiceError as exc:
        logger.warning("C-FIND from %s refused: %s", calling, exc)
        yield _error_status(exc), None
        return
    pending = _PENDING_UNSUPPORTED_KEYS if query.unsupported else _PENDING
    respond = _encoder(event)
    sent = 0
    try:
        for item in source.candidates(query.prefilter):
            for entry in matching_entries(query, item):
                if event.is_cancelled:
                    logger.info("C-FIND from %s cancelled after %d matches", calling, sent)
                    yield _CANCEL, None
                    return
                if sent >= options.limit:
                    logger.warning("C-FIND from %s stopped at %d matches", calling, sent)
                    yield _status(OutOfResourcesError.dimse_status, _TOO_MANY), None
                    return
                try:
                    identifier = respond(query, entry)
                except UnboundedValueError as exc:
                    # An identifier a modality would misread: leave this entry out.
                    logger.warning("C-FIND from %s: entry left out, %s", calling, exc)
                    continue
                yield pending, identifier
                sent += 1
    except ServiceError as exc:
        logger.warning("C-FIND from %s failed: %s", calling, exc.title)
        yield _error_status(exc), None
        return
    logger.info("C-FIND from %s: %d matches", calling, sent)


def _allowed(calling: str, allowed: Sequence[str]) -> bool:
    """The worklist's own allow-list (``worklist.allowed_calling_aes``); empty: any."""
    return not allowed or calling.strip() in {a.strip() for a in allowed}


def _act(effects: Sequence[Effect], sink: EffectSink | None) -> None:
    if not effects or sink is None:
        return
    try:
        sink(effects)
    except Exception:
        # The MPPS is saved and acknowledged; order bookkeeping must not undo that.
        logger.error("MPPS effects not applied", exc_info=True)


def handle_n_create(
    event: Event,
    repo: MppsRepository,
    sink: EffectSink | None = None,
    allowed: Sequence[str] = (),
) -> tuple[int | Dataset, Dataset | None]:
    """EVT_N_CREATE for Modality Performed Procedure Step (PS3.4 F.7.2.1)."""
    if not _allowed(event.assoc.requestor.ae_title, allowed):
        logger.warning(
            "MPPS N-CREATE from %s refused: calling AE not allowed", event.assoc.requestor.ae_title
        )
        return _status(_NOT_AUTHORIZED, "Calling AE not allowed"), None
    req = cast("N_CREATE", event.request)
    requested = req.AffectedSOPInstanceUID
    # PS3.7 10.1.5.1.4: the SCP assigns the UID when the SCU leaves it out.
    assigned = requested is None
    uid = str(generate_uid()) if requested is None else str(requested)
    try:
        step, effects = transition(repo.get(uid), Create(uid, event.attribute_list))
        repo.save(step)
    except ServiceError as exc:
        logger.warning("MPPS N-CREATE %s refused: %s", uid, exc.title)
        return _error_status(exc), None
    logger.info("MPPS %s created (%s)", uid, step.status)
    _act(effects, sink)
    reply = Dataset()
    if assigned:
        reply.AffectedSOPInstanceUID = uid
    return 0x0000, reply


def handle_n_set(
    event: Event,
    repo: MppsRepository,
    sink: EffectSink | None = None,
    allowed: Sequence[str] = (),
) -> tuple[int | Dataset, Dataset | None]:
    """EVT_N_SET for Modality Performed Procedure Step (PS3.4 F.7.2.2)."""
    if not _allowed(event.assoc.requestor.ae_title, allowed):
        logger.warning(
            "MPPS N-SET from %s refused: calling AE not allowed", event.assoc.requestor.ae_title
        )
        return _status(_NOT_AUTHORIZED, "Calling AE not allowed"), None
    uid = str(cast("N_SET", event.request).RequestedSOPInstanceUID)
    try:
        step, effects = transition(repo.get(uid), Set(uid, event.modification_list))
        repo.save(step)
    except ServiceError as exc:
        logger.warning("MPPS N-SET %s refused: %s", uid, exc.title)
        return _error_status(exc), None
    logger.info("MPPS %s set (%s)", uid, step.status)
    _act(effects, sink)
    return 0x0000, Dataset()


def presentation_contexts(
    transfer_syntaxes: Sequence[str] | None = None,
) -> list[PresentationContext]:
    """SCP presentation contexts for MWL FIND and MPPS (add them to the shared AE)."""
    syntaxes = list(transfer_syntaxes) if transfer_syntaxes else None
    return [
        build_context(ModalityWorklistInformationFind, syntaxes),
        build_context(ModalityPerformedProcedureStep, syntaxes),
    ]


def handlers(
    source: WorklistSource,
    repo: MppsRepository,
    settings: WorklistSettings | MatchOptions,
    sink: EffectSink | None = None,
) -> list[Any]:
    """The ``evt_handlers`` to pass to ``AE.start_server`` (with any others).

    pynetdicom's globals (identifiers kept out of its logs, correlation ids passed to
    association threads) are the composition root's to set, once per process:
    :func:`pacslab.runtime.configure_runtime`.
    """
    allowed = list(getattr(settings, "allowed_calling_aes", ()))
    return [
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_C_FIND, handle_find, [source, settings]),
        (evt.EVT_N_CREATE, handle_n_create, [repo, sink, allowed]),
        (evt.EVT_N_SET, handle_n_set, [repo, sink, allowed]),
    ]


def build_ae(dicom: DicomSettings | None = None, *, ae_title: str = "PACSLAB") -> AE:
    """A stand-alone AE offering MWL FIND, MPPS and Verification as SCP.

    Start it with ``ae.start_server((host, port), block=False,
    evt_handlers=handlers(...))``.
    """
    ae = AE(ae_title=dicom.ae_title if dicom else ae_title)
    if dicom is not None:
        ae.maximum_pdu_size = dicom.max_pdu
        ae.acse_timeout = min(dicom.acse_timeout_s, dicom.artim_timeout_s)
        ae.dimse_timeout = dicom.dimse_timeout_s
        ae.network_timeout = dicom.network_timeout_s
        ae.maximum_associations = dicom.max_associations
        ae.require_calling_aet = [a.strip() for a in dicom.allowed_calling_aes]
    for context in presentation_contexts():
        ae.add_supported_context(cast(str, context.abstract_syntax), context.transfer_syntax)
    ae.add_supported_context(Verification)
    return ae
