"""Remove ASTM E1381 (CLSI LIS1-A) low-level framing from a line capture.

E1381 §6.3 sends each record in frames::

    <STX> FN text <ETB|ETX> C1 C2 <CR> <LF>

``FN`` is the frame number, ``1`` for the first frame after ENQ and counting
modulo 8 (``…7, 0, 1…``). A record longer than one frame is split: every frame
but the last ends with ETB (intermediate frame), the last with ETX (end frame),
and the record's own terminating CR sits just before ETX. ``C1 C2`` are the two
upper-case hex digits of the sum, modulo 256, of every byte from FN through
ETB/ETX inclusive (§6.3.4). A capture of the line also holds the link-control
bytes of the establishment and termination phases (§6.2, §6.4): ENQ, ACK, NAK and
EOT, which are skipped here.

The standard caps a frame at 247 characters (240 of text), but analyzers in the
field send longer frames, so no limit is enforced.
"""

from __future__ import annotations

import re
from typing import Final

from core.errors import LabMessageError
from core.labs import ParseWarning

__all__ = [
    "ACK",
    "ENQ",
    "EOT",
    "MAX_FRAME_TEXT",
    "NAK",
    "STX",
    "build_frame",
    "is_framed",
    "read_frame",
    "split_frames",
    "unframe",
]

STX: Final = 0x02
ETX: Final = 0x03
EOT: Final = 0x04
ENQ: Final = 0x05
ACK: Final = 0x06
NAK: Final = 0x15
ETB: Final = 0x17
CR: Final = 0x0D
LF: Final = 0x0A

# Bytes that may sit between frames in a capture: link control and line noise
# from terminal programs (spaces, stray CR/LF).
_BETWEEN_FRAMES: Final = frozenset({ENQ, ACK, NAK, EOT, CR, LF, 0x20, 0x00})
_HEX: Final = frozenset(b"0123456789ABCDEFabcdef")
_FRAME_END: Final = re.compile(rb"[\x02\x03\x17]")


def is_framed(raw: bytes) -> bool:
    """Whether ``raw`` starts (after link-control bytes) with an E1381 frame."""
    for byte in raw[:64]:
        if byte == STX:
            return True
        if byte not in _BETWEEN_FRAMES:
            return False
    return False


def unframe(raw: bytes, *, strict_numbers: bool = True) -> tuple[bytes, list[ParseWarning]]:
    """Return the record stream carried by E1381 frames, checksums verified.

    Parameters
    ----------
    raw : bytes
        A capture of the line: frames plus ENQ/ACK/NAK/EOT.
    strict_numbers : bool
        Reject a frame number out of sequence (``True``), or accept it with a
        warning (``False``). A captured file is not a live link: nobody can ask
        the sender to repeat, every checksum has verified, and capture tools and
        some analyzers number frames irregularly (restarting at 0, skipping
        after a NAK they never logged). A QC run is not thrown away for that.

    Returns
    -------
    (bytes, list of ParseWarning)
        The concatenated frame texts (records separated by CR), as if the
        analyzer had written an unframed E1394 file, and any warnings.

    Raises
    ------
    LabMessageError
        On a checksum mismatch, a frame number out of sequence, a frame cut off
        before its checksum, bytes outside a frame, or a capture that ends in
        the middle of a record (last frame ended with ETB).
    """
    out = bytearray()
    warnings: list[ParseWarning] = []
    expected: int | None = None  # None: accept any number (capture starts mid-stream)
    previous: tuple[int, bytes] | None = None
    open_record = False
    count = 0
    irregular = 0
    i = 0
    n = len(raw)
    while i < n:
        byte = raw[i]
        if byte != STX:
            if byte not in _BETWEEN_FRAMES:
                raise LabMessageError(
                    f"unexpected byte 0x{byte:02X} outside an E1381 frame", where=f"byte {i}"
                )
            if byte == ENQ:
                expected = 1  # §6.2.4: the first frame after establishment is 1
                previous = None
            elif byte == EOT:
                expected = None
                previous = None
            i += 1
            continue
        count += 1
        where = f"frame {count}, byte {i}"
        end = _find_end(raw, i + 1)
        if end < 0:
            raise LabMessageError("frame has no ETX or ETB (truncated capture)", where=where)
        checksum = raw[end + 1 : end + 3]
        if len(checksum) < 2 or not all(c in _HEX for c in checksum):
            raise LabMessageError("frame has no two-digit checksum after ETX/ETB", where=where)
        body = raw[i + 1 : end + 1]  # FN … ETB/ETX, the span the checksum covers
        if len(body) < 2 or not 0x30 <= body[0] <= 0x37:
            raise LabMessageError("frame number is not a digit 0-7", where=where)
        computed = sum(body) & 0xFF
        sent = int(checksum, 16)
        if sent != computed:
            raise LabMessageError(
                f"checksum mismatch: frame says {sent:02X}, content sums to {computed:02X}",
                where=where,
            )
        number = body[0] - 0x30
        text = bytes(body[1:-1])
        i = end + 3
        # CR LF close the frame (§6.3.1); tolerate either being lost by a capture tool.
        if i < n and raw[i] == CR:
            i += 1
        if i < n and raw[i] == LF:
            i += 1
        if previous is not None and previous == (number, text):
            # The receiver's ACK was lost and the sender repeated the frame (§6.5.1).
            warnings.append(ParseWarning("repeated frame skipped (retransmission)", where))
            continue
        if expected is not None and number != expected:
            if strict_numbers:
                raise LabMessageError(
                    f"frame number {number} where {expected} was expected", where=where
                )
            irregular += 1
            if irregular == 1:
                warnings.append(
                    ParseWarning(
                        f"frame number {number} where {expected} was expected"
                        " (irregular numbering accepted: checksums verify)",
                        where,
                    )
                )
        expected = (number + 1) % 8
        previous = (number, text)
        out += text
        if body[-1] == ETX:
            # The record ends with CR just before ETX; add it if a sender left it out
            # so that the next record does not run on.
            if not text.endswith(b"\r"):
                out.append(CR)
            open_record = False
        else:
            open_record = True
    if count == 0:
        raise LabMessageError("no E1381 frame (STX) in the capture")
    if open_record:
        raise LabMessageError("capture ends inside a record: last frame ended with ETB")
    if irregular > 1:
        warnings.append(ParseWarning(f"{irregular} frames numbered out of sequence in all"))
    return bytes(out), warnings


