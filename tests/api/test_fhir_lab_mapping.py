"""api.fhir_lab: FHIR R4 search-parameter rules and resource shapes, without HTTP."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from api.fhir_lab import (
    diagnostic_report,
    observation,
    parse_date,
    parse_token,
    report_status,
)
from core.errors import InvalidQueryError
from storage.lab import StoredLabReport, StoredLabResult

T0 = datetime(2024, 3, 15, 7, 15, tzinfo=UTC)


def _result(**kw: object) -> StoredLabResult:
    base = StoredLabResult(
        pk=1, observation_id="abc", version=1, is_current=True, supersedes_pk=None,
        report_id="rep", file_sha256="f", file_name="f.hl7", location="message 1, segment 4",
        message_index=0, position=0, control_id="C1", format="hl7v2", analyzer="CHEM",
        instrument_id="", test_code="K", test_system="L", test_display="Kalium",
        loinc="2823-3", loinc_display="Potassium", test_raw="K^Kalium^L", sub_id="",
        value_type="NM", raw_value="4.1", value_text="4.1", value=4.1, comparator="",
        coded_value="", unit="mmol/l", ucum_unit="mmol/L", reference_range="3.5-5.1",
        reference_low=3.5, reference_high=5.1, flags=("N",), status="final", status_code="F",
        specimen_id="S1", placer_order_id="P1", filler_order_id="F1",
        performed_at=T0.astimezone(timezone(timedelta(hours=7))), is_qc=False,
        patient_id="PAT-1", patient_name="DOE^JANE", patient_birth_date="", patient_sex="F",
        comments=("hemolysed",), is_critical=False, critical_reason="", unmatched=True,
        order_ref="", created_at=T0, updated_at=T0,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def test_tokens() -> None:
    assert parse_token("http://loinc.org|2345-7") == ("LN", "2345-7")
    assert parse_token("2345-7") == (None, "2345-7")
    assert parse_token("urn:pacslab:lab-code:MAYO|21838") == ("MAYO", "21838")
    with pytest.raises(InvalidQueryError, match="unknown code system"):
        parse_token("http://snomed.info/sct|1")
    with pytest.raises(InvalidQueryError):
        parse_token("http://loinc.org|")


def test_dates_are_ranges_by_precision() -> None:
    start = datetime(2024, 3, 1, tzinfo=UTC)
    assert parse_date("2024-03") == (("ge", start), ("lt", datetime(2024, 4, 1, tzinfo=UTC)))
    assert parse_date("gt2024") == (("ge", datetime(2025, 1, 1, tzinfo=UTC)),)
    assert parse_date("le2024-12-31") == (("lt", datetime(2025, 1, 1, tzinfo=UTC)),)
    assert parse_date("lt2024-03-15T08:15:00+01:00") == (("lt", T0),)
    assert parse_date("ge2024-03-15T08:15:00 01:00") == (("ge", T0),)  # unescaped '+'
    assert parse_date("2024-03-15T07:15Z")[1] == ("lt", T0 + timedelta(minutes=1))
    with pytest.raises(InvalidQueryError, match="prefix 'ne'"):
        parse_date("ne2024")
    with pytest.raises(InvalidQueryError):
        parse_date("2024-13")
    with pytest.raises(InvalidQueryError):
        parse_date("yesterday")


def test_numeric_result_is_a_valid_r4_observation() -> None:
    obs = observation(_result())
    Observation.model_validate(obs)
    assert obs["valueQuantity"] == {
        "value": 4.1, "unit": "mmol/l", "system": "http://unitsofmeasure.org", "code": "mmol/L"
    }  # fmt: skip
    codes = [(c["system"], c["code"]) for c in obs["code"]["coding"]]
    assert codes == [("urn:pacslab:lab-code:L", "K"), ("http://loinc.org", "2823-3")]
    assert obs["effectiveDateTime"] == "2024-03-15T14:15:00+07:00"
    assert obs["subject"] == {"type": "Patient", "identifier": {"value": "PAT-1"}}
    assert "DOE" not in str(obs)


@pytest.mark.parametrize(
    ("changes", "key", "expected"),
    [
        ({"value": 8.0, "comparator": ">", "raw_value": ">8"}, "valueQuantity",
         {"value": 8.0, "comparator": ">", "unit": "mmol/l", "system": "http://unitsofmeasure.org",
          "code": "mmol/L"}),
        ({"value": None, "value_text": "***.**"}, "valueString", "***.**"),
        ({"value": None, "value_text": "", "status": "cancelled"}, "dataAbsentReason",
         {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                      "code": "not-performed"}]}),
        ({"value": None, "coded_value": "LA12432-3^Acceptable^LN"}, "valueCodeableConcept",
         {"coding": [{"system": "http://loinc.org", "code": "LA12432-3", "display": "Acceptable"}],
          "text": "Acceptable"}),
    ],
)  # fmt: skip
def test_value_kinds(changes: dict[str, object], key: str, expected: object) -> None:
    obs = observation(_result(**changes))
    Observation.model_validate(obs)
    assert obs[key] == expected


def test_qc_and_critical_tags() -> None:
    qc = observation(_result(is_qc=True, patient_id=""))
    assert "subject" not in qc and qc["meta"]["tag"][0]["code"] == "qc"
    crit = observation(_result(is_critical=True, critical_reason="flag HH", flags=("HH",)))
    assert crit["meta"]["tag"][0] == {
        "system": "urn:pacslab:lab-tag", "code": "critical", "display": "flag HH"
    }  # fmt: skip
    assert crit["interpretation"][0]["coding"][0]["code"] == "HH"
    odd = observation(_result(flags=(">RR",)))
    assert odd["interpretation"] == [{"text": ">RR"}]


def test_report_status_and_shape() -> None:
    final, pre = _result(), _result(status="preliminary", observation_id="x")
    assert report_status([final]) == "final"
    assert report_status([final, pre]) == "partial"
    assert report_status([pre]) == "preliminary"
    assert report_status([final, _result(status="corrected")]) == "corrected"
    assert report_status([_result(status="cancelled")]) == "cancelled"
    report = StoredLabReport(
        report_id="rep", specimen_id="S1", placer_order_id="P1", filler_order_id="F1",
        patient_id="PAT-1", patient_name="", is_qc=False, analyzer="CHEM", unmatched=True,
        order_ref="", created_at=T0, updated_at=T0,
    )  # fmt: skip
    body = diagnostic_report(report, [final, pre])
    DiagnosticReport.model_validate(body)
    assert [r["reference"] for r in body["result"]] == ["Observation/abc", "Observation/x"]
    assert [i["value"] for i in body["identifier"]] == ["P1", "F1", "S1"]


def test_subject_is_the_shared_patient_with_its_issuer_system() -> None:
    obs = observation(_result(patient_pk=7, patient_issuer="Baptist East"))
    Observation.model_validate(obs)
    assert obs["subject"] == {
        "reference": "Patient/7",
        "type": "Patient",
        "identifier": {"system": "urn:pacslab:issuer:Baptist%20East", "value": "PAT-1"},
    }
    oid = observation(_result(patient_pk=8, patient_issuer="1.2.3.4"))
    assert oid["subject"]["identifier"]["system"] == "urn:oid:1.2.3.4"
    none = observation(_result(patient_pk=9))
    assert none["subject"] == {
        "reference": "Patient/9", "type": "Patient", "identifier": {"value": "PAT-1"}
    }  # fmt: skip
    assert "subject" not in observation(_result(patient_pk=9, is_qc=True))


def test_based_on_only_for_a_matched_order() -> None:
    assert "basedOn" not in observation(_result())  # order numbers alone link nothing
    linked = observation(_result(order_ref="ServiceRequest/o-1", unmatched=False))
    Observation.model_validate(linked)
    assert linked["basedOn"] == [{"reference": "ServiceRequest/o-1", "type": "ServiceRequest"}]


def test_held_result_is_preliminary_and_tagged_needs_review() -> None:
    held = observation(_result(review="conflict", conflict_with="abc", status="final"))
    Observation.model_validate(held)
    assert held["status"] == "preliminary"
    assert [t["code"] for t in held["meta"]["tag"]] == ["needs-review"]
    withdrawn = observation(_result(review="moved", status="entered-in-error", version=2))
    Observation.model_validate(withdrawn)
    assert withdrawn["status"] == "entered-in-error" and "tag" not in withdrawn["meta"]
    assert observation(_result(review="accepted"))["status"] == "final"


def test_report_code_is_the_ordered_panel() -> None:
    base = StoredLabReport(
        report_id="rep", specimen_id="S1", placer_order_id="P1", filler_order_id="",
        patient_id="PAT-1", patient_name="", is_qc=False, analyzer="CHEM", unmatched=False,
        order_ref="ServiceRequest/o-1", created_at=T0, updated_at=T0, patient_pk=3,
        order_code="57128-1", order_system="LN",
        order_display="Newborn Screening Report summary panel",
    )  # fmt: skip
    body = diagnostic_report(base, [_result()])
    DiagnosticReport.model_validate(body)
    assert body["code"] == {
        "coding": [{"system": "http://loinc.org", "code": "57128-1",
                    "display": "Newborn Screening Report summary panel"}],
        "text": "Newborn Screening Report summary panel",
    }  # fmt: skip
    assert body["basedOn"] == [{"reference": "ServiceRequest/o-1", "type": "ServiceRequest"}]
    assert body["subject"]["reference"] == "Patient/3"
    local = diagnostic_report(replace(base, order_code="CHEM", order_system="L"), [_result()])
    assert local["code"]["coding"][0]["system"] == "urn:pacslab:lab-code:L"
    fallback = diagnostic_report(replace(base, order_code="", order_display=""), [_result()])
    assert fallback["code"]["coding"][0]["code"] == "11502-2"
    held = diagnostic_report(base, [_result(review="conflict")])
    assert held["status"] == "preliminary"
    assert [t["code"] for t in held["meta"]["tag"]] == ["needs-review"]
    gone = diagnostic_report(base, [_result(status="entered-in-error")])
    assert gone["status"] == "entered-in-error"
