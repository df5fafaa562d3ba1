"""Vendor CSV/TXT result exports, read through a declarative profile: bytes → messages.

Analyzers that cannot speak ASTM or HL7 write result tables (the Roche cobas c111
"export" file, middleware dumps). Nothing standard describes them, so each vendor
layout is a :class:`DelimitedProfile`: delimiter, quoting, character set, decimal
mark, date formats, which header names hold which values, and a map from the
vendor's test codes to LOINC. Adding an analyzer means adding a profile, not code.

Text is NFC-normalised after decoding: Windows-1258 (Vietnamese) writes tone marks
as combining characters (``e`` + U+0303), which would otherwise never compare
equal to the precomposed names other systems send.

A file becomes one :class:`~core.labs.LabMessage`; rows sharing a
specimen ID share a :class:`~core.labs.LabOrder`, and rows sharing a
patient ID a :class:`~core.labs.LabPatient`.
"""

from __future__ import annotations

import csv
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Final

from core.errors import LabMessageError
from core.lab_values import parse_birth_date, parse_number, parse_reference_range
from core.labs import (
    Coding,
    Comparator,
    LabMessage,
    LabObservation,
    LabOrder,
    LabPatient,
    ParseResult,
    ParseWarning,
    ResultStatus,
)
from ingest.labs.units import normalise_unit

__all__ = ["COBAS_C111", "COLUMNS", "DelimitedProfile", "parse", "parse_cobas_c111"]

#: The logical columns a profile may map to header names.
COLUMNS: Final = frozenset(
    {
        "specimen_id",
        "patient_id",
        "patient_name",
        "birth_date",
        "sex",
        "test_code",
        "test_display",
        "value",
        "exponent",
        "unit",
        "flag",
        "reference_range",
        "date",
        "time",
        "instrument_id",
        "comment",
    }
)
_REQUIRED: Final = frozenset({"test_code", "value"})


@dataclass(frozen=True, slots=True, kw_only=True)
class DelimitedProfile:
    """How to read one vendor's export.

    Attributes
    ----------
    name : str
        Used as the message type and in warnings (``"cobas_c111"``).
    columns : Mapping[str, str]
        Logical column (one of :data:`COLUMNS`) → header text in the file.
        ``test_code`` and ``value`` are required.
    delimiter : str
    quotechar : str or None
        ``None`` for files without quoting.
    encoding : str
        ``"latin-1"``, ``"cp1252"``, ``"cp1258"`` (Vietnamese), ``"utf-8-sig"``…
    decimal_comma : bool
        Values and ranges write ``,`` as the decimal mark (``5,23``).
    header_row : int
        0-based index of the header row; rows above it (titles) are skipped.
    date_format : str
        :func:`datetime.strptime` format of the ``date`` column; it may include the
        time when there is no ``time`` column.
    time_format : str or None
        Format of a separate ``time`` column.
    birth_date_format : str
    exponent_base : int
        With an ``exponent`` column, values are integers scaled by
        ``exponent_base ** exponent`` (``523`` with ``-2`` is 5.23).
    test_code_map : Mapping[str, Coding]
        Vendor test code → the standard coding (LOINC) added as an alternate.
    test_system : str
        Coding system named for the vendor's codes.
    instrument_id : str
        Instrument to report when there is no ``instrument_id`` column.
    flag_separator : str or None
        Splits the flag column into several flags; ``None`` keeps it whole.
    status : ResultStatus
        Exports hold released results, so ``FINAL`` unless a vendor says otherwise.
    qc_specimen_prefixes : tuple of str
        Specimen IDs starting with one of these are QC material.
    """

    name: str
    columns: Mapping[str, str]
    delimiter: str = ";"
    quotechar: str | None = '"'
    encoding: str = "utf-8"
    decimal_comma: bool = False
    header_row: int = 0
    date_format: str = "%Y%m%d"
    time_format: str | None = None
    birth_date_format: str = "%Y%m%d"
    exponent_base: int = 10
    test_code_map: Mapping[str, Coding] = field(default_factory=dict)
    test_system: str = "local"
    instrument_id: str = ""
    flag_separator: str | None = None
    status: ResultStatus = ResultStatus.FINAL
    qc_specimen_prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.columns) - COLUMNS
        if unknown:
            raise ValueError(
                f"unknown profile columns: {sorted(unknown)}; known: {sorted(COLUMNS)}"
            )
        missing = _REQUIRED - set(self.columns)
        if missing:
            raise ValueError(f"profile {self.name!r} must map {sorted(missing)}")
        if len(self.delimiter) != 1:
            raise ValueError("delimiter must be one character")
        # Freeze the mappings so a shared profile cannot be changed by a caller.
        object.__setattr__(self, "columns", MappingProxyType(dict(self.columns)))
        object.__setattr__(self, "test_code_map", MappingProxyType(dict(self.test_code_map)))


