"""OHIF Viewer v3 served by pacslab under /ohif (issue 20).

The browser test drives the real OHIF build (npm ``@ohif/app``, installed by ``./run
test``) in headless Debian chromium against ``create_app`` under uvicorn with
authentication on: the EMR's deep link renders the demo CT, window/level by drag and
scrolling change the image, no request fails and the CSP is never violated, and the
study list (same tab: the token kept per tab) finds the study by a Vietnamese patient
name. The other tests are plain ``TestClient`` tests of the serving rules over a small
fake build (prefix rewrites, SPA fallback, 404s, no symlink followed, headers).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.data import get_testdata_file

from api.routes import ohif
from api.routes.ohif import app_config_js, deep_link, preload_links, rewrite_index
from core.settings import OhifSettings, Settings
from tests.api._support import make_study, running_app
from tests.ohif import harness as h
from tests.support import free_port, page_sleep, wait_until

SLICES = 16
MR_J2K = "emri_small_jpeg_2k_lossless.dcm"  # pydicom test file: MR, 10 frames, JPEG 2000


#: Pixel statistics of every viewport canvas (MPR shows three).
ALL_CANVAS_STATS = """() => [...document.querySelectorAll('.cornerstone-canvas')].map(c => {
  const x = document.createElement('canvas'); x.width = c.width; x.height = c.height;
  const g = x.getContext('2d'); g.drawImage(c, 0, 0);
  const d = g.getImageData(0, 0, x.width, x.height).data;
  let n = 0, s = 0, q = 0;
  for (let i = 0; i < d.length; i += 16) { const v = d[i]; n++; s += v; q += v * v; }
  const m = s / n; return {mean: m, std: Math.sqrt(Math.max(0, q / n - m * m))}; })"""


def _overlay(page: object) -> dict[str, int]:
    """Window width/level and image index from the viewport's overlay text."""
    text: str = page.evaluate("() => document.body.innerText")  # type: ignore[attr-defined]
    out: dict[str, int] = {}
    if m := re.search(r"W:\s*(-?\d+)\s*L:\s*(-?\d+)", text):
        out["W"], out["L"] = int(m.group(1)), int(m.group(2))
    if m := re.search(r"I:\s*(\d+)\s*\((\d+)/(\d+)\)", text):
        out["I"], out["N"] = int(m.group(2)), int(m.group(3))
    return out


