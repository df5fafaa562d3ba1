"""HL7 v2.5.1 chapter 3 ADT → patient identity commands (pure; worklist/orders/adt.py)."""

from __future__ import annotations

import pytest

from core.errors import OrderMessageError
from core.patients import (
    ChangePatientIdentifier,
    Demographics,
    MergePatients,
    PatientRef,
    UpdatePatient,
)
from tests.worklist.adt_messages import a08, a40, a47, adt
from worklist.orders.adt import ADT_TYPES, patient_commands
from worklist.orders.hl7v2 import parse_message


def _commands(raw: bytes) -> list[object]:
    return [c.command for c in patient_commands(parse_message(raw, accepted=ADT_TYPES))]


def _error(raw: bytes) -> OrderMessageError:
    with pytest.raises(OrderMessageError) as info:
        patient_commands(parse_message(raw, accepted=ADT_TYPES))
    return info.value


def test_a08_gives_dicom_demographics_from_utf8() -> None:
    (command,) = _commands(a08("BN0001"))
    assert command == UpdatePatient(
        PatientRef("BN0001", "BVTW"),
        Demographics(name="NGUYỄN^THỊ^LAN", birth_date="19850312", sex="F"),
    )


@pytest.mark.parametrize("trigger", ["A01", "A04", "A08"])
def test_admit_register_update_are_updates(trigger: str) -> None:
    raw = adt(trigger, "ADT_A01", ["PID|1||77^^^BVTW||TRAN^AN||20000101|M", "PV1|1|I"])
    (command,) = _commands(raw)
    assert isinstance(command, UpdatePatient)
    assert command.demographics == Demographics("TRAN^AN", "20000101", "M")


def test_xpn_components_are_reordered_to_pn() -> None:
    # XPN: family^given^further given^suffix^prefix → PN family^given^middle^prefix^suffix.
    (command,) = _commands(a08("1", name="SMITH^JOHN^Q^JR^DR"))
    assert isinstance(command, UpdatePatient)
    assert command.demographics.name == "SMITH^JOHN^Q^DR^JR"


def test_the_legal_name_wins_over_the_first() -> None:
    (command,) = _commands(a08("1", name="BE^TI^^^^^N~TRAN^VAN BINH^^^^^L"))
    assert isinstance(command, UpdatePatient)
    assert command.demographics.name == "TRAN^VAN BINH"


def test_empty_field_keeps_and_null_deletes() -> None:
    """HL7 v2.5.1 2.5.3: empty = not sent (None); ``""`` = delete (empty string)."""
    (kept,) = _commands(a08("1", name="", birth="", sex=""))
    assert isinstance(kept, UpdatePatient)
    assert kept.demographics == Demographics(None, None, None)
    (deleted,) = _commands(a08("1", name='""', birth='""', sex='""'))
    assert isinstance(deleted, UpdatePatient)
    assert deleted.demographics == Demographics("", "", "")


@pytest.mark.parametrize(
    ("hl7", "dicom"), [("F", "F"), ("M", "M"), ("O", "O"), ("U", ""), ("A", "O"), ("N", "O")]
)
def test_table_0001_sex_to_dicom(hl7: str, dicom: str) -> None:
    (command,) = _commands(a08("1", sex=hl7))
    assert isinstance(command, UpdatePatient)
    assert command.demographics.sex == dicom


def test_sex_outside_table_0001_is_refused_103() -> None:
    err = _error(a08("1", sex="X"))
    assert (err.ack_code, err.hl7_code, err.where) == ("AE", 103, "PID^1^8")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("19850312", "19850312"),
        ("198503121030", "19850312"),
        ("19850312103015.5+0700", "19850312"),
        ("1985", None),
        ("198503", None),
    ],
)
def test_birth_date_dtm_to_da(value: str, expected: str | None) -> None:
    (command,) = _commands(a08("1", birth=value))
    assert isinstance(command, UpdatePatient)
    assert command.demographics.birth_date == expected


@pytest.mark.parametrize("value", ["12/03/1985", "19850230"])
def test_birth_date_that_is_no_date_is_refused_102(value: str) -> None:
    err = _error(a08("1", birth=value))
    assert (err.ack_code, err.hl7_code, err.where) == ("AE", 102, "PID^1^7")


