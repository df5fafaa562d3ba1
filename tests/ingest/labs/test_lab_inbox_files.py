"""Every file of tests/data/lab dropped into its inbox: ingested, or rejected with a reason.

Counts and values asserted here are read from the files themselves (see SOURCES.md);
they reach the store and the FHIR API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from lab_support import CSV_PROFILE, LAB_DATA, LabRig, lab_settings, make_rig

from api.app import create_app
from core.settings import Settings
from storage.lab import LabResultQuery, StoredLabResult

#: File → results stored (0: rejected). Counted from the files: R records, OBX
#: segments of result messages, export rows.
EXPECTED_RESULTS = {
    "abbott_architect_multi_message.astm": 14,
    "biorad_ihcom_bloodtype_two_patients.astm": 5,
    "immucor_galileo_result.astm": 14,
    "ours_astm_delims_at_caret_backslash_utf8_vi.astm": 8,
    "ours_e1381_framed_architect_etb_wrap_long.astm": 14,
    "cdc_epic_oru_r01_v23_nte_dualcoding.hl7": 3,
    "cdc_oracle_oru_r01_v23_refrange_flags.hl7": 3,
    "cdc_oru_r01_v251_result_linked.hl7": 1,
    "cdc_oru_r01_v251_utf8_micro_lf.hl7": 1,
    "cepheid_genexpert_oru_r32_v25_subcomponents.hl7": 23,
    "hapi_oml_o21_oul_r22_multi_v251.hl7": 21,
    "ours_oru_oul_v251_utf8_vi_mllp_qc.hl7": 2,
    "ours_oru_r01_v251_8859-1_crlf_value_types.hl7": 11,
    "python_hl7_oru_r01_v24_sn_value.hl7": 2,
    "roche_cobas_c111_export_semicolon.csv": 4,
    "ours_decimal_comma_latin1_de.csv": 4,
    "ours_scaled_int_cp1258_vi.txt": 4,
}

#: File → (where, why) of its rejection: order and acknowledgement messages.
EXPECTED_REJECTIONS = {
    "cdc_ca_oml_o21_v251_malformed_joined_segments.hl7": (
        "message 1, segment 1 (MSH)",
        "OML^O21 is an order, not a result message",
    ),
    "cdc_epic_orm_o01_v23.hl7": (
        "message 1, segment 1 (MSH)",
        "ORM^O01 is an order, not a result message",
    ),
    "cdc_natus_ack_v251.hl7": (
        "message 1, segment 1 (MSH)",
        "ACK is an acknowledgement, not a result message",
    ),
    "cdc_orm_o01_v251_order_linked.hl7": (
        "message 1, segment 1 (MSH)",
        "ORM^O01 is an order, not a result message",
    ),
    "hl7apy_oml_o33_v25_multi_specimen.hl7": (
        "message 1, segment 1 (MSH)",
        "OML^O33 is an order, not a result message",
    ),
}


def _all_files() -> list[Path]:
    return sorted(p for p in LAB_DATA.glob("*/*") if p.suffix in {".astm", ".hl7", ".csv", ".txt"})


def test_the_expectations_cover_every_file() -> None:
    names = {p.name for p in _all_files()}
    assert names == set(EXPECTED_RESULTS) | set(EXPECTED_REJECTIONS)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabRig, TestClient]]:
    """One inbox run over every file; the tests below read what it left."""
    # Authentication has its own tests (tests/security); here it would only add noise.
    base = Settings(data_dir=tmp_path_factory.mktemp("lab") / "data", auth={"enabled": False})
    settings = lab_settings(base, critical={"K": {"high": 5.5}, "2345-7": {"low": 2.5}})
    rig_iter = make_rig(settings)
    rig = next(rig_iter)
    for path in _all_files():
        rig.drop(path, CSV_PROFILE.get(path.name, "auto"))
    rig.outcomes = rig.run()
    with TestClient(create_app(settings)) as client:
        yield rig, client
    rig_iter.close()


def _results(rig: LabRig, **criteria: object) -> list[StoredLabResult]:
    criteria.setdefault("qc", None)
    query = LabResultQuery(limit=10_000, **criteria)  # type: ignore[arg-type]
    return rig.store.search_results(query)[0]


def _by_file(rig: LabRig, name: str, *, current_only: bool = False) -> list[StoredLabResult]:
    query = LabResultQuery(qc=None, limit=10_000, current_only=current_only)
    return [r for r in rig.store.search_results(query)[0] if r.file_name == name]


def test_every_file_is_ingested_or_rejected(loaded: tuple[LabRig, TestClient]) -> None:
    rig, _ = loaded
    outcomes = {o.name: o for o in rig.outcomes}
    assert set(outcomes) == set(EXPECTED_RESULTS) | set(EXPECTED_REJECTIONS)
    for name, count in EXPECTED_RESULTS.items():
        profile = CSV_PROFILE.get(name, "auto")
        assert outcomes[name].status == "ingested", name
        assert len(_by_file(rig, name)) == count, name
        assert (rig.inbox(profile) / "processed" / name).is_file()
        body = json.loads((rig.inbox(profile) / "processed" / f"{name}.summary.json").read_text())
        assert (body["status"], body["results"], body["sha256"]) == (
            "ingested",
            count,
            outcomes[name].sha256,
        )
    for name, (where, why) in EXPECTED_REJECTIONS.items():
        assert outcomes[name].status == "rejected", name
        rejected = rig.inbox() / "rejected"
        assert (rejected / name).is_file()
        reason = json.loads((rejected / f"{name}.error.json").read_text())
        assert (reason["where"], reason["why"], reason["format"]) == (where, why, "hl7v2")
        assert reason["what"] == "Unparseable lab message"
    # Nothing is left behind in any inbox.
    for profile in ("auto", "cobas", "labor_sued", "vn_export"):
        assert [p.name for p in rig.inbox(profile).iterdir() if p.is_file()] == []


def test_summaries_carry_no_patient_data(loaded: tuple[LabRig, TestClient]) -> None:
    rig, _ = loaded
    text = (
        rig.inbox() / "processed" / "ours_oru_oul_v251_utf8_vi_mllp_qc.hl7.summary.json"
    ).read_text()
    assert "BN-2024-001" not in text and "NGUY" not in text.upper()


def test_hapi_batch_summary_names_the_skipped_orders(loaded: tuple[LabRig, TestClient]) -> None:
    rig, _ = loaded
    name = "hapi_oml_o21_oul_r22_multi_v251.hl7"
    body = json.loads((rig.inbox() / "processed" / f"{name}.summary.json").read_text())
    assert body["messages"] == 5
    assert body["message_types"] == ["ORU^R01", "OUL^R22"]
    skipped = [w for w in body["warnings"] if w.startswith("skipped")]
    assert len(skipped) == 8


def test_architect_resent_framed_is_a_second_version(loaded: tuple[LabRig, TestClient]) -> None:
    """The E1381 capture carries the same 14 results as the unframed file: re-sent."""
    rig, _ = loaded
    plain = _by_file(rig, "abbott_architect_multi_message.astm")
    framed = _by_file(rig, "ours_e1381_framed_architect_etb_wrap_long.astm")
    assert {r.observation_id for r in plain} == {r.observation_id for r in framed}
    assert len({r.observation_id for r in plain}) == 14  # F, I, P kinds kept apart
    versions = sorted((r.version, r.is_current) for r in plain + framed)
    assert versions == [(1, False)] * 14 + [(2, True)] * 14


def test_values_units_flags_reach_the_store(loaded: tuple[LabRig, TestClient]) -> None:
    rig, _ = loaded
    (glu,) = _results(rig, specimen_ids=("SPC-1001",), codes=(("local", "GLU"),))
    assert (glu.raw_value, glu.value, glu.comparator, glu.unit) == (">8", 8.0, ">", "mmol/L")
    assert glu.flags == ("H", "A") and (glu.reference_low, glu.reference_high) == (3.9, 6.1)
    assert glu.patient_id == "PID-VN-001" and glu.patient_name.startswith("Nguyễn")
    (micro,) = _by_file(rig, "cdc_oru_r01_v251_utf8_micro_lf.hl7")
    assert (micro.unit, micro.ucum_unit, micro.value, micro.loinc) == (
        "µmol/L",
        "umol/L",
        0.5,
        "47633-3",
    )
    sn = _by_file(rig, "python_hl7_oru_r01_v24_sn_value.hl7")[0]
    assert (sn.raw_value, sn.value, sn.flags, sn.reference_range) == (
        "^182",
        182.0,
        ("H",),
        "70_105",
    )
    oracle = {
        r.sub_id or r.test_code: r
        for r in _by_file(rig, "cdc_oracle_oru_r01_v23_refrange_flags.hl7")
    }
    macr = oracle["MACR"]
    assert (macr.unit, macr.reference_range, macr.reference_high, macr.flags) == (
        "mg/g crea",
        "<30",
        30.0,
        ("H",),
    )
    cobas = {
        (r.specimen_id, r.test_code): r
        for r in _by_file(rig, "roche_cobas_c111_export_semicolon.csv")
    }
    glu2 = cobas[("03", "GLU2")]
    assert (glu2.value, glu2.ucum_unit, glu2.flags, glu2.loinc) == (1.3, "g/L", (">RR",), "2345-7")
    assert glu2.analyzer == "60274" and cobas[("CP", "ALTL")].flags == ("? QC",)
    german = _by_file(rig, "ours_decimal_comma_latin1_de.csv")
    k = next(r for r in german if r.test_code == "K")
    assert (k.value, k.ucum_unit, k.flags, k.patient_id) == (5.6, "mmol/L", ("H",), "P-77")
    crp = next(r for r in german if r.test_code == "CRP")
    assert (crp.raw_value, crp.value, crp.comparator) == ("<0,5", 0.5, "<")
    hb = [r for r in german if r.test_code == "HB"]
    assert [r.loinc for r in hb] == ["718-7", "718-7"] and hb[1].value is None
    vn = {(r.specimen_id, r.test_code): r for r in _by_file(rig, "ours_scaled_int_cp1258_vi.txt")}
    assert vn[("M-0001", "GLU")].value == 5.48 and vn[("M-0001", "WBC")].ucum_unit == "10*9/L"
    assert vn[("M-0001", "GLU")].patient_name == "Nguyễn Thị Hồng"


def test_qc_results_never_attach_to_a_patient(loaded: tuple[LabRig, TestClient]) -> None:
    rig, _ = loaded
    qc = _results(rig, qc=True)
    # ASTM O.12 = Q and H.12 = Q, HL7 SPM-11 = Q, an export row with the QC- prefix.
    assert sorted(r.specimen_id for r in qc) == ["CTRL-HIGH", "QC-0001", "QC-CTRL-2", "QC-LOT-42"]
    assert all(r.patient_id == "" and r.patient_name == "" and not r.is_critical for r in qc)
    # A patient search never returns QC, and plain searches leave QC out.
    for pid in ("PID-VN-001", "BN-2024-001", "BN-01"):
        assert all(not r.is_qc for r in _results(rig, patient_ids=(pid,)))
    assert all(not r.is_qc for r in rig.store.search_results(LabResultQuery(limit=10_000))[0])


def test_critical_values_are_flagged_by_limit_and_by_panic_flag(
    loaded: tuple[LabRig, TestClient],
) -> None:
    rig, _ = loaded
    critical = _results(rig, critical=True)
    reasons = {(r.test_code, r.specimen_id): r.critical_reason for r in critical}
    assert reasons[("K", "S-001")] == "above critical high 5.5"
    assert all(not r.is_qc for r in critical)
    # 5.4 mmol/L glucose (LOINC 2345-7) is above the configured critical low 2.5.
    assert ("2345-7", "FI-1") not in reasons


def test_fhir_search_by_patient_specimen_code_and_date(loaded: tuple[LabRig, TestClient]) -> None:
    _, client = loaded
    r = client.get("/fhir/Observation", params={"patient:identifier": "PAT-4711"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate(r.json())
    assert bundle.type == "searchset" and bundle.total == 11
    for entry in bundle.entry or []:
        Observation.model_validate(entry.resource.model_dump())  # type: ignore[union-attr]
    by_specimen = client.get("/fhir/Observation", params={"specimen:identifier": "SPC-1001"}).json()
    assert by_specimen["total"] == 6
    codes = client.get("/fhir/Observation", params={"code": "http://loinc.org|47633-3"}).json()
    (entry,) = codes["entry"]
    value = entry["resource"]["valueQuantity"]
    assert value == {
        "value": 0.5,
        "unit": "µmol/L",
        "system": "http://unitsofmeasure.org",
        "code": "umol/L",
    }
    march = client.get(
        "/fhir/Observation",
        params={
            "patient:identifier": "P-77",
            "date": ["ge2024-03-15T08:00:00Z", "lt2024-03-15T09:00:00Z"],
        },
    ).json()
    assert march["total"] == 2
    none = client.get(
        "/fhir/Observation", params={"patient:identifier": "P-77", "date": "2023"}
    ).json()
    assert none["total"] == 0


def test_fhir_diagnostic_report_groups_one_order(loaded: tuple[LabRig, TestClient]) -> None:
    _, client = loaded
    r = client.get(
        "/fhir/DiagnosticReport",
        params={"identifier": "4560411583", "_include": "DiagnosticReport:result"},
    )
    bundle = r.json()
    Bundle.model_validate(bundle)
    matches = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
    included = [e for e in bundle["entry"] if e["search"]["mode"] == "include"]
    (report,) = matches
    DiagnosticReport.model_validate(report["resource"])
    assert report["resource"]["status"] == "final"
    assert report["resource"]["subject"]["identifier"]["value"] == "1300974"
    (obs,) = included
    assert obs["resource"]["valueCodeableConcept"]["coding"][0]["code"] == "LA12432-3"
    read = client.get(f"/fhir/DiagnosticReport/{report['resource']['id']}").json()
    assert read["result"] == report["resource"]["result"]


def test_fhir_qc_only_on_request(loaded: tuple[LabRig, TestClient]) -> None:
    _, client = loaded
    qc = client.get("/fhir/Observation", params={"_tag": "qc"}).json()
    assert qc["total"] == 4
    assert all("subject" not in e["resource"] for e in qc["entry"])
    reports = client.get("/fhir/DiagnosticReport", params={"_tag": "qc"}).json()
    assert all("subject" not in e["resource"] for e in reports["entry"])
