"""The shared parse_* helpers and the UCUM table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from core.lab_values import (
    parse_number,
    parse_reference_range,
    parse_status,
    parse_timestamp,
)
from core.labs import ResultStatus
from ingest.labs.units import normalise_unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12.5", (12.5, None)),
        ("-3", (-3.0, None)),
        (".5", (0.5, None)),
        ("<0.5", (0.5, "<")),
        ("> 8", (8.0, ">")),
        (">=1e3", (1000.0, ">=")),
        ("=<2", (2.0, "<=")),
        ("3+", (None, None)),
        ("***.**", (None, None)),
        ("1,5", (None, None)),
        ("nan", (None, None)),
        ("inf", (None, None)),
        ("", (None, None)),
    ],
)
def test_parse_number(text: str, expected: tuple[float | None, str | None]) -> None:
    assert parse_number(text) == expected


def test_parse_number_decimal_comma() -> None:
    assert parse_number("1,5", decimal_comma=True) == (1.5, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.5-5.0", (3.5, 5.0)),
        ("3.5 to 5.0", (3.5, 5.0)),
        ("70_105", (70.0, 105.0)),
        ("4.50&5.90", (4.5, 5.9)),
        ("-10 - -2", (-10.0, -2.0)),
        ("<30", (None, 30.0)),
        ("<=30", (None, 30.0)),
        (">5", (5.0, None)),
        ("Negative", (None, None)),
        ("", (None, None)),
    ],
)
def test_parse_reference_range(text: str, expected: tuple[float | None, float | None]) -> None:
    assert parse_reference_range(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20250613101844", datetime(2025, 6, 13, 10, 18, 44)),
        ("202309260758", datetime(2023, 9, 26, 7, 58)),
        ("20220311", datetime(2022, 3, 11)),
        ("2022", datetime(2022, 1, 1)),
        ("20230101010000-0000", datetime(2023, 1, 1, 1, tzinfo=UTC)),
        (
            "20240315083000.1234+0700",
            datetime(2024, 3, 15, 8, 30, 0, 123400, tzinfo=timezone(timedelta(hours=7))),
        ),
        ("DOB", None),
        ("196203520", None),
        ("20241301", None),
        ("", None),
    ],
)
def test_parse_timestamp(text: str, expected: datetime | None) -> None:
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    ("code", "astm", "expected"),
    [
        ("F", False, ResultStatus.FINAL),
        ("R", True, ResultStatus.FINAL),
        ("P", False, ResultStatus.PRELIMINARY),
        ("C", False, ResultStatus.CORRECTED),
        ("X", False, ResultStatus.CANCELLED),
        ("W", False, ResultStatus.CANCELLED),
        ("W", True, ResultStatus.PRELIMINARY),
        ("", False, None),
        ("?", False, None),
    ],
)
def test_parse_status(code: str, astm: bool, expected: ResultStatus | None) -> None:
    assert parse_status(code, astm=astm) is expected


@pytest.mark.parametrize(
    ("unit", "ucum"),
    [
        ("mmol/L", "mmol/L"),
        ("mg/dl", "mg/dL"),
        ("g/l", "g/L"),
        ("G/L", "10*9/L"),
        ("10^9/L", "10*9/L"),
        ("10e9/L", "10*9/L"),
        ("x10^9/L", "10*9/L"),
        ("%", "%"),
        ("U/L", "U/L"),
        ("fL", "fL"),
        ("pg", "pg"),
        ("µmol/L", "umol/L"),
        ("mIU/mL", "m[IU]/mL"),
        ("S/CO", None),
        ("", None),
    ],
)
def test_normalise_unit(unit: str, ucum: str | None) -> None:
    assert normalise_unit(unit) == ucum
