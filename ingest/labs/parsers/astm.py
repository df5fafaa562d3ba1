"""ASTM E1394-97 / CLSI LIS2-A2 result files, framed (E1381) or not: bytes → messages.

A message runs from a Header record (H, E1394 §7) to a Message Terminator (L,
§13); between them Patient (P, §8), Order (O, §9), Result (R, §10), Comment (C,
§11), Request Information (Q, §12), Scientific (S, §14) and Manufacturer
Information (M, §15) records. One file may hold several messages. Fields are
numbered as in the standard, the record type being field 1 (``R.4`` is the value).

Delimiters are not fixed: the H record declares them in its first characters
(§7.1.2, e.g. ``H|\\^&`` = field ``|``, repeat ``\\``, component ``^``, escape
``&``; or ``H|@^\\``). Escape sequences (§6, written here with ``&``):
``&F&`` field, ``&S&`` component, ``&R&`` repeat, ``&E&`` escape, ``&Xhh…&``
hexadecimal bytes; ``&Z…&`` (local) is dropped.

Records end with CR (§6); files written by LIS middleware often use LF or CRLF,
so all three are accepted. A line that does not start with a record type is taken
as the continuation of the record before it (a record wrapped by a tool) and
reported as a warning. A leading frame digit (``1H|…``, a capture with only
STX/ETX stripped) is dropped.

Quality control: results are marked ``is_qc`` when the H record's processing ID
(H.12) is ``Q`` (§7.1.12), the order's action code (O.12) is ``Q`` ("treat
specimen as a QC test specimen", §9.4.12), or the specimen descriptor (O.16) is
``QC``/``CONTROL``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Final

from core.charsets import codec_for
from core.errors import LabMessageError
from core.lab_values import (
    DecimalComma,
    parse_birth_date,
    parse_number,
    parse_reference_range,
    parse_status,
    parse_timestamp,
)
from core.labs import (
    Coding,
    LabMessage,
    LabObservation,
    LabOrder,
    LabPatient,
    ParseResult,
    ParseWarning,
)
from ingest.labs.parsers._e1381 import is_framed, unframe
from ingest.labs.units import normalise_unit

__all__ = ["Delimiters", "parse", "parse_delimiters"]

_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
_KNOWN_RECORDS: Final = frozenset("HPORCMQLS")
_QC_DESCRIPTORS: Final = frozenset({"QC", "CONTROL", "Q"})


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The four delimiters an H record declares (E1394 §7.1.2)."""

    field: str = "|"
    repeat: str = "\\"
    component: str = "^"
    escape: str = "&"


def parse_delimiters(header: str) -> Delimiters:
    """Read the delimiters from the first characters of an H record.

    Parameters
    ----------
    header : str
        The H record, starting with ``H`` (e.g. ``H|\\^&|||…``).

    Raises
    ------
    LabMessageError
        When fewer than four delimiters follow ``H``, they repeat, or one is a
        letter, digit or line break.
    """
    if len(header) < 5 or header[0] != "H":
        raise LabMessageError("H record is too short to declare its delimiters")
    field, repeat, component, escape = header[1], header[2], header[3], header[4]
    chars = (field, repeat, component, escape)
    if len(set(chars)) != 4 or any(c.isalnum() or c in "\r\n" for c in chars):
        raise LabMessageError("H record delimiters must be four distinct non-alphanumerics")
    if len(header) > 5 and header[5] != field:
        raise LabMessageError(
            "H record delimiter definition is not followed by the field delimiter"
        )
    return Delimiters(field, repeat, component, escape)


@lru_cache(maxsize=32)
def _unescaper(delims: Delimiters, encoding: str) -> Callable[[str], str]:
    esc = delims.escape
    pattern = re.compile(
        re.escape(esc) + r"(F|S|R|E|X[0-9A-Fa-f]*|Z[^" + re.escape(esc) + r"]*)" + re.escape(esc)
    )
    simple = {"F": delims.field, "S": delims.component, "R": delims.repeat, "E": esc}

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code in simple:
            return simple[code]
        if code[0] == "X":
            hexdigits = code[1:]
            if len(hexdigits) % 2:
                return match.group(0)
            return bytes.fromhex(hexdigits).decode(encoding, errors="replace")
        return ""  # &Z…& local escape: meaning unknown to us

    def unescape(text: str) -> str:
        if esc not in text:
            return text
        return pattern.sub(one, text)

    return unescape