#: Roche cobas c111 result export (semicolon-separated, every field quoted, date and
#: time in separate columns, flags such as ``>RR`` above the reference range).
COBAS_C111: Final = DelimitedProfile(
    name="cobas_c111",
    columns={
        "specimen_id": "Sample",
        "test_code": "Test",
        "value": "Result",
        "unit": "Unit",
        "flag": "Flags",
        "date": "Date",
        "time": "Time",
        "instrument_id": "Serial",
    },
    delimiter=";",
    quotechar='"',
    encoding="latin-1",
    date_format="%Y%m%d",
    time_format="%H:%M",
    test_system="cobas_c111",
    test_code_map={
        "GLU2": Coding("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "LN"),
        "ASTL": Coding(
            "1920-8",
            "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
            "LN",
        ),
        "ALTL": Coding(
            "1742-6",
            "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
            "LN",
        ),
    },
)


def parse_cobas_c111(raw: bytes) -> ParseResult:
    """Parse a Roche cobas c111 export with :data:`COBAS_C111`."""
    return parse(raw, profile=COBAS_C111)


def parse(raw: bytes, *, profile: DelimitedProfile) -> ParseResult:
    """Parse a delimited export according to ``profile``.

    Parameters
    ----------
    raw : bytes
    profile : DelimitedProfile

    Returns
    -------
    ParseResult
        One message holding every row that has a test code.

    Raises
    ------
    LabMessageError
        When the bytes are not valid in the profile's encoding, the header row is
        missing, a mapped header is not in it, or the CSV quoting is broken.
    """
    try:
        text = raw.decode(profile.encoding)
    except UnicodeDecodeError as exc:
        raise LabMessageError(
            f"bytes are not valid {profile.encoding} at offset {exc.start}",
            where=f"byte {exc.start}",
        ) from exc
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if "\x00" in text:
        raise LabMessageError("file contains NUL bytes: not a text export")
    reader = csv.reader(
        text.splitlines(),
        delimiter=profile.delimiter,
        quotechar=profile.quotechar or '"',
        quoting=csv.QUOTE_MINIMAL if profile.quotechar else csv.QUOTE_NONE,
        strict=False,
    )
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise LabMessageError(f"broken CSV: {exc}", where=f"line {reader.line_num}") from exc
    return _Table(profile, rows).read()


class _Table:
    def __init__(self, profile: DelimitedProfile, rows: list[list[str]]) -> None:
        self.profile = profile
        self.rows = rows
        self.warnings: list[ParseWarning] = []
        if len(rows) <= profile.header_row:
            raise LabMessageError(f"no header row (row {profile.header_row + 1}) in the file")
        header = [h.strip() for h in rows[profile.header_row]]
        self.index: dict[str, int] = {}
        for logical, name in profile.columns.items():
            try:
                self.index[logical] = header.index(name)
            except ValueError:
                raise LabMessageError(
                    f"column {name!r} ({logical}) is not in the header",
                    where=f"line {profile.header_row + 1}",
                ) from None

    def cell(self, row: list[str], logical: str) -> str:
        position = self.index.get(logical)
        if position is None or position >= len(row):
            return ""
        return row[position].strip()

    def read(self) -> ParseResult:
        p = self.profile
        patients: list[LabPatient] = []
        patient_keys: dict[str, int] = {}
        orders: dict[str, LabOrder] = {}
        order_keys: dict[str, int] = {}
        observations: list[LabObservation] = []
        width = len(self.rows[p.header_row])
        for number, row in enumerate(self.rows[p.header_row + 1 :], p.header_row + 2):
            where = f"line {number}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < width:
                self.warnings.append(
                    ParseWarning(f"row has {len(row)} fields, header has {width}", where)
                )
            code = self.cell(row, "test_code")
            if not code:
                self.warnings.append(ParseWarning("row without a test code skipped", where))
                continue
            patient_index = self.patient(row, where, patients, patient_keys)
            specimen = self.cell(row, "specimen_id")
            is_qc = bool(specimen) and specimen.startswith(p.qc_specimen_prefixes or ("\0",))
            if specimen not in order_keys:
                order_keys[specimen] = len(orders)
                orders[specimen] = LabOrder(
                    where=where,
                    specimen_id=specimen,
                    is_qc=is_qc,
                    patient_index=patient_index,
                )
            order_index = order_keys[specimen]
            observations.append(
                self.observation(row, where, code, specimen, is_qc, order_index, patient_index)
            )
        codes: dict[int, list[str]] = {}
        for obs in observations:
            if obs.order_index is not None:
                found = codes.setdefault(obs.order_index, [])
                if obs.test.code not in found:
                    found.append(obs.test.code)
        built_orders = tuple(
            LabOrder(
                where=o.where,
                specimen_id=o.specimen_id,
                test_codes=tuple(codes.get(i, ())),
                is_qc=o.is_qc,
                patient_index=o.patient_index,
            )
            for i, o in enumerate(orders.values())
        )
        message = LabMessage(
            format="delimited",
            where=f"line {p.header_row + 1}",
            message_type=p.name,
            sender=observations[0].instrument_id if observations else p.instrument_id,
            patients=tuple(patients),
            orders=built_orders,
            observations=tuple(observations),
            is_qc=bool(built_orders) and all(o.is_qc for o in built_orders),
        )
        return ParseResult((message,), tuple(self.warnings))

    def patient(
        self, row: list[str], where: str, patients: list[LabPatient], keys: dict[str, int]
    ) -> int | None:
        if not any(k in self.index for k in ("patient_id", "patient_name")):
            return None
        patient_id = self.cell(row, "patient_id")
        name = self.cell(row, "patient_name")
        key = f"{patient_id}\x00{name}"
        if key in keys:
            return keys[key]
        dob_text = self.cell(row, "birth_date")
        birth_date = None
        if dob_text:
            try:
                birth_date = datetime.strptime(dob_text, self.profile.birth_date_format).date()
            except ValueError:
                birth_date = parse_birth_date(dob_text)
            if birth_date is None:
                self.warnings.append(ParseWarning("birth date is not a valid date", where))
        keys[key] = len(patients)
        patients.append(
            LabPatient(
                where=where,
                patient_id=patient_id,
                name=name,
                birth_date=birth_date,
                sex=self.cell(row, "sex"),
            )
        )
        return keys[key]

    def observation(
        self,
        row: list[str],
        where: str,
        code: str,
        specimen: str,
        is_qc: bool,
        order_index: int,
        patient_index: int | None,
    ) -> LabObservation:
        p = self.profile
        raw_value = self.cell(row, "value")
        value, comparator = self.number(raw_value, row, where)
        unit = self.cell(row, "unit")
        range_text = self.cell(row, "reference_range")
        low, high = (
            parse_reference_range(range_text, decimal_comma=p.decimal_comma)
            if range_text
            else (None, None)
        )
        flag = self.cell(row, "flag")
        if p.flag_separator and flag:
            flags = tuple(f.strip() for f in flag.split(p.flag_separator) if f.strip())
        else:
            flags = (flag,) if flag else ()
        mapped = p.test_code_map.get(code)
        comment = self.cell(row, "comment")
        return LabObservation(
            where=where,
            test=Coding(code, self.cell(row, "test_display"), p.test_system),
            test_alternates=(mapped,) if mapped else (),
            test_raw=code,
            value_type="NM" if value is not None else "ST",
            raw_value=raw_value,
            text=raw_value,
            value_components=(raw_value,) if raw_value else (),
            value=value,
            comparator=comparator,
            unit=unit,
            ucum_unit=normalise_unit(unit) if unit else None,
            reference_range=range_text,
            reference_low=low,
            reference_high=high,
            flags=flags,
            status=p.status,
            status_code="",
            specimen_id=specimen,
            instrument_id=self.cell(row, "instrument_id") or p.instrument_id,
            performed_at=self.performed(row, where),
            is_qc=is_qc,
            comments=(comment,) if comment else (),
            order_index=order_index,
            patient_index=patient_index,
        )

    def number(
        self, raw_value: str, row: list[str], where: str
    ) -> tuple[float | None, Comparator | None]:
        p = self.profile
        if "exponent" not in self.index:
            value, comparator = parse_number(raw_value, decimal_comma=p.decimal_comma)
            return value, comparator
        exponent_text = self.cell(row, "exponent")
        if not raw_value:
            return None, None
        try:
            mantissa = int(raw_value)
            exponent = int(exponent_text) if exponent_text else 0
        except ValueError:
            self.warnings.append(ParseWarning("scaled value or exponent is not an integer", where))
            return None, None
        if abs(exponent) > 30:
            self.warnings.append(ParseWarning("exponent out of range", where))
            return None, None
        return float(mantissa * p.exponent_base**exponent), None

    def performed(self, row: list[str], where: str) -> datetime | None:
        p = self.profile
        date_text = self.cell(row, "date")
        if not date_text:
            return None
        time_text = self.cell(row, "time")
        try:
            if p.time_format and time_text:
                return datetime.strptime(
                    f"{date_text} {time_text}", f"{p.date_format} {p.time_format}"
                )
            return datetime.strptime(date_text, p.date_format)
        except ValueError:
            self.warnings.append(ParseWarning("date/time does not match the profile", where))
            return None
