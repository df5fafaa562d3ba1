"""The parser registry and format detection."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from core.errors import LabMessageError
from core.labs import ParseResult
from ingest.labs.parsers import add_plugin, available_parsers, detect, get_parser, parse

LabFile = Callable[[str], bytes]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("astm/abbott_architect_multi_message.astm", "astm"),
        ("astm/biorad_ihcom_bloodtype_two_patients.astm", "astm"),
        ("astm/immucor_galileo_result.astm", "astm"),
        ("astm/ours_astm_delims_at_caret_backslash_utf8_vi.astm", "astm"),
        ("astm/ours_e1381_framed_architect_etb_wrap_long.astm", "astm"),
        ("hl7/python_hl7_oru_r01_v24_sn_value.hl7", "hl7v2"),
        ("hl7/cdc_oru_r01_v251_utf8_micro_lf.hl7", "hl7v2"),
        ("hl7/ours_oru_oul_v251_utf8_vi_mllp_qc.hl7", "hl7v2"),
        ("hl7/cdc_natus_ack_v251.hl7", "hl7v2"),
    ],
)
def test_detect_shared_files(lab_file: LabFile, name: str, kind: str) -> None:
    assert detect(lab_file(name)) == kind


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\x05", "astm"),
        (b"\x02" + b"1H|\\^&", "astm"),
        (b"H|\\^&|||", "astm"),
        (b"1H|\\^&|||", "astm"),
        (b"H|@^\\|", "astm"),
        (b"\r\nH|\\^&", "astm"),
        (b"MSH|^~\\&|", "hl7v2"),
        (b"\xef\xbb\xbfMSH|^~\\&|", "hl7v2"),
        (b"\x0bMSH|^~\\&|", "hl7v2"),
        (b"FHS|^~\\&|", "hl7v2"),
    ],
)
def test_detect_first_bytes(head: bytes, kind: str) -> None:
    assert detect(head) == kind


@pytest.mark.parametrize(
    "head",
    [b"", b"\r\n", b'"Instr";"Msg"', b"Hello", b"MSHX", b"PID|1", b"\x06\x06"],
)
def test_detect_rejects(head: bytes) -> None:
    with pytest.raises(LabMessageError):
        detect(head)


def test_detect_does_not_name_delimited_exports(lab_file: LabFile) -> None:
    with pytest.raises(LabMessageError, match="unrecognised lab file"):
        detect(lab_file("files/roche_cobas_c111_export_semicolon.csv"))


def test_registry_names_and_unknown_name() -> None:
    assert available_parsers() == ("astm", "cobas_c111", "hl7v2")
    with pytest.raises(ValueError, match="known parsers: astm, cobas_c111, hl7v2"):
        get_parser("sysmex")


def test_registry_loads_on_first_use_and_caches() -> None:
    assert get_parser("astm") is get_parser("astm")


def test_add_plugin_and_conflict() -> None:
    add_plugin("galileo_astm", ("ingest.labs.parsers.astm", "parse"))
    try:
        assert "galileo_astm" in available_parsers()
        with pytest.raises(ValueError, match="already registered"):
            add_plugin("galileo_astm", ("ingest.labs.parsers.hl7v2", "parse"))
    finally:
        from ingest.labs import parsers

        parsers._PLUGINS.pop("galileo_astm")
        parsers._LOADED.pop("galileo_astm", None)


def test_parse_detects(lab_file: LabFile) -> None:
    result = parse(lab_file("astm/immucor_galileo_result.astm"))
    assert isinstance(result, ParseResult) and len(result.observations) == 14
    hl7 = parse(lab_file("hl7/cdc_oru_r01_v251_utf8_micro_lf.hl7"))
    assert hl7.messages[0].format == "hl7v2"
