"""Property tests: any bytes either parse or raise LabMessageError, quickly.

Each parser is fed arbitrary bytes, bytes shaped like its format, and real files
with random byte flips, insertions and truncations. Anything other than a
``ParseResult`` or a ``LabMessageError`` (an IndexError, a UnicodeError, a hang)
is a bug: the watcher would crash instead of moving the file to ``rejected/``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import LabMessageError
from core.labs import ParseResult
from ingest.labs.parsers import astm, detect, hl7v2
from ingest.labs.parsers.delimited import COBAS_C111, DelimitedProfile
from ingest.labs.parsers.delimited import parse as parse_delimited
from tests.ingest.labs._framing import frame_capture

LAB_DATA = Path(__file__).resolve().parents[2] / "data" / "lab"
ASTM_FILES = sorted((LAB_DATA / "astm").glob("*.astm"))
HL7_FILES = sorted((LAB_DATA / "hl7").glob("*.hl7"))
CSV_FILES = sorted((LAB_DATA / "files").glob("*"))

VIETNAMESE = DelimitedProfile(
    name="vn",
    columns={
        "specimen_id": "Mã mẫu",
        "test_code": "Xét nghiệm",
        "value": "Kết quả",
        "exponent": "Số mũ",
    },
    delimiter="\t",
    quotechar=None,
    encoding="cp1258",
)


def _never_crashes(parse: Callable[[bytes], ParseResult], raw: bytes) -> None:
    try:
        result = parse(raw)
    except LabMessageError:
        return
    assert isinstance(result, ParseResult)


def _parse_hl7(raw: bytes) -> ParseResult:
    return hl7v2.parse(raw, skip_non_results=True)


def _parse_cobas(raw: bytes) -> ParseResult:
    return parse_delimited(raw, profile=COBAS_C111)


def _parse_vn(raw: bytes) -> ParseResult:
    return parse_delimited(raw, profile=VIETNAMESE)


def _detect(raw: bytes) -> ParseResult:
    detect(raw)
    return ParseResult(())


PARSERS: dict[str, Callable[[bytes], ParseResult]] = {
    "astm": astm.parse,
    "hl7v2": _parse_hl7,
    "cobas_c111": _parse_cobas,
    "vn": _parse_vn,
    "detect": _detect,
}

# Bytes that matter to the formats, so random input reaches the interesting paths.
_ALPHABET = st.sampled_from(
    [
        b"H|\\^&|",
        b"H|@^\\|",
        b"P|1",
        b"O|1|S|",
        b"R|1|^^^GLU|",
        b"C|1|I|",
        b"Q|1|",
        b"L|1",
        b"MSH|^~\\&|",
        b"MSH|",
        b"PID|",
        b"OBR|",
        b"OBX|1|NM|",
        b"OBX|2|SN|",
        b"NTE|1||",
        b"SPM|",
        b"ORU^R01",
        b"OUL^R22",
        b"|",
        b"^",
        b"~",
        b"&",
        b"\\",
        b"@",
        b"\r",
        b"\n",
        b"\x02",
        b"\x03",
        b"\x17",
        b"\x05",
        b"\x04",
        b"\x06",
        b"\x0b",
        b"\x1c",
        b"1",
        b"7",
        b"A",
        b"<",
        b">",
        b"5.5",
        b"\\X41\\",
        b"\\.br\\",
        b"&F&",
        b"\xc3\xa9",
        b"\xff",
        b";",
        b'"',
        b"\t",
        b"8859/1",
        b"UNICODE UTF-8",
        b"20240101120000+0100",
        b",",
    ]
)
SHAPED = st.lists(_ALPHABET, max_size=60).map(b"".join)


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=400))
def test_arbitrary_bytes(name: str, raw: bytes) -> None:
    _never_crashes(PARSERS[name], raw)


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=300, deadline=None)
@given(raw=SHAPED)
def test_format_shaped_bytes(name: str, raw: bytes) -> None:
    _never_crashes(PARSERS[name], raw)


@st.composite
def mutated(draw: st.DrawFn, files: list[Path]) -> bytes:
    """A real file with a few byte flips, insertions, deletions and a truncation."""
    data = bytearray(draw(st.sampled_from(files)).read_bytes())
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from([b"|", b"^", b"\r", b"\\", b"\x02", b"\x03"]))
        elif kind == "delete":
            del data[at]
        else:
            data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _framed(path: Path) -> bytes:
    return frame_capture(path.read_bytes(), max_text=50)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutated(ASTM_FILES))
def test_mutated_astm_files(raw: bytes) -> None:
    _never_crashes(astm.parse, raw)
    _never_crashes(_detect, raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutated(HL7_FILES))
def test_mutated_hl7_files(raw: bytes) -> None:
    _never_crashes(_parse_hl7, raw)
    _never_crashes(_detect, raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutated(CSV_FILES))
def test_mutated_exports(raw: bytes) -> None:
    _never_crashes(_parse_cobas, raw)
    _never_crashes(_parse_vn, raw)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_framed_captures(data: st.DataObject) -> None:
    capture = bytearray(_framed(data.draw(st.sampled_from(ASTM_FILES[:3]))))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(capture) - 1))
        capture[at] = data.draw(st.integers(0, 255))
    _never_crashes(astm.parse, bytes(capture))


def test_large_garbage_is_fast() -> None:
    # Quadratic scans (re-searching the rest of the file per frame or per line)
    # would show here: 2 MB of frame starts without ends, and of one long line.
    with pytest.raises(LabMessageError):
        astm.parse(b"\x05" + b"\x021" * 1_000_000)
    _never_crashes(astm.parse, b"H|\\^&\r" + b"x" * 2_000_000)
    _never_crashes(_parse_hl7, b"MSH|^~\\&|\r" + b"OBX|" * 500_000)
