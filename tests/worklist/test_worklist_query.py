"""Modality Worklist matching, one test per PS3.4 clause (pure: no network)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from core.errors import InvalidQueryError
from core.settings import WorklistSettings
from worklist.model import Code, ScheduledProcedureStep, SpsStatus, WorklistItem, make_item
from worklist.query import MatchOptions, build_query, fold_person_name, match

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


def _sps(**keys: object) -> Dataset:
    item = Dataset()
    for keyword in (
        "ScheduledStationAETitle",
        "Modality",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
    ):
        setattr(item, keyword, keys.pop(keyword, ""))
    for keyword, value in keys.items():
        setattr(item, keyword, value)
    return item


def _query(sps: Dataset | None = None, **keys: object) -> Dataset:
    ds = Dataset()
    ds.PatientName = ""
    ds.AccessionNumber = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    if sps is not None:
        ds.ScheduledProcedureStepSequence = [sps]
    return ds


def _accessions(query: Dataset, items: list[WorklistItem], **opts: object) -> list[str]:
    q = build_query(query, MatchOptions(**opts))  # type: ignore[arg-type]
    return [str(r.AccessionNumber) for item in items for r in match(q, item)]


ITEMS = [
    make_item("A1", patient_name="NGUYỄN^VĂN AN", start=datetime(2026, 11, 25, 9, 0)),
    make_item(
        "A2",
        patient_name="Smith^John",
        station_ae_title="MR1",
        modality="MR",
        start=datetime(2026, 11, 25, 23, 0),
    ),
    make_item("A3", patient_name="ĐẶNG^THỊ HOA", start=datetime(2026, 11, 26, 7, 30)),
    make_item("A4", patient_name="DOE^JANE", start=datetime(2026, 11, 27, 14, 0)),
]


# --- C.2.2.2.1 Single Value Matching -------------------------------------------------


def test_c_2_2_2_1_single_value_matching_is_exact_and_case_sensitive_for_non_pn() -> None:
    assert _accessions(_query(_sps(ScheduledStationAETitle="CT1")), ITEMS) == ["A1", "A3", "A4"]
    assert _accessions(_query(_sps(ScheduledStationAETitle="ct1")), ITEMS) == []
    assert _accessions(_query(AccessionNumber="A2"), ITEMS) == ["A2"]


def test_c_2_2_2_1_1_pn_case_insensitive_is_an_option() -> None:
    assert _accessions(_query(PatientName="SMITH^JOHN"), ITEMS) == ["A2"]
    assert _accessions(_query(PatientName="SMITH^JOHN"), ITEMS, pn_case_insensitive=False) == []


def test_c_2_2_2_1_1_pn_accent_insensitive_matches_vietnamese_without_diacritics() -> None:
    assert _accessions(_query(PatientName="NGUYEN^VAN AN"), ITEMS) == ["A1"]
    # Đ has no Unicode decomposition; it must still fold to D.
    assert _accessions(_query(PatientName="DANG^THI HOA"), ITEMS) == ["A3"]
    utf8 = _query(PatientName="nguyễn^văn an", SpecificCharacterSet="ISO_IR 192")
    assert _accessions(utf8, ITEMS) == ["A1"]
    off = {"pn_accent_insensitive": False}
    assert _accessions(_query(PatientName="NGUYEN^VAN AN"), ITEMS, **off) == []
    utf8 = _query(PatientName="NGUYỄN^VĂN AN", SpecificCharacterSet="ISO_IR 192")
    assert _accessions(utf8, ITEMS, **off) == ["A1"]


def test_c_2_2_2_1_1_pn_trailing_empty_components_and_component_groups() -> None:
    assert _accessions(_query(PatientName="DOE^JANE^^"), ITEMS) == ["A4"]
    item = make_item("A9", patient_name="Wang^XiaoDong=王^小東")
    utf8 = _query(PatientName="王^小東", SpecificCharacterSet="ISO_IR 192")
    assert _accessions(utf8, [item]) == ["A9"]
    assert _accessions(_query(PatientName="Wang^XiaoDong"), [item]) == ["A9"]


def test_fold_person_name() -> None:
    assert fold_person_name("NGUYỄN^VĂN AN^^", case=True, accent=True) == "nguyen^van an"
    assert fold_person_name("Đặng", case=False, accent=True) == "Dang"


# --- C.2.2.2.2 List of UID Matching ----------------------------------------------------


def test_c_2_2_2_2_list_of_uid_matching() -> None:
    uids = [ITEMS[0].order.study_instance_uid, ITEMS[3].order.study_instance_uid]
    assert _accessions(_query(StudyInstanceUID=uids), ITEMS) == ["A1", "A4"]


def test_c_2_2_2_4_wildcards_are_refused_for_uids() -> None:
    with pytest.raises(InvalidQueryError):
        build_query(_query(StudyInstanceUID="1.2.*"))


# --- C.2.2.2.3 Universal Matching and K.4.1.1.3.2 return keys ----------------------------


def test_c_2_2_2_3_universal_matching_returns_every_requested_key_even_when_empty() -> None:
    item = replace(ITEMS[3], order=replace(ITEMS[3].order, admission_id=""))
    q = _query(
        _sps(ScheduledProcedureStepDescription="", PreMedication=""),
        AdmissionID="",
        PatientBirthDate="",
        PregnancyStatus=None,
        RequestedProcedureCodeSequence=[],
    )
    [rsp] = match(build_query(q), item)
    assert rsp.AdmissionID == ""
    assert rsp.PatientBirthDate == "19800102"
    assert "PregnancyStatus" in rsp and rsp.PregnancyStatus is None
    sps = rsp.ScheduledProcedureStepSequence[0]
    assert sps.PreMedication == "" and sps.ScheduledProcedureStepDescription == "CT examination"
    # An empty sequence key returns whole items (K.2.2.1.2 note 4).
    assert rsp.RequestedProcedureCodeSequence[0].CodeValue == "CTRP"
    # Nothing that was not asked for (K.4.1.1.3.2).
    assert "PatientID" not in rsp and "StudyInstanceUID" not in rsp


def test_k_2_2_1_1_2_unknown_optional_keys_are_returned_empty_and_reported() -> None:
    q = _query(OtherPatientIDs="X", InstitutionName="")
    query = build_query(q)
    assert len(query.unsupported) == 2
    rsp = match(query, ITEMS[0])[0]
    assert rsp.OtherPatientIDs == "" and rsp.InstitutionName == ""


def test_k_2_2_1_1_1_an_empty_stored_value_fails_a_matching_key_but_not_a_lone_star() -> None:
    q = _query(AdmissionID="ADM1")
    assert _accessions(q, ITEMS) == []
    assert _accessions(_query(AdmissionID="*"), ITEMS) == ["A1", "A2", "A3", "A4"]


# --- C.2.2.2.4 Wild Card Matching ---------------------------------------------------


def test_c_2_2_2_4_wildcards_star_and_question_mark() -> None:
    assert _accessions(_query(PatientName="*HOA"), ITEMS) == ["A3"]
    assert _accessions(_query(PatientName="D?E*"), ITEMS) == ["A4"]
    assert _accessions(_query(AccessionNumber="A?"), ITEMS) == ["A1", "A2", "A3", "A4"]
    assert _accessions(_query(_sps(Modality="M*")), ITEMS) == ["A2"]
    # Regex metacharacters are literal.
    assert _accessions(_query(PatientName="D.E*"), ITEMS) == []


def test_c_2_2_2_4_wildcard_matching_is_case_sensitive_except_pn() -> None:
    assert _accessions(_query(_sps(ScheduledStationAETitle="c*")), ITEMS) == []
    assert _accessions(_query(PatientName="smi*"), ITEMS) == ["A2"]


@pytest.mark.parametrize(
    "keys",
    [
        {"ScheduledProcedureStepStartDate": "2026*"},
        {"ScheduledProcedureStepStartTime": "09?0"},
    ],
)
def test_c_2_2_2_4_wildcards_are_refused_for_dates_and_times(keys: dict[str, str]) -> None:
    with pytest.raises(InvalidQueryError):
        build_query(_query(_sps(**keys)))


# --- C.2.2.2.5 Range Matching ---------------------------------------------------------


@pytest.mark.parametrize(
    ("date_key", "expected"),
    [
        ("20261125", ["A1", "A2"]),
        ("20261126-", ["A3", "A4"]),
        ("-20261125", ["A1", "A2"]),
        ("20261126-20261126", ["A3"]),
        ("20261125-20261127", ["A1", "A2", "A3", "A4"]),
    ],
)
def test_c_2_2_2_5_1_date_range_matching(date_key: str, expected: list[str]) -> None:
    q = _query(_sps(ScheduledProcedureStepStartDate=date_key))
    assert _accessions(q, ITEMS) == expected


@pytest.mark.parametrize(
    ("time_key", "expected"),
    [("0900", ["A1"]), ("-0800", ["A3"]), ("1400-", ["A2", "A4"]), ("07-09", ["A1", "A3"])],
)
def test_c_2_2_2_5_2_time_range_matching_within_a_day(time_key: str, expected: list[str]) -> None:
    q = _query(_sps(ScheduledProcedureStepStartTime=time_key))
    assert _accessions(q, ITEMS) == expected


def test_c_2_2_2_5_2_a_time_range_crossing_midnight_alone_is_refused() -> None:
    with pytest.raises(InvalidQueryError, match="midnight"):
        build_query(_query(_sps(ScheduledProcedureStepStartTime="2200-0600")))


def test_table_k_6_1_date_and_time_ranges_combine_into_one_datetime_range() -> None:
    """Remark on (0040,0003) in PS3.4 Table K.6-1, and C.2.2.2.5.4."""
    q = _query(
        _sps(
            ScheduledProcedureStepStartDate="20261125-20261126",
            ScheduledProcedureStepStartTime="2200-0800",
        )
    )
    # 25th 22:00 .. 26th 08:00: not A1 (25th 09:00), but A2 (25th 23:00) and A3 (26th 07:30).
    assert _accessions(q, ITEMS) == ["A2", "A3"]
    q = _query(
        _sps(
            ScheduledProcedureStepStartDate="20261125-20261126",
            ScheduledProcedureStepStartTime="1000-0800",
        )
    )
    assert _accessions(q, ITEMS) == ["A2", "A3"]


def test_single_date_with_time_range_is_that_day_only() -> None:
    q = _query(
        _sps(
            ScheduledProcedureStepStartDate="20261125", ScheduledProcedureStepStartTime="0800-1000"
        )
    )
    assert _accessions(q, ITEMS) == ["A1"]


@pytest.mark.parametrize(
    "keys",
    [
        {"ScheduledProcedureStepStartDate": "2026-11-25"},
        {"ScheduledProcedureStepStartDate": "20261127-20261125"},
        {"ScheduledProcedureStepStartDate": "20261340"},
        {"ScheduledProcedureStepStartDate": "-"},
        {"ScheduledProcedureStepStartTime": "2500"},
        {"ScheduledProcedureStepStartTime": "ab"},
    ],
)
def test_c_2_2_2_5_malformed_ranges_are_refused(keys: dict[str, str]) -> None:
    with pytest.raises(InvalidQueryError):
        build_query(_query(_sps(**keys)))


# --- C.2.2.2.6 Sequence Matching -------------------------------------------------------


def _two_step_item() -> WorklistItem:
    base = ITEMS[0]
    mr = ScheduledProcedureStep(
        step_id="SPS-MR",
        station_ae_title="MR1",
        modality="MR",
        start=datetime(2026, 11, 25, 11, 0),
        description="MR follow-up",
        protocol_codes=(
            Code("MRP1", "99PACSLAB", "MR brain"),
            Code("MRP2", "99PACSLAB", "MR spine"),
        ),
    )
    return replace(base, steps=(*base.steps, mr))


def test_c_2_2_2_6_one_response_per_matching_step_with_only_that_step() -> None:
    item = _two_step_item()
    rsps = match(build_query(_query(_sps(ScheduledProcedureStepID=""))), item)
    assert [r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID for r in rsps] == [
        "SPSA1",
        "SPS-MR",
    ]
    assert all(len(r.ScheduledProcedureStepSequence) == 1 for r in rsps)
    [mr] = match(build_query(_query(_sps(Modality="MR"))), item)
    assert mr.ScheduledProcedureStepSequence[0].Modality == "MR"


def test_c_2_2_2_6_nested_sequence_matching_returns_only_matching_items() -> None:
    code_key = Dataset()
    code_key.CodeValue = "MRP2"
    code_key.CodeMeaning = ""
    q = _query(_sps(ScheduledProtocolCodeSequence=[code_key]))
    [rsp] = match(build_query(q), _two_step_item())
    codes = rsp.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence
    assert [(c.CodeValue, c.CodeMeaning) for c in codes] == [("MRP2", "MR spine")]
    assert "CodingSchemeDesignator" not in codes[0]


def test_c_2_2_2_6_a_sequence_key_with_two_items_is_refused() -> None:
    q = _query()
    q.ScheduledProcedureStepSequence = [_sps(), _sps()]
    with pytest.raises(InvalidQueryError, match="one item"):
        build_query(q)


def test_c_2_2_2_6_empty_sequence_key_returns_whole_step() -> None:
    q = _query()
    q.ScheduledProcedureStepSequence = []
    [rsp] = match(build_query(q), ITEMS[0])
    step = rsp.ScheduledProcedureStepSequence[0]
    assert step.ScheduledStationAETitle == "CT1" and step.ScheduledProtocolCodeSequence[0].CodeValue


# --- Worklist rules: statuses, multiple values, VR checks -------------------------------


def test_only_scheduled_and_arrived_steps_are_offered() -> None:
    items = [
        ITEMS[0].with_step_status("SPSA1", SpsStatus.ARRIVED),
        ITEMS[1].with_step_status("SPSA2", SpsStatus.STARTED),
        ITEMS[2].with_step_status("SPSA3", SpsStatus.COMPLETED),
        ITEMS[3].with_step_status("SPSA4", SpsStatus.DISCONTINUED),
    ]
    assert _accessions(_query(), items) == ["A1"]


def test_k_2_2_3_multi_valued_key_matches_any_value() -> None:
    q = _query(_sps(Modality=["MR", "CT"]))
    assert _accessions(q, ITEMS) == ["A1", "A2", "A3", "A4"]


def test_a_key_with_the_wrong_vr_is_refused() -> None:
    q = _query()
    q.add_new(0x00400100, "LO", "x")  # Scheduled Procedure Step Sequence must be SQ
    with pytest.raises(InvalidQueryError, match="VR"):
        build_query(q)


def test_prefilter_for_the_index() -> None:
    q = build_query(
        _query(
            _sps(
                ScheduledStationAETitle="CT1",
                Modality="C*",
                ScheduledProcedureStepStartDate="20261125-",
            )
        )
    )
    assert q.prefilter.station_ae_title == "CT1"
    assert q.prefilter.modality is None  # a wildcard cannot use the index
    assert str(q.prefilter.start_from) == "2026-11-25" and q.prefilter.start_until is None


def test_options_from_settings() -> None:
    opts = MatchOptions.from_settings(WorklistSettings(pn_case_insensitive=False, max_results=7))
    assert opts.limit == 7 and not opts.pn_case_insensitive and opts.pn_accent_insensitive


# --- Specific Character Set ------------------------------------------------------------


def _roundtrip(ds: Dataset) -> Dataset:
    """Encode and decode as on the wire, so the query's character set applies."""
    buf = BytesIO()
    dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
    buf.seek(0)
    return dcmread(buf, force=True)


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_c_2_2_2_query_values_are_decoded_with_the_query_character_set(charset: str) -> None:
    q = _query(PatientName="Müller*")
    q.SpecificCharacterSet = charset
    item = make_item("A8", patient_name="MÜLLER^JÜRGEN")
    assert _accessions(_roundtrip(q), [item], pn_accent_insensitive=False) == ["A8"]


