"""ASTM E1381 over TCP: pacslab as server (the analyzer connects) or as client.

E1381 was written for RS-232; over TCP (CLSI LIS1-A §5 allows any transport that
delivers bytes in order) the same ENQ/frames/EOT run on the socket. One connection
per analyzer at a time: a second connection waits until the first one closes,
as a serial line would make it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import threading
from collections.abc import Sequence

from ingest.labs.links._runner import AnalyzerLink, run_link

__all__ = ["Network", "SocketTransport", "TcpClientLink", "TcpServerLink", "is_allowed"]

logger = logging.getLogger(__name__)

_READ_SIZE = 65536
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def is_allowed(host: str, networks: Sequence[Network]) -> bool:
    """Whether ``host`` (an IP) is in one of ``networks``."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return any(address in net for net in networks)


class TcpServerLink:
    """Listen on ``host:port``; serve one analyzer connection at a time.

    Only ``allowed_sources`` may connect (empty: anyone). A new allowed connection
    replaces the current one: an analyzer that lost power reconnects while its old
    connection still looks open here. A connection silent for ``idle_timeout_s``
    with the link neutral is closed.
    """

    def __init__(
        self,
        link: AnalyzerLink,
        host: str,
        port: int,
        *,
        allowed_sources: Sequence[str] = (),
        idle_timeout_s: float | None = None,
    ) -> None:
        self.link = link
        self.allowed = tuple(ipaddress.ip_network(s, strict=False) for s in allowed_sources)
        self.idle_timeout_s = idle_timeout_s
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.listener.settimeout(0.2)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, name=f"astm-{link.name}", daemon=True)
        self._current: tuple[threading.Thread, threading.Event] | None = None

    def start(self) -> TcpServerLink:
        self.link.status.update(state="listening")
        self._thread.start()
        logger.info("analyzer %s: listening on port %d", self.link.name, self.address[1])
        if not self.allowed:
            logger.warning(
                "analyzer %s: port %d accepts connections from anyone (allowed_sources empty)",
                self.link.name,
                self.address[1],
            )
        return self

    def _serve(self) -> None:
        while not self.link.stopping.is_set():
            try:
                sock, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            if self.allowed and not is_allowed(str(peer[0]), self.allowed):
                logger.warning("analyzer %s: connection from %s refused", self.link.name, peer[0])
                self.link.status.error("connection from a source not allowed")
                sock.close()
                continue
            self._end_current()
            logger.info("analyzer %s: connected", self.link.name)
            stop = threading.Event()
            thread = threading.Thread(
                target=self._run, args=(sock, stop), name=f"astm-{self.link.name}-conn", daemon=True
            )
            self._current = (thread, stop)
            thread.start()
        self._end_current()

    def _run(self, sock: socket.socket, stop: threading.Event) -> None:
        run_link(SocketTransport(sock), self.link, stop=stop, idle_timeout_s=self.idle_timeout_s)
        if not self.link.stopping.is_set() and not stop.is_set():
            self.link.status.update(state="listening")

    def _end_current(self) -> None:
        if self._current is not None:
            thread, stop = self._current
            stop.set()
            thread.join(timeout=5)
            self._current = None

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
