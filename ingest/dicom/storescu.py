"""A Storage SCU on a plain blocking socket: the association to a C-MOVE destination.

PS3.4 C.4.2.3.1: the C-MOVE SCP performs its C-STORE sub-operations on a separate
association it opens to the Move Destination. As on the receiving side
(:mod:`.association`), pynetdicom's DUL and reactor threads would poll their queues
between every PDU; here each sub-operation is one ``sendall`` (command and data set,
PDVs cut to the destination's Maximum Length) and one blocking read of the
C-STORE-RSP (asynchronous operations window 1, PS3.7 D.3.3.3). pynetdicom encodes
the A-ASSOCIATE-RQ and decodes the answer (PS3.8 9.3.2-9.3.4).

Every read has a deadline (ACSE timeout while associating and releasing, DIMSE
timeout for a response), and nothing the destination declares is buffered beyond a
bound (:class:`~ingest.dicom.association.PduReader`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Sequence

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from ingest.dicom._retrieve import p_data_tf
from ingest.dicom.association import (
    A_ABORT,
    A_RELEASE_RP,
    MAX_CONTROL_PDU,
    P_DATA_TF,
    AbortError,
    PduReader,
)
from ingest.dicom.dimse import C_STORE_RSP, decode_command
from ingest.dicom.negotiation import APPLICATION_CONTEXT
from storage.staging import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

__all__ = ["AssociationRefusedError", "StorageScu"]

logger = logging.getLogger(__name__)

_A_ASSOCIATE_AC, _A_ASSOCIATE_RJ = 0x02, 0x03
_A_RELEASE_RQ_PDU = struct.pack(">BBII", 0x05, 0, 4, 0)
#: PS3.8 9.3.8: A-ABORT, service-user initiated.
_A_ABORT_PDU = struct.pack(">BBIBBBB", A_ABORT, 0, 4, 0, 0, 0x00, 0x00)


class AssociationRefusedError(ConnectionError):
    """The destination rejected or aborted the association request (PS3.8 9.3.3/9.3.4)."""


class StorageScu:
    """One established association to a storage SCP; see the module docstring."""

    def __init__(
        self,
        sock: socket.socket,
        accepted: dict[int, tuple[str, str]],
        peer_max_pdu: int,
        *,
        max_pdu: int,
        acse_timeout_s: float,
        dimse_timeout_s: float,
    ) -> None:
        self.sock = sock
        #: context id -> (abstract syntax, transfer syntax) the destination accepted
        self.accepted = accepted
        self.peer_max_pdu = peer_max_pdu
        self.acse_timeout_s = acse_timeout_s
        self.dimse_timeout_s = dimse_timeout_s
        self._reader = PduReader(sock, max_pdu)
        self._by_syntax = {(a, ts): cx for cx, (a, ts) in accepted.items()}
        self._message_id = 0

    @classmethod
    def associate(
        cls,
        host: str,
        port: int,
        *,
        calling_ae: str,
        called_ae: str,
        contexts: Sequence[PresentationContext],
        max_pdu: int,
        connect_timeout_s: float,
        acse_timeout_s: float,
        dimse_timeout_s: float,
    ) -> StorageScu:
        """Connect and negotiate (PS3.8 9.3.2): the accepted contexts and the
        destination's Maximum Length Received.

        Raises
        ------
        AssociationRefusedError
            A-ASSOCIATE-RJ, A-ABORT or anything but an A-ASSOCIATE-AC in answer.
        OSError
            Not reachable, or silent past the timeouts.
        """
        sock = socket.create_connection((host, port), timeout=connect_timeout_s)
        try:
            # Each sub-operation is one write, then we wait for the answer: with Nagle
            # on, its last short segment would wait for the peer's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            proposed: dict[int, str] = {}
            numbered: list[PresentationContext] = []
            for n, cx in enumerate(contexts[:128]):  # PS3.8 9.3.2.2: odd IDs 1-255
                own = PresentationContext()
                own.context_id = 2 * n + 1
                own.abstract_syntax = cx.abstract_syntax
                own.transfer_syntax = list(cx.transfer_syntax)
                numbered.append(own)
                proposed[2 * n + 1] = str(cx.abstract_syntax)
            rq = A_ASSOCIATE()
            rq.application_context_name = APPLICATION_CONTEXT
            rq.calling_ae_title = calling_ae
            rq.called_ae_title = called_ae
            rq.presentation_context_definition_list = numbered
            max_len = MaximumLengthNotification()
            max_len.maximum_length_received = max_pdu
            impl = ImplementationClassUIDNotification()
            impl.implementation_class_uid = IMPLEMENTATION_CLASS_UID
            version = ImplementationVersionNameNotification()
            version.implementation_version_name = IMPLEMENTATION_VERSION
            rq.user_information = [max_len, impl, version]
            pdu = A_ASSOCIATE_RQ()
            pdu.from_primitive(rq)
            sock.settimeout(acse_timeout_s)
            sock.sendall(pdu.encode())
            reader = PduReader(sock, max_pdu)
            pdu_type, length = reader.read_header()  # non-P-DATA: bounded to 64 KiB
            body = bytes(reader.read_body(length))
            if pdu_type != _A_ASSOCIATE_AC:
                kind = {_A_ASSOCIATE_RJ: "rejected", A_ABORT: "aborted"}.get(pdu_type, "")
                raise AssociationRefusedError(
                    f"association {kind or f'answered with PDU 0x{pdu_type:02X}'}"
                )
            ac = A_ASSOCIATE_AC()
            ac.decode(struct.pack(">BBI", pdu_type, 0, length) + body)
            primitive = ac.to_primitive()
            accepted: dict[int, tuple[str, str]] = {}
            for result in primitive.presentation_context_definition_results_list:
                cx_id = int(result.context_id or 0)
                if result.result == 0x00 and cx_id in proposed and result.transfer_syntax:
                    accepted[cx_id] = (proposed[cx_id], str(result.transfer_syntax[0]))
            peer_max = 0
            for item in primitive.user_information:
                if isinstance(item, MaximumLengthNotification):
                    peer_max = int(item.maximum_length_received or 0)
        except BaseException:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        return cls(sock, accepted, peer_max, max_pdu=max_pdu, acse_timeout_s=acse_timeout_s,
                   dimse_timeout_s=dimse_timeout_s)

    def context_for(self, sop_class_uid: str, transfer_syntax_uid: str) -> int | None:
        """The accepted context of that SOP class in that transfer syntax, if any."""
        return self._by_syntax.get((sop_class_uid, transfer_syntax_uid))

    def next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def store(self, context_id: int, command: bytes, data_set: bytes,
              while_waiting: Callable[[], None] | None = None) -> int:
        """Send one C-STORE-RQ (PS3.7 9.3.1.1) and return the Status of its response;
        ``while_waiting`` runs between the two (the next original is read then).

        Raises
        ------
        OSError
            The destination went away, aborted, or did not answer in time: the
            association is no longer usable.
        """
        payload = b"".join([
            *p_data_tf(command, context_id, self.peer_max_pdu, command=True),
            *p_data_tf(data_set, context_id, self.peer_max_pdu, command=False),
        ])
        self.sock.settimeout(self.dimse_timeout_s)
        self.sock.sendall(payload)
        if while_waiting is not None:
            while_waiting()
        return self._read_status()

    def _read_status(self) -> int:
        try:
            return self._read_response()
        except AbortError as exc:  # a PDU or PDV past our bounds: unusable, as any
            raise ConnectionError(str(exc)) from exc  # other broken association

    def _read_response(self) -> int:
        parts: list[bytes] = []
        size = 0
        reader = self._reader
        while True:
            pdu_type, length = reader.read_header()
            if pdu_type != P_DATA_TF:
                reader.read_body(length)
                raise ConnectionError(f"PDU 0x{pdu_type:02X} instead of a C-STORE-RSP")
            while length > 0:
                fragment, _cx, header = reader.read_item(length)
                length -= 6 + fragment
                if not header & 0x01:
                    raise ConnectionError("data set in a C-STORE-RSP")
                size += fragment
                if size > MAX_CONTROL_PDU:
                    raise ConnectionError("C-STORE-RSP command set too long")
                parts.append(bytes(reader.read_body(fragment)))
                if header & 0x02:
                    try:
                        rsp = decode_command(b"".join(parts))
                    except ValueError as exc:
                        raise ConnectionError(str(exc)) from exc
                    if rsp.command_field != C_STORE_RSP or rsp.status is None:
                        raise ConnectionError("not a C-STORE-RSP")
                    if rsp.message_id_responded != self._message_id:
                        raise ConnectionError("C-STORE-RSP for another message")
                    return rsp.status

    def release(self) -> None:
        """A-RELEASE-RQ, then wait (ACSE timeout) for the A-RELEASE-RP (PS3.8 9.3.6,
        9.3.7); the connection is closed either way."""
        try:
            self.sock.settimeout(self.acse_timeout_s)
            self.sock.sendall(_A_RELEASE_RQ_PDU)
            while True:
                pdu_type, length = self._reader.read_header()
                if pdu_type == P_DATA_TF:
                    self._reader.discard(length)
                    continue
                self._reader.read_body(length)
                if pdu_type in (A_RELEASE_RP, A_ABORT):
                    break
        except Exception as exc:  # the sub-operations are done: nothing to report
            logger.info("release of the move association: %s", type(exc).__name__)
        finally:
            self.close()

    def abort(self) -> None:
        """A-ABORT (PS3.8 9.3.8), then close: the association is not usable."""
        with contextlib.suppress(OSError):
            self.sock.settimeout(1.0)
            self.sock.sendall(_A_ABORT_PDU)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
