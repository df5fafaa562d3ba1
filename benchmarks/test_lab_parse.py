"""Lab parser throughput: results per second on one core (target ≥ 20,000/s).

Synthetic files shaped like the real captures in ``tests/data/lab``: an ASTM
stream of 10,000 R records (100 messages × 10 orders × 10 results), the same
stream in E1381 frames, and HL7 ORU^R01 files with 10,000 OBX (100 messages ×
100 OBX). A normal run (``--benchmark-disable`` in addopts) parses each file once
as a smoke test; ``--benchmark-enable`` measures, and ``results_per_s`` appears in
the ``extra_info`` of the JSON report and in the test's printed output.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from benchmarks.support import Goal, record
from core.labs import ParseResult
from ingest.labs.parsers import astm, hl7v2
from tests.ingest.labs._framing import frame_capture

RESULTS = 10_000
TESTS = [
    ("GLU", "Glucose", "5.4", "mmol/L", "3.9-6.1", "N"),
    ("NA", "Sodium", "140", "mmol/L", "135-145", "N"),
    ("K", "Potassium", "5.8", "mmol/L", "3.5-5.1", "H"),
    ("WBC", "Leukocytes", "12.5", "10^9/L", "4.0-10.0", "H"),
    ("HGB", "Haemoglobin", "13.2", "g/dL", "12.0-16.0", "N"),
    ("CRP", "C-reactive protein", "<0.5", "mg/L", "<5", "N"),
    ("ALT", "Alanine aminotransferase", "40", "U/L", "7-56", "N"),
    ("MCV", "Mean cell volume", "88", "fL", "80-100", "N"),
    ("HBA1C", "Haemoglobin A1c", "6.1", "%", "4.0-5.6", "H"),
    ("TROP", "Troponin", ">50000", "ng/L", "<14", "HH"),
]


def synthetic_astm(results: int = RESULTS) -> bytes:
    lines = []
    per_message = 100
    for m in range(results // per_message):
        lines.append(f"H|\\^&|||SIM^1.0^SN{m:04d}|||||LIS||P|LIS2-A2|20240315083000")
        lines.append(f"P|1|PID{m:06d}|||Doe^Jane||19800101|F")
        for o in range(per_message // len(TESTS)):
            specimen = f"S{m:04d}{o:02d}"
            codes = "\\".join(f"^^^{t[0]}" for t in TESTS)
            lines.append(f"O|{o + 1}|{specimen}||{codes}|R||||||N")
            for r, (code, name, value, unit, ref, flag) in enumerate(TESTS, 1):
                lines.append(
                    f"R|{r}|^^^{code}^{name}|{value}|{unit}|{ref}|{flag}||F||op1||"
                    f"20240315081500|ANALYZER-01"
                )
        lines.append("L|1|N")
    return ("\r".join(lines) + "\r").encode("latin-1")


def synthetic_hl7(results: int = RESULTS) -> bytes:
    messages = []
    per_message = 100
    for m in range(results // per_message):
        segments = [
            f"MSH|^~\\&|LAB|HOSP|PACSLAB|RAD|20240315083000+0100||ORU^R01^ORU_R01|C{m:06d}|P|2.5.1",
            f"PID|1||PID{m:06d}^^^HOSP^MR||Doe^Jane||19800101|F",
        ]
        for o in range(per_message // len(TESTS)):
            segments.append(f"OBR|{o + 1}|PL{m}-{o}|FI{m}-{o}|PANEL^Panel^L|||20240315070000")
            for r, (code, name, value, unit, ref, flag) in enumerate(TESTS, 1):
                unit_field = unit.replace("^", "\\S\\")
                segments.append(
                    f"OBX|{r}|NM|{code}^{name}^L^1234-5^{name}^LN||{value}|{unit_field}|{ref}|"
                    f"{flag}|||F|||20240315081500+0100"
                )
        messages.append("\r".join(segments))
    return ("\r".join(messages) + "\r").encode("latin-1")


def _framed_astm() -> bytes:
    return frame_capture(synthetic_astm(), max_text=240)


CASES: dict[str, tuple[Callable[[], bytes], Callable[[bytes], ParseResult]]] = {
    "astm": (synthetic_astm, astm.parse),
    "astm-e1381": (_framed_astm, astm.parse),
    "hl7v2-oru": (synthetic_hl7, hl7v2.parse),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lab_parse_throughput(benchmark: BenchmarkFixture, case: str) -> None:
    build, parse = CASES[case]
    raw = build()
    result = benchmark(parse, raw)
    assert len(result.observations) == RESULTS
    assert result.observations[2].flags == ("H",)
    assert result.observations[9].comparator == ">"
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        mean = stats.stats.mean
        benchmark.extra_info["results_per_s"] = round(RESULTS / mean)
        print(f"{case}: {RESULTS / mean:,.0f} results/s ({len(raw):,} bytes)")
        record(f"lab parse {case}, results/s (one core)", "pacslab", RESULTS / mean,
               "results/s", rounds=[RESULTS / t for t in stats.stats.data],
               goal=Goal(">=", 20_000.0))
