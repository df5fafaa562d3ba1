"""Share links (issue 17 item 4): one study, no account, time-limited, revocable, audited.

Two MR studies go the production way (archive, worker); authentication is on. A
user with ``imaging.share`` creates a link to study A. The link's URL carries only the
token, in the fragment. With it: study A's series, tiles and DICOMweb resources are
readable, study B's are refused, as is anything but a read; a revoked link and an
expired one (made with an injected clock) are refused; every use is in the action
log under the share's id. Headless Debian Chromium opens the link with no other
credential and the slice is drawn; after revocation the same link shows a refusal.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid

from core.settings import Settings

from .tiles_data import convert, running, tiles_settings, write_mr_series

CHROMIUM = "/usr/bin/chromium"


@dataclass
class Studies:
    settings: Settings
    sharer: str  # a token with imaging.share
    reader: str  # a token with imaging.read only
    study_a: str
    series_a: str
    version_a: int
    study_b: str
    series_b: str
    version_b: int


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studies]:
    from api.keys import ensure_private_key, issue_token

    root = tmp_path_factory.mktemp("share-links")
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("PACSLAB_"):
                mp.delenv(key)
        settings = tiles_settings(root)
        a, b = generate_uid(), generate_uid()
        c, s = math.cos(0.0), math.sin(0.0)
        files_a = write_mr_series(
            root / "a",
            slices=4,
            rows=192,
            columns=160,
            row_cosine=(0.0, c, s),
            column_cosine=(0.0, s, -c),
            study_uid=a,
            series_number=1,
        )
        files_b = write_mr_series(
            root / "b",
            slices=1,
            rows=128,
            columns=128,
            row_cosine=(1.0, 0.0, 0.0),
            column_cosine=(0.0, 1.0, 0.0),
            study_uid=b,
            series_number=1,
        )
        jobs = convert(settings, files_a + files_b)
    auth = settings.auth.model_copy(update={"enabled": True})
    assert auth.local_key is not None
    ensure_private_key(auth.local_key)
    sharer = issue_token(auth, subject="dr-share", scopes=["imaging.share"], ttl_s=900)
    reader = issue_token(auth, subject="dr-read", scopes=["imaging.read"], ttl_s=900)
    sa = str(dcmread(files_a[0], stop_before_pixels=True).SeriesInstanceUID)
    sb = str(dcmread(files_b[0], stop_before_pixels=True).SeriesInstanceUID)
    yield Studies(
        settings.model_copy(update={"auth": auth}), sharer, reader, a, sa, jobs[sa], b, sb, jobs[sb]
    )


@pytest.fixture
def client(studies: Studies) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app(studies.settings)) as c:
        yield c


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _share(client: TestClient, studies: Studies, study: str, **body: Any) -> dict[str, Any]:
    r = client.post(
        "/admin/shares", json={"study_uid": study, **body}, headers=_bearer(studies.sharer)
    )
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def _token(url: str) -> str:
    m = re.fullmatch(r"http://[^/]+/viewer/shared#token=(pls_[A-Za-z0-9_-]{43})", url)
    assert m, url
    return m.group(1)


def _audit(client: TestClient, agent: str) -> list[Any]:
    from storage.audit import AuditStore

    app: Any = client.app
    assert app.state.audit.flush()
    return AuditStore(app.state.index.engine).search(agent=agent, limit=1000)


def test_creating_a_share_needs_the_share_scope(client: TestClient, studies: Studies) -> None:
    body = {"study_uid": studies.study_a, "expires_in": 600}
    assert client.post("/admin/shares", json=body).status_code == 401
    assert (
        client.post("/admin/shares", json=body, headers=_bearer(studies.reader)).status_code == 403
    )
    for bad in (
        {"study_uid": "1.2.3.999", "expires_in": 600},  # unknown study
        {"study_uid": studies.study_a, "expires_in": 0},
        {"study_uid": studies.study_a, "expires_in": 10**9},
        {"study_uid": "x'; drop", "expires_in": 60},
        {"study_uid": studies.study_a, "note": "n" * 201},
    ):
        r = client.post("/admin/shares", json=bad, headers=_bearer(studies.sharer))
        assert r.status_code in (400, 404), (bad, r.status_code, r.text)
    created = _share(client, studies, studies.study_a, expires_in=600, note="Dr. outside")
    assert studies.study_a not in created["url"] and studies.series_a not in created["url"]
    token = _token(created["url"])
    listed = client.get("/admin/shares", headers=_bearer(studies.sharer)).json()
    mine = next(s for s in listed if s["id"] == created["id"])
    assert mine["state"] == "active" and mine["study_uid"] == studies.study_a
    assert mine["created_by"] == "dr-share"
    # the token is shown once: not in the list, and only its hash in the table
    assert token not in client.get("/admin/shares", headers=_bearer(studies.sharer)).text
    from sqlalchemy import select

    from storage.index.schema import shares

    app: Any = client.app
    with app.state.index.engine.connect() as conn:
        row = conn.execute(select(shares).where(shares.c.share_id == created["id"])).one()
    assert token not in str(tuple(row)) and len(row.token_hash) == 64


def test_a_share_reads_its_own_study_only(client: TestClient, studies: Studies) -> None:
    created = _share(client, studies, studies.study_a, expires_in=600)
    share = _bearer(_token(created["url"]))
    a_img = f"{studies.series_a}@{studies.version_a}:0:sagittal:0"
    b_img = f"{studies.series_b}@{studies.version_b}:0"
    assert (
        client.get("/viewer/api/share", headers=share).json()["study_instance_uid"]
        == studies.study_a
    )
    allowed = [
        f"/viewer/api/studies/{studies.study_a}/series",
        f"/iiif/{a_img}/info.json",
        f"/iiif/{a_img}/full/max/0/default.png",
        f"/dzi/{a_img}.dzi",
        f"/dicomweb/studies?StudyInstanceUID={studies.study_a}",
        f"/dicomweb/studies/{studies.study_a}/series",
        f"/dicomweb/studies/{studies.study_a}/metadata",
    ]
    for path in allowed:
        r = client.get(path, headers=share)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
    refused = [
        "/viewer/api/studies",  # the list of every study
        f"/viewer/api/studies/{studies.study_b}/series",
        f"/iiif/{b_img}:axial:0/info.json",
        f"/iiif/{b_img}:axial:0/full/max/0/default.png",
        f"/dzi/{b_img}:axial:0.dzi",
        "/dicomweb/studies",
        f"/dicomweb/studies?StudyInstanceUID={studies.study_b}",
        f"/dicomweb/studies?StudyInstanceUID={studies.study_a}&StudyInstanceUID={studies.study_b}",
        f"/dicomweb/studies?StudyInstanceUID={studies.study_a}\\{studies.study_b}",
        f"/dicomweb/studies/{studies.study_b}/metadata",
        f"/dicomweb/studies/{studies.study_a}/../{studies.study_b}/metadata",
        "/dicomweb/series",
        "/fhir/ImagingStudy",
        "/admin/shares",
        "/metrics",
    ]
    for path in refused:
        r = client.get(path, headers=share)
        assert r.status_code in (403, 404), (path, r.status_code)
    # reads only: no STOW-RS, no new share, no revocation with a share token
    assert (
        client.post(f"/dicomweb/studies/{studies.study_a}", headers=share, content=b"x").status_code
        == 403
    )
    assert client.delete(f"/admin/shares/{created['id']}", headers=share).status_code == 403
    # a staff token is not a share: /viewer/api/share says so
    assert client.get("/viewer/api/share", headers=_bearer(studies.reader)).status_code == 404
    # every use, allowed or refused, is in the action log under the share's id
    entries = _audit(client, f"share:{created['id']}")
    used = {e.resource for e in entries}
    assert {"/viewer/api/share", *[p.split("?")[0] for p in allowed]} <= used
    assert all(e.agent_type == "share" for e in entries)
    outcomes = {e.resource: e.outcome_desc for e in entries}
    assert outcomes[f"/viewer/api/studies/{studies.study_b}/series"] == "HTTP 403"


def test_revoked_and_expired_links_are_refused(client: TestClient, studies: Studies) -> None:
    from pacslab.wiring import build_index
    from services.sharing import ShareService
    from storage.shares import ShareStore

    created = _share(client, studies, studies.study_a, expires_in=600)
    share = _bearer(_token(created["url"]))
    path = f"/viewer/api/studies/{studies.study_a}/series"
    assert client.get(path, headers=share).status_code == 200
    assert (
        client.delete(f"/admin/shares/{created['id']}", headers=_bearer(studies.reader)).status_code
        == 403
    )
    assert (
        client.delete(f"/admin/shares/{created['id']}", headers=_bearer(studies.sharer)).status_code
        == 204
    )
    assert (
        client.delete(f"/admin/shares/{created['id']}", headers=_bearer(studies.sharer)).status_code
        == 404
    )
    r = client.get(path, headers=share)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    listed = client.get("/admin/shares", headers=_bearer(studies.sharer)).json()
    assert next(s for s in listed if s["id"] == created["id"])["state"] == "revoked"

    # A link made two hours ago for one hour: expired (the clock is injected).
    index = build_index(studies.settings)
    try:
        past = datetime.now(UTC) - timedelta(hours=2)
        old = ShareService(ShareStore(index), now=lambda: past).create(
            studies.study_a, expires_in_s=3600
        )
    finally:
        index.close()
    r = client.get(path, headers=_bearer(old.token))
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    # unknown and malformed share tokens
    for bad in ("pls_" + "A" * 43, "pls_short"):
        assert client.get(path, headers=_bearer(bad)).status_code == 401
    # the refusals are logged too, naming the share (the agent is unknown then)
    refused = [e for e in _audit(client, "anonymous") if e.resource == path]
    details = " ".join(e.detail for e in refused)
    assert f"share link {created['id']} revoked" in details
    assert f"share link {old.record.share_id} expired" in details
    revokes = [e for e in _audit(client, "dr-share") if e.event_type == "share.revoke"]
    assert any(e.resource == f"share/{created['id']}" for e in revokes)


def test_cli_share_create_list_revoke(studies: Studies) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSLAB_")}
    env["PACSLAB_DATA_DIR"] = str(studies.settings.data_dir)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])

    def pacslab(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pacslab", "share", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    made = pacslab(studies.study_a, "--hours", "2", "--note", "cli")
    assert made.returncode == 0, made.stderr
    _token(made.stdout.strip().replace("localhost", "127.0.0.1"))
    listed = pacslab("--list")
    line = next(x for x in listed.stdout.splitlines() if x.endswith(" cli"))
    share_id, state = line.split()[:2]
    assert state == "active"
    assert pacslab("--revoke", share_id).returncode == 0
    assert f"{share_id}  revoked" in pacslab("--list", studies.study_a).stdout
    assert pacslab("--revoke", share_id).returncode == 1
    assert pacslab("1.2.3.4.5.6.999").returncode == 1  # unknown study
    assert pacslab().returncode == 2


# ------------------------------------------------------------------ the browser


def _drawn(page: Any, path: Path) -> np.ndarray:
    page.locator("#osd").screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("L")).astype(np.int32)[40:]


@pytest.mark.network
def test_share_link_in_headless_chromium(studies: Studies, tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium); ./run test installs it")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright Python package is not installed"
    )
    errors: list[str] = []
    csp: list[str] = []
    requests: list[str] = []

    with running(studies.settings) as server, sync_api.sync_playwright() as pw:
        with TestClient(server_app := _app(studies)) as c:  # noqa: F841
            created = _share(c, studies, studies.study_a, expires_in=600)
        url = created["url"].replace("http://testserver", server)
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.on(
                "console",
                lambda m: (
                    csp.append(m.text)
                    if "Content Security Policy" in m.text
                    else (errors.append(m.text) if m.type == "error" else None)
                ),
            )
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            page.wait_for_function(
                "() => window.pacslab && window.pacslab.ready && window.pacslab.isLoaded() "
                "&& window.pacslab.state.tilesLoaded >= 1",
                timeout=30000,
            )
            state = page.evaluate(
                "() => ({study: window.pacslab.state.study, path: location.pathname, "
                "hash: location.hash, "
                "series: window.pacslab.state.series.series_instance_uid})"
            )
            assert state == {
                "study": studies.study_a,
                "path": "/viewer/shared",
                "hash": "",
                "series": studies.series_a,
            }
            img = _drawn(page, tmp_path / "shared.png")
            assert img.std() > 20, "uniform screenshot: the slice was not drawn"
            # the same tab, with the share's token, cannot read study B
            other = page.evaluate(
                "async (u) => (await fetch(u, {headers: {Authorization: 'Bearer ' + "
                "sessionStorage.getItem('pacslab.token')}})).status",
                f"/viewer/api/studies/{studies.study_b}/series",
            )
            assert other == 403
            page.close()

            # revoked: the same link opens a page that says so, and draws nothing
            with TestClient(_app(studies)) as c:
                assert (
                    c.delete(
                        f"/admin/shares/{created['id']}", headers=_bearer(studies.sharer)
                    ).status_code
                    == 204
                )
            errors.clear()
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(url)
            page.wait_for_function("() => window.pacslab && window.pacslab.ready", timeout=30000)
            assert (
                page.locator("#status").inner_text() == "This share link has expired or was revoked"
            )
            assert page.evaluate("() => window.pacslab.state.tilesLoaded") == 0
            page.close()

            # expired: a link made two hours ago for one hour (the clock is injected)
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(f"{server}/viewer/shared#token={_expired_token(studies)}")
            page.wait_for_function("() => window.pacslab && window.pacslab.ready", timeout=30000)
            assert (
                page.locator("#status").inner_text() == "This share link has expired or was revoked"
            )
            assert page.evaluate("() => window.pacslab.state.tilesLoaded") == 0
            page.close()
        finally:
            browser.close()
    # every use by the browser is in the action log under the share's id (the server's
    # log was flushed when it stopped)
    from pacslab.wiring import build_index
    from storage.audit import AuditStore

    index = build_index(studies.settings)
    try:
        uses = AuditStore(index.engine).search(agent=f"share:{created['id']}", limit=10_000)
        refused = [
            e
            for e in AuditStore(index.engine).search(agent="anonymous", limit=10_000)
            if f"share link {created['id']} revoked" in e.detail
        ]
    finally:
        index.close()
    paths = {e.resource for e in uses}
    assert "/viewer/api/share" in paths
    assert f"/viewer/api/studies/{studies.study_a}/series" in paths
    assert any(p.startswith(f"/iiif/{studies.series_a}") for p in paths), paths
    assert any(e.outcome_desc == "HTTP 403" for e in uses)  # study B, from the same tab
    assert refused  # the revoked link's attempt
    assert csp == [], csp
    # no request line ever carried the token (it stays in the fragment)
    assert requests and not [u for u in requests if "pls_" in u], requests
    assert errors == [], errors


def _expired_token(studies: Studies) -> str:
    from pacslab.wiring import build_index
    from services.sharing import ShareService
    from storage.shares import ShareStore

    index = build_index(studies.settings)
    try:
        past = datetime.now(UTC) - timedelta(hours=2)
        service = ShareService(ShareStore(index), now=lambda: past)
        return service.create(studies.study_a, expires_in_s=3600).token
    finally:
        index.close()


def _app(studies: Studies) -> Any:
    from api.app import create_app

    return create_app(studies.settings)
