"""Receiver processes: pre-forked children sharing one listening socket (issue #2 §7).

One Python process is bound by its GIL; the kernel spreads accepted connections over
the children blocked in ``accept`` on the inherited socket, so parallel associations
use every core. Children die with their parent (PR_SET_PDEATHSIG), so a killed
service never leaves a receiver holding the port.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.presentation import PresentationContext

from core.logging import configure
from core.settings import Settings
from ingest.dicom.scp import AcceptLoads, DicomReceiver, bind_listener
from ingest.service import IngestService
from pacslab.runtime import configure_runtime, die_with_parent
from pacslab.wiring import (
    build_commitment_queue,
    build_index,
    build_ingest,
    build_order_service,
    staging_dir,
)
from services.storage_classes import extra_storage_classes
from storage.index.sql import SqlIndex
from storage.originals import clear_staging

if TYPE_CHECKING:
    from ingest.dicom.qr_association import PlainQueryRetrieve

__all__ = [
    "DicomProcesses",
    "receiver_count",
    "receiver_staging_name",
    "run_receiver",
    "warn_open_access",
]

logger = logging.getLogger(__name__)


def run_receiver(
    listener: socket.socket,
    settings: Settings,
    stop: threading.Event | None = None,
    started: dict[str, object] | None = None,
    *,
    siblings: int = 1,
    loads: AcceptLoads | None = None,
) -> None:
    """Serve DICOM on ``listener`` in this process until ``stop`` (or forever).

    ``started`` (for tests) receives the service once the receiver accepts connections;
    ``siblings`` is how many receiver processes share ``listener``, ``loads`` their
    connection counts.
    """
    index = build_index(settings, migrate=False)
    service = build_ingest(
        settings,
        index,
        staging_name=receiver_staging_name(listener.getsockname()[1]),
        journal=True,
    )
    if service.archive.journal is not None:
        _AT_TERM.append(service.archive.journal.close)
    # pynetdicom's and pydicom's globals and the temp directory, once for this
    # process (the receiver and the worklist SCP it also serves no longer set them).
    configure_runtime(receiver_staging=service.archive.staging_dir())
    extra_contexts, extra_handlers = _other_dicom_services(settings, index)
    extra_contexts, extra_handlers, plain_qr = _query_retrieve(
        settings, index, service, extra_contexts, extra_handlers
    )
    # Queries and procedure steps served by pynetdicom are logged too (issue 7 §2).
    from ingest.dicom.audit import dimse_audit_handlers

    if service.audit is not None:
        extra_handlers = [
            *extra_handlers,
            *dimse_audit_handlers(
                service.audit, service.patient_secret, mpps_patient=_mpps_patient(index)
            ),
        ]
    receiver = DicomReceiver(
        settings.dicom,
        service,
        extra_contexts=extra_contexts,
        extra_handlers=extra_handlers,
        share_accepts=siblings > 1,
        loads=loads,
        plain_requests=plain_qr,
        plain_sop_classes=plain_qr.sop_classes if plain_qr is not None else frozenset(),
        plain_contexts=plain_qr.contexts() if plain_qr is not None else (),
        max_identifier_bytes=settings.qr.max_identifier_bytes,
        plain_roles=plain_qr is not None and plain_qr.serve_get,
        extra_storage_classes=extra_storage_classes(
            accept_retired=settings.qr.accept_retired_storage,
            private=settings.qr.private_storage_classes,
        ),
    )
    index.prepare_ingest()  # (not in the first instance's acknowledgement)
    # Everything built so far (pydicom's dictionaries, pynetdicom, SQLAlchemy's tables
    # and compiled statements) lives as long as the process: out of the cyclic
    # collector's reach, a full collection no longer walks it. Measured here, the
    # first full collection in each receiver took ~90 ms of CPU, a tenth of a
    # 500-instance transfer's CPU (CPython's documented use of gc.freeze()).
    gc.collect()
    gc.freeze()
    thread = receiver.start(listener)
    if started is not None:
        started["service"] = service
        started["receiver"] = receiver
    try:
        # Until the receiver's thread ends (the process then exits and is restarted),
        # without waking up five times a second to look (issue 21: idle CPU).
        if stop is None:
            thread.join()
        else:
            while thread.is_alive() and not stop.wait(0.2):
                pass
    finally:
        receiver.stop()
        service.close()
        service.archive.close()
        index.close()


def warn_open_access(settings: Settings) -> None:
    """WARNING at start-up for every DICOM service any calling AE may use (issue 14 §9).

    ``dicom.require_ae_allow_list`` turns the first into a start-up failure
    (:class:`core.settings.DicomSettings` refuses it).
    """
    if not settings.dicom.allowed_calling_aes:
        logger.warning(
            "DICOM %s accepts associations from any calling AE title "
            "(set PACSLAB_DICOM__ALLOWED_CALLING_AES, and "
            "PACSLAB_DICOM__REQUIRE_AE_ALLOW_LIST=true to enforce it)",
            settings.dicom.ae_title,
        )
    if not settings.worklist.allowed_calling_aes and not settings.dicom.allowed_calling_aes:
        logger.warning(
            "Modality Worklist C-FIND and MPPS answer any calling AE title "
            "(set PACSLAB_WORKLIST__ALLOWED_CALLING_AES)"
        )


def receiver_staging_name(port: int) -> str:
    """This receiver's staging subdirectory: host and port, unique among receivers
    sharing one originals directory, and the same again after a restart."""
    return f"{socket.gethostname()}-{port}"


def _mpps_patient(index: SqlIndex) -> Callable[[str], tuple[str, str] | None]:
    """Patient ID and issuer of a stored MPPS, for the action log of its N-SETs."""
    from storage.index.orders import SqlMppsRepository
    from worklist.mpps import restore_step

    repo = SqlMppsRepository(index, restore_step)

    def lookup(uid: str) -> tuple[str, str] | None:
        step = repo.get(uid)
        if step is None:
            return None
        attrs = step.attributes
        return str(attrs.get("PatientID", "") or ""), str(attrs.get("IssuerOfPatientID", "") or "")

    return lookup


def _other_dicom_services(
    settings: Settings, index: SqlIndex
) -> tuple[list[PresentationContext], list[Any]]:
    """Modality Worklist C-FIND and MPPS on the receiver's AE and port (PS3.4 K, F).

    The worklist reads the SQL order store; MPPS steps are kept in the index, and
    their effects move orders along and queue ``series`` jobs for the series an
    MPPS reports complete.
    """
    from storage.index.orders import SqlMppsRepository, SqlWorklistSource
    from worklist.mpps import restore_step
    from worklist.orders.effects import OrderEffects
    from worklist.scp import handlers, presentation_contexts

    service = build_order_service(settings, index)
    sink = OrderEffects(service, lambda uid: index.add_job("series", uid))
    evt_handlers = handlers(
        SqlWorklistSource(index),
        SqlMppsRepository(index, restore_step),
        settings.worklist,
        sink,
    )
    return presentation_contexts(), evt_handlers


def _query_retrieve(
    settings: Settings,
    index: SqlIndex,
    service: IngestService,
    contexts: list[PresentationContext],
    handlers: list[Any],
) -> tuple[list[PresentationContext], list[Any], PlainQueryRetrieve | None]:
    """Query/Retrieve FIND, MOVE, GET (PS3.4 C) and Storage Commitment (PS3.4 J).

    The worklist's C-FIND handler becomes the fallback of the Q/R one: pynetdicom
    binds one handler per intervention event, so one handler routes by SOP Class.
    With ``qr.plain_socket``, also the plain-socket C-FIND/C-MOVE server, sharing the
    service and the cap on retrieves with the pynetdicom handlers.
    """
    from functools import partial

    from ingest.dicom import qr
    from ingest.dicom._retrieve import RetrieveGate
    from ingest.dicom.qr_association import PlainQueryRetrieve
    from services.destinations import DestinationDirectory
    from services.query_retrieve import QueryRetrieveService

    qr_service = QueryRetrieveService(
        index,
        service.archive.originals,
        ae_title=settings.dicom.ae_title,
        max_find_results=settings.qr.max_find_results,
        max_retrieve_instances=settings.qr.max_retrieve_instances,
        audit=service.audit,
        patient_secret=service.patient_secret,
    )
    fallback = None
    rest: list[Any] = []
    for entry in handlers:
        if entry[0] is evt.EVT_C_FIND:
            fn, args = entry[1], list(entry[2]) if len(entry) > 2 else []
            fallback = partial(_call_with, fn, args)
        else:
            rest.append(entry)
    directory = DestinationDirectory(index, settings.qr.destinations)
    gate = RetrieveGate(settings.qr.max_concurrent_retrieves)
    qr_handlers = qr.handlers(
        qr_service,
        destinations=directory.lookup,
        max_concurrent=settings.qr.max_concurrent_retrieves,
        fallback_find=fallback,
        gate=gate,
    )
    plain = None
    if settings.qr.plain_socket:
        plain = PlainQueryRetrieve(
            qr_service,
            directory.lookup,
            gate,
            ae_title=settings.dicom.ae_title,
            max_pdu=settings.dicom.max_pdu,
            connect_timeout_s=settings.qr.connect_timeout_s,
            acse_timeout_s=settings.dicom.acse_timeout_s,
            dimse_timeout_s=settings.dicom.dimse_timeout_s,
        )
    from ingest.dicom import commitment
    from services.commitment import CommitmentService

    decisions = CommitmentService(index, service.archive.originals)
    reporter = commitment.CommitmentReporter(
        decisions,
        directory.lookup,
        ae_title=settings.dicom.ae_title,
        timeout_s=settings.qr.connect_timeout_s,
        audit=service.audit,
        queue=build_commitment_queue(settings, index, decisions, directory.lookup),
    )
    return (
        [*contexts, *qr.presentation_contexts(), *commitment.presentation_contexts()],
        [*rest, *qr_handlers, *commitment.handlers(reporter)],
        plain,
    )


def _call_with(fn: Callable[..., Any], args: list[Any], event: Any) -> Any:
    return fn(event, *args)


#: What a receiver process does when told to stop (SIGTERM), before it exits: write
#: out its original journal (storage/journal.py), so that a stopped service leaves
#: ordinary files (and if it is killed first, the next start does it).
_AT_TERM: list[Callable[[], None]] = []


def _terminate(*_: object) -> None:
    """SIGTERM: run ``_AT_TERM`` in a thread of its own, then exit. Not in the handler
    itself: it runs in the main thread, which the actions' locks must not depend on,
    and a second SIGTERM (the process group's, then the supervisor's) is ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def stop() -> None:
        try:
            for action in _AT_TERM:
                action()
        except BaseException:
            logger.exception("stopping the receiver")
        finally:
            os._exit(0)

    threading.Thread(target=stop, name="receiver-stop", daemon=True).start()