def _find_end(raw: bytes, start: int) -> int:
    """Index of the first ETX or ETB at or after ``start``, or -1.

    A new STX before either means the frame was cut off; report that as -1 too.
    One regex scan rather than ``find`` per byte value keeps this linear when a
    capture has no ETB at all.
    """
    match = _FRAME_END.search(raw, start)
    if match is None or raw[match.start()] == STX:
        return -1
    return match.start()


#: Largest frame text E1381 §6.3.1 allows (247 characters with the envelope).
MAX_FRAME_TEXT: Final = 240


def build_frame(number: int, text: bytes, *, last: bool) -> bytes:
    """One frame ``<STX> FN text <ETX|ETB> C1 C2 <CR> <LF>`` (E1381 §6.3).

    ``number`` is taken modulo 8; the checksum is the sum of FN through ETX/ETB
    modulo 256 as two upper-case hex digits (§6.3.4).
    """
    body = bytes((0x30 + number % 8,)) + text + bytes((ETX if last else ETB,))
    return bytes((STX,)) + body + f"{sum(body) & 0xFF:02X}".encode("ascii") + b"\r\n"


def split_frames(records: bytes, *, max_text: int = MAX_FRAME_TEXT) -> list[tuple[bytes, bool]]:
    """Cut a message (records ending with CR) into frame texts (§6.3.2).

    Each record starts a new frame; a record longer than ``max_text`` goes out
    in intermediate (ETB) frames and ends in an end (ETX) frame. Returns
    ``(text, last)`` pairs, ``last`` meaning ETX.
    """
    out: list[tuple[bytes, bool]] = []
    for record in records.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r"):
        if not record:
            continue
        data = record + b"\r"
        chunks = [data[i : i + max_text] for i in range(0, len(data), max_text)]
        out.extend((chunk, k == len(chunks) - 1) for k, chunk in enumerate(chunks))
    return out


def read_frame(buffer: bytes) -> tuple[int, int | None, bytes, bool] | None:
    """Read one frame at the start of ``buffer`` (which starts with STX).

    Returns
    -------
    (consumed, number, text, last) or None
        ``None`` when the frame is not complete yet. ``number`` is ``None`` when
        the frame is defective (bad checksum, no frame digit): the receiver
        replies NAK (§6.5.1.2) and waits for the retransmission.
    """
    end = _find_end(buffer, 1)
    if end < 0:
        nxt = buffer.find(bytes((STX,)), 1)
        if nxt > 0:  # a new STX before ETX/ETB: the frame was cut off
            return nxt, None, b"", False
        return None
    if len(buffer) < end + 3:
        return None
    consumed = end + 3
    # CR LF end the frame; wait for them unless something else is there already.
    for expected in (CR, LF):
        if len(buffer) <= consumed:
            return None
        if buffer[consumed] == expected:
            consumed += 1
    body = buffer[1 : end + 1]
    checksum = buffer[end + 1 : end + 3]
    if (
        len(body) < 2
        or not 0x30 <= body[0] <= 0x37
        or not all(c in _HEX for c in checksum)
        or int(checksum, 16) != sum(body) & 0xFF
    ):
        return consumed, None, b"", False
    return consumed, body[0] - 0x30, bytes(body[1:-1]), body[-1] == ETX
