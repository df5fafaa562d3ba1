"""The DICOMweb client OHIF uses, in a real browser, from a page on another origin.

npm ``dicomweb-client`` (its UMD build from ``tests/js/node_modules``) runs in headless
Debian chromium (playwright), in a page served by a second small HTTP server on another
port, against ``create_app`` under uvicorn on loopback with authentication ON and that
page's origin in ``http.cors_origins`` (issues 13.1, 13.7, 13.8). It searches as OHIF
does (``includefield=00081030,00080060``), reads series metadata, frames and the
Pixel Data bulk data its BulkDataURI points at. The same page from an origin that is
not listed is stopped by the browser (CORS enforced, not merely advertised).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from core.settings import Settings
from tests.api._support import Stored, running_app, store_ct, store_files
from tests.support import free_port, serving

pytestmark = pytest.mark.network

CHROMIUM = "/usr/bin/chromium"
UMD = Path(__file__).parents[1] / "js/node_modules/dicomweb-client/build/dicomweb-client.js"
MR_FILE = "emri_small_jpeg_2k_lossless.dcm"  # MR, 10 frames, JPEG 2000 lossless

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>viewer</title>
<script src="dicomweb-client.js"></script></head><body>viewer</body></html>"""

# Run in the page: what an OHIF study list and viewport ask for.
SCRIPT = """async ({url, token, ct, mr}) => {
  const client = new DICOMwebClient.api.DICOMwebClient({
    url, headers: {Authorization: 'Bearer ' + token}});
  const digest = async (buffers) => {
    const all = new Uint8Array(buffers.reduce((n, b) => n + b.byteLength, 0));
    let at = 0;
    for (const b of buffers) { all.set(new Uint8Array(b), at); at += b.byteLength; }
    const hash = await crypto.subtle.digest('SHA-256', all);
    return {length: all.length,
            sha256: [...new Uint8Array(hash)].map(x => x.toString(16).padStart(2, '0')).join('')};
  };
  const out = {};
  const studies = await client.searchForStudies({queryParams: {
    limit: 101, offset: 0, fuzzymatching: false,
    includefield: '00081030,00080060,ModalitiesInStudy,NumberOfStudyRelatedInstances'}});
  out.studies = studies.map(s => ({
    uid: s['0020000D'].Value[0],
    modalities: s['00080061'].Value,
    instances: s['00201208'].Value[0],
    description: (s['00081030'] || {}).Value || null}));
  const meta = await client.retrieveSeriesMetadata({
    studyInstanceUID: ct.study, seriesInstanceUID: ct.series});
  out.metadata = meta.map(m => m['00080018'].Value[0]).sort();
  const frames = await client.retrieveInstanceFrames({
    studyInstanceUID: ct.study, seriesInstanceUID: ct.series,
    sopInstanceUID: ct.sop, frameNumbers: [1]});
  out.frame = await digest(frames);
  const mrFrames = await client.retrieveInstanceFrames({
    studyInstanceUID: mr.study, seriesInstanceUID: mr.series,
    sopInstanceUID: mr.sop, frameNumbers: [2, 5]});
  out.mrFrames = await Promise.all(mrFrames.map(f => digest([f])));
  const mrMeta = await client.retrieveInstanceMetadata({
    studyInstanceUID: mr.study, seriesInstanceUID: mr.series, sopInstanceUID: mr.sop});
  const uri = mrMeta[0]['7FE00010'].BulkDataURI;
  out.bulkDataURI = uri;
  out.bulk = await digest(await client.retrieveBulkData({BulkDataURI: uri}));
  return out;
}"""

BLOCKED = """async ({url, token}) => {
  const client = new DICOMwebClient.api.DICOMwebClient({
    url, headers: {Authorization: 'Bearer ' + token}});
  try {
    const studies = await client.searchForStudies();
    return {ok: true, n: studies.length};
  } catch (e) {
    return {ok: false, error: String(e && (e.message || e.status || e))};
  }
}"""


@dataclass
class Served:
    api: str  # http://127.0.0.1:P/dicomweb
    token: str
    ct: Stored
    mr: dict[str, str]
    mr_path: Path
    page_origins: dict[str, str]  # "allowed" / "other" -> http://127.0.0.1:Q


