"""HL7 v2 wire primitives shared by every HL7 v2 edge (pure).

One home for what the lab results inbox (``ingest/labs``), the analyzer links
(``ingest/labs/links``) and the imaging order inbox (``worklist/orders``) all need
from HL7 v2.5.1 chapter 2 (Control) and Appendix C (MLLP):

* :class:`Delimiters`: the encoding characters of MSH-1/MSH-2 (§2.5.4).
* :func:`charset_codec`: the Python codec for an MSH-18 character set
  (§2.15.9.18, HL7 table 0211), plus the local Vietnamese names of
  :mod:`core.charsets` (Windows-1258, TCVN3) that table 0211 lacks.
* :func:`escape`: delimiters in free text as escape sequences (§2.7.4), for the
  messages and ACKs we write; :func:`unescaper`: the reverse, for what we read.
* :func:`build_ack`: an original-mode acknowledgment (§2.9.2, MSA §2.15.8, ERR
  §2.15.5 with HL7 Table 0357 codes, :data:`TABLE_0357`).
* MLLP framing (Appendix C.4.3, ``<VT> message <FS><CR>``): :func:`frame` and the
  bounded, incremental :class:`Deframer`.

Edges do not import each other (STYLE.md §1), so wire code they share lives
here, in ``core``, which imports nothing of ours but ``core``. Each reader keeps
its own policy on top: the lab reader is tolerant (it keeps what it can and
warns), the order reader is strict (it refuses with an ACK code).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Final

from core.charsets import codec_for

__all__ = [
    "CHARSETS",
    "END",
    "START",
    "TABLE_0357",
    "AckError",
    "Deframer",
    "Delimiters",
    "Oversize",
    "build_ack",
    "charset_codec",
    "escape",
    "frame",
    "msh_fields",
    "unescaper",
]

#: HL7 table 0211 names → Python codecs (the union of what the lab and the order
#: readers knew). UTF-16/32 cannot be split as bytes at "MSH" and are left out.
CHARSETS: Final[dict[str, str]] = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    "ISO IR6": "ascii",
    "ISO IR100": "latin-1",
    "ISO IR192": "utf-8",
}

# MLLP (HL7 v2.5.1 Appendix C.4.3).
START: Final = b"\x0b"
END: Final = b"\x1c\x0d"
#: Bytes of an oversize message kept to answer it (its MSH segment).
_HEAD: Final = 4096


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The encoding characters of MSH-1 and MSH-2 (HL7 v2.5.1 §2.5.4)."""

    field: str = "|"
    component: str = "^"
    repeat: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"


def charset_codec(msh18: str) -> str | None:
    """The Python codec for an MSH-18 character set name, or ``None`` when unknown.

    The name is matched case-insensitively after stripping blanks. Table 0211
    has no Vietnamese entry; senders write local names such as ``WINDOWS-1258``
    or ``TCVN3``/``VN3``, which :func:`core.charsets.codec_for` maps (and
    registers the TCVN3 codec for). An empty name also gives ``None``: callers
    decide what "not declared" and "unknown" mean for them.
    """
    name = msh18.strip().upper()
    if not name:
        return None
    return CHARSETS.get(name) or codec_for(name)


def escape(text: str, delimiters: Delimiters = Delimiters()) -> str:
    """Write the delimiters found in ``text`` as escape sequences (HL7 v2.5.1 §2.7.4).

    The escape character goes first (``\\E\\``) so the sequences added for the
    others are not escaped again. Line breaks are left as they are.
    """
    d = delimiters
    return (
        text.replace(d.escape, f"{d.escape}E{d.escape}")
        .replace(d.field, f"{d.escape}F{d.escape}")
        .replace(d.component, f"{d.escape}S{d.escape}")
        .replace(d.subcomponent, f"{d.escape}T{d.escape}")
        .replace(d.repeat, f"{d.escape}R{d.escape}")
    )


