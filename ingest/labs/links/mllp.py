"""HL7 v2 analyzer links over MLLP: IHE LAW (Laboratory Analytical Workflow).

IHE PaLM TF-2a LAB-28/LAB-29 with HL7 v2.5.1 messages over MLLP (v2.5.1 Appendix
C, ``<VT> message <FS><CR>``), original-mode acknowledgment:

- **in** (:class:`MllpResultServer`, the analyzer connects): OUL^R22 and ORU^R01
  results. Each is stored through
  :meth:`services.analyzers.AnalyzerService.store_results` and only then answered
  ``MSA-1 = AA``; a storage failure answers ``AE`` (the analyzer sends again), a
  message we cannot read is kept under ``rejected/`` and answered ``AR`` (sending
  it again would not help). An ACK or ORL^O34 from the analyzer is not answered.
- **query** (LAB-27): a QBP^Q11 for a specimen on the same connection is answered
  RSP^K11 with its orders (the segments of an OML^O33), QAK-2 ``OK`` or ``NF``.
- **out** (:func:`send_message`, pacslab connects to the analyzer's listener):
  OML^O33 order downloads (:func:`format_oml_o33`), acknowledged by the analyzer
  with ACK or ORL^O34.

The MLLP byte framing and the escape rules are shared with
``worklist/orders/mllp.py`` through :mod:`core.hl7v2`, because edges do not
import each other (STYLE.md §1).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from core.errors import LabMessageError
from core.hl7v2 import END, START, AckError, Deframer, escape, frame, msh_fields
from core.hl7v2 import build_ack as _core_ack
from core.lab_values import DecimalComma
from core.settings import AnalyzerSettings
from ingest.labs.links.session import AstmSession, store_message
from ingest.labs.links.tcp import Network, is_allowed
from ingest.labs.parsers import hl7v2
from services.analyzers import AnalyzerService, SpecimenOrders

__all__ = ["Hl7Session", "MllpResultServer", "format_oml_o33", "mllp_frame", "send_message"]

logger = logging.getLogger(__name__)

MAX_MESSAGE: Final = 16 * 1024 * 1024
_DECIMAL: Final[dict[str, DecimalComma]] = {"auto": "auto", "comma": True, "point": False}


def mllp_frame(message: bytes) -> bytes:
    """``<VT> message <FS><CR>`` (HL7 v2.5.1 Appendix C.4.3)."""
    return frame(message)


def _msh_fields(raw: bytes) -> list[str]:
    head = raw.split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1")
    if not head.startswith("MSH") or len(head) < 8:
        return []
    return [head[3], *head[4:].split(head[3])]  # [sep, MSH-2, MSH-3, …]; index n = MSH-(n+1)


def _msh(fields: list[str], number: int) -> str:
    index = number - 1
    return fields[index] if len(fields) > index else ""


def build_ack(raw: bytes, code: str, *, text: str = "") -> bytes:
    """An original-mode ACK (v2.5.1 §2.9.2) echoing MSH-3/4 → 5/6, MSH-10 in MSA-2.

    Built by the one ACK builder of every HL7 v2 edge (:func:`core.hl7v2.build_ack`);
    MSH-10 derives from the message's hash, so a resent message gets the same ACK id.
    ``text`` becomes ERR-8, with ERR-3 207 (application internal error, Table 0357).
    """
    return _core_ack(
        msh_fields(raw),
        code,
        now=datetime.now(UTC),
        ack_control_id=hashlib.sha256(raw).hexdigest()[:20],
        error=AckError(207, "", text[:80]) if text else None,
        sending=("pacslab", "LIS"),
    )


def _hl7_escape(text: str) -> str:
    return escape(text)


def format_oml_o33(
    orders: SpecimenOrders, *, receiver: str, control_id: str, now: datetime | None = None
) -> bytes:
    """OML^O33 (IHE LAW LAB-28, v2.5.1 §4.4.10): one specimen, one ORC/OBR per test.

    UTF-8 with ``MSH-18 = UNICODE UTF-8`` so Vietnamese names travel unchanged.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    name = "^".join(_hl7_escape(p) for p in orders.patient_name.split("^"))
    birth = orders.birth_date.strftime("%Y%m%d") if orders.birth_date else ""
    specimen = _hl7_escape(orders.specimen_id)
    segments = [
        f"MSH|^~\\&|pacslab|LIS|{_hl7_escape(receiver)}||{stamp}||OML^O33^OML_O33|"
        f"{control_id}|P|2.5.1|||NE|AL||UNICODE UTF-8|||LAB-28^IHE",
        f"PID|1||{_hl7_escape(orders.patient_id)}^^^^PI||{name}||{birth}|{orders.sex}",
        f"SPM|1|{specimen}||||||||||||||||||||||||||",
        f"SAC|||{specimen}",
    ]
    for n, test in enumerate(orders.tests, 1):
        segments += [
            f"ORC|NW|{specimen}-{n}||{specimen}",
            f"TQ1|1||||||||{orders.priority or 'R'}",
            f"OBR|{n}|{specimen}-{n}||{_hl7_escape(test.analyzer_code)}^"
            f"{_hl7_escape(test.display)}^99LAB",
        ]
    return ("\r".join(segments) + "\r").encode("utf-8")


