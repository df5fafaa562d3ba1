"""The ATNA sender: action-log entries to a syslog collector, never in a request's way.

:meth:`SyslogSender.submit` is a ``put_nowait`` on a bounded queue (``audit.atna.
queue_max``): it never blocks and never raises, so a C-STORE, a QIDO query or a login
is answered whatever the collector does. One daemon thread builds each message
(:func:`core.atna.syslog_message`) and sends it over

* ``tls://`` — TLS (RFC 5425; TLS 1.2 or later, the collector's certificate checked
  against ``ca_file`` and its host name, an optional client certificate), octet-counted
  framing (RFC 5425 4.3);
* ``tcp://`` — plain TCP with the same framing (RFC 6587 3.4.1), for collectors inside
  a trusted network;
* ``udp://`` — one message per datagram (RFC 5426 3.1).

When the collector is away the thread keeps the message in hand and reconnects with
doubling waits (0.5 s up to ``backoff_max_s``); meanwhile the queue fills and further
entries are dropped and counted (:attr:`SyslogSender.dropped`, exported as
``pacslab_atna_dropped_total``), because the hash-chained log already holds every
entry and memory must stay bounded. Only the collector's address, error classes and
counts are logged, never a message (they name studies and patients' keys).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from typing import Final
from urllib.parse import urlsplit

from core.atna import AuditSource, octet_counted, syslog_message
from core.audit import AuditEntry
from core.settings import AtnaSettings

__all__ = ["SyslogSender"]

logger = logging.getLogger(__name__)

#: RFC 5426 3.2: a UDP syslog message must fit one IPv4 datagram.
MAX_UDP: Final = 65_507
_STOP: Final = object()
#: Messages written at once, at most.
_BATCH: Final = 200


class SyslogSender:
    """A bounded queue of entries and the thread that sends them to one collector."""

    def __init__(self, settings: AtnaSettings, source: AuditSource | None = None) -> None:
        parts = urlsplit(settings.url)
        assert parts.hostname is not None and parts.port is not None  # settings checked it
        self.settings = settings
        self.transport = parts.scheme
        self.host, self.port = parts.hostname, parts.port
        self.endpoint = f"{parts.scheme}://{self.host}:{self.port}"
        host = socket.gethostname() or "-"
        self.source = source or AuditSource(
            source_id=settings.source_id or host,
            enterprise_site=settings.enterprise_site,
            hostname=host,
            procid=str(os.getpid()),
        )
        self._queue: queue.Queue[object] = queue.Queue(maxsize=settings.queue_max)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._deadline = float("inf")
        #: Messages handed to the transport, dropped (queue full, oversize, or still
        #: unsent at close), and connection attempts that failed.
        self.sent = 0
        self.dropped = 0
        self.failures = 0

    # -- the callers' side ------------------------------------------------------------

    def submit(self, entry: AuditEntry) -> None:
        """Queue one entry; never blocks, never raises."""
        try:
            if self._closing.is_set():
                return
            self._queue.put_nowait(entry)
            self._ensure_thread()
        except queue.Full:
            with self._lock:
                self.dropped += 1
                dropped = self.dropped
            if dropped == 1 or dropped % 1000 == 0:
                logger.error(
                    "ATNA queue full (%s unreachable?): %d messages dropped", self.endpoint, dropped
                )
        except Exception:
            logger.error("could not queue an ATNA message", exc_info=True)

    def _ensure_thread(self) -> None:
        # Started on first use, so a sender built before a fork runs in the child.
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="pacslab-atna", daemon=True)
                self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued message was handed to the transport (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued for up to ``timeout`` seconds, then stop."""
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)
        thread = self._thread
        if thread is not None:
            thread.join(timeout + 1.0)
        self._disconnect()

    def exposition(self) -> str:
        """Prometheus text of the counters."""
        return (
            "# HELP pacslab_atna_sent_total ATNA audit messages sent to the collector.\n"
            "# TYPE pacslab_atna_sent_total counter\n"
            f"pacslab_atna_sent_total {self.sent}\n"
            "# HELP pacslab_atna_dropped_total ATNA audit messages dropped (queue full).\n"
            "# TYPE pacslab_atna_dropped_total counter\n"
            f"pacslab_atna_dropped_total {self.dropped}\n"
            "# HELP pacslab_atna_queue ATNA audit messages waiting for the collector.\n"
            "# TYPE pacslab_atna_queue gauge\n"
            f"pacslab_atna_queue {self._queue.qsize()}\n"
        )

    # -- the sender thread ----------------------------------------------------------------

    def _run(self) -> None:
        backoff, reported = 0.5, False
        while True:
            # Whatever queued meanwhile goes out in one write (one TLS record run, one
            # syscall) instead of one per message.
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                messages = []
                for item in batch:
                    if isinstance(item, AuditEntry):
                        try:
                            messages.append(syslog_message(item, self.source))
                        except Exception:
                            logger.error("ATNA message not built", exc_info=True)
                while messages:
                    try:
                        self._send(messages)
                        if reported:
                            logger.info("ATNA collector %s reachable again", self.endpoint)
                        backoff, reported = 0.5, False
                        break
                    except (OSError, ValueError) as exc:
                        self._disconnect()
                        self.failures += 1
                        if not reported:
                            logger.warning(
                                "ATNA collector %s unreachable (%s); retrying",
                                self.endpoint,
                                type(exc).__name__,
                            )
                            reported = True
                        if self._closing.is_set() and time.monotonic() > self._deadline:
                            self._give_up(len(messages))
                            return
                        # Wakes early on close, to try once more before the deadline.
                        self._closing.wait(backoff)
                        backoff = min(backoff * 2, self.settings.backoff_max_s)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if any(item is _STOP for item in batch):
                return

    def _give_up(self, in_hand: int) -> None:
        left = in_hand + self._queue.qsize()
        with self._lock:
            self.dropped += left
        logger.error("ATNA sender closed with %d messages unsent to %s", left, self.endpoint)

    def _send(self, messages: list[bytes]) -> None:
        """Hand ``messages`` to the transport; ``sent`` counts them once written."""
        sock = self._connected()
        if self.transport != "udp":
            sock.sendall(b"".join(octet_counted(m) for m in messages))
            self.sent += len(messages)
            return
        while messages:
            message = messages[0]
            if len(message) > MAX_UDP:
                with self._lock:
                    self.dropped += 1
                logger.error("ATNA message of %d bytes too large for UDP; dropped", len(message))
            else:
                sock.send(message)
                self.sent += 1
            messages.pop(0)  # a retry after an error resends only what was not sent

    def _connected(self) -> socket.socket:
        sock = self._sock
        if sock is not None and self.transport != "udp" and _peer_closed(sock):
            self._disconnect()
            sock = None
        if sock is None:
            sock = self._connect()
            self._sock = sock
        return sock

    def _connect(self) -> socket.socket:
        s = self.settings
        if self.transport == "udp":
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
            udp = socket.socket(info[0], socket.SOCK_DGRAM)
            udp.connect(info[4])
            return udp
        raw = socket.create_connection((self.host, self.port), timeout=s.connect_timeout_s)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.transport == "tcp":
            return raw
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(s.ca_file) if s.ca_file else None
        )
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 5425 4.2, BCP 195
        if s.client_cert is not None and s.client_key is not None:
            ctx.load_cert_chain(str(s.client_cert), str(s.client_key))
        try:
            return ctx.wrap_socket(raw, server_hostname=self.host)
        except Exception:
            raw.close()
            raise

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def _peer_closed(sock: socket.socket) -> bool:
    """True if the collector closed the stream (it never sends anything: RFC 5425 4.3).

    Checked before each write, so a message is not written into a connection the
    collector has already closed and silently lost.
    """
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        if not isinstance(sock, ssl.SSLSocket):
            return sock.recv(1, socket.MSG_PEEK) == b""
        # TLS: readable may be only a record such as a TLS 1.3 session ticket; read it
        # without blocking (SSLSocket cannot peek).
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            return sock.recv(1) == b""
        except ssl.SSLWantReadError:
            return False
        finally:
            sock.settimeout(timeout)
    except (OSError, ValueError):
        return True