@lru_cache(maxsize=32)
def unescaper(delimiters: Delimiters, codec: str) -> Callable[[str], str]:
    """A function decoding HL7 escape sequences (v2.5.1 §2.7) in one leaf value.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` become the delimiters, ``\\Xhh…\\`` the bytes
    decoded in ``codec``, ``\\.br\\`` a line break and ``\\.sp n\\`` n line breaks
    (formatted text, §2.7.6); highlighting (``\\H\\ \\N\\``), other formatting
    commands, character-set switches (``\\C…\\ \\M…\\``) and local escapes
    (``\\Z…\\``) are dropped. An escape we do not recognise is kept literally.

    Split a value at its delimiters first, then unescape each leaf: an escaped
    delimiter is text, not structure.
    """
    d = delimiters
    esc = re.escape(d.escape)
    pattern = re.compile(
        esc
        + r"(F|S|T|R|E|X[0-9A-Fa-f]*|\.br|\.sp ?\d*|\.(?:in|ti|sk) ?[+-]?\d*|\.(?:ce|fi|nf)"
        + r"|H|N|Z[^"
        + esc
        + r"]*|C[0-9A-Fa-f]*|M[0-9A-Fa-f]*)"
        + esc
    )
    simple = {
        "F": d.field,
        "S": d.component,
        "T": d.subcomponent,
        "R": d.repeat,
        "E": d.escape,
        ".br": "\n",
        ".ce": "\n",
    }

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        found = simple.get(code)
        if found is not None:
            return found
        if code[0] == "X":
            digits = code[1:]
            if len(digits) % 2:
                return match.group(0)
            return bytes.fromhex(digits).decode(codec, errors="replace")
        if code.startswith(".sp"):
            count = code[3:].strip()
            return "\n" * (int(count) if count else 1) if len(count) < 3 else "\n"
        return ""

    escape = d.escape

    def unescape(text: str) -> str:
        if escape not in text:
            return text
        return pattern.sub(one, text)

    return unescape


#: HL7 Table 0357, message error condition codes (v2.5.1), for ERR-3.
TABLE_0357: Final[dict[int, str]] = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}


@dataclass(frozen=True, slots=True)
class AckError:
    """What an ACK's ERR segment says: ERR-3 (Table 0357 code), ERR-2 (location, an
    ERL such as ``PID^1^3``) and ERR-8 (user message, no patient data)."""

    code: int
    location: str = ""
    text: str = ""


def msh_fields(raw: bytes) -> list[str]:
    """The MSH of a message we may not be able to parse, as ``fields[n]`` = MSH-n.

    ``fields[0]`` is ``"MSH"`` and ``fields[1]`` the field separator (MSH-1); an
    empty list when the first line is no MSH segment. Read as Latin-1, which never
    fails: the values only go back to the sender in an ACK.
    """
    head = raw.lstrip(START).split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1")
    if not head.startswith("MSH") or len(head) < 4:
        return []
    return ["MSH", head[3], *head[4:].split(head[3])]


def build_ack(
    original: Sequence[str],
    code: str,
    *,
    now: datetime,
    ack_control_id: str,
    error: AckError | None = None,
    sending: tuple[str, str] = ("PACSLAB", ""),
) -> bytes:
    """An original-mode acknowledgment (HL7 v2.5.1 2.9.2, 2.14.1 ACK, 2.15.8 MSA, 2.15.5 ERR).

    Parameters
    ----------
    original : sequence of str
        The acknowledged message's MSH fields, ``original[n]`` = MSH-n (as
        :func:`msh_fields` returns them); empty when it had none.
    code : str
        MSA-1: ``AA``, ``AE`` or ``AR``.
    now, ack_control_id
        MSH-7 and MSH-10 of the ACK.
    error : AckError, optional
        The ERR segment.
    sending
        MSH-3/MSH-4 when the original has no receiving application to echo.

    The ACK is UTF-8 with our own delimiters; echoed values lose any ``|`` and line
    break, the error text has its delimiters escaped.
    """

    def get(n: int) -> str:
        return original[n] if n < len(original) else ""

    def clean(value: str) -> str:
        return re.sub(r"[|\r\n]", " ", value)

    component = (get(2)[:1] or "^") if original else "^"
    nine = get(9).split(component)
    trigger = nine[1] if len(nine) > 1 else ""
    version = get(12).split(component)[0] or "2.5.1"
    msh_out = "|".join(
        [
            "MSH",
            "^~\\&",
            clean(get(5)) or sending[0],
            clean(get(6)) or sending[1],
            clean(get(3)),
            clean(get(4)),
            now.strftime("%Y%m%d%H%M%S"),
            "",
            f"ACK^{clean(trigger)}^ACK" if trigger else "ACK",
            ack_control_id,
            clean(get(11) or "P"),
            clean(version),
        ]
    )
    segments = [msh_out, f"MSA|{code}|{clean(get(10).strip())}"]
    if error is not None:
        location = error.location.replace("|", " ")
        text = escape(error.text).replace("\r", " ").replace("\n", " ")[:250]
        segments.append(
            f"ERR||{location}|{error.code}^{TABLE_0357.get(error.code, '')}^HL70357|E||||{text}"
        )
    return ("\r".join(segments) + "\r").encode("utf-8")


