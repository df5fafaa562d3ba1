"""Test helper: wrap an unframed ASTM E1394 file in ASTM E1381 frames.

Written independently of ``ingest.labs.parsers._e1381`` (which only decodes) so
that the tests do not check the decoder against itself. E1381 §6.3:
``<STX> FN text <ETB|ETX> C1 C2 <CR> <LF>``, FN counting 1..7, 0, 1…, checksum
the sum of FN..ETB/ETX modulo 256 as two upper-case hex digits.
"""

from __future__ import annotations

import re
from collections.abc import Collection

STX, ETX, EOT, ENQ, ACK, ETB = b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b"\x17"


def frame(number: int, text: bytes, *, last: bool) -> bytes:
    """One frame: STX, frame number digit, text, ETX or ETB, checksum, CR LF."""
    body = str(number % 8).encode() + text + (ETX if last else ETB)
    return STX + body + f"{sum(body) % 256:02X}".encode() + b"\r\n"


def frame_capture(
    text: bytes,
    *,
    max_text: int = 240,
    whole: Collection[int] = (),
    acks: bool = True,
) -> bytes:
    """Frame every record of ``text`` as a sender would, with ENQ/ACK/EOT around.

    Parameters
    ----------
    text : bytes
        Unframed records separated by CR, LF or CRLF.
    max_text : int
        Split a record into intermediate (ETB) frames of at most this many bytes.
    whole : collection of int
        Indices of records to send in one frame whatever their length (frames
        longer than 240 characters, as real analyzers send them).
    acks : bool
        Interleave the receiver's ACKs, as a capture of both directions shows.
    """
    records = [r for r in re.split(rb"\r\n|\r|\n", text) if r]
    out = bytearray(ENQ + (ACK if acks else b""))
    number = 1
    for index, record in enumerate(records):
        data = record + b"\r"
        size = len(data) if index in whole else max_text
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        for k, chunk in enumerate(chunks):
            out += frame(number, chunk, last=k == len(chunks) - 1)
            if acks:
                out += ACK
            number = (number + 1) % 8
    out += EOT
    return bytes(out)


def with_long_comment(text: bytes, *, after_line: int, length: int) -> tuple[bytes, int]:
    """Insert a C record of ``length`` comment characters after line ``after_line``.

    Returns the new text and the index of the inserted record.
    """
    lines = [r for r in re.split(rb"\r\n|\r|\n", text) if r]
    comment = b"C|1|I|" + (b"0123456789" * (length // 10 + 1))[:length] + b"|G"
    lines.insert(after_line, comment)
    return b"\r".join(lines) + b"\r", after_line
