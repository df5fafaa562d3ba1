"""STOW-RS (PS3.18 10.5): statuses 200/202/409/400/415, the same path as C-STORE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom import dcmread

from tests.api._support import dataset_bytes, make_study

BOUNDARY = "pacslab-test-boundary"
CT = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def body(*files: bytes, part_type: str = "application/dicom") -> bytes:
    out = b""
    for raw in files:
        out += f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + raw + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def post(client: TestClient, content: bytes, url: str = "/dicomweb/studies", **kw: Any) -> Any:
    headers = {"Content-Type": kw.pop("content_type", CT), "Accept": "application/dicom+json"}
    return client.post(url, content=content, headers=headers)


def seq(response: Any, tag: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = response.json().get(tag, {}).get("Value", [])
    return items


def test_all_stored_is_200_and_bit_identical(
    client: TestClient, app: FastAPI, tmp_path: Path
) -> None:
    paths = make_study(tmp_path / "s", slices=3)
    r = post(client, body(*(p.read_bytes() for p in paths)))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    refs = seq(r, "00081199")
    assert len(refs) == 3 and "00081198" not in r.json()
    ds = dcmread(paths[0], stop_before_pixels=True)
    assert r.json()["00081190"]["Value"][0].endswith(f"/studies/{ds.StudyInstanceUID}")
    assert refs[0]["00081150"]["Value"] == [str(ds.SOPClassUID)]
    # the same durable path as C-STORE: originals keyed by the data set's SHA-256
    index, originals = app.state.index, app.state.archive.originals
    inst = index.get_instance(str(ds.SOPInstanceUID))
    stored = originals.path(inst.blob_key).read_bytes()
    assert dataset_bytes(stored) == dataset_bytes(paths[0].read_bytes())
    jobs = index.counts()
    assert jobs["instances"] == 3 and jobs["jobs_pending"] == 3


def test_some_failed_is_202(client: TestClient, tmp_path: Path) -> None:
    good = make_study(tmp_path / "g", slices=1)[0].read_bytes()
    r = post(client, body(good, b"this is not DICOM"))
    assert r.status_code == 202
    assert len(seq(r, "00081199")) == 1
    (failed,) = seq(r, "00081198")
    assert failed["00081197"]["Value"] == [0xC000]


def test_all_failed_is_409(client: TestClient, tmp_path: Path) -> None:
    raw = make_study(tmp_path / "g", slices=1)[0].read_bytes()
    truncated = raw[: len(raw) - 100]  # Pixel Data cut short
    r = post(client, body(truncated))
    assert r.status_code == 409
    (failed,) = seq(r, "00081198")
    assert failed["00081197"]["Value"] == [0xC000]
    assert failed["00081155"]["Value"]  # the UIDs from the part's meta are reported


def test_study_mismatch_fails_with_a900(client: TestClient, tmp_path: Path) -> None:
    first = make_study(tmp_path / "a", slices=1)[0]
    other = make_study(tmp_path / "b", slices=1)[0]
    study = str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    r = post(client, body(first.read_bytes(), other.read_bytes()), f"/dicomweb/studies/{study}")
    assert r.status_code == 202
    (failed,) = seq(r, "00081198")
    assert failed["00081197"]["Value"] == [0xA900]
    assert failed["00081155"]["Value"] == [str(dcmread(other).SOPInstanceUID)]


def test_unparseable_request_is_400(client: TestClient) -> None:
    assert post(client, b"").status_code == 400
    assert post(client, b"no boundary anywhere").status_code == 400
    r = post(client, body(b"x"), content_type='multipart/related; type="application/dicom"')
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"


def test_wrong_media_type_is_415(client: TestClient) -> None:
    assert post(client, b"{}", content_type="application/json").status_code == 415
    r = post(
        client,
        b"",
        content_type=f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}',
    )
    assert r.status_code == 415


def test_resend_is_duplicate_not_failure(client: TestClient, app: FastAPI, tmp_path: Path) -> None:
    raw = make_study(tmp_path / "d", slices=1)[0].read_bytes()
    assert post(client, body(raw)).status_code == 200
    assert post(client, body(raw)).status_code == 200
    assert app.state.index.counts()["instances"] == 1
