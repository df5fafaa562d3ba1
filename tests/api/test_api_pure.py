"""Pure helpers: Accept parsing, multipart bodies, FHIR dates and tokens, DA/TM ranges."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from api.dicomweb import iter_parts, multipart_body, parse_accept
from api.dicomweb._pixels import EXPLICIT_LE, choose_frame_syntax, choose_instance_syntax
from api.fhir import parse_date_param, parse_token, searchset_bundle
from api.fhir._core import Paging
from core.errors import InvalidQueryError
from storage.index.queries import parse_match
from storage.staging import part10_prefix, read_file_meta


def test_accept_is_ordered_by_quality() -> None:
    ranges = parse_accept(
        'multipart/related; type="image/jpeg"; q=0.5, '
        'multipart/related; type="application/dicom"; transfer-syntax=*'
    )
    assert [(r.media_type, r.transfer_syntax, r.q) for r in ranges] == [
        ("application/dicom", "*", 1.0),
        ("image/jpeg", None, 0.5),
    ]
    assert parse_accept(None)[0].media_type == "*/*"


def test_multipart_round_trip_with_preamble() -> None:
    body = b"\r\n" + b"".join(
        multipart_body([("application/dicom", [b"one"]), ("application/dicom", [b"t\r\nwo"])], "B")
    )
    parts = list(iter_parts(body, "B"))
    assert [body[p.start : p.end] for p in parts] == [b"one", b"t\r\nwo"]
    assert parts[0].headers["content-type"] == "application/dicom"
    with pytest.raises(InvalidQueryError):
        list(iter_parts(b"--B\r\n\r\nunterminated", "B"))


def test_instance_and_frame_negotiation() -> None:
    dicom = parse_accept('multipart/related; type="application/dicom"')
    assert choose_instance_syntax(dicom, [EXPLICIT_LE]) == EXPLICIT_LE
    assert choose_instance_syntax(parse_accept("*/*"), ["1.2.840.10008.1.2.4.50"]) == "*"
    big_endian = "1.2.840.10008.1.2.2"
    assert choose_instance_syntax(dicom, [big_endian]) is None
    jpeg = "1.2.840.10008.1.2.4.50"
    got = choose_frame_syntax(parse_accept('multipart/related; type="image/jpeg"'), jpeg)
    assert got == (f"image/jpeg; transfer-syntax={jpeg}", False)
    assert choose_frame_syntax(parse_accept('multipart/related; type="image/jls"'), jpeg) is None


@pytest.mark.parametrize(
    ("raw", "da"),
    [
        ("2024", "20240101-20241231"),
        ("eq2024-02", "20240201-20240229"),
        ("ge2024-02-10", "20240210-"),
        ("gt2024-02-10", "20240211-"),
        ("le2024-02", "-20240229"),
        ("lt2024-03-01", "-20240229"),
        ("2024-02-10T10:00:00Z", "20240210-20240210"),
    ],
)
def test_fhir_date_to_dicom_range(raw: str, da: str) -> None:
    assert parse_date_param(raw).da_range() == da


def test_fhir_date_bounds_and_errors() -> None:
    p = parse_date_param("gt2024-01-01")
    assert p.bounds()[0] == datetime(2024, 1, 2, tzinfo=UTC)
    for bad in ("ap2024", "2024-13", "20240101", "ne2024"):
        with pytest.raises(InvalidQueryError):
            parse_date_param(bad)


def test_tokens() -> None:
    assert parse_token("CT") == parse_token("CT")
    assert parse_token("CT").system is None
    assert parse_token("|X").system == ""
    assert parse_token("urn:dicom:uid|urn:oid:1.2").code == "urn:oid:1.2"


def test_bundle_links() -> None:
    resources = [{"resourceType": "Patient", "id": str(i)} for i in range(2)]
    b = searchset_bundle(
        base="http://h/fhir",
        path="Patient",
        params=[("name", "x")],
        entries=resources,
        total=5,
        paging=Paging(2, 2),
    )
    links = {link["relation"]: link["url"] for link in b["link"]}
    assert links["next"].endswith("name=x&_count=2&_offset=4")
    assert links["previous"].endswith("_offset=0")
    assert links["last"].endswith("_offset=4")
    assert b["entry"][0]["fullUrl"] == "http://h/fhir/Patient/0"
    # No total (_total=none, or past what was counted): no last link, and next only
    # after a full page.
    kw: dict[str, Any] = {"base": "http://h/fhir", "path": "Patient", "params": [],
                          "total": None}
    unknown = searchset_bundle(entries=resources, paging=Paging(2, 2), **kw)
    assert "total" not in unknown
    assert {link["relation"] for link in unknown["link"]} == {"self", "first", "previous",
                                                              "next"}
    short = searchset_bundle(entries=resources[:1], paging=Paging(2, 2), **kw)
    assert "next" not in {link["relation"] for link in short["link"]}


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("StudyDate", "2024"), ("StudyTime", "25"), ("InstanceNumber", "one"), ("Foo", "1")],
)
def test_malformed_matches(keyword: str, value: str) -> None:
    with pytest.raises(InvalidQueryError):
        parse_match(keyword, value)


def testread_file_meta_finds_dataset_start() -> None:
    prefix = part10_prefix("1.2.3", "4.5.6", EXPLICIT_LE)
    meta, offset = read_file_meta(prefix + b"\x08\x00\x16\x00UI\x00\x00")
    assert offset == len(prefix)
    assert meta[0x0003].rstrip(b"\x00") == b"4.5.6"