def test_response_is_utf8_when_any_value_is_not_ascii() -> None:
    [rsp] = match(build_query(_query(PatientName="NGUYEN*")), ITEMS[0])
    assert rsp.SpecificCharacterSet == "ISO_IR 192"
    assert _roundtrip(rsp).PatientName == "NGUYỄN^VĂN AN"
    [ascii_rsp] = match(build_query(_query(PatientName="DOE*")), ITEMS[3])
    assert "SpecificCharacterSet" not in ascii_rsp


def test_response_keeps_latin1_when_the_scu_asked_for_it_and_it_suffices() -> None:
    q = _query(PatientName="M*")
    q.SpecificCharacterSet = "ISO_IR 100"
    [rsp] = match(build_query(q), make_item("A8", patient_name="MÜLLER^JÜRGEN"))
    assert rsp.SpecificCharacterSet == "ISO_IR 100"
    [rsp] = match(build_query(_query(PatientName="NGUYEN*")), ITEMS[0])
    assert rsp.SpecificCharacterSet == "ISO_IR 192"


def test_response_vrs_follow_table_k_6_1() -> None:
    q = _query(
        _sps(), PatientBirthDate="", StudyInstanceUID="", PregnancyStatus=None, PatientWeight=""
    )
    [rsp] = match(build_query(q), ITEMS[0])
    vrs = {e.keyword: e.VR for e in rsp}
    assert vrs["PatientBirthDate"] == "DA" and vrs["StudyInstanceUID"] == "UI"
    assert vrs["PregnancyStatus"] == "US" and vrs["PatientWeight"] == "DS"
    sps_vrs = {e.keyword: e.VR for e in rsp.ScheduledProcedureStepSequence[0]}
    assert sps_vrs == {
        "ScheduledStationAETitle": "AE",
        "Modality": "CS",
        "ScheduledProcedureStepStartDate": "DA",
        "ScheduledProcedureStepStartTime": "TM",
    }
