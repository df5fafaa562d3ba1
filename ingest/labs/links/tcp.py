"""ASTM E1381 over TCP: pacslab as server (the analyzer connects) or as client.

E1381 was written for RS-232; over TCP (CLSI LIS1-A §5 allows any transport that
delivers bytes in order) the same ENQ/frames/EOT run on the socket. One connection
per analyzer at a time: a second connection waits until the first one closes,
as a serial line would make it.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading

from ingest.labs.links._runner import AnalyzerLink, run_link

__all__ = ["SocketTransport", "TcpClientLink", "TcpServerLink"]

logger = logging.getLogger(__name__)

_READ_SIZE = 65536


class SocketTransport:
    """A connected TCP socket as a :class:`~ingest.labs.links.Transport`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return b""
        data = self.sock.recv(_READ_SIZE)
        if not data:
            raise ConnectionResetError("peer closed the connection")
        return data

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class TcpServerLink:
    """Listen on ``host:port``; serve one analyzer connection at a time."""

    def __init__(self, link: AnalyzerLink, host: str, port: int) -> None:
        self.link = link
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.listener.settimeout(0.2)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, name=f"astm-{link.name}", daemon=True)

    def start(self) -> TcpServerLink:
        self.link.status.update(state="listening")
        self._thread.start()
        logger.info("analyzer %s: listening on port %d", self.link.name, self.address[1])
        return self

    def _serve(self) -> None:
        while not self.link.stopping.is_set():
            try:
                sock, _peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            logger.info("analyzer %s: connected", self.link.name)
            run_link(SocketTransport(sock), self.link)
            if not self.link.stopping.is_set():
                self.link.status.update(state="listening")

    def stop(self) -> None:
        self.link.stopping.set()
        self.listener.close()
        self._thread.join(timeout=5)


class TcpClientLink:
    """Connect to the analyzer at ``host:port``; reconnect after ``reconnect_s``."""

    def __init__(self, link: AnalyzerLink, host: str, port: int, *, reconnect_s: float) -> None:
        self.link = link
        self.host = host
        self.port = port
        self.reconnect_s = reconnect_s
        self._thread = threading.Thread(target=self._run, name=f"astm-{link.name}", daemon=True)

    def start(self) -> TcpClientLink:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self.link.stopping.is_set():
            self.link.status.update(state="connecting")
            try:
                sock = socket.create_connection((self.host, self.port), timeout=5)
            except OSError as exc:
                self.link.status.error(f"connect failed: {type(exc).__name__}")
                self.link.stopping.wait(self.reconnect_s)
                continue
            sock.settimeout(None)
            logger.info("analyzer %s: connected to the analyzer", self.link.name)
            run_link(SocketTransport(sock), self.link)
            self.link.stopping.wait(self.reconnect_s)

    def stop(self) -> None:
        self.link.stopping.set()
        self._thread.join(timeout=5)
