"""Small parse_* functions for values every lab format shares.

Numbers with comparators, reference ranges, timestamps and status codes look the
same in ASTM E1394 and HL7 v2.5.1, so the parsers share these (and the lab result
service reads a number kept as text with :func:`parse_number` for critical values).
All are total: bad input returns ``None`` (or an empty result), never raises, so one
odd field does not reject a whole file; the parsers decide what deserves a warning.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import Final, Literal, TypeAlias

from core.labs import Comparator, ResultStatus

__all__ = [
    "DecimalComma",
    "is_unambiguous_decimal_comma",
    "parse_birth_date",
    "parse_number",
    "parse_reference_range",
    "parse_status",
    "parse_timestamp",
]

_NUMBER: Final = re.compile(
    r"\s*(<=|>=|=<|=>|<|>)?\s*([+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][+-]?\d{1,3})?)\s*\Z"
)
_COMPARATORS: Final[dict[str, Comparator]] = {
    "<": "<",
    ">": ">",
    "<=": "<=",
    ">=": ">=",
    "=<": "<=",
    "=>": ">=",
}


#: ``True``: ``,`` is the decimal mark; ``False``: a comma makes text non-numeric;
#: ``"auto"``: a comma is read as the decimal mark only where that is unambiguous.
DecimalComma: TypeAlias = bool | Literal["auto"]

# A comma that could be a thousands separator: 1-3 digits (not a lone 0), comma,
# exactly three digits (``1,234``, ``12,500``).
_THOUSANDS: Final = re.compile(r"[+-]?[1-9]\d{0,2},\d{3}(?:[eE][+-]?\d{1,3})?\Z")


def is_unambiguous_decimal_comma(digits: str) -> bool:
    """Whether the comma in a number is certainly a decimal mark.

    ``7,85``, ``0,123``, ``1234,5`` and ``,5`` can only be decimals. ``1,234`` could
    be one thousand two hundred and thirty-four (a thousands separator), so it is
    not read as a number without a profile saying which mark the sender uses. A
    text with both ``.`` and ``,`` or two commas is never unambiguous.
    """
    if digits.count(",") != 1 or "." in digits:
        return False
    comma = digits.index(",")
    if comma + 1 >= len(digits) or not digits[comma + 1].isdigit():
        return False  # "7," says nothing about the mark
    return _THOUSANDS.match(digits) is None


def parse_number(
    text: str, *, decimal_comma: DecimalComma = False
) -> tuple[float | None, Comparator | None]:
    """Read ``"12.5"``, ``"<0.5"``, ``"> 8"`` or ``">=1e3"`` as (number, comparator).

    Parameters
    ----------
    text : str
        The value text.
    decimal_comma : bool or "auto"
        ``True``: treat ``,`` as the decimal mark (European and Vietnamese exports);
        ``"auto"``: only where :func:`is_unambiguous_decimal_comma` (``7,85`` yes,
        ``1,234`` no); ``False``: a comma makes the text non-numeric.

    Returns
    -------
    (float or None, comparator or None)
        ``(None, None)`` for text that is not a number (``"3+"``, ``"***.**"``).
    """
    match = _NUMBER.match(text)
    if match is None:
        return None, None
    digits = match.group(2)
    if "," in digits:
        if decimal_comma is False or (
            decimal_comma == "auto" and not is_unambiguous_decimal_comma(digits)
        ):
            return None, None
        digits = digits.replace(",", ".")
    op = match.group(1)
    return float(digits), (_COMPARATORS[op] if op else None)


_RANGE: Final = re.compile(
    r"\s*([+-]?\d+(?:[.,]\d+)?)\s*(?:-|–|_|\^|&|\bto\b|\.\.)\s*([+-]?\d+(?:[.,]\d+)?)\s*\Z"
)


def parse_reference_range(
    text: str, *, decimal_comma: DecimalComma = False
) -> tuple[float | None, float | None]:
    """Read a reference range into (low, high).

    Accepts ``3.5-5.0`` and ``3.5 to 5.0`` (E1394 R.6, §10.1.6), HL7 OBX-7 forms
    ``28-217``, ``<30`` (high only), ``>5`` (low only), and the separators real
    senders use instead of ``-``: ``_`` (``70_105``), ``^`` and ``&``
    (``4.50&5.90``).

    Returns
    -------
    (float or None, float or None)
    """
    if not text:
        return None, None
    match = _RANGE.match(text)
    if match is not None:
        low = match.group(1)
        high = match.group(2)
        if decimal_comma == "auto":
            if any("," in b and not is_unambiguous_decimal_comma(b) for b in (low, high)):
                return None, None
            low, high = low.replace(",", "."), high.replace(",", ".")
        elif decimal_comma:
            low, high = low.replace(",", "."), high.replace(",", ".")
        elif "," in low or "," in high:
            return None, None
        return float(low), float(high)
    number, comparator = parse_number(text, decimal_comma=decimal_comma)
    if number is None or comparator is None:
        return None, None
    if comparator in ("<", "<="):
        return None, number
    return number, None


_TS: Final = re.compile(
    r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:[.,](\d{1,6}))?([+-]\d{4})?\Z"
)


def parse_timestamp(text: str) -> datetime | None:
    """Read ASTM ``YYYYMMDDHHMMSS`` or HL7 TS/DTM (v2.5.1 §2.A, time stamp) into a datetime.

    HL7 allows truncation to any precision and an optional ``.SSSS`` fraction and
    ``+/-ZZZZ`` offset; with an offset the result is timezone-aware, without one
    it is naive (local time of the sender). Only the year is required.

    Returns
    -------
    datetime or None
        ``None`` for empty or invalid text (``"DOB"``, month 13).
    """
    text = text.strip()
    if not text:
        return None
    match = _TS.match(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    tz: timezone | None = None
    if offset is not None:
        hours, minutes = int(offset[1:3]), int(offset[3:5])
        if hours > 23 or minutes > 59:
            return None
        delta = timedelta(hours=hours, minutes=minutes)
        tz = timezone(-delta if offset[0] == "-" else delta)
    try:
        return datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError:
        return None


def parse_birth_date(text: str) -> date | None:
    """Read a birth date (``YYYYMMDD``, possibly with a time part) or ``None``."""
    stamp = parse_timestamp(text)
    return None if stamp is None else stamp.date()


# ASTM E1394 R.9 (§10.1.9) and HL7 v2.5.1 table 0085 (OBX-11) share letters with
# the same meaning for F, P, C and X, so one table serves both.
_STATUS: Final[dict[str, ResultStatus]] = {
    "F": ResultStatus.FINAL,  # final results
    "R": ResultStatus.FINAL,  # ASTM: previously transmitted (a repeat of a final)
    "V": ResultStatus.FINAL,  # ASTM: operator verified
    "U": ResultStatus.FINAL,  # HL7: changed to final without retransmitting
    "P": ResultStatus.PRELIMINARY,
    "S": ResultStatus.PRELIMINARY,  # partial
    "I": ResultStatus.PRELIMINARY,  # ASTM: in instrument pending; HL7: in lab
    "M": ResultStatus.PRELIMINARY,  # ASTM: MIC level
    "W": ResultStatus.CANCELLED,  # HL7: post original as wrong; ASTM: warning (see below)
    "C": ResultStatus.CORRECTED,
    "X": ResultStatus.CANCELLED,  # cannot be done / cannot be obtained
    "D": ResultStatus.CANCELLED,  # HL7: deletes the OBX record
}


def parse_status(code: str, *, astm: bool = False) -> ResultStatus | None:
    """Map a result status letter (ASTM R.9 or HL7 OBX-11) to :class:`ResultStatus`.

    ASTM ``W`` means "warning: validity is questionable", which is not a
    cancellation, so under ``astm=True`` it maps to preliminary.
    """
    code = code.strip().upper()
    if astm and code == "W":
        return ResultStatus.PRELIMINARY
    return _STATUS.get(code)
