"""Drop-folder rules (pure): which names are read, when a file is complete, filed names.

Used by the one drop-folder shell, :mod:`storage.dropfolder`, behind the lab inboxes
(``inbox/lab/<profile>/``) and the order inbox (``inbox/orders/``).

A file is read only when its writer is done with it. Writers are asked to write
under a temporary name (``.name``, ``name.tmp``, ``name.part``…) and rename it when
done (what Mirth's and most LIS middleware's file writers do): a renamed file is
complete at once. Otherwise every one of these must hold:

- **Quiet.** Size, modification time and inode unchanged over two looks at least
  ``stable_s`` apart, and the modification time at least ``stable_s`` old
  (:class:`Stability`).
- **No writer.** No process holds the file open for writing (the shell asks the
  kernel with a read lease, on local file systems).
- **Structure.** The format's own end marker is there when it has one
  (:func:`astm_incomplete`, :func:`hl7_incomplete`): an ASTM E1394 ``L``
  terminator record or E1381 ``EOT``, an HL7 batch's ``BTS``/``FTS`` (v2.5.1
  2.10.3), the end block of an MLLP-framed message.

Structure can only *veto*: a file cut exactly between two complete HL7 messages (no
batch envelope) looks complete, so quietness and the writer check still apply.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "MAX_NAME_BYTES",
    "PARTIAL_SUFFIXES",
    "REPORT_SUFFIXES",
    "NameVerdict",
    "Stability",
    "astm_incomplete",
    "filed_name",
    "hl7_incomplete",
    "is_candidate",
    "is_partial",
    "name_verdict",
    "printable_name",
    "safe_name",
]

#: Names a writer uses while a file is still being written.
PARTIAL_SUFFIXES: Final = (".tmp", ".part", ".partial", ".filepart", ".crdownload")
#: Our own report files (beside filed files, never in the inbox itself).
REPORT_SUFFIXES: Final = (".summary.json", ".error.json")
#: Longest name read as it is: room is left for ``.<8 hex>`` (a second file of the
#: same name) and ``.summary.json`` within NAME_MAX (255 bytes on Linux file systems).
MAX_NAME_BYTES: Final = 200

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_partial(name: str) -> bool:
    """True for a name that marks a file still being written (``x.hl7.tmp``)."""
    return name.lower().endswith(PARTIAL_SUFFIXES)


def _is_temporary(name: str) -> bool:
    # Dot-files (``.x``, ``..x``) and editor locks (``~$x``) are the other "still
    # being written" convention; they are read only after their rename.
    return name.startswith((".", "~")) or is_partial(name)


def is_candidate(name: str) -> bool:
    """True for a file name the inbox reads (once the file is complete).

    Hidden files (``.x``, editor locks ``~$x``) and partial names wait for their
    rename; our own reason/summary names are never read.
    """
    return name_verdict(name).kind == "read"


@dataclass(frozen=True, slots=True)
class NameVerdict:
    """What to do with a directory entry, by its name alone.

    ``kind``: ``read`` (a candidate), ``wait`` (a temporary name: read after its
    rename, set aside once abandoned) or ``reject`` (never read: set aside once,
    with ``reason``).
    """

    kind: Literal["read", "wait", "reject"]
    reason: str = ""


def name_verdict(name: str) -> NameVerdict:
    """Classify one entry name (a ``str`` from :func:`os.fsdecode`).

    Names that could not be filed or reported under their own name are rejected
    once: bytes that are not UTF-8 (``surrogateescape`` in ``name``), control
    characters, more than :data:`MAX_NAME_BYTES` bytes (a suffix would overflow
    NAME_MAX).
    """
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return NameVerdict("reject", "the file name is not valid UTF-8")
    if _CONTROL.search(name):
        return NameVerdict("reject", "the file name holds control characters")
    if len(encoded) > MAX_NAME_BYTES:
        return NameVerdict(
            "reject", f"the file name is longer than {MAX_NAME_BYTES} bytes ({len(encoded)})"
        )
    if not name or _is_temporary(name):
        return NameVerdict("wait", "a temporary name: read after its rename")
    if name.endswith(REPORT_SUFFIXES):
        return NameVerdict("reject", "a report file name (ours), not read in an inbox")
    return NameVerdict("read")


def printable_name(name: str) -> str:
    """``name`` for a reason file: undecodable bytes as ``\\xNN``, controls escaped."""
    raw = name.encode("utf-8", "surrogateescape")
    text = raw.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def safe_name(name: str, kind: str = "file") -> str:
    """A name that can always be filed: ``<kind>-<16 hex of the name's hash>``.

    Used for entries whose own name cannot be (see :func:`name_verdict`); the
    original is kept, escaped, in the reason file.
    """
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{kind}-{digest[:16]}"


def filed_name(name: str, sha256: str, taken: Callable[[str], bool]) -> str:
    """The name under ``processed/`` or ``rejected/``: the same, unless taken.

    A second file dropped under a name already filed keeps both: the new one gets
    the start of its hash before the extension (``r.hl7`` → ``r.1a2b3c4d.hl7``),
    then a counter if that is taken too.
    """
    if not taken(name):
        return name
    stem, dot, ext = name.rpartition(".")
    tag = sha256[:8] or "x"
    for n in range(10_000):
        suffix = tag if n == 0 else f"{tag}-{n}"
        candidate = f"{name}.{suffix}" if not dot or not stem else f"{stem}.{suffix}.{ext}"
        if not taken(candidate):
            return candidate
    raise FileExistsError(name)


# ---------------------------------------------------------------------- quietness


@dataclass(slots=True)
class _Seen:
    signature: tuple[int, ...]
    since: float


@dataclass(slots=True)
class Stability:
    """Tracks candidate files until each is quiet.

    Parameters
    ----------
    stable_s : float
        Quiet period, seconds.
    two_looks : bool
        Require two looks ``stable_s`` apart (by our clock) even for a file whose
        mtime is already old. Without it a file found old at first sight (start-up
        after a crash) is taken at once; with it a writer that pauses longer than
        ``stable_s`` just before we first look is still watched for ``stable_s``.
    """

    stable_s: float
    two_looks: bool = False
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _renamed: set[str] = field(default_factory=set)

    def renamed(self, path: str) -> None:
        """The writer renamed a partial file to ``path``: it is complete."""
        self._renamed.add(path)

    def is_renamed(self, path: str) -> bool:
        """True once :meth:`renamed` said so (until :meth:`forget`)."""
        return path in self._renamed

    def observe(
        self,
        path: str,
        *,
        size: int,
        mtime_ns: int,
        wall: float,
        mono: float,
        inode: int = 0,
    ) -> bool:
        """Record a ``stat`` of ``path``; return True when the file may be read.

        ``wall`` is the wall clock (to compare with ``mtime_ns``), ``mono`` a
        monotonic clock (for our own waiting). A new ``inode`` (the file was
        replaced) restarts the wait like a new size does.
        """
        if path in self._renamed:
            return True
        signature = (size, mtime_ns, inode)
        old_enough = wall - mtime_ns / 1e9 >= self.stable_s
        prev = self._seen.get(path)
        if prev is None or prev.signature != signature:
            self._seen[path] = _Seen(signature, mono)
            # A file found already quiet for stable_s by its mtime (e.g. at start-up
            # after a crash) needs no further wait, unless two looks are required.
            return old_enough and (not self.two_looks or self.stable_s <= 0)
        return mono - prev.since >= self.stable_s and old_enough

    def forget(self, path: str) -> None:
        """Stop tracking ``path`` (read, moved or deleted)."""
        self._seen.pop(path, None)
        self._renamed.discard(path)

    def __len__(self) -> int:
        return len(self._seen) + len(self._renamed)


# ---------------------------------------------------------------------- structure

_SEGMENTS = re.compile(rb"\r\n|\r|\n")
_STX, _ETX, _EOT, _ENQ = b"\x02", b"\x03", b"\x04", b"\x05"
_BOM = b"\xef\xbb\xbf"


def astm_incomplete(raw: bytes) -> str | None:
    """Why ``raw`` is a cut ASTM transmission, or None.

    ASTM E1394 §7.1.8 ends every message with an ``L`` (terminator) record; E1381
    §8.3 frames records as ``STX n text ETX|ETB checksum CR LF`` and ends the
    transmission with ``EOT``. Data that starts like neither is not judged here.
    """
    data = raw.removeprefix(_BOM).lstrip(b" \t\r\n\x00" + _ENQ + b"\x06")
    if data.startswith(_STX):
        tail = raw.rstrip(b" \t\r\n\x00\x06")
        if tail.endswith(_EOT):
            return None
        frame = tail[tail.rfind(_STX) + 1 :]
        # The last frame holds the L record and is closed by ETX (not ETB).
        if _ETX in frame and frame[1:2] == b"L":
            return None
        return "ASTM E1381 transmission without its end (EOT, or an ETX frame with the L record)"
    if not data.startswith(b"H") or len(data) < 2:
        return None
    delimiter = data[1:2]
    records = [r for r in _SEGMENTS.split(data.rstrip(b"\x00")) if r.strip()]
    last = records[-1].strip() if records else b""
    if last[:1] == b"L" and (len(last) == 1 or last[1:2] == delimiter):
        return None
    return "ASTM E1394 message without its L (terminator) record"


def hl7_incomplete(raw: bytes) -> str | None:
    """Why ``raw`` is a cut HL7 v2 file, or None.

    Judged where the format says where the end is: an MLLP-framed file (``VT`` …
    ``FS CR``, v2.5.1 Appendix C) needs the end block of its last message, a batch
    (``FHS``/``BHS``, v2.5.1 2.10.3) its ``FTS``/``BTS`` as the last segment. A
    plain message has no end marker (quietness decides).
    """
    data = raw.removeprefix(_BOM).strip(b" \t\r\n\x00")
    if data.startswith(b"\x0b"):
        if data.rfind(b"\x1c") < data.rfind(b"\x0b"):
            return "MLLP-framed HL7 without the end block (FS CR) of its last message"
        data = data.replace(b"\x0b", b"").replace(b"\x1c", b"").strip()
    segments = [s.strip() for s in _SEGMENTS.split(data) if s.strip()]
    if not segments:
        return None
    first, last = segments[0][:3], segments[-1][:3]
    if first == b"FHS" and last != b"FTS":
        return "HL7 file batch (FHS) without its FTS segment"
    if first == b"BHS" and last not in (b"BTS", b"FTS"):
        return "HL7 batch (BHS) without its BTS segment"
    return None
