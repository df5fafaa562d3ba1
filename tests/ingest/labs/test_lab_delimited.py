"""Profile-driven CSV/TXT exports: cobas c111, Latin-1 decimal comma, cp1258 scaled."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime

import pytest

from core.errors import LabMessageError
from core.labs import Coding, ResultStatus
from ingest.labs.parsers import delimited, get_parser
from ingest.labs.parsers.delimited import COBAS_C111, DelimitedProfile

LabFile = Callable[[str], bytes]

GERMAN = DelimitedProfile(
    name="labor_sued",
    columns={
        "specimen_id": "Probe",
        "patient_id": "Patienten-Nr",
        "patient_name": "Name",
        "birth_date": "Geburtsdatum",
        "test_code": "Test",
        "value": "Wert",
        "unit": "Einheit",
        "reference_range": "Referenz",
        "flag": "Kennz.",
        "date": "Datum",
    },
    delimiter=";",
    encoding="latin-1",
    decimal_comma=True,
    header_row=1,
    date_format="%d.%m.%Y %H:%M",
    birth_date_format="%d.%m.%Y",
    instrument_id="SUED-1",
)

VIETNAMESE = DelimitedProfile(
    name="vn_export",
    columns={
        "specimen_id": "Mã mẫu",
        "patient_id": "Mã BN",
        "patient_name": "Họ tên",
        "test_code": "Xét nghiệm",
        "value": "Kết quả",
        "exponent": "Số mũ",
        "unit": "Đơn vị",
        "flag": "Cờ",
        "date": "Ngày giờ",
    },
    delimiter="\t",
    quotechar=None,
    encoding="cp1258",
    date_format="%d/%m/%Y %H:%M",
    qc_specimen_prefixes=("QC-",),
)


def test_cobas_c111_rows(lab_file: LabFile) -> None:
    result = get_parser("cobas_c111")(lab_file("files/roche_cobas_c111_export_semicolon.csv"))
    assert result.warnings == ()
    (message,) = result.messages
    assert message.message_type == "cobas_c111" and message.sender == "60274"
    obs = message.observations
    assert len(obs) == 4
    glu = obs[0]
    assert glu.test == Coding("GLU2", "", "cobas_c111")
    assert glu.loinc == "2345-7"
    assert (glu.value, glu.unit, glu.ucum_unit, glu.flags) == (1.3, "g/l", "g/L", (">RR",))
    assert glu.specimen_id == "03" and glu.instrument_id == "60274"
    assert glu.performed_at == datetime(2016, 4, 10, 17, 41)
    assert glu.status is ResultStatus.FINAL
    assert (obs[1].value, obs[1].flags, obs[1].specimen_id) == (0.83, (), "252")
    ast, alt = obs[2], obs[3]
    assert (ast.test.code, ast.value, ast.ucum_unit, ast.loinc) == ("ASTL", 127.5, "U/L", "1920-8")
    assert (alt.test.code, alt.value, alt.flags, alt.loinc) == ("ALTL", 40.6, ("? QC",), "1742-6")
    assert [o.specimen_id for o in message.orders] == ["03", "252", "CP"]
    assert message.orders[2].test_codes == ("ASTL", "ALTL")
    assert ast.order_index == alt.order_index == 2


def test_german_decimal_comma_latin1(lab_file: LabFile) -> None:
    result = delimited.parse(lab_file("files/ours_decimal_comma_latin1_de.csv"), profile=GERMAN)
    (message,) = result.messages
    assert len(message.patients) == 2
    muller = message.patients[0]
    assert muller.name == "Müller^Jürgen" and muller.birth_date == date(1970, 1, 2)
    assert message.patients[1].name == "Weiß^Ärmin"
    hb, k, crp, empty = message.observations
    assert (hb.raw_value, hb.value, hb.ucum_unit) == ("14,3", 14.3, "g/dL")
    assert (hb.reference_low, hb.reference_high) == (12.0, 16.0)
    assert (k.value, k.flags, k.ucum_unit) == (5.6, ("H",), "mmol/L")
    assert (crp.value, crp.comparator, crp.reference_high) == (0.5, "<", 5.0)
    assert (empty.raw_value, empty.value, empty.value_type) == ("", None, "ST")
    assert hb.performed_at == datetime(2024, 3, 15, 8, 15)
    assert hb.instrument_id == "SUED-1"
    assert [o.patient_index for o in message.observations] == [0, 0, 1, 1]


def test_without_decimal_comma_the_values_are_not_numbers(lab_file: LabFile) -> None:
    profile = DelimitedProfile(
        name="x",
        columns=GERMAN.columns,
        encoding="latin-1",
        header_row=1,
        date_format="%d.%m.%Y %H:%M",
    )
    obs = delimited.parse(
        lab_file("files/ours_decimal_comma_latin1_de.csv"), profile=profile
    ).observations
    assert obs[0].value is None  # "14,3" is ambiguous without the profile saying so


def test_vietnamese_cp1258_is_nfc_and_scaled(lab_file: LabFile) -> None:
    raw = lab_file("files/ours_scaled_int_cp1258_vi.txt")
    assert b"\xde" in raw  # combining tilde: the file really is decomposed cp1258
    result = delimited.parse(raw, profile=VIETNAMESE)
    (message,) = result.messages
    names = [p.name for p in message.patients]
    assert names == ["Nguyễn Thị Hồng", "Trần Văn Đức", ""]
    glu, wbc, glu2, qc = message.observations
    assert (glu.raw_value, glu.value, glu.unit) == ("548", 5.48, "mmol/L")
    assert (wbc.value, wbc.ucum_unit, wbc.flags) == (12.75, "10*9/L", ("H",))
    assert glu2.value == pytest.approx(6.1)
    assert qc.is_qc and qc.specimen_id == "QC-0001" and not glu.is_qc
    assert glu.performed_at == datetime(2024, 3, 16, 7, 30)


def test_missing_header_column_is_rejected(lab_file: LabFile) -> None:
    with pytest.raises(
        LabMessageError, match="column 'Probe' \\(specimen_id\\) is not in the header"
    ):
        delimited.parse(lab_file("files/roche_cobas_c111_export_semicolon.csv"), profile=GERMAN)


def test_wrong_encoding_is_rejected() -> None:
    profile = DelimitedProfile(name="u", columns={"test_code": "T", "value": "V"}, encoding="utf-8")
    with pytest.raises(LabMessageError, match="not valid utf-8"):
        delimited.parse(b"T;V\nGLU;5\xff\n", profile=profile)


def test_profile_validation() -> None:
    with pytest.raises(ValueError, match="unknown profile columns"):
        DelimitedProfile(name="bad", columns={"test_code": "T", "value": "V", "colour": "C"})
    with pytest.raises(ValueError, match="must map \\['value'\\]"):
        DelimitedProfile(name="bad", columns={"test_code": "T"})
    with pytest.raises(TypeError):
        COBAS_C111.columns["value"] = "x"  # type: ignore[index]


def test_bad_scaled_value_warns() -> None:
    profile = DelimitedProfile(
        name="s", columns={"test_code": "T", "value": "V", "exponent": "E"}, delimiter=","
    )
    result = delimited.parse(b"T,V,E\nGLU,5.5,-1\nNA,1400,-1\n", profile=profile)
    assert [o.value for o in result.observations] == [None, 140.0]
    assert [w.message for w in result.warnings] == ["scaled value or exponent is not an integer"]
