"""Tolerant HL7 v2 splitting and escape decoding, shared by results and orders.

Pure helpers for HL7 v2.3-2.5.1 chapter 2 (Control): finding messages in a file,
choosing the character set (MSH-18, §2.15.9.18 and table 0211), splitting
segments, fields, repeats, components and subcomponents with the delimiters
declared in MSH-1/MSH-2 (§2.5.4), and decoding escape sequences (§2.7).

Written by hand rather than with python-hl7 or hl7apy because real files need
tolerance those libraries do not give: LF or CRLF segment separators, several
messages per file separated by blank lines, MLLP block bytes left in dumps,
segments run together on one line, and UTF-8 that no MSH-18 declares. The
delimiters, the character set table and MLLP framing are shared with the order
side (worklist) through :mod:`core.hl7v2`.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from core.errors import LabMessageError

# One unescape for every HL7 v2 reader (issue 15): it lives in core.hl7v2.
from core.hl7v2 import END, START, Delimiters, unescaper
from core.hl7v2 import charset_codec as _table_0211_codec
from core.labs import ParseWarning

__all__ = [
    "Delimiters",
    "HL7Message",
    "charset_codec",
    "decode_message",
    "parse_delimiters",
    "read_message",
    "read_message_type",
    "split_messages",
    "split_segments",
    "unescaper",
]

_BOM: Final = b"\xef\xbb\xbf"
# MLLP (HL7 v2.5.1 Appendix C, core.hl7v2): <VT> message <FS><CR>. Dumps of a TCP
# stream keep them.
_MLLP_START: Final = START[0]
_MLLP_END: Final = END[0]
_MESSAGE_START: Final = re.compile(rb"(?:\A|(?<=[\r\n\x0b\x1c]))[ \t]*MSH(?=[^A-Za-z0-9\r\n])")
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
_SEGMENT_ID: Final = re.compile(r"[A-Z][A-Z0-9]{2}\Z")
# Segments a sender may run together on one line (seen in the wild: OBX after OBX
# separated only by a space). A literal field separator cannot occur inside a field
# (it would be escaped as \F\), so "<space>OBX|" is a segment start.
_JOINABLE: Final = (
    "PID|PD1|PV1|PV2|NK1|ORC|OBR|OBX|NTE|SPM|SAC|TQ1|TQ2|CTD|FT1|CTI|DSC|SFT|"
    "TCD|SID|IN1|IN2|GT1|DG1|AL1|MSA|ERR|INV|BLG"
)

@dataclass(frozen=True, slots=True)
class HL7Message:
    """One message cut from a file: its segments, already split into fields.

    ``segments[i][0]`` is the segment ID and ``segments[i][n]`` is field *n*;
    for MSH, ``segments[0][1]`` is the field separator so that MSH-n lines up.
    """

    index: int
    segments: tuple[list[str], ...]
    delimiters: Delimiters
    codec: str


def split_messages(raw: bytes) -> list[bytes]:
    """Cut a file into messages at each segment starting with ``MSH``.

    A UTF-8 BOM and MLLP block characters are removed; batch envelopes
    (FHS/BHS/BTS/FTS, §2.10.3) stay with the message they precede or follow and
    are ignored by the segment readers.

    Raises
    ------
    LabMessageError
        When no MSH segment starts a line.
    """
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    starts = [m.start() for m in _MESSAGE_START.finditer(raw)]
    if not starts:
        raise LabMessageError("no MSH segment found: not an HL7 v2 message")
    starts.append(len(raw))
    pieces = []
    for begin, end in itertools.pairwise(starts):
        piece = raw[begin:end].replace(bytes((_MLLP_START,)), b"")
        pieces.append(piece.replace(bytes((_MLLP_END,)), b"\r").lstrip(b" \t"))
    return pieces


def charset_codec(msh18: str) -> str | None:
    """The Python codec for an MSH-18 value, or ``None`` when not declared.

    Raises
    ------
    LabMessageError
        For a character set we cannot decode (UTF-16, UTF-32, unknown names).
    """
    name = msh18.strip().upper()
    if not name:
        return None
    # One table 0211 (and the Vietnamese local names) for every HL7 v2 reader.
    codec = _table_0211_codec(name)
    if codec is None:
        raise LabMessageError(f"MSH-18 character set {name!r} is not supported")
    return codec


def decode_message(raw: bytes, *, where: str = "") -> tuple[str, str, list[ParseWarning]]:
    """Decode one message's bytes using MSH-18, or UTF-8 then Latin-1 without it.

    Undeclared non-ASCII text is tried as UTF-8 first because that is what modern
    senders emit without saying so (``µ`` as C2 B5); if it is not valid UTF-8 it is
    read as Latin-1, which never fails. A declared charset the bytes do not match
    (ASCII with accents, a common mislabel) gets the same fallback, with a warning.

    Returns
    -------
    (str, str, list of ParseWarning)
        The NFC-normalised text, the codec used, and warnings.
    """
    warnings: list[ParseWarning] = []
    first = _LINE_BREAK.split(raw[:4096].decode("latin-1"), 1)[0]
    msh18 = ""
    if len(first) > 3:
        fields = first.split(first[3])
        if len(fields) > 17:
            repeat = fields[1][1:2] if len(fields[1]) > 1 else "~"
            msh18 = fields[17].split(repeat, 1)[0] if repeat else fields[17]
    declared = charset_codec(msh18)
    if raw.isascii():
        return raw.decode("ascii"), declared or "ascii", warnings
    candidates = [declared] if declared else ["utf-8"]
    for codec in candidates:
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:
            continue
        return unicodedata.normalize("NFC", text), codec, warnings
    fallback = "utf-8" if declared and declared != "utf-8" else "latin-1"
    try:
        text = raw.decode(fallback)
    except UnicodeDecodeError:
        fallback = "latin-1"
        text = raw.decode(fallback)
    if declared:
        warnings.append(
            ParseWarning(f"bytes do not match MSH-18 {msh18.strip()!r}; read as {fallback}", where)
        )
    return unicodedata.normalize("NFC", text), fallback, warnings


def parse_delimiters(msh: str) -> Delimiters:
    """Read MSH-1 and MSH-2 from the first segment.

    Raises
    ------
    LabMessageError
        When the segment is not MSH or declares fewer than four distinct
        encoding characters.
    """
    if len(msh) < 8 or not msh.startswith("MSH"):
        raise LabMessageError("MSH segment too short to declare its delimiters")
    field = msh[3]
    end = msh.find(field, 4)
    encoding = msh[4:end] if end >= 0 else msh[4:]
    # v2.7 adds a fifth (truncation) character; some senders drop the fourth, and
    # then "&" is the only sensible subcomponent separator.
    if len(encoding) == 3 and "&" not in encoding + field:
        encoding += "&"
    if len(encoding) < 4:
        raise LabMessageError("MSH-2 must declare component, repeat, escape and subcomponent")
    component, repeat, escape, subcomponent = encoding[0], encoding[1], encoding[2], encoding[3]
    chars = (field, component, repeat, escape, subcomponent)
    if len(set(chars)) != 5 or any(c.isalnum() or c in "\r\n" for c in chars):
        raise LabMessageError("MSH-1/MSH-2 delimiters must be distinct non-alphanumerics")
    return Delimiters(field, component, repeat, escape, subcomponent)


def split_segments(
    text: str, delimiters: Delimiters, *, where: str = ""
) -> tuple[list[list[str]], list[ParseWarning]]:
    """Split a message into segments, each a list of raw (undecoded) fields.

    CR (the standard, §2.5.4), LF and CRLF all end a segment. Blank lines are
    skipped. A line that does not start with a segment ID continues the previous
    segment (a line break inside a field). Segments run together on one line are
    split again at ``<space>SEG|`` for the segment IDs a sender is likely to join.

    Returns
    -------
    (list of list of str, list of ParseWarning)
    """
    warnings: list[ParseWarning] = []
    fs = delimiters.field
    lines: list[str] = []
    for line in _LINE_BREAK.split(text):
        if not line or line.isspace():
            continue
        if _SEGMENT_ID.match(line[:3]) and (len(line) == 3 or line[3] == fs):
            lines.append(line)
        elif lines:
            warnings.append(ParseWarning("line break inside a segment joined back", where))
            lines[-1] = lines[-1] + "\n" + line
        else:
            raise LabMessageError("message does not start with a segment ID", where=where)
    segments: list[list[str]] = []
    joined = _joined_pattern(fs)
    for line in lines:
        if joined.search(line, 4):
            parts = joined.split(line)
            names = ", ".join(p[:3] for p in parts[1:])
            warnings.append(
                ParseWarning(f"segments {names} were joined to {line[:3]} on one line", where)
            )
        else:
            parts = [line]
        for part in parts:
            fields = part.split(fs)
            if fields[0] == "MSH":
                fields.insert(1, fs)
            segments.append(fields)
    return segments, warnings


@lru_cache(maxsize=8)
def _joined_pattern(field: str) -> re.Pattern[str]:
    return re.compile(r"\s+(?=(?:" + _JOINABLE + r")" + re.escape(field) + ")")


def read_message_type(msh: list[str], delimiters: Delimiters) -> str:
    """MSH-9 as ``CODE^TRIGGER`` (``"ORU^R01"``), or ``CODE`` alone (``"ACK"``).

    The message structure (component 3, ``ORU_R01``) is left out: it names the
    grammar, not the event, and v2.3 senders omit it. Always written with ``^``
    whatever component separator the message declares.
    """
    field = msh[9] if len(msh) > 9 else ""
    comps = field.split(delimiters.component)
    code = comps[0].strip().upper()
    trigger = comps[1].strip().upper() if len(comps) > 1 else ""
    return f"{code}^{trigger}" if trigger else code


def read_message(raw: bytes, index: int) -> tuple[HL7Message, list[ParseWarning]]:
    """Decode and split one message cut by :func:`split_messages`."""
    where = f"message {index}"
    text, codec, warnings = decode_message(raw, where=where)
    first = _LINE_BREAK.split(text, 1)[0]
    delimiters = _parse_delimiters_at(first, where)
    segments, more = split_segments(text, delimiters, where=where)
    warnings.extend(more)
    return HL7Message(index, tuple(segments), delimiters, codec), warnings


def _parse_delimiters_at(msh: str, where: str) -> Delimiters:
    """:func:`parse_delimiters` with the location added to errors."""
    try:
        return parse_delimiters(msh)
    except LabMessageError as exc:
        raise LabMessageError(exc.reason, where=where) from None