class Hl7Session:
    """One HL7 analyzer: results in (with the ACK to send back), orders out."""

    def __init__(
        self,
        settings: AnalyzerSettings,
        service: AnalyzerService,
        *,
        folder: Path,
    ) -> None:
        self.settings = settings
        self.service = service
        self.decimal = _DECIMAL[settings.decimal_mark]
        self.messages = folder / "messages"
        self.rejected = folder / "rejected"
        self._counter = 0
        self._lock = threading.Lock()

    def handle(self, raw: bytes) -> bytes | None:
        """Store one received message; return the ACK, or None for an ACK/ORL."""
        kind = _msh(_msh_fields(raw), 9).split("^")[0]
        if kind in ("ACK", "ORL"):
            return None
        if kind == "QBP":
            return self.query(raw)
        status = self.service.status
        status.update(last_message_at=datetime.now(UTC))
        status.count("messages_received")
        sha = hashlib.sha256(raw).hexdigest()
        try:
            parsed = hl7v2.parse(raw, decimal_comma=self.decimal)
            if not parsed.observations:
                raise LabMessageError("no OBX result in the message")
        except LabMessageError as exc:
            AstmSession._keep(self.rejected, sha, raw, {"where": exc.where, "why": exc.reason})
            status.count("rejected")
            status.error(f"message rejected: {exc.title}")
            return build_ack(raw, "AR", text=exc.title)
        try:
            store_message(self, sha, raw, parsed, fmt="hl7v2")
        except Exception as exc:
            # Not stored: AE tells the analyzer to send the message again.
            logger.error("analyzer %s: HL7 message not stored", self.settings.name, exc_info=True)
            status.error(f"message not stored: {type(exc).__name__}")
            return build_ack(raw, "AE", text="not stored; send again")
        return build_ack(raw, "AA")

    def query(self, raw: bytes) -> bytes:
        """Answer a LAW work-order query (LAB-27, QBP^Q11 → RSP^K11).

        ``QPD-3`` names the specimen (container) ID. The answer carries the
        order segments of an OML^O33 for it (QAK-2 ``OK``) or none (``NF``).
        """
        text = raw.decode("utf-8", errors="replace").replace("\n", "\r")
        qpd = next((seg for seg in text.split("\r") if seg.startswith("QPD|")), "")
        fields = qpd.split("|")
        tag = fields[2] if len(fields) > 2 else ""
        specimen = fields[3].split("^")[0] if len(fields) > 3 else ""
        orders = self.service.ordered_tests(specimen) if specimen else None
        msh = _msh_fields(raw)
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
        control = hashlib.sha256(raw).hexdigest()[:20]
        segments = [
            f"MSH|^~\\&|pacslab|LIS|{_msh(msh, 3)}|{_msh(msh, 4)}|{stamp}||RSP^K11^RSP_K11|"
            f"{control}|P|{_msh(msh, 12) or '2.5.1'}|||NE|NE||UNICODE UTF-8",
            f"MSA|AA|{_msh(msh, 10)}",
            f"QAK|{tag}|{'OK' if orders else 'NF'}",
            qpd,
        ]
        if orders is not None:
            body = format_oml_o33(orders, receiver=self.settings.name, control_id=control)
            segments += body.decode("utf-8").rstrip("\r").split("\r")[1:]
        self.service.status.count("messages_sent")
        return ("\r".join(segments) + "\r").encode("utf-8")

    def download(self, specimen_id: str) -> bool:
        """Send the OML^O33 of ``specimen_id`` to the analyzer; False if nothing is ordered.

        Raises
        ------
        ConnectionError
            The analyzer did not take the message (no connection, no AA/CA).
        """
        orders = self.service.ordered_tests(specimen_id)
        if orders is None:
            return False
        with self._lock:
            self._counter += 1
            control = f"PL{int(time.time())}{self._counter:04d}"
        message = format_oml_o33(orders, receiver=self.settings.name, control_id=control)
        try:
            ack = send_message(
                self.settings.order_host,
                self.settings.order_port,
                message,
                timeout=self.settings.reply_timeout_s,
            )
        except OSError as exc:
            self.service.status.error(f"order download failed: {type(exc).__name__}")
            raise ConnectionError("the analyzer's MLLP listener did not answer") from exc
        fields = ack.split(b"\r")
        msa = next((s.decode("latin-1") for s in fields if s.startswith(b"MSA")), "")
        code = msa.split("|")[1] if msa.count("|") >= 1 else ""
        if code not in ("AA", "CA"):
            self.service.status.error(f"order download refused: {code or 'no MSA'}")
            raise ConnectionError(f"analyzer answered {code or 'no MSA'}")
        self.service.status.count("messages_sent")
        return True


