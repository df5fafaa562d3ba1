"""ASTM E1394 parsing of the real analyzer files and our delimiter/QC fixture."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime

import pytest

from core.errors import LabMessageError
from core.labs import ResultStatus
from ingest.labs.parsers import astm

LabFile = Callable[[str], bytes]


def test_architect_five_messages_each_with_three_or_two_results(lab_file: LabFile) -> None:
    result = astm.parse(lab_file("astm/abbott_architect_multi_message.astm"))
    assert len(result.messages) == 5
    assert [len(m.observations) for m in result.messages] == [3, 3, 3, 2, 3]
    assert len(result.observations) == 14
    assert result.warnings == ()  # "L|1" without termination code is normal


def test_architect_first_result_values(lab_file: LabFile) -> None:
    message = astm.parse(lab_file("astm/abbott_architect_multi_message.astm")).messages[0]
    assert message.sender == "ARCHITECT"
    assert message.timestamp == datetime(2025, 6, 13, 13, 15, 19)
    final, interpretation, rlu = message.observations
    assert final.test.code == "580"
    assert final.test.display == "Anti-HBcII"
    assert final.test_raw.endswith("^^F")
    assert (final.raw_value, final.value, final.unit) == ("0.15", 0.15, "S/CO")
    assert final.ucum_unit is None  # S/CO is not in the UCUM table on purpose
    assert final.status is ResultStatus.FINAL and final.status_code == "R"
    assert final.specimen_id == "276056250158121"
    assert final.instrument_id == "i1SR52842"
    assert final.performed_at == datetime(2025, 6, 13, 10, 18, 44)
    assert (interpretation.text, interpretation.value) == ("Nonreactive", None)
    assert interpretation.value_type == "ST"
    assert (rlu.value, rlu.unit) == (1277.0, "RLU")
    order = message.orders[0]
    assert order.instrument_specimen_id == "276056250158121^U265^1"
    assert order.priority == "R" and order.test_codes == ("580",)


def test_architect_fourth_message_anti_hbs(lab_file: LabFile) -> None:
    message = astm.parse(lab_file("astm/abbott_architect_multi_message.astm")).messages[3]
    final = message.observations[0]
    assert (final.test.display, final.value, final.unit) == ("Anti-HBs 3", 2.87, "mIU/mL")
    assert final.ucum_unit == "m[IU]/mL"
    assert final.specimen_id == "AA5XVA2BT9"


def test_galileo_two_orders_for_one_patient(lab_file: LabFile) -> None:
    result = astm.parse(lab_file("astm/immucor_galileo_result.astm"))
    (message,) = result.messages
    assert len(message.patients) == 1
    assert len(message.orders) == 2
    assert len(message.observations) == 14
    assert [o.order_index for o in message.observations].count(0) == 9
    assert [o.order_index for o in message.observations].count(1) == 5
    patient = message.patients[0]
    assert patient.patient_id == "1171984"
    assert patient.birth_date == date(1959, 4, 22)
    assert patient.sex == "M"
    assert "Patient^Test" not in repr(patient)  # names never reach logs via repr
    assert "1171984" not in repr(patient) and "1959" not in repr(patient)


def test_galileo_repeat_component_results(lab_file: LabFile) -> None:
    obs = astm.parse(lab_file("astm/immucor_galileo_result.astm")).observations
    anti_b = obs[2]
    assert anti_b.test.code == "Anti-B"
    assert anti_b.raw_value == "3+^3+^45"
    assert anti_b.value_components == ("3+", "3+", "45")
    assert anti_b.value is None
    interp = obs[8]
    assert (interp.test.code, interp.text) == ("ABOD Full Interp", "B Pos")
    assert obs[-1].text == "Pos" and obs[-1].specimen_id == "0651439A"
    assert all(o.status is ResultStatus.FINAL for o in obs)


def test_biorad_two_patients_same_id_different_names(lab_file: LabFile) -> None:
    (message,) = astm.parse(lab_file("astm/biorad_ihcom_bloodtype_two_patients.astm")).messages
    assert len(message.patients) == 2
    first, second = message.patients
    assert first.patient_id == second.patient_id == "1010868845"
    assert first.name == "Testus^Test" and second.name == "Testis^Tost"
    assert [o.patient_index for o in message.observations] == [0, 0, 0, 0, 1]


def test_biorad_comments_and_blood_group(lab_file: LabFile) -> None:
    obs = astm.parse(lab_file("astm/biorad_ihcom_bloodtype_two_patients.astm")).observations
    anti_a = obs[0]
    assert (anti_a.test.code, anti_a.value) == ("AntiA", 40.0)
    assert len(anti_a.comments) == 1
    assert "5005352062212117030" in anti_a.comments[0]
    group = obs[3]
    assert group.test.code == "Result"
    assert group.value_components[:4] == ("A", "NEG", "NEG", "ccee")
    assert group.status_code == "S" and group.status is ResultStatus.PRELIMINARY
    assert group.comments == ()  # "C|1|^^^||" carries no text


def test_our_delimiters_escapes_and_values(lab_file: LabFile) -> None:
    raw = lab_file("astm/ours_astm_delims_at_caret_backslash_utf8_vi.astm")
    result = astm.parse(raw, encoding="utf-8")
    assert result.warnings == ()
    first = result.messages[0]
    assert first.control_id == "MSG001"
    assert first.patient is not None and first.patient.name == "Nguyễn^Thị Hồng"
    assert first.orders[0].test_codes == ("GLU", "NA", "WBC", "CRP", "URO", "K")
    glu, na, wbc, crp, uro, k = first.observations
    assert (glu.value, glu.comparator, glu.raw_value) == (8.0, ">", ">8")
    assert (glu.reference_low, glu.reference_high) == (3.9, 6.1)
    assert glu.flags == ("H", "A")  # "H@A": "@" is this file's repeat delimiter
    assert glu.comments == ("Above linear range| diluted^retest \\ lot @ 42",)
    assert na.status is ResultStatus.CORRECTED
    assert (wbc.unit, wbc.ucum_unit) == ("10^9/L", "10*9/L")
    assert (crp.value, crp.comparator, crp.reference_high, crp.reference_low) == (
        0.5,
        "<",
        5.0,
        None,
    )
    assert (uro.raw_value, uro.value, uro.status) == ("3+", None, ResultStatus.FINAL)
    assert (k.raw_value, k.value, k.status) == ("***.**", None, ResultStatus.CANCELLED)
    assert not first.is_qc and not any(o.is_qc for o in first.observations)


def test_our_qc_by_action_code_and_processing_id(lab_file: LabFile) -> None:
    raw = lab_file("astm/ours_astm_delims_at_caret_backslash_utf8_vi.astm")
    _, by_action, by_header = astm.parse(raw, encoding="utf-8").messages
    assert by_action.orders[0].action_code == "Q"
    assert by_action.is_qc and by_action.observations[0].is_qc
    assert by_action.observations[0].specimen_id == "QC-LOT-42"
    assert by_header.is_qc and by_header.observations[0].is_qc
    assert by_header.observations[0].flags == ("HH",)


def test_utf8_file_read_as_latin1_is_mojibake_not_an_error(lab_file: LabFile) -> None:
    raw = lab_file("astm/ours_astm_delims_at_caret_backslash_utf8_vi.astm")
    patient = astm.parse(raw).messages[0].patient
    assert patient is not None and patient.name != "Nguyễn^Thị Hồng"


def test_crlf_lf_and_cr_give_the_same_results(lab_file: LabFile) -> None:
    raw = lab_file("astm/immucor_galileo_result.astm")
    lf = astm.parse(raw).observations
    assert astm.parse(raw.replace(b"\n", b"\r")).observations == lf
    assert astm.parse(raw.replace(b"\n", b"\r\n")).observations == lf


def test_frame_digit_prefix_is_dropped(lab_file: LabFile) -> None:
    lines = lab_file("astm/immucor_galileo_result.astm").split(b"\n")
    numbered = b"\n".join(str((i + 1) % 8).encode() + line for i, line in enumerate(lines))
    assert len(astm.parse(numbered).observations) == 14


def test_continued_line_is_joined_with_a_warning() -> None:
    raw = b"H|\\^&\rP|1\rO|1|S1||^^^GLU\rR|1|^^^GLU|5.\r5|mmol/L\rL|1|N\r"
    result = astm.parse(raw)
    (obs,) = result.observations
    assert (obs.value, obs.unit) == (5.5, "mmol/L")
    assert [w.message for w in result.warnings] == ["line continues the previous record"]


def test_query_record_and_missing_terminator() -> None:
    result = astm.parse(b"H|\\^&\rQ|1|^SPEC-9||ALL\r")
    assert result.messages[0].queries == ("SPEC-9",)
    assert [w.message for w in result.warnings] == ["message ends without an L record"]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "file holds no ASTM records"),
        (b"P|1\rL|1\r", "P record outside a message (no H before it)"),
        (b"H|\\^\r", "H record is too short to declare its delimiters"),
        (b"H||^&|\r", "H record delimiters must be four distinct non-alphanumerics"),
        (b"hello world", "file does not start with an ASTM H record"),
    ],
)
def test_rejections(raw: bytes, reason: str) -> None:
    with pytest.raises(LabMessageError) as info:
        astm.parse(raw)
    assert info.value.reason == reason


def test_invalid_encoding_is_a_lab_error() -> None:
    with pytest.raises(LabMessageError, match="not valid utf-8"):
        astm.parse(b"H|\\^&\rP|1||\xff\r", encoding="utf-8")
