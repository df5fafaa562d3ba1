"""Viewer deep links, acquisition planes, security and cache headers (issues 13.10, 14.4, 14.9).

One data dir holds a study with two MR series that go the production way (archive,
worker): a single oblique slice (sagittal tilted 25°) and a six-slice sagittal
stack. Authentication is on, as in a hospital. Headless Debian Chromium opens the deep
links an EMR would, with the page's strict Content-Security-Policy in force, and the
screenshots must show the slice, not the one-pixel line of a reformat.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
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
TILT = math.radians(25)
ROWS, COLUMNS = 320, 256


@dataclass
class Links:
    settings: Settings
    token: str
    study: str
    oblique: str
    oblique_version: int
    sagittal: str
    sagittal_version: int


@pytest.fixture(scope="module")
def links(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Links]:
    from api.keys import ensure_private_key, issue_token

    root = tmp_path_factory.mktemp("viewer-links")
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("PACSLAB_"):
                mp.delenv(key)
        settings = tiles_settings(root)
        study = generate_uid()
        c, s = math.cos(TILT), math.sin(TILT)
        oblique = write_mr_series(root / "dicom", slices=1, rows=ROWS, columns=COLUMNS,
                                  row_cosine=(0.0, c, s), column_cosine=(0.0, s, -c),
                                  study_uid=study, series_number=1)
        sagittal = write_mr_series(root / "dicom", slices=6, rows=256, columns=256,
                                   row_cosine=(0.0, 1.0, 0.0), column_cosine=(0.0, 0.0, -1.0),
                                   study_uid=study, series_number=2)
        jobs = convert(settings, oblique + sagittal)
    auth = settings.auth.model_copy(update={"enabled": True})
    assert auth.local_key is not None
    ensure_private_key(auth.local_key)
    token = issue_token(auth, subject="dr-emr", scopes=["imaging.read"], ttl_s=600)
    o_uid = str(dcmread(oblique[0], stop_before_pixels=True).SeriesInstanceUID)
    s_uid = str(dcmread(sagittal[0], stop_before_pixels=True).SeriesInstanceUID)
    yield Links(settings.model_copy(update={"auth": auth}), token, study, o_uid, jobs[o_uid],
                s_uid, jobs[s_uid])


@pytest.fixture
def client(links: Links) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app(links.settings)) as c:
        yield c


def _bearer(links: Links) -> dict[str, str]:
    return {"Authorization": f"Bearer {links.token}"}


def _size(content: bytes) -> tuple[int, int]:
    size: tuple[int, int] = Image.open(io.BytesIO(content)).size
    return size


# ------------------------------------------------------------------ JSON and tiles


def test_series_open_in_their_acquisition_plane(client: TestClient, links: Links) -> None:
    r = client.get(f"/viewer/api/studies/{links.study}/series", headers=_bearer(links))
    assert r.status_code == 200, r.text
    by_uid = {s["series_instance_uid"]: s for s in r.json()}
    (oblique,) = by_uid[links.oblique]["stacks"]
    # one oblique slice: its own (sagittal-ish) plane only, the whole slice, no reformat
    assert list(oblique["planes"]) == ["sagittal"]
    assert oblique["default_plane"] == oblique["acquisition_plane"] == "sagittal"
    plane = oblique["planes"]["sagittal"]
    assert {plane["width"], plane["height"]} == {ROWS, COLUMNS} and plane["depth"] == 1
    thumb = client.get(oblique["thumbnail"], headers=_bearer(links))
    assert thumb.status_code == 200
    assert min(_size(thumb.content)) > 64, _size(thumb.content)  # not a line
    # six sagittal slices: a volume; sagittal first, then the two reformats
    (sag,) = by_uid[links.sagittal]["stacks"]
    assert list(sag["planes"]) == ["sagittal", "axial", "coronal"]
    assert sag["default_plane"] == "sagittal"
    assert min(_size(client.get(sag["thumbnail"], headers=_bearer(links)).content)) == 128
    # a reformat of the single slice is not offered, and not served either
    base = f"/iiif/{links.oblique}@{links.oblique_version}:0"
    assert client.get(f"{base}:axial:0/info.json", headers=_bearer(links)).status_code == 404
    info = client.get(f"{base}:sagittal:0/info.json", headers=_bearer(links)).json()
    assert {info["width"], info["height"]} == {ROWS, COLUMNS}


def _token_routes(links: Links) -> list[str]:
    o = f"{links.oblique}@{links.oblique_version}:0:sagittal:0"
    latest = f"{links.oblique}:0:sagittal:0"
    return [
        f"/iiif/{o}/info.json",
        f"/iiif/{o}/full/max/0/default.png",
        f"/iiif/{o}/0,0,128,128/128,/0/gray.jpg",
        f"/iiif/{latest}/info.json",
        f"/iiif/{latest}/full/max/0/default.png",
        f"/dzi/{o}.dzi",
        f"/dzi/{o}_files/9/0_0.png",
        f"/dzi/{latest}_files/9/0_0.png",
        "/viewer/api/studies",
        f"/viewer/api/studies/{links.study}/series",
    ]


def test_token_routes_are_private_to_the_browser(client: TestClient, links: Links) -> None:
    """Issue 14.4: nothing behind a token may be kept by a shared cache (RFC 9111)."""
    for path in _token_routes(links):
        assert client.get(path).status_code == 401, path
        r = client.get(path, headers=_bearer(links))
        assert r.status_code == 200, (path, r.text)
        cc = r.headers["cache-control"]
        assert cc.startswith("private") and "public" not in cc, (path, cc)
        vary = {v.strip().lower() for v in r.headers.get("vary", "").split(",")}
        assert "authorization" in vary, (path, r.headers.get("vary"))
        etag = r.headers.get("etag")
        if etag:  # the 304 carries the same rules
            again = client.get(path, headers={**_bearer(links), "If-None-Match": etag})
            assert again.status_code == 304
            assert again.headers["cache-control"] == cc
            assert "authorization" in again.headers["vary"].lower()
    # pinned versions stay immutable in the browser's own cache
    r = client.get(_token_routes(links)[1], headers=_bearer(links))
    assert r.headers["cache-control"] == "private, max-age=31536000, immutable"
    info = client.get(_token_routes(links)[0], headers=_bearer(links))
    assert info.headers["vary"] == "Accept, Authorization"


# ------------------------------------------------------------------ page headers, /docs


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.data: dict[int, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.tags and data.strip():
            self.data[len(self.tags) - 1] = self.data.get(len(self.tags) - 1, "") + data


def test_viewer_pages_send_security_headers(client: TestClient, links: Links) -> None:
    for path in ("/viewer", f"/viewer/studies/{links.study}",
                 f"/viewer/studies/{links.study}/series/{links.oblique}",
                 "/viewer/studies/1.2.3/series/4.5.6"):
        r = client.get(path)  # public: the page holds no data, the token is in the fragment
        assert r.status_code == 200 and "text/html" in r.headers["content-type"], path
        csp = {d.split()[0]: d.split()[1:] for d in
               (p.strip() for p in r.headers["content-security-policy"].split(";")) if d}
        assert csp["default-src"] == ["'none'"]
        assert csp["script-src"] == ["'self'"]
        assert "'unsafe-inline'" not in csp["style-src"]
        assert "'unsafe-eval'" not in r.headers["content-security-policy"]
        assert csp["frame-ancestors"] == ["'self'"]
        assert r.headers["x-frame-options"] == "SAMEORIGIN"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "public" not in r.headers["cache-control"]
        # nothing inline for the CSP to forbid: scripts have a src and no body, no style
        page = _Tags()
        page.feed(r.text)
        for i, (tag, attrs) in enumerate(page.tags):
            assert "style" not in attrs and not any(a.startswith("on") for a in attrs), tag
            assert tag != "style"
            if tag == "script":
                assert str(attrs.get("src", "")).startswith("/static/") and i not in page.data
        assert not re.search(r"(src|href)=\"(https?:)?//", r.text)
    js = client.get("/static/viewer/viewer.js")
    assert js.status_code == 200 and js.headers["x-content-type-options"] == "nosniff"


def test_frame_ancestors_setting(links: Links) -> None:
    from api.app import create_app

    http = links.settings.http.model_copy(
        update={"viewer_frame_ancestors": ["'self'", "https://emr.example:8443"]})
    with TestClient(create_app(links.settings.model_copy(update={"http": http}))) as c:
        r = c.get(f"/viewer/studies/{links.study}")
    assert "frame-ancestors 'self' https://emr.example:8443" in \
        r.headers["content-security-policy"]
    assert "x-frame-options" not in r.headers  # XFO cannot name the EMR; CSP governs
    with pytest.MonkeyPatch.context() as mp:  # as a deployment sets it (JSON list)
        mp.setenv("PACSLAB_HTTP__VIEWER_FRAME_ANCESTORS", '["\'self\'", "https://emr.example"]')
        assert Settings().http.viewer_frame_ancestors == ["'self'", "https://emr.example"]
        mp.setenv("PACSLAB_HTTP__VIEWER_FRAME_ANCESTORS", '["https://emr.example; x"]')
        with pytest.raises(ValueError):
            Settings()
    for bad in (["https://x; script-src *"], ["*"], [], ["'none'", "'self'"],
                ["javascript:alert(1)"], ["https://emr example"]):
        with pytest.raises(ValueError):
            Settings(http={"viewer_frame_ancestors": bad})


def test_docs_are_served_without_a_cdn(client: TestClient) -> None:
    r = client.get("/docs")  # public, like the OpenAPI document
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)""", r.text)
    assert urls and not [u for u in urls if re.match(r"(https?:)?//", u)], urls
    assert "cdn" not in r.text.lower() and "https://" not in r.text
    assets = [u for u in urls if u.startswith("/static/swagger-ui/")]
    assert {a.rsplit("/", 1)[1] for a in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for asset in assets:
        a = client.get(asset)
        assert a.status_code == 200 and len(a.content) > 500, asset
    js = client.get("/static/swagger-ui/swagger-ui-bundle.js")
    assert js.headers["x-content-type-options"] == "nosniff"
    assert js.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/redoc").status_code in (401, 404)  # off: ReDoc only comes from a CDN


# ------------------------------------------------------------------ the browser


def _ready(page: Any, *, tiles: bool) -> None:
    cond = "() => window.pacslab && window.pacslab.ready"
    if tiles:
        cond += " && window.pacslab.isLoaded() && window.pacslab.state.tilesLoaded >= 1"
    page.wait_for_function(cond, timeout=20000)


def _drawn(page: Any, path: Path) -> np.ndarray:
    """The #osd screenshot in grey, below OpenSeadragon's buttons."""
    page.locator("#osd").screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("L")).astype(np.int32)[40:]


