"""core.hl7v2: the HL7 v2 wire primitives both HL7 inboxes share (issue 15)."""

from __future__ import annotations

import pytest

from core.hl7v2 import CHARSETS, Deframer, Delimiters, charset_codec, escape, frame
from ingest.labs.parsers._hl7 import charset_codec as lab_charset_codec
from ingest.labs.parsers._hl7 import unescaper
from worklist.orders.hl7v2 import parse_message


@pytest.mark.parametrize("name", [*CHARSETS, "WINDOWS-1258", "TCVN3", " unicode utf-8 "])
def test_both_readers_know_the_same_character_sets(name: str) -> None:
    codec = charset_codec(name)
    assert codec is not None
    assert lab_charset_codec(name) == codec


def test_unknown_and_empty_charset() -> None:
    assert charset_codec("") is None
    assert charset_codec("UTF-16") is None


def test_order_reader_decodes_a_charset_only_the_lab_reader_knew() -> None:
    # 8859/3 and TCVN3 were missing from the order reader's table before issue 15.
    name = "Nguy\u1ec5n"
    raw = (
        "MSH|^~\\&|RIS|H|PACS|H|20260101120000||ORM^O01|1|P|2.5.1|||||VN|TCVN3\r"
        f"PID|||P1||{name}^An\r"
    ).encode("tcvn3")
    msg = parse_message(raw)
    assert name in msg.segments[1].get(5)


def test_escape_round_trips_through_the_lab_unescaper() -> None:
    text = "a|b^c&d~e\\f"
    escaped = escape(text)
    assert "|" not in escaped and "^" not in escaped
    assert unescaper(Delimiters(), "utf-8")(escaped) == text


def test_deframer_yields_framed_messages_and_drops_garbage() -> None:
    d = Deframer(max_message=100)
    stream = b"noise" + frame(b"MSH|one") + b"x" + frame(b"MSH|two")
    got = [m for chunk in (stream[:9], stream[9:]) for m in d.feed(chunk)]
    assert got == [b"MSH|one", b"MSH|two"]
    with pytest.raises(ValueError):
        list(Deframer(max_message=3).feed(frame(b"too long")))
