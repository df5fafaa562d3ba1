"""core/hl7v2.py: the one ACK builder and unescape of every HL7 v2 reader (issue 15)."""

from __future__ import annotations

from datetime import datetime

from core.hl7v2 import AckError, Delimiters, build_ack, msh_fields, unescaper

NOW = datetime(2026, 12, 2, 10, 30)
A40 = (
    b"MSH|^~\\&|HIS|BVTW|PACSLAB|BVTW|20261202103000||ADT^A40^ADT_A39|C1|P|2.5.1\r"
    b"PID|1||BN1\rMRG|TMP1\r"
)


def test_ack_echoes_the_header_and_reports_the_error() -> None:
    ack = build_ack(
        msh_fields(A40), "AE", now=NOW, ack_control_id="K1",
        error=AckError(204, "MRG^1^1", "unknown | patient"),
    )  # fmt: skip
    msh, msa, err = ack.decode().rstrip("\r").split("\r")
    assert msh == "MSH|^~\\&|PACSLAB|BVTW|HIS|BVTW|20261202103000||ACK^A40^ACK|K1|P|2.5.1"
    assert msa == "MSA|AE|C1"
    assert err == "ERR||MRG^1^1|204^Unknown key identifier^HL70357|E||||unknown \\F\\ patient"


def test_ack_for_a_message_without_msh() -> None:
    assert msh_fields(b"garbage\r") == []
    ack = build_ack([], "AR", now=NOW, ack_control_id="K2", error=AckError(100))
    assert ack.decode().split("\r")[:2] == [
        "MSH|^~\\&|PACSLAB||||20261202103000||ACK|K2|P|2.5.1",
        "MSA|AR|",
    ]


def test_unescape_hex_in_the_message_charset_and_delimiters() -> None:
    latin = unescaper(Delimiters(), "latin-1")
    assert latin("M\\XDC\\LLER \\T\\ \\S\\ \\E\\") == "MÜLLER & ^ \\"
    assert unescaper(Delimiters(), "utf-8")("A\\.br\\B\\H\\C\\N\\") == "A\nBC"
