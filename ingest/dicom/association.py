"""A storage association handled on a plain blocking socket (PS3.8 upper layer).

Why not pynetdicom's ``Association`` for this: its DUL and reactor threads poll their
queues with ``sleep(0.001)``, so every C-STORE pays two poll latencies and the polling
CPU of every open association, and one process tops out near 200 instances/s here. A
storage association is a simple, strictly alternating conversation (asynchronous
operations window 1, PS3.7 D.3.3.3): read a request, answer it. We keep pynetdicom for
what it does well, PDU encoding/decoding and presentation context negotiation
(``negotiate_as_acceptor``), and for every association that is not pure storage or
verification (worklist, MPPS, role selection, user identity), which
:mod:`ingest.dicom.scp` hands to a pynetdicom server untouched.

Each DIMSE response goes out in one ``sendall`` with TCP_NODELAY set, so default
DCMTK peers (Nagle on) are not delayed by our small writes.

Every peer is treated as hostile: nothing it declares is buffered beyond a bound.
P-DATA-TF PDUs are limited by our Maximum Length Received (PS3.8 D.1), other PDUs to
64 KiB, a command set's fragments to ``max_command_bytes``, a data set to
``max_dataset_bytes`` (streamed to disk, never held); past any of them the association
ends with A-ABORT (PS3.8 9.3.8). :class:`Admission` counts connections from accept and
keeps one peer from taking every slot.
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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from core.errors import ServiceError
from core.logging import correlation
from ingest.dicom._retrieve import p_data_tf
from ingest.dicom.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    Command,
    decode_command,
    encode_response,
)
from ingest.dicom.negotiation import (
    APPLICATION_CONTEXT,
    DEFAULT_PEER_MAX_PDU,
    Negotiation,
    quick_negotiation,
    served_here,
)
from storage.staging import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, StagedWriter

__all__ = [
    "AbortError",
    "Admission",
    "AssociationPolicy",
    "FastAssociation",
    "Negotiation",
    "PduReader",
    "RequestCallback",
    "StoreCallback",
    "Ticket",
    "is_fast_path",
    "negotiate",
]

logger = logging.getLogger(__name__)

A_ASSOCIATE_RQ_TYPE, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x01, 0x04, 0x05, 0x06, 0x07
#: Bound on the PDUs that are not P-DATA-TF once associated (release, abort).
MAX_CONTROL_PDU = 65536

#: Called with the finished data set's writer, the request and the calling AE title;
#: returns the DIMSE status and an ErrorComment.
StoreCallback = Callable[[StagedWriter, Command, str], tuple[int, str]]
#: Serves a request that is not C-STORE/C-ECHO (C-FIND, C-MOVE, C-GET: :mod:`.qr_association`)
#: given the association, the command, its context ID and the identifier's bytes; it
#: sends every response itself (:meth:`FastAssociation.send_message`).
RequestCallback = Callable[["FastAssociation", Command, int, bytes], None]


class AbortError(Exception):
    """The association must end with A-ABORT (PS3.8 9.3.8)."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PeerAbortError(ConnectionError):
    """The peer sent A-ABORT (PS3.8 9.3.8): the association is gone, nothing to answer."""