class _Reader:
    """State of one pass over the records of one file (not reused)."""

    def __init__(self, delims: Delimiters, encoding: str) -> None:
        self.delims = delims
        self.unescape = _unescaper(delims, encoding)

    def components(self, field: str) -> list[str]:
        """Decoded components of the first repeat, trailing empties removed."""
        d = self.delims
        first = field.split(d.repeat, 1)[0] if d.repeat in field else field
        parts = first.split(d.component) if d.component in first else [first]
        while len(parts) > 1 and not parts[-1]:
            parts.pop()
        unescape = self.unescape
        return [unescape(p) for p in parts]

    def repeats(self, field: str) -> list[str]:
        """Decoded repeats, each with components joined by ``^``."""
        if not field:
            return []
        d = self.delims
        out = []
        for rep in field.split(d.repeat):
            comps = rep.split(d.component)
            while len(comps) > 1 and not comps[-1]:
                comps.pop()
            text = "^".join(self.unescape(c) for c in comps)
            if text:
                out.append(text)
        return out

    def words(self, field: str) -> str:
        """All non-empty decoded components of all repeats, joined by spaces."""
        d = self.delims
        parts: list[str] = []
        for rep in field.split(d.repeat):
            parts.extend(self.unescape(c) for c in rep.split(d.component) if c)
        return " ".join(p for p in parts if p)


def _field(fields: list[str], number: int) -> str:
    """Field ``number`` in E1394 numbering (the record type is field 1)."""
    return fields[number - 1] if len(fields) >= number else ""


def parse(
    raw: bytes,
    *,
    encoding: str = "latin-1",
    decimal_comma: DecimalComma = False,
    strict_frames: bool = True,
) -> ParseResult:
    """Parse ASTM E1394 messages from an analyzer file or an E1381 line capture.

    Parameters
    ----------
    raw : bytes
        File content. Framing (E1381 STX…ETX, with ENQ/ACK/EOT) is detected from
        the first bytes and removed after checking every checksum.
    encoding : str
        Character set of the record text. E1394 §6.1 specifies ASCII; analyzers in
        the field send Latin-1 (the default, which never fails to decode), UTF-8,
        Windows-1258 or TCVN3 (``vn3``, :mod:`core.charsets`).
    decimal_comma : bool or "auto"
        How a comma in R.4 and R.6 is read (:func:`core.lab_values.parse_number`).
        Each value read with a decimal comma is counted in one warning.
    strict_frames : bool
        For E1381 captures: a frame number out of sequence rejects the file
        (``True``) or is a warning when every checksum verifies (``False``, for a
        captured file where losing a QC run is worse than an odd capture tool).

    Returns
    -------
    ParseResult
        One :class:`~core.labs.LabMessage` per H…L.

    Raises
    ------
    LabMessageError
        When the file is empty, undecodable in ``encoding``, framing is broken,
        the first record is not H, or H declares unusable delimiters. ``where``
        names the line (record) or frame.
    """
    warnings: list[ParseWarning] = []
    if is_framed(raw):
        raw, frame_warnings = unframe(raw, strict_numbers=strict_frames)
        warnings.extend(frame_warnings)
    encoding = codec_for(encoding) or encoding
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise LabMessageError(
            f"bytes are not valid {encoding} at offset {exc.start}", where=f"byte {exc.start}"
        ) from exc
    except LookupError as exc:
        raise LabMessageError(f"unknown character set {encoding!r}") from exc
    if not text.isascii():
        # Windows-1258 and some middleware send decomposed accents (Vietnamese).
        text = unicodedata.normalize("NFC", text)
    records = _records(text, warnings)
    comma_values: list[str] = []  # where each value read with a decimal comma is
    if not records:
        raise LabMessageError("file holds no ASTM records")
    messages: list[LabMessage] = []
    builder: _MessageBuilder | None = None
    for lineno, record in records:
        where = f"line {lineno}"
        kind = record[0]
        if kind == "H":
            if builder is not None:
                warnings.append(ParseWarning("message ends without an L record", builder.where))
                messages.append(builder.build())
            delims = _parse_delimiters_at(record, where)
            builder = _MessageBuilder(
                _Reader(delims, encoding), record, where, len(messages) + 1, warnings
            )
            builder.decimal_comma = decimal_comma
            builder.comma_values = comma_values
            continue
        if builder is None:
            raise LabMessageError(f"{kind} record outside a message (no H before it)", where=where)
        if kind == "L":
            builder.terminate(record, where)
            messages.append(builder.build())
            builder = None
            continue
        builder.add(kind, record, where)
    if builder is not None:
        warnings.append(ParseWarning("message ends without an L record", builder.where))
        messages.append(builder.build())
    if comma_values:
        warnings.append(
            ParseWarning(
                f"comma read as the decimal mark in {len(comma_values)} value(s)", comma_values[0]
            )
        )
    return ParseResult(tuple(messages), tuple(warnings))


