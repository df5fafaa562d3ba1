"""The viewer's study list: search by name, ID, accession, date, modality, and pages
(issue 21), over several patients so that an ignored filter fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom import dcmread

from tests.api._support import make_study, store_files

STUDIES = [  # stored in this order: the list shows the newest (last) first
    ("lan", "TRẦN^THỊ LAN", "P1", "ACC1", "20261101", "CT"),
    ("do", "Đỗ^VĂN HÙNG", "P2", "ACC2", "20261115", "MR"),
    ("nguyen", "NGUYỄN^ÁNH", "P3", "ACC3", "20261120", "CT"),
    ("nguyen2", "NGUYEN^BINH", "P4", "ACC4", "20261201", "US"),
]


@pytest.fixture
def listed(app: FastAPI, tmp_path: Path) -> dict[str, str]:
    out = {}
    for key, name, pid, acc, day, modality in STUDIES:
        paths = make_study(tmp_path / key, modality=modality, PatientName=name, PatientID=pid,
                           AccessionNumber=acc, StudyDate=day)
        store_files(app.state.archive, paths)
        out[key] = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    return out


def keys(client: TestClient, listed: dict[str, str], **params: Any) -> list[str]:
    r = client.get("/viewer/api/studies", params=params)
    assert r.status_code == 200, r.text
    by_uid = {v: k for k, v in listed.items()}
    return [by_uid[s["study_instance_uid"]] for s in r.json()]


def test_search_fields(client: TestClient, listed: dict[str, str]) -> None:
    assert keys(client, listed) == ["nguyen2", "nguyen", "do", "lan"]
    assert keys(client, listed, name="trần") == ["lan"]
    assert keys(client, listed, name="TRAN THI") == ["lan"]
    assert keys(client, listed, name="đỗ") == ["do"]
    assert keys(client, listed, name="Nguyễn") == ["nguyen2", "nguyen"]
    assert keys(client, listed, name="nguyen anh") == ["nguyen"]
    assert keys(client, listed, patient_id="P2") == ["do"]
    assert keys(client, listed, accession="ACC3") == ["nguyen"]
    assert keys(client, listed, date="2026-11-15") == ["do"]
    assert keys(client, listed, date="20261110-20261130") == ["nguyen", "do"]
    assert keys(client, listed, modality="ct") == ["nguyen", "lan"]
    assert keys(client, listed, modality="CT", name="nguyen") == ["nguyen"]
    assert keys(client, listed, name="nobody") == []


def test_rows_carry_counts_and_modalities(client: TestClient, listed: dict[str, str]) -> None:
    (row,) = client.get("/viewer/api/studies", params={"patient_id": "P1"}).json()
    assert row["patient_name"] == "TRẦN^THỊ LAN" and row["accession_number"] == "ACC1"
    assert row["modalities"] == ["CT"] and row["series"] == 1


def test_pages_follow_the_link_header(client: TestClient, listed: dict[str, str]) -> None:
    seen: list[str] = []
    url: str | None = "/viewer/api/studies?limit=3"
    by_uid = {v: k for k, v in listed.items()}
    while url:
        r = client.get(url)
        assert r.status_code == 200
        seen += [by_uid[s["study_instance_uid"]] for s in r.json()]
        link = r.headers.get("link")
        url = link.split(">")[0].lstrip("<") if link else None
    assert seen == ["nguyen2", "nguyen", "do", "lan"]
    assert "link" not in client.get("/viewer/api/studies", params={"limit": 4}).headers


@pytest.mark.parametrize("params", [{"date": "2026-13-45"}, {"date": "yesterday"},
                                    {"limit": "0"}, {"offset": "-1"}, {"name": "x" * 300}])
def test_bad_search_is_4xx(client: TestClient, listed: dict[str, str],
                           params: dict[str, str]) -> None:
    assert client.get("/viewer/api/studies", params=params).status_code in (400, 422)
