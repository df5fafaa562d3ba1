"""Lab result parsers, one module per format, behind a small plugin registry.

Like pydicom's ``add_plugin``, a parser name maps to a ``(module, function)``
import path that is imported on first use, so the watcher can name a format in
its settings without importing every parser. Every parser is pure: bytes in,
:class:`~core.labs.ParseResult` out, :class:`~core.errors.LabMessageError`
for anything it cannot read.

================  ===============================================  =====================
name              format                                           function
================  ===============================================  =====================
``astm``          ASTM E1394 / LIS2-A2, unframed or E1381-framed   ``astm.parse``
``hl7v2``         HL7 v2.3-2.5.1 ORU^R01, OUL^R22                  ``hl7v2.parse``
``cobas_c111``    Roche cobas c111 CSV export                      ``delimited.parse_cobas_c111``
================  ===============================================  =====================

Example
-------
>>> from ingest.labs.parsers import detect, get_parser
>>> result = get_parser(detect(raw))(raw)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Final, Protocol

from core.errors import LabMessageError
from core.labs import ParseResult

__all__ = ["Parser", "add_plugin", "available_parsers", "detect", "get_parser", "parse"]


class Parser(Protocol):
    """A parser: ``parse(raw, **options) -> ParseResult``."""

    def __call__(self, raw: bytes, /) -> ParseResult: ...


_PLUGINS: dict[str, tuple[str, str]] = {
    "astm": ("ingest.labs.parsers.astm", "parse"),
    "hl7v2": ("ingest.labs.parsers.hl7v2", "parse"),
    "cobas_c111": ("ingest.labs.parsers.delimited", "parse_cobas_c111"),
}
_LOADED: dict[str, Parser] = {}


def add_plugin(name: str, import_path: tuple[str, str]) -> None:
    """Register a parser under ``name``, to be imported on first use.

    Parameters
    ----------
    name : str
        The format name used by :func:`get_parser` (``"sysmex_xn"``).
    import_path : (str, str)
        Module and function, e.g. ``("mylab.parsers", "parse_xn")``. The function
        must take ``raw: bytes`` and return a ``ParseResult``.

    Raises
    ------
    ValueError
        When ``name`` is already registered to a different path.
    """
    current = _PLUGINS.get(name)
    if current is not None and current != import_path:
        raise ValueError(f"lab parser {name!r} is already registered to {current}")
    _PLUGINS[name] = import_path
    _LOADED.pop(name, None)


def available_parsers() -> tuple[str, ...]:
    """The registered parser names, sorted."""
    return tuple(sorted(_PLUGINS))


def get_parser(name: str) -> Parser:
    """Return the parser registered as ``name``, importing it on first use.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known ones. This is a
        configuration error, not a bad file, so it is not a LabMessageError.
    """
    loaded = _LOADED.get(name)
    if loaded is not None:
        return loaded
    path = _PLUGINS.get(name)
    if path is None:
        known = ", ".join(available_parsers())
        raise ValueError(f"no lab parser named {name!r}; known parsers: {known}")
    module = importlib.import_module(path[0])
    function: Parser = getattr(module, path[1])
    _LOADED[name] = function
    return function


_BOM: Final = b"\xef\xbb\xbf"
_LINK_CONTROL: Final = b"\x05\x02\x04"  # ENQ STX EOT (E1381 §6)


def detect(raw: bytes) -> str:
    """Name the format of ``raw`` from its first bytes: ``"astm"`` or ``"hl7v2"``.

    ASTM: E1381 link-control bytes first (ENQ, STX; E1381 §6.2), or an H record
    (``H|``, E1394 §7), or an H record after a frame digit (``1H|``). HL7 v2:
    ``MSH`` followed by its field separator (v2.5.1 §2.15.9), possibly after a
    UTF-8 BOM, an MLLP start block (0x0B), or batch headers (``FHS``/``BHS``).
    Leading blank lines are ignored. Delimited exports have no signature: the
    caller names their profile.

    Raises
    ------
    LabMessageError
        When neither format is recognised.
    """
    head = raw[:64]
    if head.startswith(_BOM):
        head = head[len(_BOM) :]
    # A capture may start with the receiver's ACK/NAK or with blank lines.
    head = head.lstrip(b"\r\n\t \x06\x15")
    if not head:
        raise LabMessageError("empty file: not an ASTM or HL7 v2 message")
    if head[0] in _LINK_CONTROL:
        return "astm"
    if head[0] == 0x0B:
        head = head[1:]
    if head[:3] in (b"MSH", b"FHS", b"BHS") and len(head) > 3 and not _alnum(head[3]):
        return "hl7v2"
    if head[:1] == b"H" and len(head) > 1 and not _alnum(head[1]) and head[1] not in b"\r\n":
        return "astm"
    if len(head) > 2 and head[0] in b"01234567" and head[1:2] == b"H" and not _alnum(head[2]):
        return "astm"
    raise LabMessageError(
        "unrecognised lab file: expected ASTM (ENQ, STX, 'H|', '1H|') or HL7 v2 ('MSH|')"
    )


def _alnum(byte: int) -> bool:
    return chr(byte).isalnum() if byte < 0x80 else True


def parse(raw: bytes, *, format: str | None = None) -> ParseResult:
    """Parse ``raw`` with the named parser, or the one :func:`detect` picks."""
    return get_parser(format or detect(raw))(raw)
