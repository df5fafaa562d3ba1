"""The loop that drives one :class:`~ingest.labs.e1381.E1381Link` over a transport.

One thread per analyzer link: read with a short timeout (so timers and queued
outgoing messages are served), feed the state machine, carry out its effects.
:class:`~ingest.labs.e1381.Deliver` calls the message handler in this thread and
tells the link whether the message is stored; only then does the link answer the
frame (ACK after durable, NAK otherwise).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from ingest.labs.e1381 import Abort, Deliver, E1381Link, Effect, LinkTimers, Send, Sent
from services.analyzers import LinkStatus

__all__ = ["AnalyzerLink", "MessageHandler", "Transport", "run_link"]

logger = logging.getLogger(__name__)

#: Store a received message; return reply messages to send (host query answers).
#: Raising means "not stored": the frame is refused and the analyzer repeats it.
MessageHandler = Callable[[bytes], Sequence[bytes]]

#: Longest wait in one read, so stop requests and queued messages are seen soon.
_POLL_S = 0.05


class Transport(Protocol):
    """A byte pipe to the analyzer (TCP socket, serial port)."""

    def read(self, timeout: float) -> bytes:
        """Bytes available within ``timeout`` (``b""`` if none); ConnectionError on close."""
        ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class AnalyzerLink:
    """What a transport shell shares with the outside: outbox, status, stop flag."""

    def __init__(
        self,
        name: str,
        handler: MessageHandler,
        status: LinkStatus,
        *,
        timers: LinkTimers | None = None,
    ) -> None:
        self.name = name
        self.handler = handler
        self.status = status
        self.timers = timers or LinkTimers()
        self.outbox: queue.Queue[bytes] = queue.Queue()
        self.stopping = threading.Event()
        # Messages queued in the state machine when a connection drops are kept
        # here and queued again on the next connection.
        self.carry: list[bytes] = []

    def send(self, message: bytes) -> None:
        """Queue an outgoing message (an order download); thread-safe."""
        self.outbox.put(message)


def run_link(
    transport: Transport,
    link: AnalyzerLink,
    *,
    stop: threading.Event | None = None,
    idle_timeout_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Serve ``transport`` until it closes, ``link.stopping`` or ``stop`` is set, or it
    has been silent for ``idle_timeout_s`` with the link neutral."""
    machine = E1381Link(timers=link.timers)
    last_activity = clock()
    status = link.status
    status.update(connected=True, state=machine.state)
    pending: list[Effect] = []
    for message in link.carry:
        pending += machine.queue(message, clock())
    link.carry.clear()
    try:
        while not link.stopping.is_set() and not (stop is not None and stop.is_set()):
            now = clock()
            if (
                idle_timeout_s is not None
                and machine.state == "idle"
                and now - last_activity > idle_timeout_s
            ):
                logger.info("analyzer %s: connection idle; closed", link.name)
                break
            while True:
                try:
                    message = link.outbox.get_nowait()
                except queue.Empty:
                    break
                pending += machine.queue(message, now)
            _carry_out(pending, machine, transport, link, clock)
            pending = []
            wait = _POLL_S
            if machine.deadline is not None:
                wait = max(0.0, min(wait, machine.deadline - now))
            data = transport.read(wait)
            now = clock()
            if data:
                last_activity = now
                pending += machine.receive(data, now)
            pending += machine.tick(now)
            _carry_out(pending, machine, transport, link, clock)
            pending = []
            status.update(state=machine.state)
    except (ConnectionError, OSError) as exc:
        logger.info("analyzer %s: link closed (%s)", link.name, type(exc).__name__)
    finally:
        link.carry.extend(machine.unsent())
        status.update(connected=False, state="disconnected")
        transport.close()


def _carry_out(
    effects: list[Effect],
    machine: E1381Link,
    transport: Transport,
    link: AnalyzerLink,
    clock: Callable[[], float],
) -> None:
    work = list(effects)
    while work:
        effect = work.pop(0)
        if isinstance(effect, Send):
            transport.write(effect.data)
        elif isinstance(effect, Deliver):
            link.status.update(last_message_at=datetime.now(UTC))
            link.status.count("messages_received")
            try:
                replies = list(link.handler(effect.message))
                ok = True
            except Exception as exc:
                # Not stored: the frame is refused and the analyzer sends it again.
                logger.error("analyzer %s: message not stored", link.name, exc_info=True)
                link.status.error(f"message not stored: {type(exc).__name__}")
                replies, ok = [], False
            now = clock()
            work = machine.stored(ok, now) + work
            for reply in replies:
                work += machine.queue(reply, now)
        elif isinstance(effect, Sent):
            link.status.count("messages_sent")
        elif isinstance(effect, Abort):
            logger.warning("analyzer %s: %s", link.name, effect.reason)
            link.status.error(effect.reason)
