"""The raw response encoder writes the bytes pydicom writes (PS3.5 section 7), pure."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from worklist._attributes import Entry
from worklist._wire import Unencodable, raw_response
from worklist.model import Code, Patient, ScheduledProcedureStep, WorklistItem, make_item
from worklist.query import Projection, build_query, matching_entries, project

pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR"),
    # an empty US key in a query (PregnancyStatus) is a str until pydicom sees the VR
    pytest.mark.filterwarnings("ignore:A value of type .str. cannot be assigned"),
]

NAMES = [
    "DOE^JANE",
    "NGUYỄN^VĂN AN",
    "Müller^Jürgen",
    "ĐẶNG^THỊ HOA",
    "Y^A=山田^太郎",
    "ODD",
    "DOE^JOHN==",  # trailing empty groups are dropped (PS3.5 6.2.1)
    "=",
    "A=\\B=",  # two values
]


def _item(n: int, name: str) -> WorklistItem:
    item = make_item(
        f"A{n}",
        patient_name=name,
        start=datetime(2026, 11, 25, 7 + n % 12, 5 * (n % 12)),
        requesting_physician="" if n % 2 else "HOUSE^GREGORY",
        admission_id="ADM1" if n % 3 else "",
    )
    patient = Patient(
        name=name,
        id=f"P{n}",
        issuer="HOSP" if n % 2 else "",
        birth_date=date(1980, 1, 2) if n % 4 else None,
        sex="MFO"[n % 3],
        weight_kg=[None, 72.5, 80.0][n % 3],
        size_m=[None, 1.75][n % 2],
        pregnancy_status=[None, 4, 1][n % 3],
        medical_alerts="LATEX" if n % 5 == 0 else "",
    )
    second = replace(
        item.steps[0],
        step_id=f"SPS{n}B",
        protocol_codes=(Code("P1", "99X", "first"), Code("P2", "99X", "second", "1.0")),
        comments="Nhịn ăn 6 giờ" if n % 2 else "",
    )
    return replace(item, patient=patient, steps=(item.steps[0], second))


def _queries() -> list[Dataset]:
    plain = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientWeight",
                    "PregnancyStatus", "AccessionNumber", "RequestingPhysician",
                    "StudyInstanceUID", "AdmissionID", "IssuerOfPatientID"):
        setattr(plain, keyword, "")
    plain.ScheduledProcedureStepSequence = [Dataset()]  # whole items (C.2.2.2.6)
    plain.RequestedProcedureCodeSequence = []
    unsupported = Dataset()
    unsupported.PatientName = ""
    unsupported.InstitutionName = ""  # not in Table K.6-1: returned empty
    unsupported.OtherPatientIDsSequence = []
    nested = Dataset()
    nested.PatientName = "*"
    sps = Dataset()
    sps.ScheduledProcedureStepID = ""
    sps.CommentsOnTheScheduledProcedureStep = ""
    code = Dataset()
    code.CodeValue = "P2"
    code.CodingSchemeVersion = ""
    sps.ScheduledProtocolCodeSequence = [code]
    nested.ScheduledProcedureStepSequence = [sps]
    latin = Dataset()
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName = ""
    latin.MedicalAlerts = ""
    return [plain, unsupported, nested, latin]


def _projections(names: list[str]) -> list[Projection]:
    items = [_item(n, name) for n, name in enumerate(names)]
    out = []
    for identifier in _queries():
        query = build_query(identifier)
        out += [project(query, e) for item in items for e in matching_entries(query, item)]
    return out


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_raw_response_bytes_equal_pydicom_encoding(implicit: bool) -> None:
    projections = _projections(NAMES)
    assert {p.charset for p in projections} == {None, "ISO_IR 100", "ISO_IR 192"}
    for p in projections:
        expected = encode(p.to_dataset(), implicit, True)
        assert expected
        assert encode(raw_response(p, implicit_vr=implicit), implicit, True) == expected


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20),
                min_size=1, max_size=4))
def test_raw_response_of_any_names_equals_pydicom(names: list[str]) -> None:
    for p in _projections(names):
        for implicit in (True, False):
            raw = encode(raw_response(p, implicit_vr=implicit), implicit, True)
            assert raw == encode(p.to_dataset(), implicit, True)


def test_values_outside_the_encoder_are_refused_for_the_pydicom_path() -> None:
    item = make_item("A1")
    entry = Entry(item, replace(item.steps[0], modality="ÇT"))  # non-ASCII CS
    q = Dataset()
    sps = Dataset()
    sps.Modality = ""
    q.ScheduledProcedureStepSequence = [sps]
    # A CS value outside its repertoire no longer reaches the encoder: project()
    # bounds it to the VR (PS3.5 6.2, issue 14 §6) ...
    projection = project(build_query(q), entry)
    assert projection.to_dataset().ScheduledProcedureStepSequence[0].Modality == "CT"
    # ... so the encoder's refusal is checked on a projection built by hand.
    sq_tag = next(n[0] for n in projection.nodes if n[1] == "SQ")
    raw = Projection(
        [(sq_tag, "SQ", [[(0x00080060, "CS", "ÇT")]])], projection.charset
    )
    with pytest.raises(Unencodable):
        raw_response(raw, implicit_vr=True)
    assert raw.to_dataset().ScheduledProcedureStepSequence[0].Modality == "ÇT"


def test_an_ambiguous_vr_key_goes_the_pydicom_way() -> None:
    q = Dataset()
    q.AccessionNumber = ""
    q.add_new(0x00280106, "US or SS", None)  # Smallest Image Pixel Value: not ours
    projection = project(build_query(q), Entry(make_item("A1"), make_item("A1").steps[0]))
    with pytest.raises(Unencodable):
        raw_response(projection, implicit_vr=False)
    assert encode(projection.to_dataset(), False, True)  # pydicom resolves it


def test_steps_without_codes_and_odd_lengths() -> None:
    item = make_item("ODD1", steps=[ScheduledProcedureStep(
        step_id="S1", station_ae_title="CT1", modality="CT",
        start=datetime(2026, 11, 25, 9, 0), protocol_codes=())])
    q = Dataset()
    q.AccessionNumber = ""
    q.StudyInstanceUID = ""
    q.ScheduledProcedureStepSequence = [Dataset()]
    query = build_query(q)
    [entry] = matching_entries(query, item)
    p = project(query, entry)
    for implicit in (True, False):
        assert encode(raw_response(p, implicit_vr=implicit), implicit, True) == encode(
            p.to_dataset(), implicit, True
        )
