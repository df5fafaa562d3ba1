"""Absolute URLs in DICOMweb and FHIR answers never come from the Host header
(issue 14.9, host header injection): ``http.public_url`` or the local address."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from tests.api._support import Stored, make_study, running_app, store_ct

EVIL = {"Host": "evil.example:666", "X-Forwarded-Host": "evil.example"}


def urls(client: TestClient, ct: Stored, tmp_path: Path) -> list[str]:
    """Every absolute URL the API writes, asked for with a forged Host."""
    found: list[str] = []
    studies = client.get("/dicomweb/studies", headers=EVIL).json()
    found += [s["00081190"]["Value"][0] for s in studies]
    series = client.get(f"/dicomweb/studies/{ct.study}/series", headers=EVIL).json()
    found += [s["00081190"]["Value"][0] for s in series]
    meta = client.get(f"/dicomweb/studies/{ct.study}/metadata", headers=EVIL).json()
    found += [m["7FE00010"]["BulkDataURI"] for m in meta]
    raw = make_study(tmp_path / "stow", slices=1)[0].read_bytes()
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + raw
            + f"\r\n--{boundary}--\r\n".encode())
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    stow = client.post("/dicomweb/studies", content=body,
                       headers={**EVIL, "Content-Type": ctype}).json()
    found.append(stow["00081190"]["Value"][0])
    found += [i["00081190"]["Value"][0] for i in stow["00081199"]["Value"]]
    endpoint = client.get("/fhir/Endpoint/dicomweb", headers=EVIL).json()
    found.append(endpoint["address"])
    bundle = client.get("/fhir/ImagingStudy", headers=EVIL).json()
    found += [e["fullUrl"] for e in bundle["entry"]] + [link["url"] for link in bundle["link"]]
    study = client.get(f"/fhir/ImagingStudy/{ct.study}", headers=EVIL)
    assert study.status_code == 200
    assert len(found) >= 8
    assert "evil.example" not in json.dumps(study.json())
    return found


def test_host_header_is_not_echoed(client: TestClient, ct: Stored, tmp_path: Path) -> None:
    for url in urls(client, ct, tmp_path):
        assert "evil" not in url, url
        # TestClient's ASGI scope["server"] is ("testserver", 80)
        assert url.startswith("http://testserver/"), url


def test_public_url_is_used(settings: Settings, tmp_path: Path) -> None:
    http = settings.http.model_copy(update={"public_url": "https://pacs.example.org/api"})
    with running_app(settings.model_copy(update={"http": http})) as app:
        ct = store_ct(app, tmp_path / "ct")
        for url in urls(TestClient(app), ct, tmp_path):
            assert url.startswith("https://pacs.example.org/api/"), url


@pytest.mark.parametrize(
    "value", ["pacs.example.org", "ftp://x", "https://u:p@x", "https://x/?a=1", "https://x#f"]
)
def test_public_url_must_be_a_plain_http_url(value: str) -> None:
    with pytest.raises(ValueError, match="public_url"):
        Settings(http={"public_url": value})
