"""The DICOM receiver: one listening socket, fast path for storage, pynetdicom for the rest.

Every accepted connection is peeked at (``MSG_PEEK``, nothing consumed): an
A-ASSOCIATE-RQ that proposes only Storage and Verification contexts is served by
:class:`~ingest.dicom.association.FastAssociation`; anything else (worklist, MPPS,
role selection, user identity, TLS) is handed untouched to a pynetdicom
``AssociationServer`` in the same process, with the handlers the composition root
registered. Several processes may serve one listening socket (pre-fork, see
:mod:`pacslab.services`): the kernel hands each connection to one of them.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from core.logging import correlation
from core.settings import DicomSettings
from ingest.dicom.association import (
    A_ASSOCIATE_RQ_TYPE,
    AssociationPolicy,
    FastAssociation,
    Negotiation,
)
from ingest.dicom.handlers import handle_echo, handle_store, store_staged
from ingest.service import IngestService

__all__ = ["TRANSFER_SYNTAXES", "DicomReceiver", "bind_listener"]

logger = logging.getLogger(__name__)

#: Accepted as received, never transcoded (PS3.5 Annex A, PS3.6 Table A-1).
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.100",  # MPEG2 MP@ML (US/endoscopy video)
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264
    "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC/H.264 BD
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265 Main
]


def storage_contexts(extra_classes: Sequence[str] = ()) -> list[PresentationContext]:
    """pynetdicom's storage SOP classes plus ``extra_classes`` (retired, private)."""
    known = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    extra = [uid for uid in extra_classes if uid not in known]
    return [build_context(uid, TRANSFER_SYNTAXES) for uid in [*known, *extra]]


