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

:func:`frame` and :class:`Deframer` are pure; :class:`MllpServer` is the socket shell.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.errors import OrderMessageError
from core.logging import correlation

if TYPE_CHECKING:
    from worklist.orders.intake import Hl7OrderIntake

__all__ = ["END", "START", "Deframer", "MllpServer", "Oversize", "frame", "parse_sources"]

logger = logging.getLogger(__name__)

START = b"\x0b"
END = b"\x1c\x0d"
#: Bytes of an oversize message kept to answer it (its MSH segment).
_HEAD = 4096

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def frame(message: bytes) -> bytes:
    """Wrap one message in MLLP framing."""
    return START + message + END


@dataclass(frozen=True, slots=True)
class Oversize:
    """A frame grew past the limit: its first bytes (for the ACK) and its size so far."""

    head: bytes
    size: int


class Deframer:
    """Collects bytes and yields complete messages (without framing).

    Parameters
    ----------
    max_message : int
        Largest message kept.
    drain_bytes : int
        Bytes of an oversize message read and discarded while looking for its end.
    """

    def __init__(
        self, max_message: int = 16 * 1024 * 1024, drain_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self._buf = bytearray()
        self.max_message = max_message
        self.drain_bytes = drain_bytes
        self._dropping = False
        self._dropped = 0
        self._last = b""

    @property
    def in_message(self) -> bool:
        """A message has started and has not ended."""
        return self._dropping or bool(self._buf)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Add received bytes; yield every message now complete.

        Raises
        ------
        ValueError
            A message grew past ``max_message`` without its end block.
        """
        for item in self.events(data):
            if isinstance(item, Oversize):
                raise ValueError("MLLP message too large")
            yield item

    def events(self, data: bytes) -> Iterator[bytes | Oversize]:
        """Like :meth:`feed`, but an oversize message yields one :class:`Oversize`.

        Its remaining bytes are then discarded up to its end block.

        Raises
        ------
        ValueError
            More than ``drain_bytes`` discarded without finding the end block.
        """
        if self._dropping:
            data = self._drain(data)
            if self._dropping:
                return
        self._buf += data
        while True:
            start = self._buf.find(START)
            if start < 0:
                self._buf.clear()  # nothing framed: garbage between messages
                return
            if start:
                del self._buf[:start]
            end = self._buf.find(END, 1)
            if end < 0:
                if len(self._buf) - 1 > self.max_message:
                    yield Oversize(bytes(self._buf[1 : 1 + _HEAD]), len(self._buf) - 1)
                    rest = bytes(self._buf[-1:])
                    self._dropped = len(self._buf) - 2
                    self._buf.clear()
                    self._dropping = True
                    self._last = rest
                return
            if end - 1 > self.max_message:
                yield Oversize(bytes(self._buf[1 : 1 + _HEAD]), end - 1)
                del self._buf[: end + len(END)]
                continue
            message = bytes(self._buf[1:end])
            del self._buf[: end + len(END)]
            yield message

    def _drain(self, data: bytes) -> bytes:
        """Discard up to the end block; return what follows it."""
        joined = self._last + data
        end = joined.find(END)
        if end >= 0:
            self._dropping, self._dropped, self._last = False, 0, b""
            return joined[end + len(END) :]
        self._dropped += len(data)
        self._last = joined[-1:]
        if self._dropped > self.drain_bytes:
            raise ValueError("oversize MLLP message without an end block within the drain budget")
        return b""


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