def test_a40_merges_every_pid_mrg_pair() -> None:
    commands = _commands(a40([("BN0001", "TMP0001"), ("BN0002", "TMP0002")]))
    assert commands == [
        MergePatients(PatientRef("BN0001", "BVTW"), PatientRef("TMP0001", "BVTW")),
        MergePatients(PatientRef("BN0002", "BVTW"), PatientRef("TMP0002", "BVTW")),
    ]


def test_a40_carries_the_survivors_demographics_when_sent() -> None:
    (command,) = _commands(a40([("BN0001", "TMP0001")], name="LÊ^VĂN^HÙNG"))
    assert isinstance(command, MergePatients)
    assert command.demographics == Demographics(name="LÊ^VĂN^HÙNG")


def test_a40_where_names_the_pair() -> None:
    items = patient_commands(parse_message(a40([("A", "B"), ("C", "D")]), accepted=ADT_TYPES))
    assert [i.where for i in items] == ["MRG^1^1", "MRG^2^1"]


def test_a47_changes_the_identifier() -> None:
    assert _commands(a47("TMP0001", "BN0001")) == [
        ChangePatientIdentifier(old=PatientRef("TMP0001", "BVTW"), new=PatientRef("BN0001", "BVTW"))
    ]


def test_v23_fallbacks_pid2_and_mrg4() -> None:
    raw = adt("A40", "ADT_A39", ["PID|1|BN9^^^BVTW|||X^Y", "MRG||||TMP9^^^BVTW"])
    assert _commands(raw) == [
        MergePatients(PatientRef("BN9", "BVTW"), PatientRef("TMP9", "BVTW"), Demographics("X^Y"))
    ]


def test_issuer_from_universal_id_when_no_namespace() -> None:
    raw = adt("A08", "ADT_A01", ["PID|1||5^^^&1.2.3.4&ISO||A^B"])
    (command,) = _commands(raw)
    assert isinstance(command, UpdatePatient)
    assert command.patient == PatientRef("5", "1.2.3.4")


def test_first_identifier_repetition_with_a_value() -> None:
    raw = adt("A08", "ADT_A01", ["PID|1||~77^^^BVTW^MR~88^^^BHYT^NI||A^B"])
    (command,) = _commands(raw)
    assert isinstance(command, UpdatePatient)
    assert command.patient == PatientRef("77", "BVTW")


def test_latin1_declared_by_msh18() -> None:
    raw = adt("A08", "ADT_A01", ["PID|1||5^^^H||MÜLLER^JÖRG"], charset="8859/1", encoding="latin-1")
    (command,) = _commands(raw)
    assert isinstance(command, UpdatePatient)
    assert command.demographics.name == "MÜLLER^JÖRG"


def test_escaped_delimiter_in_a_name_is_resolved() -> None:
    (command,) = _commands(a08("1", name="O\\T\\BRIEN^ANN"))
    assert isinstance(command, UpdatePatient)
    assert command.demographics.name == "O&BRIEN^ANN"


@pytest.mark.parametrize(
    ("body", "code", "where"),
    [
        (["PID|1||A^^^H", "PID|2||B^^^H", "MRG|C^^^H"], 100, "PID^1"),
        (["MRG|C^^^H", "PID|1||A^^^H"], 100, "MRG^1"),
        (["PID|1||A^^^H", "MRG|C^^^H", "MRG|D^^^H"], 100, "MRG^2"),
        (["PID|1||^^^H", "MRG|C^^^H"], 101, "PID^1^3"),
        (["PID|1||A^^^H", "MRG|^^^H"], 101, "MRG^1^1"),
        (["EVN|A40"], 100, "PID"),
        ([f"PID|1||{'9' * 65}^^^H", "MRG|C^^^H"], 102, "PID^1^3"),
        (["PID|1||A\\E\\B^^^H", "MRG|C^^^H"], 102, "PID^1^3"),
    ],
)
def test_a40_content_errors(body: list[str], code: int, where: str) -> None:
    err = _error(adt("A40", "ADT_A39", body))
    assert (err.ack_code, err.hl7_code, err.where) == ("AE", code, where)


def test_other_adt_events_are_refused_201() -> None:
    with pytest.raises(OrderMessageError) as info:
        parse_message(adt("A03", "ADT_A03", ["PID|1||1^^^H"]), accepted=ADT_TYPES)
    assert (info.value.ack_code, info.value.hl7_code) == ("AR", 201)


def test_orders_only_reader_still_refuses_adt_200() -> None:
    with pytest.raises(OrderMessageError) as info:
        parse_message(a08("1"))
    assert (info.value.ack_code, info.value.hl7_code) == ("AR", 200)
