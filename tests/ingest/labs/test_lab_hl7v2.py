"""HL7 v2 result parsing: each shared file's observations or rejection reason."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from core.errors import LabMessageError
from core.labs import Coding, ResultStatus
from ingest.labs.parsers import hl7v2
from ingest.labs.parsers._hl7 import (
    Delimiters,
    decode_message,
    split_messages,
    split_segments,
    unescaper,
)

LabFile = Callable[[str], bytes]


@pytest.mark.parametrize(
    ("name", "kind", "reason"),
    [
        (
            "hl7/cdc_ca_oml_o21_v251_malformed_joined_segments.hl7",
            "OML^O21",
            "OML^O21 is an order, not a result message",
        ),
        ("hl7/cdc_epic_orm_o01_v23.hl7", "ORM^O01", "ORM^O01 is an order, not a result message"),
        (
            "hl7/cdc_orm_o01_v251_order_linked.hl7",
            "ORM^O01",
            "ORM^O01 is an order, not a result message",
        ),
        ("hl7/cdc_natus_ack_v251.hl7", "ACK", "ACK is an acknowledgement, not a result message"),
        (
            "hl7/hl7apy_oml_o33_v25_multi_specimen.hl7",
            "OML^O33",
            "OML^O33 is an order, not a result message",
        ),
        (
            "hl7/hapi_oml_o21_oul_r22_multi_v251.hl7",
            "OML^O21",
            "OML^O21 is an order, not a result message",
        ),
    ],
)
def test_non_result_messages_are_rejected_with_their_type(
    lab_file: LabFile, name: str, kind: str, reason: str
) -> None:
    raw = lab_file(name)
    assert hl7v2.message_type(raw) == kind
    with pytest.raises(LabMessageError) as info:
        hl7v2.parse(raw)
    assert info.value.reason == reason
    assert info.value.where == "message 1, segment 1 (MSH)"


def test_other_kinds_of_message_are_named() -> None:
    assert hl7v2.describe_message_type("ADT^A01") == (
        "ADT^A01 is a patient administration message, not a result message"
    )
    assert hl7v2.describe_message_type("ORL^O34") == (
        "ORL^O34 is an order response, not a result message"
    )
    assert hl7v2.describe_message_type("ZZZ^Z01") == (
        "ZZZ^Z01 is not a result message (expected ORU or OUL)"
    )
    assert hl7v2.describe_message_type("ORU^R01") is None
    assert hl7v2.describe_message_type("") == "MSH-9 message type is empty"


def test_python_hl7_sn_value_and_invalid_fn_type(lab_file: LabFile) -> None:
    result = hl7v2.parse(lab_file("hl7/python_hl7_oru_r01_v24_sn_value.hl7"))
    (message,) = result.messages
    assert (message.message_type, message.control_id) == ("ORU^R01", "CNTRL-3456")
    assert message.timestamp == datetime(2002, 2, 15, 9, 30)
    sn, fn = message.observations
    assert sn.value_type == "SN"
    assert (sn.raw_value, sn.text, sn.value, sn.comparator) == ("^182", "182", 182.0, None)
    assert (sn.unit, sn.ucum_unit) == ("mg/dl", "mg/dL")
    assert (sn.reference_range, sn.reference_low, sn.reference_high) == ("70_105", 70.0, 105.0)
    assert sn.flags == ("H",) and sn.status is ResultStatus.FINAL
    assert sn.test == Coding("1554-5", "GLUCOSE", "POST 12H CFST:MCNC:PT:SER/PLAS:QN")
    assert fn.value_type == "FN" and fn.value is None and fn.text == "^182"
    warnings = [w.message for w in result.warnings]
    assert "OBX-2 value type 'FN' is not in HL7 table 0125; read as text" in warnings
    assert "PID-7 birth date is not a valid date" in warnings  # 196203520 has 9 digits
    patient = message.patient
    assert patient is not None and patient.patient_id == "555-44-4444"
    assert patient.birth_date is None


def test_epic_dual_coding_and_28_nte_lines(lab_file: LabFile) -> None:
    (message,) = hl7v2.parse(lab_file("hl7/cdc_epic_oru_r01_v23_nte_dualcoding.hl7")).messages
    factor_v, interpretation, reviewer = message.observations
    assert factor_v.test == Coding("21838", "Factor V Leiden (R506Q) Mutation, B", "MAYO")
    assert factor_v.loinc == "21668-9"
    assert (factor_v.value_type, factor_v.text, factor_v.reference_range) == (
        "ST",
        "Negative",
        "Negative",
    )
    assert factor_v.performed_at == datetime(2023, 9, 26, 7, 54)
    assert len(interpretation.comments) == 22
    assert interpretation.comments[0] == "This individual DOES NOT have the factor V Leiden F5"
    assert len(reviewer.comments) == 6
    assert sum(len(o.comments) for o in message.observations) == 28
    assert message.orders[0].specimen_id == "23MAYO-265S0173"
    assert message.orders[0].placer_order_id == "1008303116"
    assert message.orders[0].test_codes == ("F5DNA",)


def test_oracle_ranges_flags_and_sub_id(lab_file: LabFile) -> None:
    (message,) = hl7v2.parse(lab_file("hl7/cdc_oracle_oru_r01_v23_refrange_flags.hl7")).messages
    albumin, creatinine, ratio = message.observations
    assert (albumin.value, albumin.unit, albumin.loinc) == (2.1, "mg/dL", "14957-5")
    assert (creatinine.reference_low, creatinine.reference_high) == (28.0, 217.0)
    assert (ratio.value, ratio.unit, ratio.ucum_unit) == (36.0, "mg/g crea", None)
    assert (ratio.reference_range, ratio.reference_low, ratio.reference_high) == ("<30", None, 30.0)
    assert ratio.flags == ("H",)
    assert {o.sub_id for o in message.observations} == {"MACR"}
    assert len(ratio.comments) == 7  # the performing-lab footer follows OBX 3
    assert ratio.comments[3] == "AMERICAN ESOTERIC LABORATORIES-MEMPHIS"
    order = message.orders[0]
    assert (order.specimen_id, order.placer_order_id) == ("335707581", "9710754487")
    assert order.action_code == "RE" and order.priority == "R"


def test_utf8_micro_sign_without_msh18(lab_file: LabFile) -> None:
    (obs,) = hl7v2.parse(lab_file("hl7/cdc_oru_r01_v251_utf8_micro_lf.hl7")).observations
    assert (obs.value, obs.unit, obs.ucum_unit) == (0.5, "µmol/L", "umol/L")
    assert obs.flags == ("N",) and obs.sub_id == "1"
    assert obs.loinc == "47633-3"
    assert obs.performed_at == datetime(2024, 2, 12, 10, 30, 49)


def test_result_linked_to_order_by_placer_and_filler(lab_file: LabFile) -> None:
    (message,) = hl7v2.parse(lab_file("hl7/cdc_oru_r01_v251_result_linked.hl7")).messages
    assert message.timestamp == datetime(2023, 1, 1, 1, 0, tzinfo=UTC)
    order = message.orders[0]
    assert (order.placer_order_id, order.filler_order_id) == ("4560411583", "20231561137")
    assert order.specimen_id == "423787478"  # SPM-2 placer EI, subcomponents dropped
    (obs,) = message.observations
    assert obs.coded_value == Coding("LA12432-3", "Acceptable", "LN")
    assert obs.text == "Acceptable" and obs.specimen_id == "423787478"
    assert obs.performed_at == datetime(2023, 6, 6, 19, 16, 13)  # OBX-19 over OBX-14


def test_genexpert_subcomponents_and_sub_ids(lab_file: LabFile) -> None:
    (message,) = hl7v2.parse(
        lab_file("hl7/cepheid_genexpert_oru_r32_v25_subcomponents.hl7")
    ).messages
    assert message.message_type == "ORU^R32"
    assert len(message.observations) == 23
    first = message.observations[0]
    assert first.test.code == "CTNG&CT&CT-NG IUO Assay&1"
    assert (first.sub_id, first.text) == ("CT", "NOT DETECTED")
    assert first.comments == ("Notes^^notes for OBM",)
    ng = message.observations[10]
    assert (ng.sub_id, ng.text) == ("NG", "DETECTED")
    ct = message.observations[12]
    assert (ct.sub_id, ct.raw_value) == ("NG2&Ct", "^31.1")
    assert {o.specimen_id for o in message.observations} == {"sidOBM"}


def test_hapi_batch_results_when_orders_are_skipped(lab_file: LabFile) -> None:
    result = hl7v2.parse(lab_file("hl7/hapi_oml_o21_oul_r22_multi_v251.hl7"), skip_non_results=True)
    assert [m.message_type for m in result.messages] == ["OUL^R22"] * 4 + ["ORU^R01"]
    assert [m.control_id for m in result.messages] == [
        "msgOF103",
        "msgOF105",
        "msgOF108",
        "msgOF110",
        "LAB562901",
    ]
    assert [len(m.observations) for m in result.messages] == [2, 4, 4, 6, 5]
    skipped = [w.message for w in result.warnings if w.message.startswith("skipped")]
    assert len(skipped) == 8
    assert "skipped: ORL^O34 is an order response, not a result message" in skipped
    oul = result.messages[3]
    cancelled = oul.observations[3]
    assert (cancelled.status, cancelled.status_code, cancelled.value) == (
        ResultStatus.CANCELLED,
        "X",
        None,
    )
    pre = oul.observations[1]
    assert (pre.value, pre.unit, pre.ucum_unit, pre.flags) == (4200.0, "umol/l", "umol/L", ("N",))
    assert (pre.reference_low, pre.reference_high) == (4000.0, 6100.0)
    assert {o.specimen_id for o in oul.observations} == {"123456781"}
    oru = result.messages[4]
    hb = oru.observations[0]
    assert (hb.value, hb.unit, hb.loinc, hb.status_code) == (14.31, "g/dL", "4546-8", "F")
    assert hb.flags == ()  # OBX-8 empty; "A" is OBX-10 nature of abnormal test
    rbc = oru.observations[2]
    assert (rbc.reference_low, rbc.reference_high) == (4.5, 5.9)  # "4.50&5.90"
    assert (rbc.unit, rbc.ucum_unit) == ("mill/mm3", "10*6/uL")


def test_our_latin1_crlf_value_types(lab_file: LabFile) -> None:
    result = hl7v2.parse(lab_file("hl7/ours_oru_r01_v251_8859-1_crlf_value_types.hl7"))
    (message,) = result.messages
    assert message.timestamp == datetime(2024, 3, 15, 8, 30, tzinfo=timezone(timedelta(hours=1)))
    assert message.patient is not None and message.patient.name == "Müller^Jürgen"
    assert message.patient.birth_date == date(1970, 1, 2)
    assert [o.specimen_id for o in message.orders] == ["FI-1", "FI-2"]
    obs = message.observations
    assert len(obs) == 11
    assert [o.order_index for o in obs] == [0] * 9 + [1, 1]
    aptt, crp, titer = obs[1], obs[2], obs[3]
    assert (aptt.raw_value, aptt.text, aptt.value, aptt.comparator) == ("^>^8", ">8", 8.0, ">")
    assert aptt.status is ResultStatus.PRELIMINARY
    assert aptt.performed_at == datetime(
        2024, 3, 15, 8, 15, 0, 123000, tzinfo=timezone(-timedelta(hours=5))
    )
    assert (crp.value, crp.comparator, crp.reference_high) == (0.5, "<", 5.0)
    assert (titer.text, titer.value) == ("1:128", None)
    creat = obs[4]
    assert (creat.unit, creat.ucum_unit, creat.status) == (
        "µmol/L",
        "umol/L",
        ResultStatus.CORRECTED,
    )
    assert obs[5].text == "a|b^c&d~e\\f AB"
    assert obs[6].text == "Zeile eins\nZeile zwei\nAbsatz zwei"
    assert obs[6].comments == ("Kommentar zum Befund: geprüft",)
    culture = obs[7]
    assert culture.coded_value == Coding("3092008", "Staphylococcus aureus", "SCT")
    assert obs[8].value_type == "ED" and obs[8].text == "JVBERi0xLjQK"
    assert (obs[9].value, obs[9].ucum_unit, obs[9].flags) == (12.5, "10*9/L", ("H",))
    assert (obs[10].raw_value, obs[10].value, obs[10].status) == (
        "***.**",
        None,
        ResultStatus.CANCELLED,
    )
    assert [w.message for w in result.warnings] == ["OBX-5 is not a number though OBX-2 is NM"]


def test_our_utf8_mllp_file_with_qc_specimen(lab_file: LabFile) -> None:
    result = hl7v2.parse(lab_file("hl7/ours_oru_oul_v251_utf8_vi_mllp_qc.hl7"))
    oru, oul = result.messages
    assert oru.patient is not None and oru.patient.name == "Nguyễn^Thị Hồng"
    (wbc,) = oru.observations
    assert wbc.test == Coding("WBC", "Bạch cầu", "L") and wbc.loinc == "6690-2"
    assert (wbc.unit, wbc.ucum_unit) == ("10^9/L", "10*9/L")
    assert wbc.comments == ("Đã kiểm tra lại",)
    assert not oru.is_qc and not wbc.is_qc
    assert oul.message_type == "OUL^R22"
    assert oul.is_qc and oul.observations[0].is_qc
    assert oul.observations[0].specimen_id == "QC-CTRL-2"


def test_latin1_bytes_without_msh18_fall_back_from_utf8() -> None:
    raw = "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5\rPID|1||X||Gödel^Kurt\r".encode("latin-1")
    (message,) = hl7v2.parse(raw).messages
    assert message.patient is not None and message.patient.name == "Gödel^Kurt"


def test_declared_charset_mismatch_warns() -> None:
    raw = "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5|||||DEU|ASCII\rPID|1||X||Gödel\r"
    result = hl7v2.parse(raw.encode("utf-8"))
    assert result.messages[0].patient is not None
    assert result.messages[0].patient.name == "Gödel"
    assert [w.message for w in result.warnings] == [
        "bytes do not match MSH-18 'ASCII'; read as utf-8"
    ]


def test_unsupported_charset_is_rejected() -> None:
    raw = b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5|||||DEU|UNICODE UTF-16\r"
    with pytest.raises(LabMessageError, match="'UNICODE UTF-16' is not supported"):
        hl7v2.parse(raw)


def test_no_msh_is_rejected() -> None:
    with pytest.raises(LabMessageError, match="no MSH segment found"):
        hl7v2.parse(b"PID|1||X\r")


# -- the reusable private helpers ---------------------------------------------


def test_joined_segments_are_split_again(lab_file: LabFile) -> None:
    raw = lab_file("hl7/cdc_ca_oml_o21_v251_malformed_joined_segments.hl7")
    (piece,) = split_messages(raw)
    text, codec, _ = decode_message(piece)
    segments, warnings = split_segments(text, Delimiters())
    obx = [s for s in segments if s[0] == "OBX"]
    assert [s[1] for s in obx] == [str(n) for n in range(1, 14)]
    assert obx[0][5] == "3477701755"
    assert [w.message for w in warnings] == [
        "segments OBX, OBX were joined to OBR on one line",
        "segments OBX, OBX, OBX were joined to OBX on one line",
    ]
    assert codec == "ascii"


def test_split_messages_counts_the_hapi_batch(lab_file: LabFile) -> None:
    assert len(split_messages(lab_file("hl7/hapi_oml_o21_oul_r22_multi_v251.hl7"))) == 13


def test_hapi_utf8_name_without_msh18(lab_file: LabFile) -> None:
    pieces = split_messages(lab_file("hl7/hapi_oml_o21_oul_r22_multi_v251.hl7"))
    text, codec, _ = decode_message(pieces[10])
    assert codec == "utf-8" and "SEBASTIÁN" in text


@pytest.mark.parametrize(
    ("escaped", "plain"),
    [
        ("a\\F\\b", "a|b"),
        ("a\\S\\b\\T\\c\\R\\d\\E\\e", "a^b&c~d\\e"),
        ("line\\.br\\next", "line\nnext"),
        ("\\.sp 2\\x", "\n\nx"),
        ("\\X4142\\", "AB"),
        ("\\XC2B5\\mol", "µmol"),
        ("\\H\\bold\\N\\", "bold"),
        ("\\Zlocal\\x", "x"),
        ("\\Q\\unknown", "\\Q\\unknown"),
        ("trailing\\", "trailing\\"),
    ],
)
def test_unescape(escaped: str, plain: str) -> None:
    assert unescaper(Delimiters(), "utf-8")(escaped) == plain
