"""A simulated analyzer: the instrument side of ASTM E1381, blocking and simple.

Written from the standard (E1381 §6), independently of ``ingest.labs.e1381``, so
the tests do not check the link against itself. It frames with
``tests.ingest.labs._framing.frame`` and works over any byte pipe: a TCP socket or one
end of a ``socat`` pseudo-terminal pair.
"""

from __future__ import annotations

import os
import re
import select
import socket
import time
from dataclasses import dataclass, field

from tests.ingest.labs._framing import frame

ENQ, ACK, NAK, EOT, STX = 0x05, 0x06, 0x15, 0x04, 0x02


class Pipe:
    """Bytes in and out, with a read timeout."""

    def __init__(self, *, sock: socket.socket | None = None, fd: int | None = None) -> None:
        self.sock = sock
        self.fd = fd
        self.pending = bytearray()

    def write(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
        else:
            assert self.fd is not None
            os.write(self.fd, data)

    def _fill(self, timeout: float) -> bool:
        target: socket.socket | int = self.sock if self.sock is not None else (self.fd or 0)
        ready, _, _ = select.select([target], [], [], timeout)
        if not ready:
            return False
        chunk = self.sock.recv(4096) if self.sock is not None else os.read(self.fd or 0, 4096)
        if not chunk:
            raise ConnectionError("closed")
        self.pending += chunk
        return True

    def read_byte(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                return None
        byte = self.pending[0]
        del self.pending[0]
        return byte

    def read_frame(self, timeout: float) -> bytes | None:
        """After an STX: the rest of the frame up to CR LF."""
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                return None
        end = self.pending.index(b"\r\n") + 2
        data = bytes(self.pending[:end])
        del self.pending[:end]
        return data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        elif self.fd is not None:
            os.close(self.fd)


@dataclass
class Transcript:
    """What the LIS answered, for the assertions."""

    replies: list[int] = field(default_factory=list)
    acked_messages: int = 0


def records_of(text: bytes) -> list[bytes]:
    return [r + b"\r" for r in re.split(rb"\r\n|\r|\n", text) if r]


def messages_of(text: bytes) -> list[list[bytes]]:
    """Cut a capture into H…L messages."""
    out: list[list[bytes]] = []
    for record in records_of(text):
        if record.startswith(b"H") or not out:
            out.append([])
        out[-1].append(record)
    return out


def send_session(
    pipe: Pipe,
    messages: list[list[bytes]],
    *,
    reply_s: float = 15.0,
    corrupt: set[int] | None = None,
    max_text: int = 240,
) -> Transcript:
    """Send messages in one session (ENQ … EOT); resend NAKed frames up to 6 times.

    ``corrupt`` names frame indices (0-based over the session) whose first copy
    goes out with a wrong checksum. Raises TimeoutError when the LIS stays silent.
    """
    corrupt = set(corrupt or ())
    t = Transcript()
    pipe.write(bytes((ENQ,)))
    reply = pipe.read_byte(reply_s)
    if reply != ACK:
        raise TimeoutError(f"no ACK to ENQ: {reply!r}")
    number = 1
    index = 0
    for message in messages:
        message_ok = True
        for record in message:
            chunks = [record[i : i + max_text] for i in range(0, len(record), max_text)]
            for k, chunk in enumerate(chunks):
                data = frame(number, chunk, last=k == len(chunks) - 1)
                for attempt in range(7):
                    out = data
                    if index in corrupt and attempt == 0:
                        out = data[:-4] + (b"00" if data[-4:-2] != b"00" else b"01") + b"\r\n"
                    pipe.write(out)
                    reply = pipe.read_byte(reply_s)
                    if reply is None:
                        raise TimeoutError("no reply to a frame")
                    t.replies.append(reply)
                    if reply == ACK:
                        break
                else:
                    message_ok = False
                number = (number + 1) % 8
                index += 1
        if message_ok:
            t.acked_messages += 1
    pipe.write(bytes((EOT,)))
    return t


def receive_session(pipe: Pipe, *, wait_s: float = 5.0, nak_first: int = 0) -> list[bytes]:
    """Wait for the LIS's ENQ, ACK it, collect frame texts until EOT.

    ``nak_first`` frames are refused once each before being accepted.
    """
    deadline = time.monotonic() + wait_s
    while True:
        byte = pipe.read_byte(max(0.0, deadline - time.monotonic()))
        if byte is None:
            raise TimeoutError("no ENQ from the LIS")
        if byte == ENQ:
            break
    pipe.write(bytes((ACK,)))
    texts: list[bytes] = []
    refused = 0
    while True:
        byte = pipe.read_byte(wait_s)
        if byte is None:
            raise TimeoutError("no frame from the LIS")
        if byte == EOT:
            return texts
        if byte != STX:
            continue
        rest = pipe.read_frame(wait_s)
        assert rest is not None
        body = rest[:-4]
        checksum = rest[-4:-2]
        assert f"{sum(body) % 256:02X}".encode() == checksum, "bad checksum from the LIS"
        if refused < nak_first:
            refused += 1
            pipe.write(bytes((NAK,)))
            continue
        texts.append(body[1:-1])
        pipe.write(bytes((ACK,)))
