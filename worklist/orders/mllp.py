"""MLLP listener for HL7 v2 orders (HL7 v2.5.1 Appendix C, Minimal Lower Layer Protocol).

A message travels as ``<VT> message <FS><CR>`` (0x0B … 0x1C 0x0D). Each one is handed
to :class:`~worklist.orders.intake.Hl7OrderIntake` and its ACK goes back in the
same framing, on the same connection, before the next message is read (original
mode: the sender waits for the ACK). Bytes outside a frame are dropped; a frame
larger than ``max_message`` closes the connection. The peer's address goes with each
message to the intake's action log.

:func:`frame` and :class:`Deframer` are pure; :class:`MllpServer` is the socket shell.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from core.logging import correlation

if TYPE_CHECKING:
    from worklist.orders.intake import Hl7OrderIntake

__all__ = ["END", "START", "Deframer", "MllpServer", "frame"]

logger = logging.getLogger(__name__)

START = b"\x0b"
END = b"\x1c\x0d"


def frame(message: bytes) -> bytes:
    """Wrap one message in MLLP framing."""
    return START + message + END


class Deframer:
    """Collects bytes and yields complete messages (without framing)."""

    def __init__(self, max_message: int = 16 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self.max_message = max_message

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Add received bytes; yield every message now complete.

        Raises
        ------
        ValueError
            A message grew past ``max_message`` without its end block.
        """
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
                if len(self._buf) > self.max_message:
                    raise ValueError("MLLP message too large")
                return
            message = bytes(self._buf[1:end])
            del self._buf[: end + len(END)]
            yield message


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.server.idle_timeout_s)
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        deframer = Deframer()
        with correlation():
            logger.info("MLLP connection from %s", peer)
            while True:
                try:
                    data = sock.recv(65536)
                except (TimeoutError, OSError):
                    break
                if not data:
                    break
                try:
                    for message in deframer.feed(data):
                        result = self.server.intake.handle(message, peer=peer)
                        sock.sendall(frame(result.ack))
                except ValueError:
                    logger.warning("MLLP %s: message too large; closing", peer)
                    break
                except OSError:
                    break
            logger.info("MLLP connection from %s closed", peer)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], intake: Hl7OrderIntake, idle_timeout_s: float
    ) -> None:
        self.intake = intake
        self.idle_timeout_s = idle_timeout_s
        super().__init__(address, _Handler)


class MllpServer:
    """Accept MLLP connections on ``(host, port)`` in a background thread.

    Parameters
    ----------
    intake : Hl7OrderIntake
        Applies each message and makes its ACK.
    host, port : str, int
        Where to listen; port 0 picks a free one (see :attr:`port`).
    idle_timeout_s : float
        A connection idle this long is closed.
    """

    def __init__(
        self, intake: Hl7OrderIntake, host: str, port: int, *, idle_timeout_s: float = 300.0
    ) -> None:
        self._server = _Server((host, port), intake, idle_timeout_s)
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
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