def _need_browser() -> Any:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium)")
    if not UMD.exists():
        pytest.skip("npm dicomweb-client is not installed in tests/js/node_modules")
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def _page_server(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    port = free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Quiet,
                                                                         directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{port}"


@pytest.fixture
def served(settings: Settings, tmp_path: Path) -> Iterator[Served]:

    from api.keys import ensure_private_key, issue_token

    _need_browser()
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(UMD, site / "dicomweb-client.js")
    (site / "index.html").write_text(PAGE)
    allowed_httpd, allowed = _page_server(site)
    other_httpd, other = _page_server(site)

    http = settings.http.model_copy(update={"cors_origins": [allowed]})
    auth = settings.auth.model_copy(update={"enabled": True})
    assert auth.local_key is not None
    ensure_private_key(auth.local_key)
    token = issue_token(auth, subject="dr-viewer", scopes=["imaging.read"], ttl_s=600)
    with running_app(settings.model_copy(update={"http": http, "auth": auth})) as app:
        ct = store_ct(app, tmp_path / "ct")
        mr_path = Path(get_testdata_file(MR_FILE))  # type: ignore[arg-type]
        store_files(app.state.archive, [mr_path])
        ds = dcmread(mr_path, stop_before_pixels=True)
        mr = {"study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID),
              "sop": str(ds.SOPInstanceUID)}
        try:
            with serving(app) as base:
                yield Served(f"{base}/dicomweb", token, ct, mr, mr_path,
                             {"allowed": allowed, "other": other})
        finally:
            allowed_httpd.shutdown()
            other_httpd.shutdown()


def _run_in_page(origin: str, script: str, arg: dict[str, Any]) -> tuple[Any, list[str]]:
    sync_api = _need_browser()
    console: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: console.append(m.text))
            page.goto(f"{origin}/index.html")
            page.wait_for_function("typeof DICOMwebClient !== 'undefined'", timeout=10000)
            result = page.evaluate(script, arg)
        finally:
            browser.close()
    return result, console


def sha256(data: bytes) -> dict[str, Any]:
    return {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_ohif_client_from_another_origin(served: Served) -> None:
    ct, mr = served.ct, served.mr
    arg = {"url": served.api, "token": served.token,
           "ct": {"study": ct.study, "series": ct.series, "sop": ct.sops[0]}, "mr": mr}
    result, console = _run_in_page(served.page_origins["allowed"], SCRIPT, arg)
    assert served.page_origins["allowed"] != served.api.removesuffix("/dicomweb")

    # Each study answers its own modalities and counts (issue 13.1).
    by_uid = {s["uid"]: s for s in result["studies"]}
    assert by_uid[ct.study]["modalities"] == ["CT"], json.dumps(result["studies"])
    assert by_uid[mr["study"]]["modalities"] == ["MR"]
    assert by_uid[ct.study]["instances"] == 4 and by_uid[mr["study"]]["instances"] == 1

    assert result["metadata"] == sorted(ct.sops)
    assert result["frame"] == sha256(dcmread(ct.paths[0]).PixelData)

    # Compressed frames and bulk data, decoded to native pixels (issue 13.8).
    pixels = dcmread(served.mr_path).pixel_array  # JPEG 2000 lossless
    assert result["mrFrames"] == [sha256(pixels[i].tobytes()) for i in (1, 4)]
    assert result["bulkDataURI"].startswith(served.api + "/studies/")
    assert result["bulk"] == sha256(pixels.tobytes())
    assert not [m for m in console if "CORS" in m], console


def test_page_from_an_unlisted_origin_is_blocked(served: Served) -> None:
    arg = {"url": served.api, "token": served.token}
    result, console = _run_in_page(served.page_origins["other"], BLOCKED, arg)
    assert result["ok"] is False, result
    assert any("CORS policy" in m for m in console), console
    # the same page from the listed origin gets through
    result, _ = _run_in_page(served.page_origins["allowed"], BLOCKED, arg)
    assert result == {"ok": True, "n": 2}
