"""ASTM E1381-02 (CLSI LIS1-A) low-level link as a pure state machine.

The link moves messages (E1394 records) between an instrument and the computer
system in three phases (§6.1): *establishment* (the sender sends ENQ, the receiver
answers ACK, or NAK when busy), *transfer* (frames ``<STX> FN text <ETB|ETX> C1 C2
<CR><LF>``, each answered ACK or NAK; a NAKed frame is sent again, at most six
times, §6.5.1.2) and *termination* (EOT). Timers (§6.5.2): the sender waits 15 s
for a reply to ENQ or to a frame, the receiver 30 s for the next frame; when one
runs out the side that waits gives up (the sender with EOT) and the link is
neutral again. Contention (§6.2.7): when both sides send ENQ the instrument wins,
so this side, the computer system, stops and receives, and tries again after the
instrument's EOT.

``E1381Link`` takes line bytes, elapsed time and requests, and returns effects
(:class:`Send`, :class:`Deliver`, :class:`Sent`, :class:`Abort`), as distributed's
``WorkerState`` does. It never reads a clock or a socket: the shells in
:mod:`ingest.labs.links` do. Its one departure from a bare E1381 receiver is the
durability rule of pacslab: the frame that completes a message (the one carrying
its L record, E1394 §13) is answered only after the shell has stored the message
(:meth:`E1381Link.stored`). If storing fails the frame gets NAK, so the instrument
sends it again (and after six tries gives up, keeping the results itself): an ACK
always means "stored". One case cannot keep that promise: a sender that ends a
message with EOT and no L record. Its frames were answered one by one, and EOT
takes no answer, so such a message is delivered at EOT and a storage failure
then can only be logged (E1394 §13 requires the L record; every capture we hold
has it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final, Literal

from ingest.labs.parsers._e1381 import (
    ACK,
    ENQ,
    EOT,
    MAX_FRAME_TEXT,
    NAK,
    STX,
    build_frame,
    read_frame,
    split_frames,
)

__all__ = [
    "Abort",
    "Deliver",
    "E1381Link",
    "Effect",
    "LinkTimers",
    "Send",
    "Sent",
]

#: Bytes a receiver keeps for one frame before it gives up on it (a sender
#: without ETX must not grow our memory; real analyzers exceed 247 characters).
MAX_FRAME_BYTES: Final = 64 * 1024
#: Sessions a message is offered in after its frames went unanswered.
MAX_SESSIONS: Final = 3
#: Bytes of one message (H…L) a receiver keeps before refusing its frames.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LinkTimers:
    """E1381 §6.5.2 timers and the retry limit; tests shorten them."""

    reply_s: float = 15.0  # sender waits for ACK/NAK after ENQ or a frame
    frame_s: float = 30.0  # receiver waits for the next frame or EOT
    busy_s: float = 10.0  # sender waits after a NAK to ENQ before trying again
    contention_s: float = 20.0  # computer waits after contention (§6.2.7.1)
    retries: int = 6  # a frame is sent at most 1 + 6 times (§6.5.1.2)


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the line."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """A whole message arrived; store it, then call :meth:`E1381Link.stored`."""

    message: bytes


@dataclass(frozen=True, slots=True)
class Sent:
    """The peer acknowledged every frame of an outgoing message."""

    message: bytes


@dataclass(frozen=True, slots=True)
class Abort:
    """A transfer ended without success (timeout, retries exhausted)."""

    reason: str
    message: bytes = b""


Effect = Send | Deliver | Sent | Abort
State = Literal["idle", "receiving", "storing", "establishing", "sending", "waiting"]


@dataclass(slots=True)
class _Outgoing:
    message: bytes
    frames: list[bytes]
    index: int = 0
    tries: int = 0
    sessions: int = 0


@dataclass(slots=True)
class E1381Link:
    """One side of an E1381 link, as the computer system (the LIS).

    Attributes
    ----------
    state : str
        ``idle`` (neutral), ``receiving``, ``storing`` (a complete message awaits
        :meth:`stored`), ``establishing`` (ENQ sent), ``sending``, ``waiting``
        (before trying ENQ again).
    deadline : float or None
        When :meth:`tick` must be called next (same clock as ``now``).
    """

    timers: LinkTimers = field(default_factory=LinkTimers)
    max_text: int = MAX_FRAME_TEXT
    state: State = "idle"
    deadline: float | None = None
    _buffer: bytearray = field(default_factory=bytearray)
    _expected: int = 1
    _last: tuple[int, bytes] | None = None
    _record: bytearray = field(default_factory=bytearray)  # record split over ETB frames
    _message: bytearray = field(default_factory=bytearray)  # records since H
    _held: tuple[int, bytes, int] | None = None  # frame awaiting stored(): FN, text, size
    _outbox: deque[bytes] = field(default_factory=deque)
    _out: _Outgoing | None = None
    _next_number: int = 1  # frame numbers run on across the messages of a session

    # -- requests ------------------------------------------------------------------

    def queue(self, message: bytes, now: float) -> list[Effect]:
        """Ask to send ``message`` (E1394 records, each ending with CR)."""
        self._outbox.append(message)
        if self.state == "idle":
            return self._establish(now)
        return []

    def stored(self, ok: bool, now: float) -> list[Effect]:
        """The message of the last :class:`Deliver` is durable (``ok``) or not."""
        if self.state != "storing" or self._held is None:
            return []
        number, text, _size = self._held
        self._held = None
        self.state = "receiving"
        self.deadline = now + self.timers.frame_s
        if ok:
            self._message.clear()
            self._accept_number(number, text)
            return [Send(bytes((ACK,)))]
        # Not stored: refuse the frame; the sender repeats it and we deliver again.
        return [Send(bytes((NAK,)))]

    def unsent(self) -> list[bytes]:
        """Messages queued or in transfer, to carry over to a new connection."""
        out = [self._out.message] if self._out is not None else []
        return out + list(self._outbox)

    @property
    def pending(self) -> int:
        """Messages queued or in transfer to the peer."""
        return len(self._outbox) + (self._out is not None)

    # -- line input -------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Effect]:
        """Bytes arrived from the line."""
        self._buffer += data
        effects: list[Effect] = []
        while self._buffer:
            before = len(self._buffer)
            effects += self._step(now)
            if len(self._buffer) == before:
                break
        return effects

    def tick(self, now: float) -> list[Effect]:
        """Time passed; act on an expired timer."""
        if self.deadline is None or now < self.deadline:
            return []
        state = self.state
        if state in ("receiving", "storing"):
            # §6.5.2.2: the receiver discards the incomplete message and goes neutral.
            self._reset_receiver()
            self._buffer.clear()
            self._to_idle()
            effects: list[Effect] = [Abort("receiver timeout: no frame or EOT in time")]
            return effects + self._resume(now)
        if state == "establishing":
            # No reply to ENQ in 15 s: EOT, neutral, try again later.
            self.state = "waiting"
            self.deadline = now + self.timers.busy_s
            return [Send(bytes((EOT,))), Abort("no reply to ENQ")]
        if state == "sending":
            # No reply to a frame: EOT, and offer the message again in a new session
            # after the busy wait (the analyzer may have been busy or restarting),
            # at most MAX_SESSIONS times.
            out = self._out
            self.state = "waiting"
            self.deadline = now + self.timers.busy_s
            effects = [Send(bytes((EOT,)))]
            if out is not None:
                out.sessions += 1
                if out.sessions >= MAX_SESSIONS:
                    self._out = None
                    return [*effects, Abort("no reply to a frame; message dropped", out.message)]
            return [*effects, Abort("no reply to a frame")]
        if state == "waiting":
            self._to_idle()
            return self._resume(now)
        return []

    # -- internals ----------------------------------------------------------------

    def _to_idle(self) -> None:
        self.state = "idle"
        self.deadline = None

    def _reset_receiver(self) -> None:
        self._expected = 1
        self._last = None
        self._record.clear()
        self._message.clear()
        self._held = None

    def _resume(self, now: float) -> list[Effect]:
        if self.state == "idle" and (self._outbox or self._out is not None):
            return self._establish(now)
        return []

    def _establish(self, now: float) -> list[Effect]:
        self.state = "establishing"
        self.deadline = now + self.timers.reply_s
        return [Send(bytes((ENQ,)))]

    def _step(self, now: float) -> list[Effect]:
        buf = self._buffer
        state = self.state
        if state in ("idle", "waiting"):
            byte = buf[0]
            del buf[0]
            if byte == ENQ:
                self._reset_receiver()
                self.state = "receiving"
                self.deadline = now + self.timers.frame_s
                return [Send(bytes((ACK,)))]
            return []  # §6.2.5: a neutral receiver ignores everything but ENQ
        if state == "establishing":
            byte = buf[0]
            del buf[0]
            if byte == ACK:
                return self._start_sending(now)
            if byte == NAK:
                self.state = "waiting"
                self.deadline = now + self.timers.busy_s
                return []
            if byte == ENQ:
                # Contention (§6.2.7): the instrument has priority. Receive its
                # message; ours waits until the link is neutral again.
                self._reset_receiver()
                self.state = "receiving"
                self.deadline = now + self.timers.frame_s
                return [Send(bytes((ACK,)))]
            return []
        if state == "sending":
            byte = buf[0]
            del buf[0]
            return self._on_reply(byte, now)
        if state == "storing":
            return []  # the sender waits for our reply; nothing should arrive
        return self._receive_step(now)

    def _receive_step(self, now: float) -> list[Effect]:
        buf = self._buffer
        byte = buf[0]
        if byte == EOT:
            del buf[0]
            effects: list[Effect] = []
            if self._message:
                # A message without L: everything in it was acknowledged frame by
                # frame already, so it is delivered as it is.
                effects.append(Deliver(bytes(self._message)))
            self._reset_receiver()
            self._to_idle()
            return effects + self._resume(now)
        if byte != STX:
            del buf[0]
            return []
        frame = read_frame(bytes(buf[: MAX_FRAME_BYTES + 8]))
        if frame is None:
            if len(buf) > MAX_FRAME_BYTES:
                del buf[:]
                return [Send(bytes((NAK,)))]
            return []
        consumed, number, text, last = frame
        del buf[:consumed]
        self.deadline = now + self.timers.frame_s
        if number is None:
            return [Send(bytes((NAK,)))]
        if self._last is not None and self._last == (number, text):
            # Our ACK was lost and the sender repeated the frame (§6.5.1.2).
            return [Send(bytes((ACK,)))]
        if number != self._expected:
            return [Send(bytes((NAK,)))]
        if len(self._message) + len(self._record) + len(text) > MAX_MESSAGE_BYTES:
            return [Send(bytes((NAK,)))]
        if not last:
            self._record += text
            self._accept_number(number, text)
            return [Send(bytes((ACK,)))]
        record = bytes(self._record) + text
        if not record.endswith(b"\r"):
            record += b"\r"
        if self._completes_message(record):
            self._message += record
            self._record.clear()
            self._held = (number, text, len(record))
            self.state = "storing"
            self.deadline = None
            message = bytes(self._message)
            # Keep the message until stored(ok); on failure the repeat of this
            # frame must find the records before it still there.
            self._message = bytearray(message[: len(message) - len(record)])
            return [Deliver(message)]
        self._message += record
        self._record.clear()
        self._accept_number(number, text)
        return [Send(bytes((ACK,)))]

    def _accept_number(self, number: int, text: bytes) -> None:
        self._expected = (number + 1) % 8
        self._last = (number, text)

    @staticmethod
    def _completes_message(record: bytes) -> bool:
        # The L record ends a message (E1394 §13); with records packed several to
        # a frame, the last of them is what counts.
        last = record.rstrip(b"\r").rsplit(b"\r", 1)[-1]
        return last[:1] == b"L" and (len(last) == 1 or not chr(last[1]).isalnum())

    def _start_sending(self, now: float) -> list[Effect]:
        if self._out is None:
            if not self._outbox:
                self._to_idle()
                return [Send(bytes((EOT,)))]
            message = self._outbox.popleft()
            self._out = _Outgoing(message, self._frames(message, 1))
        elif self._out.frames[0][1] != 0x31:
            # Retried in a new session: frame numbers start at 1 again (§6.3.3).
            self._out = _Outgoing(self._out.message, self._frames(self._out.message, 1))
        self._out.index = 0
        self._out.tries = 0
        self.state = "sending"
        self.deadline = now + self.timers.reply_s
        return [Send(self._out.frames[0])]

    def _frames(self, message: bytes, start: int) -> list[bytes]:
        texts = split_frames(message, max_text=self.max_text)
        self._next_number = (start + len(texts)) % 8
        return [build_frame(start + i, text, last=last) for i, (text, last) in enumerate(texts)]

    def _on_reply(self, byte: int, now: float) -> list[Effect]:
        out = self._out
        assert out is not None
        if byte in (ACK, EOT):
            # EOT here is a receiver interrupt (§6.3.7): it counts as ACK.
            out.index += 1
            out.tries = 0
            self.deadline = now + self.timers.reply_s
            if out.index < len(out.frames):
                return [Send(out.frames[out.index])]
            self._out = None
            effects: list[Effect] = [Sent(out.message)]
            if self._outbox and byte == ACK:
                message = self._outbox.popleft()
                self._out = _Outgoing(message, self._frames(message, self._next_number))
                return [*effects, Send(self._out.frames[0])]
            self._to_idle()
            return [*effects, Send(bytes((EOT,)))]
        if byte == NAK:
            out.tries += 1
            if out.tries > self.timers.retries:
                self._out = None
                self.state = "waiting"
                self.deadline = now + self.timers.busy_s
                return [
                    Send(bytes((EOT,))),
                    Abort(f"frame refused {out.tries} times", out.message),
                ]
            self.deadline = now + self.timers.reply_s
            return [Send(out.frames[out.index])]
        return []  # §6.3.5: anything else is ignored; the timer decides
