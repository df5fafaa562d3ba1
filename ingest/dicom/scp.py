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

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler

from core.logging import correlation
from core.settings import DicomSettings
from core.transfer_syntax import ACCEPTED
from ingest.dicom.association import (
    A_ASSOCIATE_RQ_TYPE,
    Admission,
    AssociationPolicy,
    FastAssociation,
    Negotiation,
    RequestCallback,
    Ticket,
)
from ingest.dicom.dimse import C_STORE_RQ, decode_command
from ingest.dicom.handlers import handle_echo, handle_store, store_staged
from ingest.service import IngestService

if TYPE_CHECKING:
    from pynetdicom.association import Association

__all__ = ["TRANSFER_SYNTAXES", "AcceptLoads", "DicomReceiver", "bind_listener"]

logger = logging.getLogger(__name__)

#: Accepted as received, never transcoded (the one list: :mod:`core.transfer_syntax`).
TRANSFER_SYNTAXES: list[str] = list(ACCEPTED)


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


class AcceptLoads:
    """How many connections each receiver process sharing a listening socket serves:
    one integer per process (``slot``) in memory they all share (a
    ``multiprocessing.RawArray``, made before the fork). Each process writes only its
    own slot, so no lock is needed; a reader may see a count one connection old.
    """

    def __init__(self, counts: Any, slot: int) -> None:
        self.counts = counts
        self.slot = slot

    def add(self, n: int) -> None:
        self.counts[self.slot] += n

    def ahead(self) -> int:
        """Connections this process serves beyond the least busy one."""
        counts = [int(n) for n in self.counts]
        return counts[self.slot] - min(counts)


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
    loads
        The connection counts of every process sharing the socket (with
        ``share_accepts``): only a process busier than the least busy one lets the
        others go first.
    plain_requests
        Serves requests beyond C-STORE/C-ECHO on the plain-socket path (Q/R C-FIND,
        C-MOVE: :class:`~ingest.dicom.qr_association.PlainQueryRetrieve`), for the
        SOP classes ``plain_sop_classes`` with the presentation contexts
        ``plain_contexts``; their other associations still go to pynetdicom.
        ``plain_roles``: SCP/SCU Role Selection is negotiated there too (C-GET).

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
        loads: AcceptLoads | None = None,
        plain_requests: RequestCallback | None = None,
        plain_sop_classes: frozenset[str] = frozenset(),
        plain_contexts: Sequence[PresentationContext] = (),
        max_identifier_bytes: int = 1 << 20,
        plain_roles: bool = False,
    ) -> None:
        self.settings = settings
        self.plain_requests = plain_requests
        self.share_accepts = share_accepts
        self.loads = loads if share_accepts else None
        self.service = service
        storage = storage_contexts(extra_storage_classes)
        contexts = [*storage, build_context(Verification, TRANSFER_SYNTAXES[:2])]
        plain_roles = plain_roles and plain_requests is not None
        if plain_roles:
            # As the pynetdicom AE (_build_ae): storage contexts allow either role, so
            # a C-GET SCU can take the SCP role for its sub-operations (PS3.7 D.3.3.4).
            for cx in storage:
                cx.scu_role = True
                cx.scp_role = True
        self.policy = AssociationPolicy(
            contexts=[*contexts, *plain_contexts] if plain_requests else contexts,
            plain_sop_classes=plain_sop_classes if plain_requests else frozenset(),
            max_identifier_bytes=max_identifier_bytes,
            plain_roles=plain_roles,
            pynetdicom_sop_classes=frozenset(
                str(cx.abstract_syntax) for cx in extra_contexts
                if str(cx.abstract_syntax) not in plain_sop_classes
            ) if plain_requests else None,
            storage_sop_classes=frozenset(str(cx.abstract_syntax) for cx in storage),
            allowed_calling_aes=frozenset(a.strip() for a in settings.allowed_calling_aes),
            max_pdu=settings.max_pdu,
            network_timeout_s=settings.network_timeout_s,
            max_associations=settings.max_associations,
            max_command_bytes=settings.max_command_bytes,
            max_dataset_bytes=settings.max_dataset_bytes,
            admission=Admission(settings.max_associations, settings.per_ae_limit),
        )
        self.ssl_context = _ssl_context(settings)
        self.ae = self._build_ae(contexts, extra_contexts)
        handlers = [
            (evt.EVT_C_STORE, handle_store, [service]),
            (evt.EVT_C_ECHO, handle_echo),
            # The association's C-STORE entries (ingest/store_audit.py). pynetdicom runs
            # these in the association's thread, under the id _serve_slow set.
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            # Refused associations go to the action log (ATNA User Authentication).
            (evt.EVT_REJECTED, self._on_rejected),
            *extra_handlers,
        ]
        # pynetdicom serves only connections we hand over; its own listening socket is
        # a loopback placeholder that nobody connects to.
        server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=handlers, ssl_context=None
        )
        assert server is not None  # block=False returns the server
        server.RequestHandlerClass = _BoundedRequestHandler
        self.slow_server = server
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connections = 0  # being served by this process
        self._count_lock = threading.Lock()

    def _refused(self, calling_ae: str, peer: str, code: tuple[int, int, int]) -> None:
        """A calling AE title we do not accept (A-ASSOCIATE-RJ 1/1/3, PS3.8 9.3.4)."""
        self.service.record_refused_association(
            calling_ae,
            peer,
            reason="calling AE not recognized",
            called_ae=self.settings.ae_title,
            code=code,
        )

    def _on_ended(self, event: Any) -> None:
        """EVT_RELEASED / EVT_ABORTED: the association's C-STORE entries are due."""
        self.service.association_ended()

    def _on_rejected(self, event: Any) -> None:
        """pynetdicom rejected an association (EVT_REJECTED, acceptor side): audited
        when its calling AE title is not one we accept; a local limit is no security
        event. A notification handler: logs its own errors and carries on."""
        try:
            requestor = event.assoc.requestor
            calling = str(requestor.ae_title or "").strip()
            allowed = self.policy.allowed_calling_aes
            if allowed and calling not in allowed:
                self._refused(calling, str(requestor.address or ""), (1, 1, 3))
        except Exception:
            logger.error("refused association not audited", exc_info=True)

    def _build_ae(
        self, contexts: Sequence[PresentationContext], extra: Sequence[PresentationContext]
    ) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        # pynetdicom's ARTIM timer runs for acse_timeout (PS3.8 9.1.5).
        ae.acse_timeout = min(self.settings.acse_timeout_s, self.settings.artim_timeout_s)
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
        # socket wakes for a new connection, and one busier than another (``loads``)
        # waits a moment before taking it, so a less busy process gets it first. Left
        # to the kernel, four parallel associations were split 3:1 between two
        # processes as often as 2:2, and the busier process (one GIL) set the pace; a
        # wait by a process's own count only (any busy process waited) left two
        # processes with one association each racing for the third and the fourth,
        # and 3:1 splits still came in about half of the runs (issue 19).
        listener.setblocking(False)
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(500):  # ms; so stop() is noticed
                continue
            wait = self._accept_wait_s()
            if wait:
                time.sleep(wait)
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
            ticket = self.policy.admission.admit(
                sock, str(addr[0]) if isinstance(addr, tuple) else peer
            )
            if ticket is None:
                # Every slot busy with live transfers: refuse before reading a byte.
                logger.warning(
                    "connection from %s refused: %d connections",
                    peer,
                    self.settings.max_associations,
                )
                _close(sock)
                continue
            with self._count_lock:
                self._connections += 1
                if self.loads is not None:
                    self.loads.add(1)
            thread = threading.Thread(
                target=self._handle_counted,
                args=(sock, addr, peer, ticket),
                name=f"dicom-{peer}",
                daemon=True,
            )
            thread.start()

    def _handle_counted(self, sock: socket.socket, addr: Any, peer: str, ticket: Ticket) -> None:
        try:
            self._handle(sock, addr, peer, ticket)
        except Exception:
            logger.error("connection from %s failed", peer, exc_info=True)
            _close(sock)
        finally:
            ticket.release()
            with self._count_lock:
                self._connections -= 1
                if self.loads is not None:
                    self.loads.add(-1)

    def _accept_wait_s(self) -> float:
        """How long to leave a pending connection to the other processes first."""
        if not self.share_accepts:
            return 0.0
        if self.loads is None:
            busy = self._connections
            return 0.01 * min(busy, 5) if busy > 0 else 0.0
        # Long enough for a less busy process whose threads hold the GIL (a first
        # association's negotiation: ~30 ms of pynetdicom) to get to its accept; a
        # connection waits this long only when every other process is busy too.
        ahead = self.loads.ahead()
        return 0.04 * min(ahead, 5) if ahead > 0 else 0.0

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

    def _handle(self, sock: socket.socket, addr: Any, peer: str, ticket: Ticket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            try:
                sock.settimeout(self.settings.artim_timeout_s)
                tls = self.ssl_context.wrap_socket(sock, server_side=True)
                tls.settimeout(None)
            except (OSError, ssl.SSLError) as exc:
                logger.warning("TLS handshake with %s failed: %s", peer, type(exc).__name__)
                if isinstance(exc, ssl.SSLError):  # not a peer that just went away
                    self.service.record_refused_association("", peer, reason="tls")
                sock.close()
                return
            ticket.sock = tls
            ip = addr[0] if isinstance(addr, tuple) else peer
            if not ticket.establish("", key=f"tls:{ip}"):
                logger.warning("TLS connection from %s refused: too many from there", peer)
                _close(tls)
                return
            self._serve_slow(tls, addr, ticket, None)
            return
        try:
            rq_bytes = self._peek_associate_rq(sock)
        except (OSError, ValueError) as exc:
            logger.warning(
                "connection from %s dropped before A-ASSOCIATE: %s", peer, type(exc).__name__
            )
            _close(sock)
            return
        except _RefusedError as exc:
            logger.warning("connection from %s refused: %s", peer, exc)
            with contextlib.suppress(OSError):
                sock.sendall(exc.pdu)
            _close(sock)
            return
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
                ticket,
                on_refused=self._refused,
                on_request=self.plain_requests,
                on_closed=self.service.association_ended,
                in_memory=self.service.archive.in_memory_staging,
            ).run(plan)
            return
        calling_ae = plan.calling_ae if plan is not None else ""
        if calling_ae and plan is not None and plan.allowed and not ticket.establish(calling_ae):
            logger.warning(
                "association from %s (%s) rejected: that AE holds %d associations",
                calling_ae,
                peer,
                self.policy.admission.per_key,
            )
            _recv_consume(sock, len(rq_bytes))
            with contextlib.suppress(OSError):
                sock.sendall(_associate_rj(0x02, 0x03, 0x02))  # transient, local limit
            _close(sock)
            return
        sock.settimeout(None)
        self._serve_slow(sock, addr, ticket, calling_ae)

    def _serve_slow(
        self, sock: socket.socket, addr: Any, ticket: Ticket, calling_ae: str | None
    ) -> None:
        """Hand the connection to pynetdicom, under a correlation id of its own.

        pynetdicom's ``Association`` copies the context it is created in
        (``PASS_CONTEXTVARS``) to its reactor and DIMSE threads, so the id must be
        set before it exists, in this thread. ``process_request`` would first start a
        plain thread (``socketserver.ThreadingMixIn``), whose context is empty: the
        worklist and MPPS logs and action-log entries would have no correlation id.
        This thread already belongs to the connection, so it builds the association,
        then waits for it to end: the connection's slot is held until then.
        """
        _HANDOFF.guard = _PduGuard(self.settings, ticket)
        _HANDOFF.assoc = None
        try:
            with correlation():
                self.slow_server.process_request_thread(sock, addr)
            assoc = _HANDOFF.assoc
        finally:
            _HANDOFF.guard = None
            _HANDOFF.assoc = None
        if assoc is not None:
            assoc.join()

    def _peek_associate_rq(self, sock: socket.socket) -> bytes:
        """The A-ASSOCIATE-RQ PDU, read without consuming it (PS3.8 9.3.2).

        The whole request must arrive within ARTIM (PS3.8 9.1.5); another first PDU,
        or a request longer than ``max_associate_rq_bytes``, is answered without
        reading it (nothing of it is buffered).
        """
        deadline = time.monotonic() + self.settings.artim_timeout_s
        header = _peek(sock, 6, deadline)
        pdu_type, _, length = struct.unpack(">BBI", header)
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            # Sta2 + anything but A-ASSOCIATE-RQ: AA-1, A-ABORT (PS3.8 9.2 table 9-10).
            raise _RefusedError(
                f"first PDU is type 0x{pdu_type:02X}",
                struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x01),
            )
        if length > self.settings.max_associate_rq_bytes:
            raise _RefusedError(
                f"A-ASSOCIATE-RQ of {length} bytes", _associate_rj(0x01, 0x01, 0x01)
            )
        return _peek(sock, 6 + length, deadline)