def frame(message: bytes) -> bytes:
    """Wrap one message in MLLP framing, ``<VT> message <FS><CR>``."""
    return START + message + END


@dataclass(frozen=True, slots=True)
class Oversize:
    """A frame grew past the limit: its first bytes (for the ACK) and its size so far."""

    head: bytes
    size: int


class Deframer:
    """Collects received bytes and yields complete MLLP messages (without framing).

    Bytes outside a frame are dropped. Memory stays bounded: a message larger
    than ``max_message`` is reported once (:meth:`events`) or refused
    (:meth:`feed`), and its remaining bytes are discarded up to ``drain_bytes``.

    Parameters
    ----------
    max_message : int
        Largest message kept.
    drain_bytes : int
        Bytes of an oversize message read and discarded while looking for its end.
    """

    def __init__(
        self, max_message: int = 16 * 1024 * 1024, drain_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self._buf = bytearray()
        self.max_message = max_message
        self.drain_bytes = drain_bytes
        self._dropping = False
        self._dropped = 0
        self._last = b""

    @property
    def in_message(self) -> bool:
        """A message has started and has not ended."""
        return self._dropping or bool(self._buf)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Add received bytes; yield every message now complete.

        Raises
        ------
        ValueError
            A message grew past ``max_message`` without its end block.
        """
        for item in self.events(data):
            if isinstance(item, Oversize):
                raise ValueError("MLLP message too large")
            yield item

    def events(self, data: bytes) -> Iterator[bytes | Oversize]:
        """Like :meth:`feed`, but an oversize message yields one :class:`Oversize`.

        Its remaining bytes are then discarded up to its end block.

        Raises
        ------
        ValueError
            More than ``drain_bytes`` discarded without finding the end block.
        """
        if self._dropping:
            data = self._drain(data)
            if self._dropping:
                return
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
                if len(self._buf) - 1 > self.max_message:
                    yield Oversize(bytes(self._buf[1 : 1 + _HEAD]), len(self._buf) - 1)
                    rest = bytes(self._buf[-1:])
                    self._dropped = len(self._buf) - 2
                    self._buf.clear()
                    self._dropping = True
                    self._last = rest
                return
            if end - 1 > self.max_message:
                yield Oversize(bytes(self._buf[1 : 1 + _HEAD]), end - 1)
                del self._buf[: end + len(END)]
                continue
            message = bytes(self._buf[1:end])
            del self._buf[: end + len(END)]
            yield message

    def _drain(self, data: bytes) -> bytes:
        """Discard up to the end block; return what follows it."""
        joined = self._last + data
        end = joined.find(END)
        if end >= 0:
            self._dropping, self._dropped, self._last = False, 0, b""
            return joined[end + len(END) :]
        self._dropped += len(data)
        self._last = joined[-1:]
        if self._dropped > self.drain_bytes:
            raise ValueError("oversize MLLP message without an end block within the drain budget")
        return b""
