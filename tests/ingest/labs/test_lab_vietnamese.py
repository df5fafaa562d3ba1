"""Lab data as a Vietnamese hospital sends it (issue 18, part 4).

Our own fixtures, built here byte by byte: HL7 v2 with MSH-18 ``WINDOWS-1258`` and
``TCVN3``, ASTM in TCVN3 and UTF-8, values written with a decimal comma, a critical
potassium written ``7,85``, and a framed capture with irregular frame numbers.
The TCVN3 table is checked against the well-known look of VN3 text shown in
Latin-1 ("Hµ Néi" for "Hà Nội"), which is how every Vietnamese user recognises it.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.charsets import TCVN3_DECODING, codec_for, decode_text
from core.errors import LabMessageError
from core.lab_values import is_unambiguous_decimal_comma, parse_number, parse_reference_range
from core.settings import LabCriticalLimit, Settings
from ingest.labs.parsers import astm, hl7v2
from ingest.labs.profiles import InboxProfile, parse_file
from services.lab_results import plan_results
from storage.lab import LabResultQuery
from tests.ingest.labs._framing import ENQ, EOT, frame
from tests.ingest.labs.lab_support import LabRig, lab_settings, make_rig

NAME = "Nguyễn Thị Hương"
CITY = "Bệnh viện Đa khoa tỉnh Hà Giang"


def cp1258(text: str) -> bytes:
    """Encode as Windows-1258 does: base letter, then a combining tone mark.

    cp1258 has precomposed Â, Ê, Ô, Ơ, Ư, Ă, Đ (and some toned Latin-1 letters) but
    writes the five tone marks as combining characters 0xCC, 0xEC, 0xD2, 0xDE, 0xF2.
    """
    tones = {"\u0300", "\u0301", "\u0303", "\u0309", "\u0323"}
    out = bytearray()
    for ch in unicodedata.normalize("NFC", text):
        try:
            out += ch.encode("cp1258")
            continue
        except UnicodeEncodeError:
            pass
        decomposed = unicodedata.normalize("NFD", ch)
        base = unicodedata.normalize("NFC", "".join(c for c in decomposed if c not in tones))
        out += base.encode("cp1258")
        out += "".join(c for c in decomposed if c in tones).encode("cp1258")
    return bytes(out)


# -- decimal comma ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7,85", (7.85, None)),
        ("0,123", (0.123, None)),
        ("1234,5", (1234.5, None)),
        (",5", (0.5, None)),
        ("<0,5", (0.5, "<")),
        ("-2,5", (-2.5, None)),
        ("1,234", (None, None)),  # could be one thousand two hundred and thirty-four
        ("12,500", (None, None)),
        ("1.234,5", (None, None)),
        ("1,2,3", (None, None)),
        ("7,", (None, None)),
        ("7.85", (7.85, None)),
    ],
)
def test_auto_reads_only_an_unambiguous_decimal_comma(
    text: str, expected: tuple[float | None, str | None]
) -> None:
    assert parse_number(text, decimal_comma="auto") == expected


def test_unambiguous_rule_and_ranges() -> None:
    assert is_unambiguous_decimal_comma("3,5")
    assert not is_unambiguous_decimal_comma("100,000")
    assert parse_reference_range("3,5-5,1", decimal_comma="auto") == (3.5, 5.1)
    assert parse_reference_range("1,000-2,000", decimal_comma="auto") == (None, None)
    # The default stays strict: a comma is text unless a caller says otherwise.
    assert parse_number("7,85") == (None, None)


ASTM_COMMA = (
    b"H|\\^&|||CHEM-VN|||||||P|1|20260301083000\r"
    b"P|1||BN-0001\r"
    b"O|1|S-VN-1||^^^K\\^^^NA|R\r"
    b"R|1|^^^K|7,85|mmol/L|3,5-5,1|HH||F||||20260301083500\r"
    b"R|2|^^^NA|1,234|mmol/L|135-145|N||F||||20260301083500\r"
    b"L|1|N\r"
)


def test_astm_auto_profile_reads_a_comma_decimal_and_says_so() -> None:
    fmt, result = parse_file(ASTM_COMMA, InboxProfile("auto"))
    assert fmt == "astm"
    k, na = result.observations
    assert (k.value, k.value_type, k.reference_low, k.reference_high) == (7.85, "NM", 3.5, 5.1)
    assert (na.value, na.value_type, na.text) == (None, "ST", "1,234")
    assert [w.message for w in result.warnings] == ["comma read as the decimal mark in 1 value(s)"]
    # A profile that declares the point keeps the comma value as text.
    _, strict = parse_file(ASTM_COMMA, InboxProfile("pt", decimal_comma=False))
    assert strict.observations[0].value is None


def test_critical_limit_applies_to_a_value_written_with_a_comma() -> None:
    limits = {"K": LabCriticalLimit(high=6.0)}
    # No panic flag, so only the limit can make it critical.
    raw = ASTM_COMMA.replace(b"|HH|", b"|H|")
    for profile in (InboxProfile("auto"), InboxProfile("pt", decimal_comma=False)):
        fmt, parsed = parse_file(raw, profile)
        results = plan_results(parsed, file_sha256="0" * 64, fmt=fmt, critical=limits)
        k = next(r for r in results if r.test_code == "K")
        assert (k.is_critical, k.critical_reason) == (True, "above critical high 6")
        na = next(r for r in results if r.test_code == "NA")
        assert not na.is_critical


# -- character sets ------------------------------------------------------------------


def test_tcvn3_table_is_the_vn3_standard() -> None:
    # The same text in VN3, seen through Latin-1: the classic look of VN3 files.
    assert "Hà Nội".encode("tcvn3").decode("latin-1") == "Hµ Néi"
    assert "Nguyễn Thị Dương".encode("tcvn3").decode("latin-1") == "NguyÔn ThÞ D\xad¬ng"
    assert "Đà Nẵng".encode("tcvn3").decode("latin-1") == "§µ N½ng"
    assert "Việt Nam".encode("vn3") == b"Vi\xd6t Nam"
    high = [c for c in TCVN3_DECODING[0x80:] if c != "\ufffe"]
    # 7 letters with a base diacritic in each case, plus 12 vowels x 5 tones, lower case.
    assert len(high) == len(set(high)) == 14 + 60
    vowels = "aăâeêioôơuưy"
    toned = {
        unicodedata.normalize("NFC", v + t)
        for v in vowels
        for t in "\u0300\u0309\u0303\u0301\u0323"
    }
    assert toned <= set(high)
    with pytest.raises(UnicodeDecodeError):
        b"\x80".decode("tcvn3")


def test_windows_1258_decodes_to_nfc() -> None:
    raw = cp1258(NAME)
    assert b"\xcc" in raw or b"\xec" in raw or b"\xd2" in raw or b"\xde" in raw or b"\xf2" in raw
    assert decode_text(raw, "cp1258") == unicodedata.normalize("NFC", NAME)
    assert codec_for("Windows-1258") == "cp1258"
    assert codec_for(" vn3 ") == "tcvn3"


def _hl7(msh18: str, encode: object, value: str = "7,85") -> bytes:
    assert callable(encode)
    segments = [
        f"MSH|^~\\&|LIS|{CITY}|HIS|BV|20260301083000||ORU^R01|MSG-1|P|2.5.1|||||VNM|{msh18}",
        f"PID|1||BN-0001^^^BV^MR||{NAME.replace(' ', '^', 1)}||19800101|F",
        "OBR|1|ORD-1|FIL-1|2823-3^Kali^LN",
        f"OBX|1|NM|2823-3^Kali^LN||{value}|mmol/L|3,5-5,1|H|||F|||20260301083500",
        "NTE|1||Mẫu bị tan máu nhẹ",
    ]
    return encode("\r".join(segments) + "\r")  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("msh18", "encode"),
    [
        ("WINDOWS-1258", cp1258),
        ("CP1258", cp1258),
        ("TCVN3", lambda t: t.encode("tcvn3")),
        ("VN3", lambda t: t.encode("tcvn3")),
        ("UNICODE UTF-8", lambda t: unicodedata.normalize("NFD", t).encode("utf-8")),
    ],
)
def test_hl7_msh18_vietnamese_charsets(msh18: str, encode: object) -> None:
    raw = _hl7(msh18, encode)
    result = hl7v2.parse(raw, decimal_comma="auto")
    (msg,) = result.messages
    (patient,) = msg.patients
    family, given = NAME.split(" ", 1)
    assert patient.name.split("^")[:2] == [family, given]
    assert all(unicodedata.is_normalized("NFC", p) for p in patient.name.split("^"))
    (obs,) = msg.observations
    assert (obs.value, obs.reference_low, obs.reference_high) == (7.85, 3.5, 5.1)
    assert obs.comments == ("Mẫu bị tan máu nhẹ",)
    assert "comma read as the decimal mark in 1 value(s)" in [w.message for w in result.warnings]


def test_astm_tcvn3_profile_encoding() -> None:
    raw = (
        "H|\\^&|||HEMA-VN\rP|1||BN-2||Trần^Văn Đức\rO|1|S-2||^^^WBC\r"
        "R|1|^^^WBC|12,4|10*9/L|4-10|H||F\rC|1|I|Mẫu đông|G\rL|1|N\r"
    ).encode("tcvn3")
    _, result = parse_file(raw, InboxProfile("vn", encoding="VN3"))
    (obs,) = result.observations
    assert result.messages[0].patients[0].name == "Trần^Văn Đức"
    assert (obs.value, obs.comments) == (12.4, ("Mẫu đông",))


# -- irregular frame numbering -----------------------------------------------------------


def _irregular_capture() -> bytes:
    records = [
        b"H|\\^&|||XN-350^QC|||||||Q|1|20260301070000\r",
        b"O|1|QC-LOT-1||^^^WBC\\^^^RBC|R||||||Q\r",
        b"R|1|^^^WBC|7,02|10*3/uL||N||F\r",
        b"R|2|^^^RBC|4,51|10*6/uL||N||F\r",
        b"L|1|N\r",
    ]
    numbers = [1, 2, 2, 0, 4]  # repeats, restarts at 0, skips: checksums all verify
    return (
        ENQ + b"".join(frame(n, r, last=True) for n, r in zip(numbers, records, strict=True)) + EOT
    )


def test_live_strictness_still_rejects_irregular_numbering() -> None:
    with pytest.raises(LabMessageError, match="frame number 2 where 3 was expected"):
        astm.parse(_irregular_capture())


def test_captured_file_with_irregular_numbering_is_read_with_a_warning() -> None:
    fmt, result = parse_file(_irregular_capture(), InboxProfile("auto"))
    assert fmt == "astm"
    assert [(o.test.code, o.value, o.is_qc) for o in result.observations] == [
        ("WBC", 7.02, True),
        ("RBC", 4.51, True),
    ]
    messages = [w.message for w in result.warnings]
    assert messages[0].startswith("frame number 2 where 3 was expected (irregular numbering")
    assert "3 frames numbered out of sequence in all" in messages


def test_a_bad_checksum_still_rejects_a_capture() -> None:
    capture = bytearray(_irregular_capture())
    capture[capture.index(b"7,02")] = ord("8")
    with pytest.raises(LabMessageError, match="checksum mismatch"):
        parse_file(bytes(capture), InboxProfile("auto"))


# -- end to end through the inbox and FHIR --------------------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[LabRig]:
    base = Settings(data_dir=tmp_path / "data", auth={"enabled": False})
    settings = lab_settings(base, critical={"2823-3": {"high": 6.0}})
    yield from make_rig(settings)


def test_inbox_critical_comma_value_is_numeric_in_fhir(rig: LabRig, tmp_path: Path) -> None:
    source = tmp_path / "vn_kali_cp1258.hl7"
    source.write_bytes(_hl7("WINDOWS-1258", cp1258).replace(b"|H|||F|", b"|N|||F|"))
    rig.drop(source)
    (outcome,) = rig.run()
    assert outcome.status == "ingested"
    summary = json.loads((rig.inbox() / "processed" / f"{source.name}.summary.json").read_text())
    assert summary["critical_results"] == 1
    assert "comma read as the decimal mark in 1 value(s)" in " ".join(summary["warnings"])
    (stored,) = rig.store.search_results(LabResultQuery(qc=None, limit=10))[0]
    assert (stored.value, stored.is_critical, stored.patient_name) == (
        7.85,
        True,
        NAME.replace(" ", "^", 1),
    )
    with TestClient(create_app(rig.settings)) as client:
        bundle = client.get("/fhir/Observation", params={"code": "http://loinc.org|2823-3"}).json()
    (entry,) = bundle["entry"]
    assert entry["resource"]["valueQuantity"]["value"] == 7.85


def test_encode_text_for_vietnamese_code_pages() -> None:
    from core.charsets import encode_text

    name = "TRẦN Thị Hương"
    assert decode_text(encode_text(name, "cp1258"), "cp1258") == name
    assert encode_text(name, "cp1258") == cp1258(name)
    # VN3: upper-case toned letters take the lower-case code (upper-case VN3 fonts).
    assert decode_text(encode_text(name, "tcvn3"), "tcvn3") == "TRầN Thị Hương"
    assert encode_text("日本", "latin-1") == b"??"