def bind_listener(host: str, port: int, backlog: int = 128) -> socket.socket:
    """Bind and listen before forking, so every receiver process shares the socket."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def _ssl_context(settings: DicomSettings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca is not None:
        ctx.load_verify_locations(settings.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class DicomReceiver:
    """Accept loop of one process; see the module docstring.

    Parameters
    ----------
    settings
        The ``dicom`` section.
    service
        Where received instances go.
    extra_contexts, extra_handlers
        Presentation contexts and pynetdicom event handlers of other services that
        share this AE and port (worklist C-FIND, MPPS), served by pynetdicom.
    extra_storage_classes
        Storage SOP classes accepted beyond pynetdicom's list (retired, private).
    share_accepts
        Other receiver processes accept on the same socket: a busy one lets them go
        first.

    Durability (fsync) is the archive's business, not the transport's.
    """

    def __init__(
        self,
        settings: DicomSettings,
        service: IngestService,
        *,
        extra_contexts: Sequence[PresentationContext] = (),
        extra_handlers: Sequence[tuple[Any, ...]] = (),
        share_accepts: bool = False,
        extra_storage_classes: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.share_accepts = share_accepts
        self.service = service
        storage = storage_contexts(extra_storage_classes)
        contexts = [*storage, build_context(Verification, TRANSFER_SYNTAXES[:2])]
        self.policy = AssociationPolicy(
            contexts=contexts,
            storage_sop_classes=frozenset(str(cx.abstract_syntax) for cx in storage),
            allowed_calling_aes=frozenset(a.strip() for a in settings.allowed_calling_aes),
            max_pdu=settings.max_pdu,
            network_timeout_s=settings.network_timeout_s,
            max_associations=settings.max_associations,
        )
        self.ssl_context = _ssl_context(settings)
        self._configure_pynetdicom()
        self.ae = self._build_ae(contexts, extra_contexts)
        handlers = [
            (evt.EVT_C_STORE, handle_store, [service]),
            (evt.EVT_C_ECHO, handle_echo),
            *extra_handlers,
        ]
        # pynetdicom serves only connections we hand over; its own listening socket is
        # a loopback placeholder that nobody connects to.
        server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=handlers, ssl_context=None
        )
        assert server is not None  # block=False returns the server
        self.slow_server = server
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connections = 0  # being served by this process
        self._count_lock = threading.Lock()

    def _configure_pynetdicom(self) -> None:
        # Set once per process from Settings (STYLE.md §4); these are pynetdicom globals.
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.LOG_HANDLER_LEVEL = "none"
        _config.PASS_CONTEXTVARS = True
        # We accept data sets as received: value validation on read only produces
        # warnings (pydicom's default WARN mode) and its regexes cost more than the
        # rest of header parsing. Refusals are decided by core.instance.record_from().
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        # pynetdicom's chunked receive writes to tempfile's directory: keep it on the
        # same file system as the originals.
        tempfile.tempdir = str(self.service.archive.staging_dir())

    def _build_ae(
        self, contexts: Sequence[PresentationContext], extra: Sequence[PresentationContext]
    ) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.acse_timeout = self.settings.acse_timeout_s
        ae.dimse_timeout = self.settings.dimse_timeout_s
        ae.network_timeout = self.settings.network_timeout_s
        ae.maximum_associations = self.settings.max_associations
        ae.require_calling_aet = list(self.policy.allowed_calling_aes)
        for cx in [*contexts, *extra]:
            uid = str(cx.abstract_syntax)
            # Storage contexts accept SCP/SCU Role Selection (PS3.7 D.3.3.4) either
            # way, so a C-GET SCU can take the SCP role for its sub-operations.
            role = True if uid in self.policy.storage_sop_classes else None
            ae.add_supported_context(uid, cx.transfer_syntax, scu_role=role, scp_role=role)
        return ae

    # -- accept loop ---------------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        """Accept connections until :meth:`stop` (blocking)."""
        # Non-blocking accept after our own poll: every receiver process sharing the
        # socket wakes for a new connection, and one already serving associations
        # (``share_accepts``: there are other processes) waits a moment before taking
        # it, so an idle process gets it first. Left to
        # the kernel, four parallel associations were split 3:1 between two processes
        # as often as 2:2, and the busier process (one GIL) set the pace.
        listener.setblocking(False)
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(500):  # ms; so stop() is noticed
                continue
            busy = self._connections if self.share_accepts else 0
            if busy:
                time.sleep(0.01 * min(busy, 5))
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                continue  # another process took it
            except OSError:
                if self._stop.is_set():
                    break
                logger.error("accept failed", exc_info=True)
                continue
            sock.setblocking(True)
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            with self._count_lock:
                self._connections += 1
            thread = threading.Thread(
                target=self._handle_counted,
                args=(sock, addr, peer),
                name=f"dicom-{peer}",
                daemon=True,
            )
            thread.start()

    def _handle_counted(self, sock: socket.socket, addr: Any, peer: str) -> None:
        try:
            self._handle(sock, addr, peer)
        finally:
            with self._count_lock:
                self._connections -= 1

    def start(self, listener: socket.socket) -> threading.Thread:
        thread = threading.Thread(
            target=self.serve, args=(listener,), name="dicom-accept", daemon=True
        )
        thread.start()
        self._threads.append(thread)
        return thread

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        self.slow_server.shutdown()

    def _handle(self, sock: socket.socket, addr: Any, peer: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            try:
                sock.settimeout(self.settings.acse_timeout_s)
                tls = self.ssl_context.wrap_socket(sock, server_side=True)
                tls.settimeout(None)
            except (OSError, ssl.SSLError) as exc:
                logger.warning("TLS handshake with %s failed: %s", peer, type(exc).__name__)
                sock.close()
                return
            self._serve_slow(tls, addr)
            return
        try:
            rq_bytes = self._peek_associate_rq(sock)
        except (OSError, ValueError) as exc:
            logger.warning(
                "connection from %s dropped before A-ASSOCIATE: %s", peer, type(exc).__name__
            )
            sock.close()
            return
        if rq_bytes is not None:
            try:
                plan: Negotiation | None = self.policy.negotiation(rq_bytes)
            except Exception:
                plan = None  # let pynetdicom answer malformed requests per PS3.8
            if plan is not None and plan.fast:
                _recv_consume(sock, len(rq_bytes))
                FastAssociation(
                    sock,
                    peer,
                    self.policy,
                    partial(store_staged, self.service),
                    self.service.archive.staging_dir(),
                ).run(plan)
                return
        sock.settimeout(None)
        self._serve_slow(sock, addr)

    def _serve_slow(self, sock: socket.socket, addr: Any) -> None:
        """Hand the connection to pynetdicom, under a correlation id of its own.

        pynetdicom's ``Association`` copies the context it is created in
        (``PASS_CONTEXTVARS``) to its reactor and DIMSE threads, so the id must be
        set before it exists, in this thread. ``process_request`` would first start a
        plain thread (``socketserver.ThreadingMixIn``), whose context is empty: the
        worklist and MPPS logs and action-log entries would have no correlation id.
        This thread already belongs to the connection, so it builds the association.
        """
        with correlation():
            self.slow_server.process_request_thread(sock, addr)

    def _peek_associate_rq(self, sock: socket.socket) -> bytes | None:
        """The A-ASSOCIATE-RQ PDU, read without consuming it; None if it is another PDU."""
        sock.settimeout(self.settings.acse_timeout_s)
        header = sock.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(header) < 6:
            raise ConnectionError("closed")
        pdu_type, _, length = struct.unpack(">BBI", header)
        if pdu_type != A_ASSOCIATE_RQ_TYPE or length > 1 << 20:
            return None
        data = sock.recv(6 + length, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(data) < 6 + length:
            raise ConnectionError("closed during A-ASSOCIATE-RQ")
        return data


def _recv_consume(sock: socket.socket, n: int) -> None:
    while n:
        chunk = sock.recv(min(n, 65536))
        if not chunk:
            raise ConnectionError("closed")
        n -= len(chunk)