class _RefusedError(Exception):
    """The first PDU is refused; ``pdu`` is the answer to send before closing."""

    def __init__(self, message: str, pdu: bytes) -> None:
        super().__init__(message)
        self.pdu = pdu


def _associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BBIBBBB", 0x03, 0, 4, 0, result, source, reason)


def _peek(sock: socket.socket, n: int, deadline: float) -> bytes:
    """The first ``n`` bytes waiting on ``sock``, not consumed, by ``deadline``.

    With a timeout set, Python's socket is non-blocking underneath, so MSG_WAITALL
    returns what has arrived: poll until all of it is there.
    """
    hangup: select.poll | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("ARTIM expired before the A-ASSOCIATE-RQ arrived")
        sock.settimeout(remaining)
        data = sock.recv(n, socket.MSG_PEEK | socket.MSG_WAITALL)
        if not data:
            raise ConnectionError("closed")
        if len(data) >= n:
            return data[:n]
        # Part of it is here, so the socket polls readable: wait for the peer's
        # close (POLLRDHUP: it will send no more) or a few ms, then peek again.
        if hangup is None:
            hangup = select.poll()
            hangup.register(sock, _POLLRDHUP)
        if _POLLRDHUP and any(ev & _POLLRDHUP for _, ev in hangup.poll(5)):
            raise ConnectionError("closed during A-ASSOCIATE-RQ")
        if not _POLLRDHUP:
            time.sleep(0.005)


