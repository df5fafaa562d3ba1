"""STOW-RS (PS3.18 10.5): statuses 200/202/409/400/415, the same path as C-STORE."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom import dcmread

from core.settings import Settings
from core.synthetic import write_ct_series
from tests.api._support import dataset_bytes, make_study, running_app

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


# -- a full disk (issue 14.8: was a 500), simulated as tests/faults/test_disk_full.py ----


def test_enospc_while_staging_is_507_with_a700(
    client: TestClient, app: FastAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage.staging import StagedWriter

    def full(self: StagedWriter, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    paths = make_study(tmp_path / "s", slices=2)
    with monkeypatch.context() as patch:
        patch.setattr(StagedWriter, "_write_out", full)
        r = post(client, body(*(p.read_bytes() for p in paths)))
    assert r.status_code == 507, r.text
    assert [f["00081197"]["Value"] for f in seq(r, "00081198")] == [[0xA700]] * 2
    assert app.state.index.counts()["instances"] == 0  # nothing acknowledged
    assert post(client, body(*(p.read_bytes() for p in paths))).status_code == 200


def test_enospc_while_spooling_is_507(
    client: TestClient, app: FastAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.routes import dicomweb

    class FullFile(io.BytesIO):
        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    spool = tmp_path / "spool.stow"
    spool.touch()
    monkeypatch.setattr(dicomweb, "_spool_open", lambda directory: (FullFile(), spool))
    r = post(client, body(make_study(tmp_path / "s", slices=1)[0].read_bytes()))
    assert r.status_code == 507, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert not spool.exists()  # the partial spool is removed


def test_real_full_file_system_is_507_then_recovers(settings: Settings, tmp_path: Path) -> None:
    """A 1 MiB tmpfs under the originals (root only, as tests/faults does)."""
    originals = tmp_path / "data" / "originals"
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the simulated cases above run instead")
    originals.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "pacslab-stow-full", str(originals)]
    if subprocess.run(mount, capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with running_app(settings) as application:
            client = TestClient(application)
            (path,) = write_ct_series(tmp_path / "big", slices=1, rows=256, columns=256)
            big = path.read_bytes()  # 128 KiB of pixels
            # a body larger than the whole file system: the spool fails
            r = post(client, body(*[big] * 10))
            assert r.status_code == 507, r.text
            # room for the spool (one copy), none for the staged instance (a second)
            filler = originals / "filler"
            with filler.open("wb", buffering=0) as fp, contextlib.suppress(OSError):
                while True:
                    fp.write(b"\0" * 4096)
            os.truncate(filler, filler.stat().st_size - 3 * len(big) // 2)
            r = post(client, body(big))
            assert r.status_code == 507, r.text
            assert application.state.index.counts()["instances"] == 0
            filler.unlink()
            assert post(client, body(big)).status_code == 200
    finally:
        subprocess.run(["umount", "-l", str(originals)], capture_output=True, check=False)