def _extent(img: np.ndarray) -> tuple[int, int]:
    """Height and width of the lit part of a screenshot (the drawn slice)."""
    rows = np.flatnonzero((img > 30).mean(axis=1) > 0.02)
    cols = np.flatnonzero((img > 30).mean(axis=0) > 0.02)
    if not rows.size or not cols.size:
        return 0, 0
    return int(np.ptp(rows)) + 1, int(np.ptp(cols)) + 1


@pytest.mark.network
def test_deep_links_in_headless_chromium(links: Links, tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium); "
                    "./run test installs it")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright Python package is not installed")
    errors: list[str] = []
    failed: list[str] = []
    csp: list[str] = []

    def watch(page: Any, *, allow_404: bool = False) -> None:
        def console(m: Any) -> None:
            if "Content Security Policy" in m.text or "Content-Security-Policy" in m.text:
                csp.append(m.text)
            elif m.type == "error" and not (allow_404 and "404" in m.text):
                errors.append(m.text)
        page.on("console", console)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}")
                if r.status >= 400 and not (allow_404 and r.status == 404) else None)

    with running(links.settings) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        try:
            size = {"width": 1000, "height": 700}
            # 1. an EMR opens one series: the single oblique slice, in its own plane
            page = browser.new_page(viewport=size)
            watch(page)
            page.goto(f"{server}/viewer/studies/{links.study}/series/{links.oblique}"
                      f"#token={links.token}")
            _ready(page, tiles=True)
            state = page.evaluate("() => ({plane: window.pacslab.state.plane, "
                                  "series: window.pacslab.state.series.series_instance_uid, "
                                  "buttons: [...document.querySelectorAll('#planes button')]"
                                  ".map(b => b.textContent), hash: location.hash})")
            assert state["plane"] == "sagittal" and state["series"] == links.oblique
            assert state["buttons"] == ["sagittal (acquired)"]
            assert state["hash"] == ""  # the token left the address bar
            oblique = _drawn(page, tmp_path / "1-oblique.png")
            page.close()

            # 2. the study link opens the study and its first series; thumbnails are images
            page = browser.new_page(viewport=size)
            watch(page)
            page.goto(f"{server}/viewer/studies/{links.study}#token={links.token}")
            _ready(page, tiles=True)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.thumb img')].length === 2 && "
                "[...document.querySelectorAll('.thumb img')].every(i => i.naturalWidth > 0)",
                timeout=20000)
            thumbs = page.evaluate("() => [...document.querySelectorAll('.thumb img')]"
                                   ".map(i => [i.naturalWidth, i.naturalHeight])")
            assert all(min(t) > 64 for t in thumbs), thumbs
            assert page.evaluate("() => window.pacslab.state.series.series_instance_uid") \
                == links.oblique
            # the sagittal stack: acquired plane first, then the reformats
            page.locator(f".thumb[data-series='{links.sagittal}']").click()
            page.wait_for_function(
                "() => window.pacslab.state.series.series_instance_uid === "
                f"'{links.sagittal}' && window.pacslab.isLoaded()", timeout=20000)
            buttons = page.evaluate("() => [...document.querySelectorAll('#planes button')]"
                                    ".map(b => b.textContent)")
            assert buttons == ["sagittal (acquired)", "axial", "coronal"], buttons
            sagittal = _drawn(page, tmp_path / "2-sagittal.png")
            page.close()

            # 3. unknown UIDs: a clear message in the page, no crash
            for path, message in (
                    ("/viewer/studies/1.2.3.4", "Study not found: 1.2.3.4"),
                    (f"/viewer/studies/{links.study}/series/9.8.7",
                     "Series not found in this study: 9.8.7"),
                    ("/viewer/studies/not-a-uid", "Study not found: not-a-uid")):
                page = browser.new_page(viewport=size)
                watch(page, allow_404=True)
                page.goto(f"{server}{path}#token={links.token}")
                _ready(page, tiles=False)
                assert page.locator("#status").inner_text() == message, path
                page.close()
        finally:
            browser.close()

    assert csp == [], csp
    assert errors == [], errors
    assert failed == [], failed
    for name, img in (("oblique", oblique), ("sagittal", sagittal)):
        height, width = _extent(img)
        # the slice, fitted to the 1000 × 660 view: both sides hundreds of pixels
        assert height > 100 and width > 100, (name, height, width)
        assert img.std() > 20, f"{name}: uniform screenshot"
    height, width = _extent(oblique)
    # the phantom's body ellipse is wider (0.85) than tall (0.62) in stored pixels;
    # the 320 × 256 slice is shown whole, rows down
    assert 0.4 < height / width < 2.5, (height, width)