_POLLRDHUP: int = getattr(select, "POLLRDHUP", 0)  # Linux


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


_HANDOFF = threading.local()
#: Data sets pynetdicom holds in memory (queries, MPPS): a few KiB in practice.
_IN_MEMORY_DATASET = 16 << 20


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _quickack(raw: socket.socket | None) -> None:
    """Acknowledge what was just read now, not after the 40 ms delayed-ACK timer.

    pynetdicom's SCUs (and Debian's DCMTK) write a C-FIND's command and identifier in
    two sends with Nagle's algorithm on: the identifier waits until the command is
    acknowledged, and we send nothing before the identifier arrives, so each query
    cost the delayed-ACK timer (MWL C-FIND p50 ~48 ms whatever the worklist held,
    issue 21). The fast C-STORE path does the same (``association.PduReader``).
    Linux leaves quick-ACK mode on its own, so it is asked again after each read.
    """
    if _QUICKACK is not None and raw is not None:
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


class _PduGuard:
    """Bounds what pynetdicom buffers on an association we hand it.

    pynetdicom reads each PDU whole (``DULServiceProvider._read_pdu_data``: 6 bytes,
    then the declared length) and joins command and data set fragments in memory.
    This wraps its socket's ``recv``: a PDU longer than allowed, a command set past
    ``max_command_bytes`` or a data set past ``max_dataset_bytes`` closes the
    connection (after an A-ABORT) before the bytes are read.
    """

    def __init__(self, settings: DicomSettings, ticket: Ticket) -> None:
        self.ticket = ticket
        self.max_rq = settings.max_associate_rq_bytes
        # pynetdicom holds a whole PDU in memory: bounded even when ours is "unlimited".
        self.max_pdata = settings.max_pdu + 6 if settings.max_pdu else 64 << 20
        self.max_command = settings.max_command_bytes
        self.max_dataset = settings.max_dataset_bytes
        self._body: tuple[int, int] | None = None
        self._command = 0
        self._command_bytes = bytearray()
        self._dataset = 0
        self._dataset_limit = _IN_MEMORY_DATASET
        self._associated = False

    def wrap(self, recv: Any, raw: socket.socket | None) -> Any:
        def guarded(nr_bytes: int) -> bytearray:
            if self._body is None:
                data: bytearray = recv(nr_bytes)
                _quickack(raw)
                if nr_bytes == 6 and len(data) == 6:
                    pdu_type, _, length = struct.unpack(">BBI", data)
                    self._check(pdu_type, length, raw)
                    self._body = (pdu_type, length)
                return data
            pdu_type, _length = self._body
            self._body = None
            data = recv(nr_bytes)
            _quickack(raw)
            if pdu_type == 0x04:
                self._count_pdvs(data, raw)
            return data

        return guarded

    def _refuse(self, raw: socket.socket | None, why: str) -> None:
        logger.warning("aborting association from %s: %s", self.ticket.key, why)
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.sendall(struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06))
        raise OSError(why)  # pynetdicom: transport closed (Evt17), nothing more is read

    def _check(self, pdu_type: int, length: int, raw: socket.socket | None) -> None:
        self.ticket.touch()
        if pdu_type == 0x01:
            if self._associated or length > self.max_rq:
                self._refuse(raw, f"A-ASSOCIATE-RQ of {length} bytes")
            self._associated = True
        elif pdu_type == 0x04:
            if self.max_pdata and length > self.max_pdata:
                self._refuse(raw, f"P-DATA-TF of {length} bytes")
        elif length > 65536:
            self._refuse(raw, f"PDU type 0x{pdu_type:02X} of {length} bytes")

    def _limit_for(self, command: bytes) -> int:
        """Data set bound of the message ``command`` starts: a C-STORE's data set
        streams to a file (``STORE_RECV_CHUNKED_DATASET``); every other one (C-FIND
        identifiers, MPPS attributes) is held in memory by pynetdicom."""
        try:
            field = decode_command(command).command_field
        except ValueError:
            return _IN_MEMORY_DATASET  # pynetdicom will refuse the command itself
        return self.max_dataset if field == C_STORE_RQ else _IN_MEMORY_DATASET

    def _count_pdvs(self, body: bytes | bytearray, raw: socket.socket | None) -> None:
        pos = 0
        while pos + 6 <= len(body):
            item_len, _context, header = struct.unpack_from(">IBB", body, pos)
            size = max(item_len - 2, 0)
            if header & 0x01:
                self._command += size
                if self._command > self.max_command:
                    self._refuse(raw, "command set too long")
                self._command_bytes += body[pos + 6 : pos + 4 + item_len]
                if header & 0x02:
                    self._dataset_limit = self._limit_for(bytes(self._command_bytes))
                    self._command = 0
                    self._dataset = 0
                    self._command_bytes.clear()
            else:
                self._dataset += size
                if self._dataset > self._dataset_limit:
                    self._refuse(raw, "data set too long")
                if header & 0x02:
                    self._dataset = 0
            pos += 4 + max(item_len, 2)


class _BoundedRequestHandler(RequestHandler):
    """pynetdicom's handler, with :class:`_PduGuard` on the association's socket."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        guard: _PduGuard | None = getattr(_HANDOFF, "guard", None)
        sock = assoc.dul.socket
        if guard is not None and sock is not None:
            sock.recv = guard.wrap(sock.recv, sock.socket)  # type: ignore[method-assign]
            _HANDOFF.assoc = assoc
        return assoc


def _recv_consume(sock: socket.socket, n: int) -> None:
    while n:
        chunk = sock.recv(min(n, 65536))
        if not chunk:
            raise ConnectionError("closed")
        n -= len(chunk)