def send_message(host: str, port: int, message: bytes, *, timeout: float) -> bytes:
    """Send one MLLP message and return the reply (without framing)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(mllp_frame(message))
        buf = bytearray()
        while END not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the reply")
            buf += chunk
            if len(buf) > MAX_MESSAGE:
                raise ConnectionError("reply too large")
        start = buf.find(START)
        return bytes(buf[start + 1 : buf.find(END)])


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        server = self.server
        status = server.session.service.status
        status.update(connected=True, state="connected")
        # Messages larger than MAX_MESSAGE close the connection (no drain, no AR).
        deframer = Deframer(max_message=MAX_MESSAGE)
        try:
            while True:
                sock.settimeout(server.idle_timeout_s)
                try:
                    data = sock.recv(65536)
                except (TimeoutError, OSError):
                    break
                if not data:
                    break
                try:
                    for message in deframer.feed(data):
                        reply = server.session.handle(message)
                        if reply is not None:
                            sock.sendall(mllp_frame(reply))
                except ValueError:
                    status.error("MLLP message too large; connection closed")
                    return
        finally:
            status.update(connected=False, state="listening")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        session: Hl7Session,
        idle_timeout_s: float,
        allowed: tuple[Network, ...] = (),
    ):
        self.session = session
        self.idle_timeout_s = idle_timeout_s
        self.allowed = allowed
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        if self.allowed and not is_allowed(host, self.allowed):
            logger.warning("analyzer MLLP connection from %s refused", host)
            self.session.service.status.error("connection from a source not allowed")
            return False
        return True


class MllpResultServer:
    """Listen for an analyzer's HL7 results; ``start``/``stop`` like the ASTM shells."""

    def __init__(
        self,
        session: Hl7Session,
        host: str,
        port: int,
        *,
        idle_timeout_s: float = 300.0,
        allowed_sources: Sequence[str] = (),
    ) -> None:
        self.session = session
        allowed = tuple(ipaddress.ip_network(a, strict=False) for a in allowed_sources)
        self._server = _Server((host, port), session, idle_timeout_s, allowed)
        self.address: tuple[str, int] = self._server.server_address[:2]  # type: ignore[assignment]
        self._thread: threading.Thread | None = None
        self.link: Any = None

    def start(self) -> MllpResultServer:
        self.session.service.status.update(state="listening")
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            name=f"mllp-{self.session.settings.name}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
