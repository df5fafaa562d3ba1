"""MLLP listener for HL7 v2 orders (HL7 v2.5.1 Appendix C, Minimal Lower Layer Protocol).

A message travels as ``<VT> message <FS><CR>`` (0x0B … 0x1C 0x0D). Each one is handed
to :class:`~worklist.orders.intake.Hl7OrderIntake` and its ACK goes back in the
same framing, on the same connection, before the next message is read (original
mode: the sender waits for the ACK). Bytes outside a frame are dropped. The peer's
address goes with each message to the intake's action log.

Hostile senders are bounded:

- **Oversize.** A frame larger than ``max_message`` is answered at once with an
  original-mode ACK ``MSA-1 = AR`` and an ``ERR`` saying why (built from the
  message's first bytes, so MSA-2 carries its MSH-10), then the rest of the frame
  is read and discarded up to ``drain_bytes`` (memory stays bounded) and the
  connection goes on; past that budget it is closed. We answer ``AR``, not ``CR``:
  ``CR`` is an enhanced-mode commit ACK (v2.5.1 2.9.3), and a sender in original
  mode (MSH-15/16 empty, what this listener speaks) expects an application ACK;
  ``AR`` is the one for a message refused for what it is rather than for its
  content (2.9.2.2), which is the case of a message never read.
- **Slow.** A connection silent for ``idle_timeout_s`` between messages is closed,
  and a message must arrive whole within ``message_timeout_s`` of its first byte.
- **Too many.** At most ``max_connections`` at once; more are closed on accept.
- **Anyone.** ``allowed_sources`` (IPs, CIDR networks) limits who may connect;
  others are closed on accept and logged with their IP only. Empty lets anyone
  in, with a warning at start.

:func:`~core.hl7v2.frame` and :class:`~core.hl7v2.Deframer` (pure, shared with the
analyzer links) live in :mod:`core.hl7v2`; :class:`MllpServer` is the socket shell.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.errors import OrderMessageError

# The framing is shared with the analyzer links (ingest/labs/links/mllp.py) through
# core.hl7v2; it is re-exported here for the callers and tests that import it from here.
from core.hl7v2 import END, START, Deframer, Oversize, frame
from core.logging import correlation

if TYPE_CHECKING:
    from worklist.orders.intake import Hl7OrderIntake

__all__ = ["END", "START", "Deframer", "MllpServer", "Oversize", "frame", "parse_sources"]

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_sources(items: Sequence[str]) -> tuple[Network, ...]:
    """IPs and CIDR networks (``orders.mllp_allowed_sources``) as networks."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def _allowed(host: str, networks: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = self.server
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        deframer = Deframer(server.max_message, server.drain_bytes)
        started = 0.0
        with correlation():
            logger.info("MLLP connection from %s", peer)
            while True:
                now = time.monotonic()
                if deframer.in_message:
                    left = server.message_timeout_s - (now - started)
                    if left <= 0:
                        logger.warning("MLLP %s: message not complete in time; closing", peer)
                        break
                    sock.settimeout(min(left, server.idle_timeout_s))
                else:
                    sock.settimeout(server.idle_timeout_s)
                try:
                    data = sock.recv(65536)
                except (TimeoutError, OSError):
                    break
                if not data:
                    break
                try:
                    for item in deframer.events(data):
                        sock.sendall(frame(self._answer(item, peer)))
                except ValueError:
                    logger.warning("MLLP %s: oversize message not ended; closing", peer)
                    break
                except OSError:
                    break
                # The clock of a message starts with its first chunk.
                started = (started or time.monotonic()) if deframer.in_message else 0.0
            logger.info("MLLP connection from %s closed", peer)

    def _answer(self, item: bytes | Oversize, peer: str) -> bytes:
        intake = self.server.intake
        if isinstance(item, Oversize):
            logger.warning(
                "MLLP %s: message of %d+ bytes over the limit of %d: answered AR",
                peer, item.size, self.server.max_message,
            )
            error = OrderMessageError(
                f"message of {item.size} bytes or more exceeds the limit of "
                f"{self.server.max_message} bytes; not read",
                hl7_code=207,
                ack_code="AR",
            )
            return intake.refuse(item.head, error, peer=peer).ack
        return intake.handle(item, peer=peer).ack

    def finish(self) -> None:
        self.server.slots.release()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], intake: Hl7OrderIntake, **opts: Any) -> None:
        self.intake = intake
        self.idle_timeout_s: float = opts["idle_timeout_s"]
        self.message_timeout_s: float = opts["message_timeout_s"]
        self.max_message: int = opts["max_message"]
        self.drain_bytes: int = opts["drain_bytes"]
        self.allowed: tuple[Network, ...] = opts["allowed"]
        self.slots = threading.BoundedSemaphore(opts["max_connections"])
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        if self.allowed and not _allowed(host, self.allowed):
            logger.warning("MLLP connection from %s refused: not an allowed source", host)
            return False
        if not self.slots.acquire(blocking=False):
            logger.warning("MLLP connection from %s refused: too many connections", host)
            return False
        return True


class MllpServer:
    """Accept MLLP connections on ``(host, port)`` in a background thread.

    Parameters
    ----------
    intake : Hl7OrderIntake
        Applies each message and makes its ACK.
    host, port : str, int
        Where to listen; port 0 picks a free one (see :attr:`port`).
    idle_timeout_s : float
        A connection idle this long between messages is closed.
    message_timeout_s : float
        A message must be received whole this long after its first byte.
    max_message, drain_bytes : int
        Largest message; bytes of an oversize one discarded (see the module docstring).
    allowed_sources : sequence of str
        IPs / CIDR networks allowed to connect; empty: anyone (logged at start).
    max_connections : int
        Connections served at once.
    """

    def __init__(
        self,
        intake: Hl7OrderIntake,
        host: str,
        port: int,
        *,
        idle_timeout_s: float = 300.0,
        message_timeout_s: float = 60.0,
        max_message: int = 16 * 1024 * 1024,
        drain_bytes: int = 256 * 1024 * 1024,
        allowed_sources: Sequence[str] = (),
        max_connections: int = 32,
    ) -> None:
        self._allowed = parse_sources(allowed_sources)
        self._server = _Server(
            (host, port),
            intake,
            idle_timeout_s=idle_timeout_s,
            message_timeout_s=message_timeout_s,
            max_message=max_message,
            drain_bytes=drain_bytes,
            allowed=self._allowed,
            max_connections=max_connections,
        )
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MllpServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="mllp-orders", daemon=True
        )
        self._thread.start()
        logger.info("MLLP orders listener on port %d", self.port)
        if not self._allowed:
            logger.warning(
                "MLLP orders listener on port %d accepts connections from anyone "
                "(orders.mllp_allowed_sources is empty)", self.port,
            )
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