def _child_main(
    listener: socket.socket, settings: Settings, siblings: int, loads: AcceptLoads,
    parent_pid: int,
) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, _terminate)
    configure(settings.log.level, json_format=settings.log.json_format)
    run_receiver(listener, settings, siblings=siblings, loads=loads)


def receiver_count(cores: int) -> int:
    """Receiver processes when ``PACSLAB_DICOM__WORKERS`` is 0: two per core, at most 32
    (never fewer than one per core).

    Why two: a receiver waits on the network and the device for part of every
    instance (the journal's ``fdatasync``, the SCU sending the next one), and a second
    association in the same process then shares its GIL: each release and retake
    around a system call becomes a thread switch when another thread waits. Measured
    with 4 ``storescu`` associations on 2 cores (benchmarks/test_dicom_ingest.py, issue
    19), 4 receivers took 7-10 % more instances per second than 2 (and fewer context
    switches). Why at most 32: each holds an index connection and its original journal
    (``PACSLAB_STORAGE__JOURNAL_MB`` of disk), and a site rarely has more modalities
    sending at once.
    """
    return max(cores, min(2 * cores, 32))


class DicomProcesses:
    """Bind the DICOM port, fork the receivers, restart any that dies."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.listener = bind_listener(settings.dicom.host, settings.dicom.port)
        self.port = self.listener.getsockname()[1]
        self.count = settings.dicom.workers or receiver_count(os.cpu_count() or 1)
        self._ctx = mp.get_context("fork")
        #: Connections each receiver serves, in memory shared with all of them: a
        #: new connection goes to the least busy one (ingest.dicom.scp.AcceptLoads).
        self._loads = self._ctx.RawArray("i", self.count)
        self._procs: list[BaseProcess] = []
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None

    def start(self) -> None:
        warn_open_access(self.settings)
        self._clear_staging()
        for slot in range(self.count):
            self._procs.append(self._spawn(slot))
        logger.info(
            "DICOM %s listening on port %d with %d receiver processes",
            self.settings.dicom.ae_title,
            self.port,
            self.count,
        )
        self._watch = threading.Thread(target=self._supervise, name="dicom-supervisor", daemon=True)
        self._watch.start()

    def _clear_staging(self) -> None:
        # Whatever is in staging was never acknowledged (a crash mid-receive): the SCU
        # got no success and will send it again. Only done before any receiver runs.
        # Only our own subdirectory: other receivers on this store keep theirs.
        removed = clear_staging(staging_dir(self.settings, receiver_staging_name(self.port)))
        if removed:
            logger.warning("removed %d unacknowledged partial files from staging", removed)

    def _spawn(self, slot: int) -> BaseProcess:
        self._loads[slot] = 0  # a killed receiver's connections are gone with it
        proc = self._ctx.Process(
            target=_child_main,
            args=(self.listener, self.settings, self.count, AcceptLoads(self._loads, slot),
                  os.getpid()),
            name="pacslab-dicom",
            daemon=True,
        )
        proc.start()
        return proc

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            for i, proc in enumerate(self._procs):
                if not proc.is_alive() and not self._stop.is_set():
                    logger.error(
                        "receiver process %s exited (%s); restarting", proc.pid, proc.exitcode
                    )
                    self._procs[i] = self._spawn(i)

    def stop(self) -> None:
        self._stop.set()
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            # (up to 30 s: a receiver writes out its original journal first)
            proc.join(timeout=30)
        self.listener.close()