def _overlay_of(page: object, images: int) -> dict[str, int]:
    """The overlay once it counts ``images`` (it shows "(1/0)" for a moment after the
    first image is drawn, while OHIF still loads the stack), or as it is after 15 s."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: _overlay(page).get("N") == images, timeout=15, interval=0.2,
                   sleep=page_sleep(page))
    return _overlay(page)


def _study_rows(page: object) -> str:
    return page.evaluate("() => document.body.innerText")  # type: ignore[attr-defined, no-any-return]


@pytest.mark.network
def test_deep_link_renders_and_responds_and_study_list_finds_vietnamese_name(
    settings: Settings, tmp_path: Path
) -> None:
    api = h.need_ohif(settings.ohif.dist_dir)
    study = h.demo_ct(tmp_path / "ct", slices=SLICES, size=256)
    other = make_study(tmp_path / "other", PatientName="TRẦN^THỊ BÌNH", PatientID="P2",
                       SpecificCharacterSet="ISO_IR 192", StudyDescription="MR OTHER")
    mr_path = Path(get_testdata_file(MR_J2K))  # type: ignore[arg-type]
    mr_study = str(dcmread(mr_path, stop_before_pixels=True).StudyInstanceUID)
    stored = h.Study(study.study, study.series, study.slices, study.paths + other + [mr_path])
    with h.pacslab_server(settings, stored) as srv:
        pw, browser = h.launch(api)
        try:
            opened = h.open_viewer(browser, srv, study, timeout_s=90)
            page = opened.page
            # The token left the address bar at once (kept in sessionStorage).
            assert "token" not in page.url
            if page.get_by_text("Skip all").count():  # OHIF's first-visit tour
                page.get_by_text("Skip all").first.click()
            before = page.evaluate(h.CANVAS_STATS)
            assert before["std"] > 5 and before["nonzero"] > 0.05, before  # not blank
            first = _overlay_of(page, SLICES)
            assert first.get("N") == SLICES and first.get("I") == 1, first

            # Window/level by drag (OHIF's default left-button tool).
            box = page.locator(".cornerstone-canvas").first.bounding_box()
            cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(cx, cy)
            page.mouse.down()
            page.mouse.move(cx + 120, cy + 80, steps=10)
            page.mouse.up()
            wait_until(lambda: _overlay(page).get("W") != first.get("W"), interval=0.1,
                       message="window/level did not change on drag")
            after_wl = _overlay(page)
            assert (after_wl["W"], after_wl["L"]) != (first["W"], first["L"]), after_wl
            stats_wl = page.evaluate(h.CANVAS_STATS)
            assert abs(stats_wl["mean"] - before["mean"]) > 1, (before, stats_wl)

            # Scrolling changes slices.
            page.mouse.wheel(0, 300)
            page.mouse.wheel(0, 300)
            wait_until(lambda: _overlay(page).get("I") != 1, interval=0.1,
                       message="scrolling did not change the slice")
            assert _overlay(page)["I"] > 1

            # Every slice was fetched; no request failed, no CSP violation.
            wait_until(lambda: len(h._frame_urls(page)) >= SLICES, timeout=30, interval=0.2,
                       message=lambda: f"{len(h._frame_urls(page))} of {SLICES} frames fetched")
            assert len(h._frame_urls(page)) == SLICES
            assert opened.failed == [], opened.failed
            bad = [m for m in opened.console if "Content Security Policy" in m
                   or m.startswith("pageerror")]
            assert bad == [], bad

            # A length measurement, calibrated by the Pixel Spacing (0.7 mm) of the
            # metadata pacslab serves: a 200 px drag on the fitted 256 px image.
            page.locator("[data-cy=MeasurementTools-split-button-primary]").first.click()
            page.mouse.move(cx - 100, cy + 150)
            page.mouse.down()
            page.mouse.move(cx + 100, cy + 150, steps=10)
            # Let the last move land before the button is released (cornerstone handles
            # moves per animation frame; under load the last step was dropped).
            page.wait_for_timeout(300)
            page.mouse.move(cx + 100, cy + 150)
            page.wait_for_timeout(300)
            page.mouse.up()
            expected = 200 / (min(box["width"], box["height"]) / 256) * 0.7
            labels: list[str] = wait_until(
                lambda: page.evaluate("() => [...document.querySelectorAll('svg text')]"
                                      ".map(t => t.textContent).filter(t => / mm$/.test(t))"),
                interval=0.2, sleep=page_sleep(page), message="no length measurement shown")
            assert len(labels) == 1, labels
            assert abs(float(labels[0].removesuffix(" mm")) - expected) < 0.03 * expected, (
                labels, expected)

            # MPR: the volume built from pacslab's frames, resliced in three viewports.
            # The reformats of 16 slices are thin strips, so "not blank" is std > 1
            # (an empty viewport is exactly 0).
            page.locator("[data-cy=Layout]").first.click()
            page.get_by_text("MPR", exact=True).first.click()
            def mpr_views() -> list[dict[str, float]]:
                views: list[dict[str, float]] = page.evaluate(ALL_CANVAS_STATS)
                return views if len(views) == 3 and all(v["std"] > 1 for v in views) else []

            views = wait_until(mpr_views, timeout=60, interval=0.3, sleep=page_sleep(page),
                               message=lambda: f"MPR views: {page.evaluate(ALL_CANVAS_STATS)}")
            assert len(views) == 3 and all(v["std"] > 1 for v in views), views

            # The study list in the same tab (the token is kept per tab), by name.
            page.goto(f"{srv.base}/ohif/")
            page.wait_for_selector("text=MR OTHER", timeout=30000)
            for typed, shown, hidden in (("nguyễn", "NGUYỄN, VĂN AN", "MR OTHER"),
                                         ("TRẦN", "MR OTHER", "CT CHEST W CONTRAST")):
                page.locator("input").first.fill(typed)
                # (the list empties while the new search runs: wait for the answer)
                def answered(shown: str = shown, hidden: str = hidden) -> str:
                    text = _study_rows(page)
                    return text if shown in text and hidden not in text else ""

                text = wait_until(answered, timeout=15, interval=0.2, sleep=page_sleep(page),
                                  message=f"the study list did not answer {typed!r}")
                assert shown in text and hidden not in text, (typed, text[:400])

            # A compressed series (JPEG 2000 lossless, 10 frames): OHIF asks for frames
            # with transfer-syntax=*, gets them as stored and decodes them in its worker.
            page.goto(f"{srv.base}{deep_link(mr_study)}")
            stats = wait_until(
                lambda: st if (st := page.evaluate(h.CANVAS_STATS)) and st["std"] > 5
                and st["nonzero"] > 0.05 else None,
                timeout=60, interval=0.2, sleep=page_sleep(page),
                message=lambda: f"compressed series not shown: {page.evaluate(h.CANVAS_STATS)}")
            assert stats and stats["std"] > 5 and stats["nonzero"] > 0.05, stats
            assert _overlay_of(page, 10).get("N") == 10
            assert opened.failed == [], opened.failed
            bad = [m for m in opened.console if "Content Security Policy" in m
                   or m.startswith("pageerror") or "decodeTask" in m]
            assert bad == [], bad
        finally:
            browser.close()
            pw.stop()


@pytest.mark.network
def test_without_token_dicomweb_is_refused(settings: Settings, tmp_path: Path) -> None:
    """The page is public; the images are not (OHIF's requests get 401 without #token)."""
    api = h.need_ohif(settings.ohif.dist_dir)
    study = h.demo_ct(tmp_path / "ct", slices=2, size=64)
    with h.pacslab_server(settings, study) as srv:
        pw, browser = h.launch(api)
        try:
            page = browser.new_page()
            statuses: list[int] = []
            page.on("response", lambda r: statuses.append(r.status)
                    if "/dicomweb/" in r.url else None)
            page.goto(f"{srv.base}{deep_link(study.study)}")
            wait_until(lambda: len(statuses) >= 2, timeout=30, interval=0.2,
                       sleep=page_sleep(page), message=lambda: f"DICOMweb answers: {statuses}")
            assert len(statuses) >= 2 and set(statuses) == {401}, statuses
            assert page.evaluate("() => sessionStorage.getItem('pacslab.token')") is None
        finally:
            browser.close()
            pw.stop()


@pytest.mark.network
def test_builtin_viewer_links_to_ohif_with_the_tab_token(settings: Settings,
                                                         tmp_path: Path) -> None:
    """The built-in viewer's study page links to OHIF; the token follows in the tab."""
    api = h.need_ohif(settings.ohif.dist_dir)
    study = h.demo_ct(tmp_path / "ct", slices=3, size=128)
    with h.pacslab_server(settings, study) as srv:
        pw, browser = h.launch(api)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{srv.base}/viewer/studies/{study.study}#token={srv.token}")
            link = page.get_by_text("Open in OHIF")
            link.wait_for(timeout=20000)
            assert link.get_attribute("href") == deep_link(study.study)
            link.click()
            page.wait_for_url("**/ohif/viewer?StudyInstanceUIDs=*")
            stats = wait_until(
                lambda: st if (st := page.evaluate(h.CANVAS_STATS)) and st["std"] > 5 else None,
                timeout=60, interval=0.2, sleep=page_sleep(page),
                message=lambda: f"OHIF showed no image: {page.evaluate(h.CANVAS_STATS)}")
            assert stats and stats["std"] > 5, stats
        finally:
            browser.close()
            pw.stop()


@pytest.mark.network
def test_oidc_sends_the_browser_to_the_identity_provider(settings: Settings) -> None:
    """With ohif.oidc_* set, OHIF signs in itself: authorization code flow with PKCE at
    the provider named by its discovery document, redirect back to /ohif/callback."""
    api = h.need_ohif(settings.ohif.dist_dir)
    idp_port = free_port()
    idp = f"http://127.0.0.1:{idp_port}"
    discovery = json.dumps({
        "issuer": idp, "authorization_endpoint": f"{idp}/authorize",
        "token_endpoint": f"{idp}/token", "jwks_uri": f"{idp}/jwks",
        "response_types_supported": ["code"], "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"]}).encode()
    seen: list[str] = []

    class Provider(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            body = discovery if self.path.endswith("openid-configuration") else b"sign in"
            self.send_response(200)
            self.send_header("Content-Type", "application/json" if body is discovery
                             else "text/html")
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", idp_port), Provider)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    ohif = settings.ohif.model_copy(update={"oidc_authority": idp, "oidc_client_id": "ohif-pacs"})
    study = h.Study("1.2.3", "1.2.3.4", 0, [])
    try:
        with h.pacslab_server(settings.model_copy(update={"ohif": ohif}), study) as srv:
            pw, browser = h.launch(api)
            try:
                page = browser.new_page()
                page.goto(f"{srv.base}/ohif/")
                page.wait_for_url(f"{idp}/authorize?**", timeout=30000)
                query = parse_qs(urlsplit(page.url).query)
                assert query["client_id"] == ["ohif-pacs"]
                assert query["response_type"] == ["code"]
                assert query["redirect_uri"] == [f"{srv.base}/ohif/callback"]
                assert query["code_challenge_method"] == ["S256"] and query["code_challenge"]
                assert "imaging.read" in query["scope"][0].split()
            finally:
                browser.close()
                pw.stop()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "/.well-known/openid-configuration" in seen


# --- serving rules over a fake build (no browser) ---------------------------------------

INDEX = ('<!doctype html><html><head><script>console.time("scriptToView"),'
         'window.PUBLIC_URL="/"</script><link rel="manifest" href="/manifest.json">'
         '<script rel="preload" as="script" src="/app-config.js"></script>'
         '<script>function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/"'
         '</script><script defer src="/app.bundle.0123456789abcdef.js"></script>'
         '<link href="/app.bundle.css" rel="stylesheet"><a href="https://ohif.org/">x</a>'
         '</head><body><div id="root"></div></body></html>')


@pytest.fixture
def fake_dist(tmp_path: Path) -> Path:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text(INDEX)
    (dist / "app.bundle.0123456789abcdef.js").write_text(
        'var x=1;\n__webpack_require__.p = "/";\nimport("/dicom-microscopy-viewer/a.js")')
    (dist / "app.bundle.css").write_text("@font-face{src:url(/a34f9d1faa5f3315.woff2)}")
    (dist / "manifest.json").write_text('{"icons":[{"src":"/assets/a.png"}]}')
    (dist / "assets" / "a.png").write_bytes(b"\x89PNG")
    (dist / "0ddf166f7a343eda.wasm").write_bytes(b"\0asm\1\0\0\0")
    (dist / "app-config.js").write_text("window.config = {package: true}")
    return dist


@pytest.fixture
def client(settings: Settings, fake_dist: Path) -> Iterator[TestClient]:
    s = settings.model_copy(update={
        "ohif": OhifSettings(dist_dir=fake_dist),
        "auth": settings.auth.model_copy(update={"enabled": True})})
    with running_app(s) as app, TestClient(app) as c:
        yield c


def test_index_under_prefix_without_inline_scripts(client: TestClient) -> None:
    for path in ("/ohif", "/ohif/", "/ohif/viewer", "/ohif/viewer?StudyInstanceUIDs=1.2.3",
                 "/ohif/index.html", "/ohif/segmentation/x"):
        r = client.get(path)
        assert r.status_code == 200, path  # public: no token, no patient data
        assert r.headers["content-type"].startswith("text/html")
        body = r.text
        assert "<script>" not in body  # inline code moved to app-config.js
        assert 'src="/ohif/app-config.js"' in body
        assert 'src="/ohif/app.bundle.0123456789abcdef.js"' in body
        assert 'href="/ohif/app.bundle.css"' in body and 'href="/ohif/manifest.json"' in body
        assert 'href="https://ohif.org/"' in body  # absolute URLs untouched
        csp = r.headers["content-security-policy"]
        script_src = re.search(r"script-src ([^;]*)", csp)
        assert script_src and script_src.group(1) == "'self' 'wasm-unsafe-eval'"
        assert "frame-ancestors 'self'" in csp and "object-src 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"


def test_assets_rewritten_for_the_prefix(client: TestClient) -> None:
    js = client.get("/ohif/app.bundle.0123456789abcdef.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert '__webpack_require__.p = "/ohif/";' in js.text
    assert "'/ohif/dicom-microscopy-viewer/" in js.text or '"/dicom-microscopy-viewer/' in js.text
    assert "immutable" in js.headers["cache-control"]  # content-hashed name
    # Only workers started from these scripts may eval (the image decoders' Emscripten
    # code); the page's own policy never allows it.
    assert "'unsafe-eval'" in js.headers["content-security-policy"]
    assert "'unsafe-eval'" not in client.get("/ohif/viewer").headers["content-security-policy"]
    assert "'unsafe-eval'" not in client.get("/ohif/app.bundle.css").headers[
        "content-security-policy"]
    assert client.get("/ohif/app.bundle.css").text == (
        "@font-face{src:url(/ohif/a34f9d1faa5f3315.woff2)}")
    assert '"/ohif/assets/a.png"' in client.get("/ohif/manifest.json").text
    wasm = client.get("/ohif/0ddf166f7a343eda.wasm")
    assert wasm.headers["content-type"] == "application/wasm"
    assert client.get("/ohif/assets/a.png").content == b"\x89PNG"


def test_assets_validate_and_compress(client: TestClient, fake_dist: Path) -> None:
    """Strong ETags and 304s (RFC 9110 13.1.2); gzip for those who accept it, with
    Content-Encoding, Vary and a tag of its own; the first request for a file never
    waits for the compression (done once, in the background)."""
    big = fake_dist / "1206.bundle.786e5b556f903028.js"
    big.write_text("var chunk = 1;\n" * 500)
    url = "/ohif/" + big.name
    plain = client.get(url, headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200 and plain.content == big.read_bytes()
    etag = plain.headers["etag"]
    assert etag.startswith('"') and not etag.startswith('W/')
    assert plain.headers["vary"] == "Accept-Encoding" and "content-encoding" not in plain.headers
    again = client.get(url, headers={"If-None-Match": etag, "Accept-Encoding": "identity"})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    # the first gzip-accepting request starts the compression in the background
    wait_until(lambda: client.get(url, headers={"Accept-Encoding": "gzip, br"})
               .headers.get("content-encoding") == "gzip",
               timeout=10, message="the build file was never sent gzip-compressed")
    gz = client.get(url, headers={"Accept-Encoding": "gzip, br"})
    assert gz.headers["content-encoding"] == "gzip"
    assert gz.content == big.read_bytes()  # httpx decodes it
    assert int(gz.headers["content-length"]) < len(big.read_bytes()) // 10
    assert gz.headers["etag"] != etag and "immutable" in gz.headers["cache-control"]
    assert client.get(url, headers={"Accept-Encoding": "gzip;q=0"}).headers.get(
        "content-encoding") is None
    assert client.get(url, headers={"If-None-Match": gz.headers["etag"],
                                    "Accept-Encoding": "gzip"}).status_code == 304
    # A rewritten script is served, tagged and compressed as rewritten.
    js = client.get("/ohif/app.bundle.0123456789abcdef.js")
    assert '"/ohif/"' in js.text and js.headers["etag"]
    # Images are not compressed again.
    png = client.get("/ohif/assets/a.png", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in png.headers and "vary" not in png.headers


def test_viewer_route_preloads_its_chunks(client: TestClient, fake_dist: Path) -> None:
    """The deep link's page names the chunks its first image needs, for the installed
    version (a stamp without a list, or a missing file, gives no hint for it)."""
    assert preload_links(fake_dist) == ""  # no version stamp
    (fake_dist / ".pacslab-ohif-version").write_text("3.13.2\n")
    (fake_dist / "6495.bundle.8e8306fedff44999.js").write_text("x")
    (fake_dist / "2623.css").write_text("a{}")
    (fake_dist / "a34f9d1faa5f3315.woff2").write_bytes(b"wOF2")
    page = client.get("/ohif/viewer?StudyInstanceUIDs=1.2.3").text
    assert ('<link rel="preload" as="script" fetchpriority="low" '
            'href="/ohif/6495.bundle.8e8306fedff44999.js">') in page
    assert '<link rel="preload" as="style" fetchpriority="low" href="/ohif/2623.css">' in page
    assert 'as="font" type="font/woff2" crossorigin' in page
    assert page.count("<link rel=\"preload\"") == 3  # only the files that are there
    assert page.index("/ohif/6495.bundle") < page.index("</head>")
    for other in ("/ohif", "/ohif/", "/ohif/segmentation/x"):
        assert "<link rel=\"preload\"" not in client.get(other).text, other
    (fake_dist / ".pacslab-ohif-version").write_text("9.9.9")
    assert preload_links(fake_dist) == ""


def test_installed_build_has_the_preloaded_files(settings: Settings) -> None:
    """When the pinned OHIF version changes, its viewer's chunk list must be recorded
    (benchmarks/test_ohif_viewer.py's profile; api/routes/ohif.py _VIEWER_PRELOAD)."""
    dist = settings.ohif.dist_dir
    stamp = dist / ".pacslab-ohif-version"
    if not stamp.is_file():
        pytest.skip(f"OHIF Viewer is not installed in {dist}")
    version = stamp.read_text().strip()
    names = ohif._VIEWER_PRELOAD.get(version)
    assert names, f"no preload list for OHIF {version}: record the viewer route's chunks"
    assert [n for n in names if not (dist / n).is_file()] == []


def test_generated_app_config(client: TestClient) -> None:
    r = client.get("/ohif/app-config.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    body = r.text
    assert "package: true" not in body  # the package's own config is never served
    assert '"routerBasename": "/ohif"' in body and '"showStudyList": true' in body
    assert 'location.origin + "/dicomweb"' in body
    assert '"qidoSupportsIncludeField": true' in body
    assert "sessionStorage" in body and "pacslab.token" in body  # the viewer's token key
    assert "userAuthenticationService" in body and '"oidc"' not in body


def test_app_config_with_oidc() -> None:
    cfg = app_config_js(OhifSettings(oidc_authority="https://idp.example.org/realms/h",
                                     oidc_client_id="ohif"))
    assert '"authority": "https://idp.example.org/realms/h"' in cfg
    assert '"client_id": "ohif"' in cfg and "if (!true)" in cfg  # token hook off
    with pytest.raises(ValueError):
        OhifSettings(oidc_authority="https://idp.example.org")  # client id missing
    with pytest.raises(ValueError):
        OhifSettings(oidc_authority="http://idp.example.org", oidc_client_id="x")


@pytest.mark.parametrize("path", [
    "/ohif/missing.js", "/ohif/assets/none.png", "/ohif/.pacslab-ohif-version",
    "/ohif/..%2f..%2fetc%2fpasswd.js", "/ohif/%2e%2e/%2e%2e/etc/passwd.txt",
    "/ohif/assets/../../dist.txt", "/ohif/" + "a/" * 300 + "x.js",
])
def test_missing_or_hostile_asset_paths_are_404(client: TestClient, path: str) -> None:
    r = client.get(path)
    # 404; or 401 when the auth layer already refuses a path that normalises off /ohif/
    assert r.status_code in (401, 404), (path, r.status_code)
    assert "root:" not in r.text


def test_symlink_in_build_not_followed(client: TestClient, fake_dist: Path,
                                       tmp_path: Path) -> None:
    secret = tmp_path / "secret.js"
    secret.write_text("SECRET")
    os.symlink(secret, fake_dist / "leak.js")
    os.symlink(tmp_path, fake_dist / "up")
    assert client.get("/ohif/leak.js").status_code == 404
    assert client.get("/ohif/up/secret.js").status_code == 404


def test_not_installed_says_how(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(update={"ohif": OhifSettings(dist_dir=tmp_path / "nothing")})
    with running_app(s) as app, TestClient(app) as c:
        for path in ("/ohif", "/ohif/viewer", "/ohif/app.bundle.js"):
            r = c.get(path)
            assert r.status_code == 503
            assert "npm" in r.text and "PACSLAB_OHIF__DIST_DIR" in r.text and "./run" in r.text


def test_deep_link_and_index_rewrite_pure() -> None:
    assert deep_link("1.2.3") == "/ohif/viewer?StudyInstanceUIDs=1.2.3"
    assert deep_link("1.2&x=<3>") == "/ohif/viewer?StudyInstanceUIDs=1.2%26x%3D%3C3%3E"
    html = '<img src="//cdn/x"><a href="/a">'
    assert rewrite_index(html) == '<img src="//cdn/x"><a href="/ohif/a">'


def test_imaging_study_links_to_the_ohif_deep_link(client: TestClient, tmp_path: Path) -> None:
    """FHIR ImagingStudy.endpoint: besides the DICOMweb Endpoint, a contained IHE IID
    Endpoint whose address opens that study in OHIF; the link is served (issue 20)."""
    from api.keys import issue_token
    from tests.api._support import store_ct

    app = client.app
    studies = [store_ct(app, tmp_path / "ct1").study, store_ct(app, tmp_path / "ct2").study]
    settings = app.state.settings  # type: ignore[attr-defined]
    token = issue_token(settings.auth, subject="emr", scopes=["imaging.read"])
    auth = {"Authorization": f"Bearer {token}"}
    bundle = client.get("/fhir/ImagingStudy", headers=auth).json()
    by_uid = {e["resource"]["id"]: e["resource"] for e in bundle["entry"]}
    assert set(studies) <= by_uid.keys()
    for uid in studies:
        study = by_uid[uid]
        (viewer,) = study["contained"]
        assert {"reference": "#ohif"} in study["endpoint"]
        assert {"reference": "Endpoint/dicomweb"} in study["endpoint"]
        assert viewer["connectionType"]["code"] == "ihe-iid"
        url = urlsplit(viewer["address"])
        assert f"{url.path}?{url.query}" == deep_link(uid)  # this study, not another
        assert parse_qs(url.query) == {"StudyInstanceUIDs": [uid]}
        page = client.get(f"{url.path}?{url.query}")
        assert page.status_code == 200 and 'src="/ohif/app-config.js"' in page.text
    off = settings.model_copy(update={"ohif": OhifSettings(enabled=False)})
    with running_app(off) as app_off:
        store_ct(app_off, tmp_path / "ct3")
        other = TestClient(app_off).get("/fhir/ImagingStudy", headers=auth).json()
        assert all("contained" not in e["resource"] for e in other["entry"])