def _parse_delimiters_at(record: str, where: str) -> Delimiters:
    """:func:`parse_delimiters` with the record's location added to errors."""
    try:
        return parse_delimiters(record)
    except LabMessageError as exc:
        raise LabMessageError(exc.reason, where=where) from None


def _records(text: str, warnings: list[ParseWarning]) -> list[tuple[int, str]]:
    """Split text into (line number, record), joining continued lines.

    The field delimiter is only known once H is read, so a record start is
    recognised as a record type letter followed by a non-alphanumeric character.
    """
    records: list[tuple[int, str]] = []
    for lineno, line in enumerate(_LINE_BREAK.split(text), 1):
        if not line or line.isspace():
            continue
        if len(line) >= 3 and line[0] in "01234567" and line[1].isalpha() and not line[2].isalnum():
            line = line[1:]  # frame number left by a capture without STX
        if line[0] in _KNOWN_RECORDS and (len(line) == 1 or not line[1].isalnum()):
            records.append((lineno, line))
        elif len(line) >= 2 and line[0].isalpha() and line[0].isupper() and not line[1].isalnum():
            warnings.append(
                ParseWarning(f"unknown record type {line[0]!r} skipped", f"line {lineno}")
            )
        elif records:
            warnings.append(ParseWarning("line continues the previous record", f"line {lineno}"))
            previous_line, previous = records[-1]
            records[-1] = (previous_line, previous + line)
        else:
            raise LabMessageError(
                "file does not start with an ASTM H record", where=f"line {lineno}"
            )
    return records