class Ticket:
    """One accepted connection's slot (see :class:`Admission`)."""

    __slots__ = ("_admission", "key", "last_active", "sock", "state")

    def __init__(self, admission: Admission, sock: socket.socket, key: str) -> None:
        self._admission = admission
        self.sock = sock
        self.key = key  # "ip:<address>" until the calling AE title is known
        self.state = "pending"  # pending -> established -> closed
        self.last_active = time.monotonic()

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def establish(self, calling_ae: str, *, key: str = "") -> bool:
        """Count this connection under its calling AE title (or ``key``: a TLS peer,
        whose A-ASSOCIATE-RQ only pynetdicom reads); False if that key is at its
        limit (answer A-ASSOCIATE-RJ, transient, local limit exceeded). Established,
        it is evicted only when idle."""
        return self._admission._establish(self, key or f"ae:{calling_ae}")

    def release(self) -> None:
        self._admission._release(self)

    def evict(self) -> None:
        """Close the socket under the thread serving it: its next read fails."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class Admission:
    """Connection slots of one receiver process, counted from accept.

    A connection holds a slot from ``accept`` (before its A-ASSOCIATE-RQ is read:
    PS3.8 ARTIM runs then) until it closes, whichever transport serves it. When every
    slot is taken, a new connection takes the slot of the connection that has waited
    longest without sending its A-ASSOCIATE-RQ, or else of the established association
    idle longest (if idle at least ``evict_idle_s``): an idle flood cannot keep a
    modality out, a modality in the middle of a transfer is never cut off. One key
    (calling AE title, or IP address while the AE is unknown) may hold at most
    ``per_key`` slots.
    """

    def __init__(self, total: int, per_key: int, evict_idle_s: float = 2.0) -> None:
        self.total = total
        self.per_key = per_key
        self.evict_idle_s = evict_idle_s
        self._lock = threading.Lock()
        self._tickets: dict[int, Ticket] = {}
        self._per_key: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._tickets)

    def admit(self, sock: socket.socket, ip: str) -> Ticket | None:
        """A slot for a connection just accepted, or None (close it at once)."""
        key = f"ip:{ip}"
        victims: list[Ticket] = []
        with self._lock:
            if self._per_key.get(key, 0) >= self.per_key:
                victim = self._oldest(lambda t: t.state == "pending" and t.key == key)
                if victim is None:
                    return None
                victims.append(victim)
            elif len(self._tickets) >= self.total:
                victim = self._oldest(lambda t: t.state == "pending")
                if victim is None:
                    idle_since = time.monotonic() - self.evict_idle_s
                    victim = self._oldest(
                        lambda t: t.state == "established" and t.last_active <= idle_since
                    )
                if victim is None:
                    return None
                victims.append(victim)
            for victim in victims:
                self._drop(victim)
            ticket = Ticket(self, sock, key)
            self._tickets[id(ticket)] = ticket
            self._per_key[key] = self._per_key.get(key, 0) + 1
        for victim in victims:
            logger.warning("closing an idle connection (%s) for a new one", victim.key)
            victim.evict()
        return ticket

    def _oldest(self, match: Callable[[Ticket], bool]) -> Ticket | None:
        candidates = [t for t in self._tickets.values() if match(t)]
        return min(candidates, key=lambda t: t.last_active) if candidates else None

    def _drop(self, ticket: Ticket) -> None:
        if self._tickets.pop(id(ticket), None) is None:
            return
        left = self._per_key.get(ticket.key, 1) - 1
        if left:
            self._per_key[ticket.key] = left
        else:
            self._per_key.pop(ticket.key, None)
        ticket.state = "closed"

    def _establish(self, ticket: Ticket, key: str) -> bool:
        with self._lock:
            if ticket.state != "pending":
                return ticket.state == "established"
            if self._per_key.get(key, 0) >= self.per_key:
                return False
            self._drop(ticket)
            ticket.key, ticket.state = key, "established"
            ticket.touch()
            self._tickets[id(ticket)] = ticket
            self._per_key[key] = self._per_key.get(key, 0) + 1
            return True

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            self._drop(ticket)


@dataclass
class AssociationPolicy:
    """What this receiver accepts; shared by every association of a process."""

    contexts: Sequence[PresentationContext]
    storage_sop_classes: frozenset[str]
    allowed_calling_aes: frozenset[str] = frozenset()
    max_pdu: int = 4_194_304
    network_timeout_s: float = 60.0
    max_associations: int = 32
    max_command_bytes: int = 65536
    max_dataset_bytes: int = 4 << 30
    #: SOP classes beyond storage and verification served on this path (Q/R FIND,
    #: MOVE and GET, :mod:`.qr_association`); their contexts must be in ``contexts``.
    plain_sop_classes: frozenset[str] = frozenset()
    #: A C-FIND/C-MOVE/C-GET identifier is held in memory: past this, A-ABORT.
    max_identifier_bytes: int = 65536
    #: Accept SCP/SCU Role Selection (PS3.7 D.3.3.4) on this path: C-GET served here,
    #: its C-STORE sub-operations on the storage contexts the SCU takes the SCP role
    #: for (the storage ``contexts`` then allow both roles).
    plain_roles: bool = False
    #: With the Q/R plain path: the SOP classes only pynetdicom serves (worklist,
    #: MPPS, commitment...); an association proposing one goes there, one proposing
    #: SOP classes nobody serves stays here and those contexts are rejected (PS3.8
    #: 9.3.3.2 result 3), as pynetdicom would (DCMTK's getscu proposes retired print
    #: classes). None: every proposed context must be one served here.
    pynetdicom_sop_classes: frozenset[str] | None = None
    admission: Admission = field(default_factory=lambda: Admission(32, 16))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _plans: OrderedDict[bytes, Negotiation] = field(default_factory=OrderedDict)
    _negotiating: threading.Lock = field(default_factory=threading.Lock)

    def negotiation(self, rq_bytes: bytes) -> Negotiation:
        """What to answer this A-ASSOCIATE-RQ (PS3.8 9.3.2), decoded at most once.

        A modality proposes the same contexts, AE titles and user information on
        every association, byte for byte; pynetdicom's decoding and acceptor
        negotiation of a full storescu proposal (~120 contexts, each UID checked by
        regex) cost about as much as storing a dozen instances, so answers are kept
        per distinct request, and a plain request is answered without them
        (:mod:`ingest.dicom.negotiation`, ~20x less CPU).

        Raises
        ------
        Exception
            Whatever pynetdicom raises on a malformed request (the caller hands the
            connection to pynetdicom, which answers it per PS3.8).
        """
        with self._lock:
            plan = self._plans.get(rq_bytes)
            if plan is not None:
                self._plans.move_to_end(rq_bytes)
                return plan
        # One negotiation at a time: the four associations a modality opens at once
        # then share the first one's answer instead of each computing it.
        with self._negotiating:
            with self._lock:
                plan = self._plans.get(rq_bytes)
            if plan is None:
                plan = quick_negotiation(
                    rq_bytes, self, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
                ) or negotiate(rq_bytes, self)
                with self._lock:
                    self._plans[rq_bytes] = plan
                    while len(self._plans) > 256:
                        self._plans.popitem(last=False)
        return plan


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


class PduReader:
    """Reads PDUs (PS3.8 9.3.1) and P-DATA-TF items from a blocking socket into one
    reused buffer: no allocation per PDU.

    A data set fragment is read together with what follows it, up to
    :data:`LOOKAHEAD` bytes (the next PDU's header and its first item's header, PS3.8
    9.3.5 and E.2) when they have arrived: one ``recvmsg_into`` instead of three
    system calls per P-DATA-TF PDU (measured: a CT image of 0.5 MB came in 4-5 PDUs
    from DCMTK, 14 receives, each a release and retake of the GIL that another
    association's thread was waiting for). Every read takes those bytes first;
    :attr:`buffered` tells whether any are held. TLS sockets (which have no
    ``recvmsg_into``) read exactly what is asked.

    A view returned by :meth:`read_body` is valid until the next read.
    """

    #: Bytes read past a data set fragment: a PDU header and a PDV item header.
    LOOKAHEAD = 12

    def __init__(self, sock: socket.socket, limit: int, ticket: Ticket | None = None) -> None:
        self.sock = sock
        # Our Maximum Length Received bounds the P-DATA-TF variable field (PS3.8
        # D.1.1); a little slack for peers that count the 6-byte header in it.
        self.limit = limit + 6 if limit else 0
        self.ticket = ticket
        self._header = bytearray(6)
        self._buf = bytearray(65536)
        self._ahead = bytearray(self.LOOKAHEAD)
        self._start = self._end = 0  # held bytes: self._ahead[_start:_end]
        self._scatter = not isinstance(sock, ssl.SSLSocket)

    @property
    def buffered(self) -> int:
        """Bytes read from the socket and not yet taken."""
        return self._end - self._start

    def _take(self, view: memoryview) -> int:
        """Copy held bytes into ``view``; how many."""
        n = min(len(view), self._end - self._start)
        if n:
            view[:n] = self._ahead[self._start : self._start + n]
            self._start += n
        return n

    def _read(self, view: memoryview) -> None:
        got = self._take(view)
        if got < len(view):
            _recv_into(self.sock, view[got:])

    def recv_exactly(self, view: memoryview) -> None:
        """Fill ``view`` (a data set fragment), and keep what arrived after it."""
        if not self._scatter:
            self._read(view)
            return
        got = self._take(view)
        n = len(view)
        if got == n:
            return  # (from held bytes alone: those left stay held)
        while got < n:
            # Held bytes are all taken here: the look-ahead buffer is free.
            k = self.sock.recvmsg_into([view[got:], self._ahead])[0]
            if k == 0:
                raise ConnectionError("peer closed the connection")
            got += k
        self._start, self._end = 0, got - n

    def read_header(self) -> tuple[int, int]:
        """The next PDU's type and length."""
        # Acknowledge at once instead of after the 40 ms delayed-ACK timer: a peer with
        # Nagle's algorithm on (Debian's DCMTK) holds the tail of each data set until
        # the command PDU before it is acknowledged. Linux clears QUICKACK after use.
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        self._read(memoryview(self._header))
        if self.ticket is not None:
            self.ticket.touch()
        pdu_type, _, length = struct.unpack(">BBI", self._header)
        if pdu_type == P_DATA_TF:
            if self.limit and length > self.limit:
                raise AbortError(0x06, f"PDU of {length} bytes exceeds the negotiated maximum")
        elif length > MAX_CONTROL_PDU:
            # A-RELEASE-RQ/RP and A-ABORT are 4 bytes (PS3.8 9.3.6-9.3.8): not buffered.
            raise AbortError(0x06, f"PDU type 0x{pdu_type:02X} of {length} bytes")
        return pdu_type, length

    def read_item(self, remaining: int) -> tuple[int, int, int]:
        """The next PDV item's fragment size, presentation context ID and control
        header (PS3.8 E.2), given the ``remaining`` bytes of its P-DATA-TF PDU.

        Raises
        ------
        AbortError
            The item does not fit in what is left of its PDU (PS3.8 9.3.5.1).
        """
        if remaining < 6:
            raise AbortError(0x06, "truncated PDV item")
        self._read(memoryview(self._header))
        item_len, context_id, header = struct.unpack(">IBB", self._header)
        if item_len < 2 or 4 + item_len > remaining:
            raise AbortError(0x06, "invalid PDV item length")
        return int(item_len) - 2, int(context_id), int(header)

    def discard(self, length: int) -> None:
        """Read and drop ``length`` bytes through the fixed buffer."""
        view = memoryview(self._buf)
        while length:
            n = min(length, len(view))
            self._read(view[:n])
            length -= n

    def read_body(self, length: int) -> memoryview:
        if length > len(self._buf):
            self._buf = bytearray(length)
        view = memoryview(self._buf)[:length]
        self._read(view)
        return view


def negotiate(rq_bytes: bytes, policy: AssociationPolicy) -> Negotiation:
    """Decode the request and, for a fast-path association, build our answer."""
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(rq_bytes)
    rq = pdu.to_primitive()
    calling_ae = str(rq.calling_ae_title).strip()
    allowed = not policy.allowed_calling_aes or calling_ae in policy.allowed_calling_aes
    if not is_fast_path(rq, policy.storage_sop_classes | policy.plain_sop_classes,
                        roles=policy.plain_roles, elsewhere=policy.pynetdicom_sop_classes):
        return Negotiation(False, calling_ae, allowed, {}, b"")
    roles: dict[str, tuple[bool | None, bool | None]] = {}
    peer_max_pdu = DEFAULT_PEER_MAX_PDU
    for item in rq.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max_pdu = int(item.maximum_length_received or 0)
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[str(item.sop_class_uid)] = (item.scu_role, item.scp_role)
    results, role_items = negotiate_as_acceptor(
        rq.presentation_context_definition_list,
        list(policy.contexts),
        roles or None,  # type: ignore[arg-type]
    )
    accepted = {
        int(cx.context_id or 0): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in results
        if cx.result == 0x00
    }
    ac = A_ASSOCIATE()
    ac.application_context_name = APPLICATION_CONTEXT
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = results
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = policy.max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    ac.user_information = [max_len, impl, version, *role_items]
    ac_pdu = A_ASSOCIATE_AC()
    ac_pdu.from_primitive(ac)
    scu = frozenset(int(cx.context_id or 0) for cx in results if cx.result == 0x00 and cx.as_scu)
    return Negotiation(
        True, calling_ae, allowed, accepted, ac_pdu.encode(), peer_max_pdu, scu
    )


def is_fast_path(
    rq: A_ASSOCIATE,
    storage_sop_classes: frozenset[str],
    *,
    roles: bool = False,
    elsewhere: frozenset[str] | None = None,
) -> bool:
    """True if every proposed context is Verification or in ``storage_sop_classes``
    (storage, and the Q/R FIND/MOVE models when the plain path serves them) and no
    negotiation item needs pynetdicom (SCP/SCU role selection, PS3.7 D.3.3.4; user
    identity, D.3.3.7; extended negotiation, D.3.3.5). ``roles``: role selection is
    served here too (C-GET on the plain path). ``elsewhere``: only contexts of these
    SOP classes need pynetdicom; others unknown here are rejected here."""
    for item in rq.user_information:
        name = type(item).__name__
        if roles and name == "SCP_SCU_RoleSelectionNegotiation":
            continue
        if name not in {
            "MaximumLengthNotification",
            "ImplementationClassUIDNotification",
            "ImplementationVersionNameNotification",
            "AsynchronousOperationsWindowNegotiation",
        }:
            return False
    return all(served_here(str(cx.abstract_syntax), storage_sop_classes, elsewhere)
               for cx in rq.presentation_context_definition_list)


class FastAssociation:
    """One storage/verification association on a blocking socket, in its own thread;
    with ``on_request``, Q/R C-FIND, C-MOVE and C-GET too (:mod:`.qr_association`)."""

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        policy: AssociationPolicy,
        on_store: StoreCallback,
        staging: Path,
        ticket: Ticket | None = None,
        on_refused: Callable[[str, str, tuple[int, int, int]], None] | None = None,
        on_request: RequestCallback | None = None,
        on_closed: Callable[[], None] | None = None,
        in_memory: bool = False,
    ) -> None:
        self.on_request = on_request
        #: Called once the association is over (released, aborted or dropped), in its
        #: thread under its correlation id: the C-STORE action log writes its entries.
        self.on_closed = on_closed
        self.peer_max_pdu = DEFAULT_PEER_MAX_PDU
        self.scu_contexts: frozenset[int] = frozenset()
        self._reader: PduReader | None = None
        self._cancel_seen: set[int] = set()  # C-CANCEL-RQs read during a C-GET
        #: Told (calling AE, peer, A-ASSOCIATE-RJ code) of a calling AE refused (audit).
        self.on_refused = on_refused
        self.ticket = ticket
        self.sock = sock
        self.peer = peer
        self.policy = policy
        self.on_store = on_store
        self.calling_ae = ""
        self.accepted: dict[int, tuple[str, str]] = {}
        self.stored = 0
        self._staging = staging
        #: Keep instances in memory rather than staging them as files (the archive
        #: journals them: storage/journal.py).
        self.in_memory = in_memory

    # -- association establishment (PS3.8 9.3.2-9.3.4) ---------------------------

    def run(self, plan: Negotiation) -> None:
        started = time.perf_counter()
        with correlation():
            try:
                if not self._negotiate(plan):
                    return
                logger.info(
                    "association from %s (%s) accepted, %d contexts",
                    self.calling_ae,
                    self.peer,
                    len(self.accepted),
                )
                self.sock.settimeout(self.policy.network_timeout_s or None)
                self._serve()
            except AbortError as exc:
                logger.warning(
                    "aborting association from %s: %s", self.calling_ae or self.peer, exc
                )
                self._send_abort(exc.reason)
            except (ConnectionError, TimeoutError, OSError) as exc:
                logger.warning(
                    "association from %s ended: %s",
                    self.calling_ae or self.peer,
                    type(exc).__name__,
                )
            finally:
                self._close()
                logger.info(
                    "association from %s closed: %d stored in %.2f s",
                    self.calling_ae or self.peer,
                    self.stored,
                    time.perf_counter() - started,
                )
                if self.on_closed is not None:
                    self.on_closed()

    def _negotiate(self, plan: Negotiation) -> bool:
        self.calling_ae = plan.calling_ae
        if not plan.allowed:
            logger.warning(
                "association from %s (%s) rejected: calling AE not allowed",
                self.calling_ae,
                self.peer,
            )
            self._reject(0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE
            if self.on_refused is not None:
                self.on_refused(self.calling_ae, self.peer, (0x01, 0x01, 0x03))
            return False
        if self.ticket is not None and not self.ticket.establish(self.calling_ae):
            logger.warning(
                "association from %s rejected: that AE holds %d associations already",
                self.calling_ae,
                self.policy.admission.per_key,
            )
            self._reject(0x02, 0x03, 0x02)  # rejected-transient, presentation, local limit
            return False
        self.accepted = plan.accepted
        self.peer_max_pdu = plan.peer_max_pdu
        self.scu_contexts = plan.scu_contexts
        self.sock.sendall(plan.ac_pdu)
        return True

    def _reject(self, result: int, source: int, diagnostic: int) -> None:
        rj = A_ASSOCIATE()
        rj.result, rj.result_source, rj.diagnostic = result, source, diagnostic
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(rj)
        with contextlib.suppress(OSError):
            self.sock.sendall(pdu.encode())

    # -- data transfer (PS3.8 9.3.5) ----------------------------------------------

    def _serve(self) -> None:
        cmd_parts: list[bytes] = []
        cmd_size = 0  # bytes of the command set being received
        data_size = 0  # bytes of the data set being received
        command: Command | None = None
        cmd_context = 0
        writer: StagedWriter | None = None
        identifier: bytearray | None = None  # of a C-FIND/C-MOVE, held in memory
        reader = PduReader(self.sock, self.policy.max_pdu, self.ticket)
        self._reader = reader
        try:
            while True:
                pdu_type, length = reader.read_header()
                if pdu_type != P_DATA_TF:
                    reader.read_body(length)  # release/abort bodies hold nothing we use
                    if pdu_type == A_RELEASE_RQ:
                        if command is not None or cmd_parts:
                            # PS3.7 D.3.3.1 / PS3.8 7.2: no release in mid-message.
                            raise AbortError(0x02, "A-RELEASE-RQ in the middle of a message")
                        self.sock.sendall(struct.pack(">BBII", A_RELEASE_RP, 0, 4, 0))
                        return
                    if pdu_type == A_ABORT:
                        logger.warning("peer %s aborted the association", self.calling_ae)
                        return
                    raise AbortError(0x02, f"unexpected PDU type 0x{pdu_type:02X}")
                # P-DATA-TF, item by item (PS3.8 9.3.5.1): a data set fragment goes from
                # the socket straight into the staged file's buffer, without a copy.
                while length > 0:
                    size, context_id, header = reader.read_item(length)
                    length -= 6 + size
                    if context_id not in self.accepted:
                        raise AbortError(0x06, f"PDV on unaccepted context {context_id}")
                    if header & 0x01:  # command fragment
                        if command is not None:
                            raise AbortError(0x02, "command fragment inside a data set")
                        cmd_size += size
                        if cmd_size > self.policy.max_command_bytes:
                            # A command set is a few hundred bytes (PS3.7 9.3): fragments
                            # without end are an attack on memory, not a message.
                            raise AbortError(0x02, f"command set over {cmd_size - size} bytes")
                        cmd_parts.append(bytes(reader.read_body(size)))
                        if header & 0x02:
                            cmd_size = 0
                            data_size = 0
                            try:
                                command = decode_command(b"".join(cmd_parts))
                            except ValueError as exc:
                                raise AbortError(0x06, str(exc)) from exc
                            cmd_parts.clear()
                            cmd_context = context_id
                            if not command.has_dataset:
                                self._dispatch(command, cmd_context, None)
                                command = None
                            elif command.command_field == C_STORE_RQ:
                                writer = self._open_writer(command, cmd_context)
                            elif self.on_request is not None:
                                identifier = bytearray()
                    else:  # data set fragment
                        if command is None or context_id != cmd_context:
                            raise AbortError(0x02, "data set fragment without its command")
                        data_size += size
                        if data_size > self.policy.max_dataset_bytes:
                            raise AbortError(0x02, "data set larger than max_dataset_bytes")
                        if identifier is not None:
                            if data_size > self.policy.max_identifier_bytes:
                                # A query identifier is a few hundred bytes: one past
                                # the bound is an attack on memory (PS3.8 9.3.8).
                                raise AbortError(0x02, "identifier over max_identifier_bytes")
                            identifier += reader.read_body(size)
                        elif writer is None:
                            reader.discard(size)  # refused already: consume and drop
                        else:
                            try:
                                writer.receive(reader.recv_exactly, size)
                            except ServiceError as exc:  # disk full: answer at the end
                                logger.error("cannot stage incoming instance: %s", exc.title)
                                writer = None
                        if header & 0x02:
                            if identifier is not None:
                                assert self.on_request is not None
                                if length or reader.buffered:
                                    # The operation reads this socket itself (C-CANCEL,
                                    # C-GET's C-STORE-RSPs): no PDVs may be left unread.
                                    raise AbortError(0x02, "PDVs after a complete request")
                                request, identifier = bytes(identifier), None
                                self.on_request(self, command, cmd_context, request)
                            else:
                                self._dispatch(command, cmd_context, writer)
                            writer = None
                            command = None
        finally:
            if writer is not None:
                writer.abort()  # association ended mid-transfer: nothing half-written stays

    def _open_writer(self, command: Command, context_id: int) -> StagedWriter | None:
        _abstract, ts = self.accepted[context_id]
        try:
            return StagedWriter(
                self._staging,
                command.affected_sop_class_uid,
                command.affected_sop_instance_uid,
                ts,
                in_memory=self.in_memory,
            )
        except ServiceError as exc:
            logger.error("cannot stage incoming instance: %s", exc.title)
            return None

    def _dispatch(self, command: Command, context_id: int, writer: StagedWriter | None) -> None:
        abstract, _ts = self.accepted[context_id]
        if command.command_field == C_ECHO_RQ:
            self._respond(context_id, encode_response(C_ECHO_RSP, command, 0x0000))
            return
        if command.command_field == C_CANCEL_RQ:
            # PS3.7 9.3.2.3: a C-CANCEL of an operation already finished (the final
            # response crossed it on the wire) has nothing to cancel.
            return
        if command.command_field != C_STORE_RQ:
            raise AbortError(0x02, f"unsupported DIMSE command 0x{command.command_field:04X}")
        if command.affected_sop_class_uid != abstract:
            # PS3.4 B.2.3: the SOP Class is not the one of the presentation context.
            if writer is not None:
                writer.abort()
            status, comment = 0x0122, "SOP Class differs from presentation context"
        elif writer is None:
            status, comment = 0xA700, "Out of resources: cannot stage data set"
        else:
            try:
                status, comment = self.on_store(writer, command, self.calling_ae)
            except Exception:
                # A bug, not bad input: never acknowledged, logged with its traceback;
                # 0xC211 is what pynetdicom answers when a handler raises.
                logger.error(
                    "C-STORE of %s failed unexpectedly",
                    command.affected_sop_instance_uid,
                    exc_info=True,
                )
                writer.abort()
                status, comment = 0xC211, "Unexpected failure while storing"
        if status in (0x0000,) or status >> 12 == 0xB:
            self.stored += 1
        self._respond(context_id, encode_response(C_STORE_RSP, command, status, comment))

    # -- operations served by on_request (PS3.7 9.3.2, 9.3.4) ----------------------

    def send_message(self, context_id: int, command_bytes: bytes, data_set: bytes = b"") -> None:
        """One DIMSE message in one ``sendall``: the command PDV, then the data set's
        PDVs cut to the requestor's Maximum Length (PS3.8 9.3.5, E.2)."""
        parts = [*p_data_tf(command_bytes, context_id, self.peer_max_pdu, command=True),
                 *p_data_tf(data_set, context_id, self.peer_max_pdu, command=False)]
        self.sock.sendall(b"".join(parts))
        if self.ticket is not None:
            self.ticket.touch()  # busy answering, not idle: never evicted for a new one

    def cancelled(self, message_id: int) -> bool:
        """Whether a C-CANCEL-RQ for ``message_id`` has arrived (PS3.7 9.3.2.3), read
        without waiting when nothing has.

        With the asynchronous operations window at 1 (PS3.7 D.3.3.3) the requestor may
        send only C-CANCEL while an operation is outstanding: any other request, or an
        A-RELEASE-RQ (PS3.7 D.3.3.1: not while a response is due), ends the
        association with A-ABORT; an A-ABORT from the peer ends it at once.
        """
        reader = self._reader
        if reader is None:
            return False
        if message_id in self._cancel_seen:
            self._cancel_seen.discard(message_id)
            return True
        while self._readable():
            command = self._read_command(reader)
            if command.command_field != C_CANCEL_RQ:
                raise AbortError(
                    0x02, f"DIMSE 0x{command.command_field:04X} while an operation runs"
                )
            if command.message_id_responded == message_id:
                return True
            # A cancel of another (finished) operation: nothing to do.
        return False

    def _readable(self) -> bool:
        """Bytes to read now, without waiting: decrypted bytes TLS already holds
        (invisible to the kernel) or the reader's look-ahead, else ``poll``
        (``select`` fails on descriptors past FD_SETSIZE, which a busy receiver
        process can reach)."""
        if self._reader is not None and self._reader.buffered:
            return True
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending() > 0:
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def store_on_this(
        self,
        context_id: int,
        command: bytes,
        data_set: bytes,
        message_id: int,
        operation_id: int,
        while_waiting: Callable[[], None] | None = None,
    ) -> int:
        """A C-STORE sub-operation of a C-GET on this association (PS3.4 C.4.3.3.1):
        send the request, run ``while_waiting``, return the Status of its C-STORE-RSP.
        A C-CANCEL-RQ of the C-GET that arrives first is remembered for
        :meth:`cancelled`."""
        self.send_message(context_id, command, data_set)
        if while_waiting is not None:
            while_waiting()
        reader = self._reader
        assert reader is not None
        while True:
            rsp = self._read_command(reader)
            if rsp.command_field == C_CANCEL_RQ:
                if rsp.message_id_responded == operation_id:
                    self._cancel_seen.add(operation_id)
                continue
            if (rsp.command_field == C_STORE_RSP and rsp.message_id_responded == message_id
                    and rsp.status is not None):
                return rsp.status
            raise AbortError(0x02, f"DIMSE 0x{rsp.command_field:04X} instead of C-STORE-RSP")

    def _read_command(self, reader: PduReader) -> Command:
        """Read one command-only message (C-CANCEL-RQ), PDU by PDU."""
        parts: list[bytes] = []
        size = 0
        while True:
            pdu_type, length = reader.read_header()
            if pdu_type == A_ABORT:
                reader.read_body(length)
                raise PeerAbortError("peer aborted the association")
            if pdu_type != P_DATA_TF:
                raise AbortError(0x02, f"PDU type 0x{pdu_type:02X} while an operation runs")
            while length > 0:
                fragment, context_id, header = reader.read_item(length)
                length -= 6 + fragment
                if context_id not in self.accepted or not header & 0x01:
                    raise AbortError(0x02, "data set while an operation runs")
                size += fragment
                if size > self.policy.max_command_bytes:
                    raise AbortError(0x02, "command set over max_command_bytes")
                parts.append(bytes(reader.read_body(fragment)))
                if header & 0x02:
                    if length:
                        raise AbortError(0x02, "PDVs after a complete command")
                    try:
                        return decode_command(b"".join(parts))
                    except ValueError as exc:
                        raise AbortError(0x06, str(exc)) from exc

    def _respond(self, context_id: int, command_bytes: bytes) -> None:
        item = struct.pack(">IBB", len(command_bytes) + 2, context_id, 0x03) + command_bytes
        self.sock.sendall(struct.pack(">BBI", P_DATA_TF, 0, len(item)) + item)

    def _send_abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">BBIBBBB", A_ABORT, 0, 4, 0, 0, 0x02, reason))

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
