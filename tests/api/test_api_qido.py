"""QIDO-RS (PS3.18 10.6) through TestClient: matching, return attributes, paging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.api._support import Stored, make_study, run_metadata_step, store_files


def search(client: TestClient, path: str, **params: Any) -> list[dict[str, Any]]:
    r = client.get(f"/dicomweb{path}", params=params)
    if r.status_code == 204:
        return []
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    body: list[dict[str, Any]] = r.json()
    return body


def values(results: list[dict[str, Any]], tag: str) -> list[Any]:
    return [r[tag]["Value"][0] for r in results if "Value" in r.get(tag, {})]


def test_study_required_return_attributes(client: TestClient, ct: Stored) -> None:
    (study,) = search(client, "/studies")
    # PS3.18 Table 10.6.1-5
    for tag in (
        "00080020",
        "00080030",
        "00080050",
        "00080056",
        "00080061",
        "00080090",
        "00081190",
        "00100010",
        "00100020",
        "00100030",
        "00100040",
        "0020000D",
        "00200010",
        "00201206",
        "00201208",
        "00080005",
    ):
        assert tag in study, tag
    assert study["00201206"] == {"vr": "IS", "Value": [1]}
    assert study["00201208"] == {"vr": "IS", "Value": [4]}
    assert study["00080061"]["Value"] == ["CT"]
    assert study["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "NGUYEN^VAN AN"}]}
    assert study["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{ct.study}")


def test_series_and_instance_levels(client: TestClient, ct: Stored) -> None:
    (series,) = search(client, f"/studies/{ct.study}/series")
    assert series["0020000E"]["Value"] == [ct.series]
    assert series["00201209"]["Value"] == [4]
    assert series["00080060"]["Value"] == ["CT"]
    insts = search(client, f"/studies/{ct.study}/series/{ct.series}/instances")
    assert values(insts, "00080018") == ct.sops
    assert values(insts, "00200013") == [1, 2, 3, 4]
    assert values(insts, "00280010") == [32] * 4
    assert insts[0]["00081190"]["Value"][0].endswith(f"/instances/{ct.sops[0]}")
    # outside a study, series and instances carry their study's attributes
    (all_series,) = search(client, "/series")
    assert all_series["0020000D"]["Value"] == [ct.study]
    assert "00100020" in all_series
    assert len(search(client, "/instances")) == 4
    assert len(search(client, f"/studies/{ct.study}/instances")) == 4


def test_empty_result_is_204(client: TestClient, ct: Stored) -> None:
    r = client.get("/dicomweb/studies", params={"PatientID": "nobody"})
    assert r.status_code == 204
    assert r.content == b""


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, {"a", "b", "c"}),
        ({"PatientID": "P1"}, {"a", "c"}),
        ({"00100020": "P2"}, {"b"}),
        ({"PatientName": "NGUYEN*"}, {"a", "c"}),
        ({"PatientName": "nguyen^van an"}, {"a", "c"}),  # PN case-insensitive
        ({"PatientName": "tran"}, set()),  # no fuzzy: exact
        ({"PatientName": "tran", "fuzzymatching": "true"}, {"b"}),
        ({"PatientName": "binh", "fuzzymatching": "true"}, {"b"}),
        ({"PatientName": "v", "fuzzymatching": "true"}, {"a", "c"}),
        ({"AccessionNumber": "ACC-?"}, {"a", "b", "c"}),
        ({"AccessionNumber": "acc-a"}, set()),  # LIKE is case-sensitive on both dialects
        ({"StudyDate": "20240101-"}, {"a", "b"}),
        ({"StudyDate": "-20240105"}, {"a", "c"}),
        ({"StudyDate": "20240101-20240131"}, {"a"}),
        ({"StudyDate": "20240220"}, {"b"}),
        ({"StudyTime": "08-09"}, {"a"}),
        ({"StudyTime": "2359"}, {"c"}),
        ({"ModalitiesInStudy": "MR"}, {"b"}),
        ({"ModalitiesInStudy": "CT\\MR"}, {"a", "b", "c"}),
        ({"ModalitiesInStudy": "MR,XA"}, {"b"}),  # PS3.18 8.3.4.1: a comma-separated list
        ({"ModalitiesInStudy": "C*"}, {"a", "c"}),
        ({"ModalitiesInStudy": "?R"}, {"b"}),
        ({"ModalitiesInStudy": "X*"}, set()),
        ({"StudyDescription": "CT*"}, {"a", "c"}),
        ({"PatientName": ""}, {"a", "b", "c"}),  # universal matching
    ],
)
def test_study_matching(
    client: TestClient, catalogue: dict[str, str], params: dict[str, str], expected: set[str]
) -> None:
    found = set(values(search(client, "/studies", **params), "0020000D"))
    assert found == {catalogue[k] for k in expected}


def test_uid_list_matching(client: TestClient, catalogue: dict[str, str]) -> None:
    for sep in ("\\", ","):
        uids = sep.join([catalogue["a"], catalogue["b"]])
        found = set(values(search(client, "/studies", StudyInstanceUID=uids), "0020000D"))
        assert found == {catalogue["a"], catalogue["b"]}


def test_limit_offset_and_stable_order(client: TestClient, catalogue: dict[str, str]) -> None:
    everything = values(search(client, "/studies"), "0020000D")
    pages = [values(search(client, "/studies", limit=1, offset=i), "0020000D") for i in range(3)]
    assert [p[0] for p in pages] == everything
    assert search(client, "/studies", limit=5, offset=3) == []


def test_includefield(client: TestClient, app: FastAPI, ct: Stored) -> None:
    (study,) = search(client, "/studies", includefield="InstitutionName")
    assert study["00080080"]["Value"] == ["Provincial General Hospital"]
    (study,) = search(client, "/studies", includefield="all")
    assert "00080080" in study and "00100021" in study
    # a tag the index does not keep: instance level reads it from the stored metadata
    assert run_metadata_step(app) == 4
    insts = search(client, "/instances", includefield="00180060,SliceLocation")
    assert insts[0]["00180060"]["Value"] == [120]  # KVP (DS is a JSON number)
    assert "00201041" in insts[0]


@pytest.mark.parametrize(
    "params",
    [
        {"StudyDate": "2024-01-01"},
        {"StudyDate": "-"},
        {"limit": "-1"},
        {"offset": "x"},
        {"offset": str(10**24)},  # found by schemathesis: overflowed the SQL integer
        {"fuzzymatching": "maybe"},
        {"NotAKeyword": "1"},
        {"SOPInstanceUID": "1.2.3"},  # instance key at study level
        {"includefield": "Bogus"},
    ],
)
def test_bad_queries_are_400(client: TestClient, params: dict[str, str]) -> None:
    r = client.get("/dicomweb/studies", params=params)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == 400


def test_unsupported_key_is_ignored_with_warning(client: TestClient, ct: Stored) -> None:
    r = client.get("/dicomweb/studies", params={"OperatorsName": "X"})
    assert r.status_code == 200
    assert "OperatorsName" in r.headers["warning"]


def test_unacceptable_media_type_is_406(client: TestClient, ct: Stored) -> None:
    r = client.get("/dicomweb/studies", headers={"Accept": "application/dicom+xml"})
    assert r.status_code == 406


def test_modalities_and_counts_are_per_study(
    client: TestClient, app: FastAPI, catalogue: dict[str, str], tmp_path: Path
) -> None:
    """Issue 13.1: each study answers its own ModalitiesInStudy and counts (PS3.18
    Table 10.6.1-5), not those of the archive; FHIR ImagingStudy.modality shares the
    query."""
    # A second series (PT, 2 instances) in study "a": CT\PT, 2 series, 4 instances.
    store_files(
        app.state.archive,
        make_study(tmp_path / "a-pt", modality="PT", StudyInstanceUID=catalogue["a"],
                   PatientName="NGUYEN^VAN AN", PatientID="P1"),
    )
    expected = {
        catalogue["a"]: (["CT", "PT"], 2, 4),
        catalogue["b"]: (["MR"], 1, 3),
        catalogue["c"]: (["CT"], 1, 2),
    }
    studies = search(
        client, "/studies", includefield="00081030,00080060,ModalitiesInStudy,"
        "NumberOfStudyRelatedInstances"
    )
    got = {
        s["0020000D"]["Value"][0]: (
            sorted(s["00080061"]["Value"]), s["00201206"]["Value"][0], s["00201208"]["Value"][0]
        )
        for s in studies
    }
    assert got == expected
    for uid, (modalities, _, _) in expected.items():
        r = client.get(f"/fhir/ImagingStudy/{uid}")
        assert r.status_code == 200, r.text
        assert sorted(c["code"] for c in r.json()["modality"]) == modalities


@pytest.mark.parametrize(
    ("path", "params", "expected"),
    [
        # PS3.18 10.6.1.2: a study-level key at series/instance level is valid
        ("/series", {"ModalitiesInStudy": "MR"}, {"b"}),
        ("/series", {"ModalitiesInStudy": "CT"}, {"a", "c"}),
        ("/instances", {"ModalitiesInStudy": "MR"}, {"b"}),
        ("/series", {"SeriesNumber": "1,2"}, {"a", "b", "c"}),  # integer list matching
    ],
)
def test_study_keys_at_lower_levels(
    client: TestClient,
    catalogue: dict[str, str],
    path: str,
    params: dict[str, str],
    expected: set[str],
) -> None:
    found = set(values(search(client, path, **params), "0020000D"))
    assert found == {catalogue[k] for k in expected}


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/studies", {"StudyInstanceUID": "\\"}),  # issue 14.8: was a 500
        ("/studies", {"StudyInstanceUID": ","}),
        ("/studies", {"ModalitiesInStudy": "\\"}),
        ("/series", {"SeriesNumber": "\\"}),
        ("/series", {"SeriesNumber": "1,x"}),
        ("/series", {"Modality": ",,"}),
    ],
)
def test_empty_and_malformed_lists_are_400(
    client: TestClient, ct: Stored, path: str, params: dict[str, str]
) -> None:
    r = client.get(f"/dicomweb{path}", params=params)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