class _MessageBuilder:
    """Accumulates one H…L message; the records' meaning is E1394 §7-§15."""

    def __init__(
        self,
        reader: _Reader,
        header: str,
        where: str,
        index: int,
        warnings: list[ParseWarning],
    ) -> None:
        self.reader = reader
        self.where = where
        self.index = index
        self.warnings = warnings
        self.field = reader.delims.field
        fields = header.split(self.field)
        self.sender = (reader.components(_field(fields, 5)) or [""])[0]
        self.control_id = reader.unescape(_field(fields, 3))
        self.processing_id = (reader.components(_field(fields, 12)) or [""])[0]
        self.timestamp = self.stamp(_field(fields, 14), "H.14", where)
        self.is_qc_message = self.processing_id.upper() == "Q"
        self.decimal_comma: DecimalComma = False
        self.comma_values: list[str] = []
        self.patients: list[LabPatient] = []
        self.orders: list[LabOrder] = []
        self.observations: list[LabObservation] = []
        self.queries: list[str] = []
        self.comments: list[str] = []
        # Which record a following C record comments on: "P", "O", "R" or "H".
        self.last = "H"

    def stamp(self, text: str, name: str, where: str) -> datetime | None:
        if not text:
            return None
        value = parse_timestamp(text.split(self.reader.delims.component, 1)[0])
        if value is None:
            self.warnings.append(ParseWarning(f"{name} is not a valid date/time", where))
        return value

    def located(self, where: str) -> str:
        return f"message {self.index}, {where}"

    def add(self, kind: str, record: str, where: str) -> None:
        fields = record.split(self.field)
        if kind == "R":
            self.result(fields, where)
        elif kind == "O":
            self.order(fields, where)
        elif kind == "P":
            self.patient(fields, where)
        elif kind == "C":
            self.comment(fields)
        elif kind == "Q":
            comps = self.reader.components(_field(fields, 3))
            # Q.3 starting range: patient ID ^ specimen ID (§12.1.3).
            specimen = comps[1] if len(comps) > 1 and comps[1] else (comps[0] if comps else "")
            self.queries.append(specimen)
            self.last = "H"
        elif kind in ("M", "S"):
            self.last = "H"  # manufacturer/scientific: content is vendor-defined
        elif kind == "H":  # pragma: no cover - handled by parse()
            raise AssertionError

    def patient(self, fields: list[str], where: str) -> None:
        r = self.reader
        patient_id = next(
            (pid for n in (3, 4, 5) if (pid := (r.components(_field(fields, n)) or [""])[0])),
            "",
        )
        dob_text = _field(fields, 8)
        birth_date = parse_birth_date(dob_text) if dob_text else None
        if dob_text and birth_date is None:
            self.warnings.append(ParseWarning("P.8 birth date is not a valid date", where))
        self.patients.append(
            LabPatient(
                where=self.located(where),
                patient_id=patient_id,
                name="^".join(r.components(_field(fields, 6))),
                birth_date=birth_date,
                sex=r.unescape(_field(fields, 9)),
            )
        )
        self.last = "P"

    def order(self, fields: list[str], where: str) -> None:
        r = self.reader
        specimen = (r.components(_field(fields, 3)) or [""])[0]
        instrument_specimen = r.repeats(_field(fields, 4))
        if not specimen and instrument_specimen:
            specimen = instrument_specimen[0].split("^", 1)[0]
        tests = [
            _test_coding(r.delims, r.unescape, rep)[0]
            for rep in _field(fields, 5).split(r.delims.repeat)
            if rep
        ]
        test_codes = tuple(t.code for t in tests)
        action = r.unescape(_field(fields, 12)).strip().upper()
        descriptor = (r.components(_field(fields, 16)) or [""])[0].strip().upper()
        self.orders.append(
            LabOrder(
                where=self.located(where),
                specimen_id=specimen,
                instrument_specimen_id="~".join(instrument_specimen),
                test_codes=test_codes,
                # One test ordered: it is the report's code; several name no one panel.
                panel=tests[0] if len(tests) == 1 and tests[0].code else None,
                priority=r.unescape(_field(fields, 6)),
                action_code=action,
                is_qc=self.is_qc_message or action == "Q" or descriptor in _QC_DESCRIPTORS,
                patient_index=len(self.patients) - 1 if self.patients else None,
            )
        )
        self.last = "O"

    def result(self, fields: list[str], where: str) -> None:
        r = self.reader
        d = r.delims
        unescape = r.unescape
        test_raw = _field(fields, 3)
        test, alternates = _test_coding(d, unescape, test_raw.split(d.repeat, 1)[0])
        if not test.code:
            self.warnings.append(ParseWarning("R.3 universal test ID is empty", where))
        raw_value = _field(fields, 4)
        components = r.components(raw_value)
        text = "^".join(components)
        value, comparator = (None, None)
        if len(components) == 1 and text:
            value, comparator = parse_number(text, decimal_comma=self.decimal_comma)
            if value is not None and "," in text:
                self.comma_values.append(self.located(where))
        unit = unescape(_field(fields, 5))
        range_text = "^".join(r.components(_field(fields, 6)))
        low, high = (
            parse_reference_range(range_text, decimal_comma=self.decimal_comma)
            if range_text
            else (None, None)
        )
        flags_field = _field(fields, 7)
        flags = tuple(r.repeats(flags_field)) if flags_field else ()
        status_code = unescape(_field(fields, 9))
        completed = _field(fields, 13) or _field(fields, 12)
        order_index = len(self.orders) - 1 if self.orders else None
        order = self.orders[order_index] if order_index is not None else None
        if order is None:
            self.warnings.append(ParseWarning("R record without an O record before it", where))
        self.observations.append(
            LabObservation(
                where=self.located(where),
                test=test,
                test_alternates=alternates,
                test_raw=unescape(test_raw),
                value_type="ST" if value is None else "NM",
                raw_value=raw_value,
                text=text,
                value_components=tuple(components),
                value=value,
                comparator=comparator,
                unit=unit,
                ucum_unit=normalise_unit(unit) if unit else None,
                reference_range=range_text,
                reference_low=low,
                reference_high=high,
                flags=flags,
                status=parse_status(status_code, astm=True),
                status_code=status_code,
                specimen_id=order.specimen_id if order else "",
                instrument_id=(r.components(_field(fields, 14)) or [""])[0],
                performed_at=self.stamp(completed, "R.13", where) if completed else None,
                is_qc=order.is_qc if order else self.is_qc_message,
                order_index=order_index,
                patient_index=len(self.patients) - 1 if self.patients else None,
            )
        )
        self.last = "R"

    def comment(self, fields: list[str]) -> None:
        # C.3 should be the comment source (I or L); some analyzers (Bio-Rad IH)
        # put text there, so anything longer than a code is kept as text.
        source = _field(fields, 3)
        parts = [self.reader.words(source)] if len(source) > 1 else []
        parts.append(self.reader.words(_field(fields, 4)))
        text = " ".join(p for p in parts if p)
        if not text:
            return
        if self.last == "R" and self.observations:
            obs = self.observations[-1]
            self.observations[-1] = replace(obs, comments=(*obs.comments, text))
        elif self.last == "O" and self.orders:
            order = self.orders[-1]
            self.orders[-1] = replace(order, comments=(*order.comments, text))
        else:
            # Comments on P records are patient information: kept with the message,
            # which callers must treat as PHI like the rest of it.
            self.comments.append(text)

    def terminate(self, record: str, where: str) -> None:
        fields = record.split(self.field)
        code = _field(fields, 3).strip().upper()
        # L.3 (§13.1.3): N (or empty) is normal; T/R/E/Q/I/F report something else.
        if code and code not in ("N", "F"):
            self.warnings.append(
                ParseWarning(f"message terminated with code {code!r}", self.located(where))
            )

    def build(self) -> LabMessage:
        return LabMessage(
            format="astm",
            where=self.located(self.where),
            message_type="ASTM",
            sender=self.sender,
            control_id=self.control_id,
            timestamp=self.timestamp,
            patients=tuple(self.patients),
            orders=tuple(self.orders),
            observations=tuple(self.observations),
            queries=tuple(self.queries),
            comments=tuple(self.comments),
            is_qc=self.is_qc_message or (bool(self.orders) and all(o.is_qc for o in self.orders)),
        )


def _test_coding(
    delims: Delimiters, unescape: Callable[[str], str], field: str
) -> tuple[Coding, tuple[Coding, ...]]:
    """Read a Universal Test ID (O.5, R.3): ``universal^name^type^local…``.

    Component 4 is the manufacturer's code, which analyzers fill; component 1 was
    reserved for a universal code and is kept as an alternate when both appear.
    """
    comps = [unescape(c) for c in field.split(delims.component)]
    universal = comps[0] if comps else ""
    local = comps[3] if len(comps) > 3 else ""
    if local:
        display = comps[4] if len(comps) > 4 else ""
        alternates = (Coding(universal, comps[1], "universal"),) if universal else ()
        return Coding(local, display, "local"), alternates
    name = comps[1] if len(comps) > 1 else ""
    return Coding(universal, name, "universal" if universal else "local"), ()
