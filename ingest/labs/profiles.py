"""Inbox profiles: which parser reads a folder's files, and how (pure).

A profile (``LabProfileSettings`` in :mod:`core.settings`) binds one inbox folder
to a format: ``auto`` tells ASTM E1394 (framed by E1381 or not) from HL7 v2 by the
first bytes (:func:`ingest.labs.parsers.detect`); ``delimited`` reads a vendor
export through a declarative :class:`~ingest.labs.parsers.delimited.DelimitedProfile`;
any other name is a registered parser (``astm``, ``hl7v2``, ``cobas_c111``).

:func:`parse_file` is the whole decision "what does this file hold": it returns the
parsed messages or raises :class:`~core.errors.LabMessageError` with what, where
and why, which the watcher writes to ``rejected/<name>.error.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

from core import charsets  # registers the TCVN3 codec for profile encodings
from core.dropfiles import astm_incomplete, hl7_incomplete
from core.errors import LabMessageError
from core.lab_values import DecimalComma
from core.labs import Coding, ParseResult
from core.settings import LabDelimitedSettings, LabProfileSettings
from ingest.labs.parsers import astm, available_parsers, delimited, detect, get_parser, hl7v2
from ingest.labs.parsers.delimited import DelimitedProfile

__all__ = [
    "InboxProfile",
    "delimited_profile",
    "incomplete_reason",
    "parse_file",
    "parse_profile",
]


@dataclass(frozen=True, slots=True)
class InboxProfile:
    """A validated inbox profile.

    Attributes
    ----------
    name : str
        The folder name under ``inbox/lab/``.
    format : str
        ``"auto"``, ``"delimited"`` or a registered parser name.
    encoding : str
        ASTM record character set; empty tries UTF-8, then Latin-1.
    skip_non_results : bool
        HL7 v2: leave out non-result messages of a batch (named in the summary).
    analyzer : str
        Used when a message names no sender.
    decimal_comma : bool or "auto"
        ASTM/HL7: how a comma in a value is read (``decimal_mark`` setting).
    delimited : DelimitedProfile or None
    patient_issuer : str
        Issuer of Patient IDs sent without one (ASTM, exports).
    """

    name: str
    format: str = "auto"
    encoding: str = ""
    skip_non_results: bool = True
    analyzer: str = ""
    decimal_comma: DecimalComma = "auto"
    delimited: DelimitedProfile | None = None
    max_bytes: int | None = None
    patient_issuer: str = ""


def delimited_profile(name: str, section: LabDelimitedSettings) -> DelimitedProfile:
    """Build a :class:`DelimitedProfile` from settings (raises ``ValueError`` if invalid)."""
    codes: dict[str, Coding] = {}
    for vendor, spec in section.test_code_map.items():
        parts = spec.split("^")
        code = parts[0].strip()
        if not code:
            raise ValueError(f"profile {name!r}: empty code mapped from {vendor!r}")
        display = parts[1] if len(parts) > 1 else ""
        system = parts[2] if len(parts) > 2 and parts[2] else "LN"
        codes[vendor] = Coding(code, display, system)
    return DelimitedProfile(
        name=name,
        columns=section.columns,
        delimiter=section.delimiter,
        quotechar=section.quotechar,
        encoding=section.encoding,
        decimal_comma=section.decimal_comma,
        header_row=section.header_row,
        date_format=section.date_format,
        time_format=section.time_format,
        birth_date_format=section.birth_date_format,
        exponent_base=section.exponent_base,
        test_code_map=codes,
        test_system=section.test_system,
        instrument_id=section.instrument_id,
        flag_separator=section.flag_separator,
        qc_specimen_prefixes=tuple(section.qc_specimen_prefixes),
    )


_DECIMAL_MARKS: dict[str, DecimalComma] = {"auto": "auto", "comma": True, "point": False}


def parse_profile(name: str, section: LabProfileSettings) -> InboxProfile:
    """Validate one profile of the settings.

    Raises
    ------
    ValueError
        Unknown format (the message lists the known ones), unknown character set,
        or an invalid delimited layout. A configuration error, refused at start-up.
    """
    fmt = section.format
    known = ("auto", "delimited", *available_parsers())
    if fmt not in known:
        raise ValueError(f"lab profile {name!r}: unknown format {fmt!r}; known: {', '.join(known)}")
    encoding = charsets.codec_for(section.encoding) or section.encoding
    if encoding:
        try:
            "".encode(encoding)
        except LookupError as exc:
            raise ValueError(
                f"lab profile {name!r}: unknown encoding {section.encoding!r}"
            ) from exc
    layout = delimited_profile(name, section.delimited) if section.delimited is not None else None
    return InboxProfile(
        name=name,
        format=fmt,
        encoding=encoding,
        skip_non_results=section.skip_non_results,
        analyzer=section.analyzer,
        decimal_comma=_DECIMAL_MARKS[section.decimal_mark],
        delimited=layout,
        max_bytes=section.max_bytes,
        patient_issuer=section.patient_issuer,
    )


def parse_file(raw: bytes, profile: InboxProfile) -> tuple[str, ParseResult]:
    """Parse one inbox file as ``profile`` says.

    Returns
    -------
    (str, ParseResult)
        The format actually read (``"astm"``, ``"hl7v2"``, ``"delimited"`` or the
        parser name) and the messages, which hold at least one result.

    Raises
    ------
    LabMessageError
        The file is not a lab file of this profile, cannot be parsed, or holds no
        result: an HL7 order or ACK (v2.5.1 §2.14.9.9 message type), an ASTM host
        query (E1394 §12), an empty export.
    """
    fmt = detect(raw) if profile.format == "auto" else profile.format
    if fmt == "astm":
        result = _parse_astm(raw, profile.encoding, profile.decimal_comma)
    elif fmt == "hl7v2":
        result = _parse_hl7v2(raw, profile.skip_non_results, profile.decimal_comma)
    elif fmt == "delimited":
        assert profile.delimited is not None  # enforced by the settings validator
        result = delimited.parse(raw, profile=profile.delimited)
    else:
        result = get_parser(fmt)(raw)
    if not result.observations:
        where = result.messages[0].where if result.messages else None
        queries = [q for m in result.messages for q in m.queries]
        if queries:
            raise LabMessageError(
                f"host query (Q record) for {len(queries)} specimen(s), not results", where=where
            )
        raise LabMessageError(
            "no result in the file (no R record, OBX segment or row)", where=where
        )
    return fmt, result


def incomplete_reason(raw: bytes, profile: InboxProfile) -> str | None:
    """Why ``raw`` is a file cut short, judged by its format's end marker, or None.

    ASTM: the E1394 ``L`` terminator record or the E1381 ``EOT``; HL7 v2: a batch's
    ``BTS``/``FTS`` or an MLLP frame's end block (:mod:`core.dropfiles`). Delimited
    exports declare no row count in any profile we know, so they have no marker:
    the drop folder's quiet period and writer check decide.
    """
    fmt = profile.format
    if fmt == "auto":
        try:
            fmt = detect(raw)
        except LabMessageError:
            return None  # not a lab format: the parser says why
    if fmt == "astm":
        return astm_incomplete(raw)
    if fmt == "hl7v2":
        return hl7_incomplete(raw)
    return None


def _parse_astm(raw: bytes, encoding: str, decimal_comma: DecimalComma) -> ParseResult:
    # A file is a capture, not a live link: irregular frame numbers are a warning
    # when every checksum verifies (E1381 §6.3.3 numbering exists to detect lost
    # frames while the sender can still repeat them).
    if encoding:
        return astm.parse(raw, encoding=encoding, decimal_comma=decimal_comma, strict_frames=False)
    try:
        return astm.parse(raw, encoding="utf-8", decimal_comma=decimal_comma, strict_frames=False)
    except LabMessageError as exc:
        # E1394 §6.1 says ASCII; in practice UTF-8 or Latin-1. Latin-1 never fails to
        # decode, so it is the fallback, and only for a decoding failure.
        if not exc.reason.startswith("bytes are not valid utf-8"):
            raise
        return astm.parse(raw, encoding="latin-1", decimal_comma=decimal_comma, strict_frames=False)


def _parse_hl7v2(raw: bytes, skip_non_results: bool, decimal_comma: DecimalComma) -> ParseResult:
    result = hl7v2.parse(raw, skip_non_results=skip_non_results, decimal_comma=decimal_comma)
    if not result.messages:
        # Every message was skipped: parse strictly to name the first one and why.
        hl7v2.parse(raw)
        raise LabMessageError("no result message in the file")
    return result
