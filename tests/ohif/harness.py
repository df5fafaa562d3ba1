"""OHIF Viewer v3 in headless Debian chromium (playwright), shared by the test and the
benchmark (issue 20).

``pacslab_server`` runs ``create_app`` under uvicorn on loopback, authentication ON,
with the demo CT (:mod:`core.synthetic`, the study ``pacslab demo`` sends) stored
through the archive's accept path (the one C-STORE uses) under a Vietnamese patient
name. ``orthanc_server`` is the anchor: Debian Orthanc with its DICOMweb plugin, the
same files stored over its REST API, and the same OHIF build served from a tiny local
server that also proxies ``/dicom-web`` to Orthanc (same origin, no CORS).
``open_viewer`` opens a deep link and measures, from the page: time to the first
rendered image (the viewport canvas has non-blank pixels) and to all slices loaded
(cornerstone's image cache holds every image of the series).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from api.routes.ohif import app_config_js, rewrite_asset, rewrite_index
from core.settings import OhifSettings, Settings
from core.synthetic import write_ct_series
from tests.support import free_port, serving, wait_until

CHROMIUM = "/usr/bin/chromium"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ORTHANC_PLUGINS = "/usr/share/orthanc/plugins"
#: The demo patient's name in Vietnamese (UTF-8, SpecificCharacterSet ISO_IR 192).
PATIENT_NAME = "NGUYỄN^VĂN AN"

#: Chromium flags: WebGL through SwiftShader (cornerstone3D renders with WebGL; there
#: is no GPU here), no background traffic.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
                 "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def need_ohif(dist: Path) -> Any:
    """Skip unless chromium, playwright and the OHIF build are there; playwright's api."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium)")
    if not (dist / "index.html").is_file():
        pytest.skip(f"OHIF Viewer is not installed in {dist} (./run test installs it)")
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@dataclass
class Study:
    study: str
    series: str
    slices: int
    paths: list[Path]


def demo_ct(directory: Path, *, slices: int, size: int) -> Study:
    """The demo CT (``pacslab demo``'s series) under the Vietnamese patient name."""
    paths = write_ct_series(directory, slices=slices, rows=size, columns=size,
                            patient_name=PATIENT_NAME, accession_number="DEMO0001")
    ds = dcmread(paths[0], stop_before_pixels=True)
    return Study(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), slices, paths)


@dataclass
class Server:
    base: str  # http://127.0.0.1:P
    token: str = ""
    #: Every HTTP request the server answered: (start, seconds until its last byte was
    #: handed to the socket, path), on ``time.monotonic``'s clock.
    requests: list[tuple[float, float, str]] = field(default_factory=list)

    def server_s(self, start: float, end: float) -> float:
        """Sum of the server's request times for the requests begun in [start, end]."""
        return sum(d for t, d, _ in list(self.requests) if start <= t <= end)


class _Timed:
    """ASGI wrapper that records each request's server time into ``log``."""

    def __init__(self, app: Any, log: list[tuple[float, float, str]]) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()

        async def timed_send(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.log.append((t0, time.monotonic() - t0, scope["path"]))

        await self.app(scope, receive, timed_send)


@contextmanager
def pacslab_server(settings: Settings, study: Study) -> Iterator[Server]:
    """pacslab's API with ``study`` stored (archive accept: the C-STORE path) and the
    instance job's metadata step done, as after ``pacslab demo``; auth on."""

    from api.keys import ensure_private_key, issue_token
    from tests.api._support import run_metadata_step, running_app, store_files

    auth = settings.auth.model_copy(update={"enabled": True})
    assert auth.local_key is not None
    ensure_private_key(auth.local_key)
    token = issue_token(auth, subject="dr-ohif", scopes=["imaging.read"], ttl_s=900)
    with running_app(settings.model_copy(update={"auth": auth})) as app:
        store_files(app.state.archive, study.paths)
        run_metadata_step(app)  # what the instance job does after the C-STORE
        log: list[tuple[float, float, str]] = []
        with serving(_Timed(app, log)) as base:
            yield Server(base, token, log)


# --- the Orthanc anchor ---------------------------------------------------------------


def need_orthanc() -> None:
    if not os.path.exists(ORTHANC):
        pytest.skip("Orthanc is not installed (Debian orthanc)")
    if not list(Path(ORTHANC_PLUGINS).glob("libOrthancDicomWeb*")):
        pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian orthanc-dicomweb)")


def _ohif_site_handler(dist: Path, orthanc: str,
                       log: list[tuple[float, float, str]]) -> type[BaseHTTPRequestHandler]:
    """OHIF's build under /ohif with an app-config for /dicom-web, which is proxied.

    Files are read once and kept in memory, and Nagle is off (headers and body are
    two writes: with Nagle the body waited for the client's delayed ACK, 40 ms), so
    the site adds as little as it can to Orthanc's own time.
    """
    config = app_config_js(OhifSettings(dist_dir=dist)).replace(
        '"/dicomweb"', '"/dicom-web"')
    index = rewrite_index((dist / "index.html").read_text(encoding="utf-8"))
    target = orthanc.removeprefix("http://")

    files: dict[Path, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str,
                  extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            t0 = time.monotonic()
            try:
                self._get()
            finally:
                log.append((t0, time.monotonic() - t0, self.path.split("?", 1)[0]))

        def _get(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith("/dicom-web/"):
                self._proxy()
                return
            rel = path.removeprefix("/ohif").lstrip("/")
            if rel == "app-config.js":
                self._send(200, config.encode(), "text/javascript")
                return
            file = dist / rel
            if rel and ".." not in rel and file.is_file():
                if file not in files:
                    raw = file.read_bytes()
                    files[file] = rewrite_asset(file.name, raw) or raw
                data = files[file]
                ctype = ("text/javascript" if file.suffix == ".js" else "application/wasm"
                         if file.suffix == ".wasm" else "text/css" if file.suffix == ".css"
                         else "application/octet-stream")
                self._send(200, data, ctype)
            elif "." in rel.rsplit("/", 1)[-1]:
                self._send(404, b"not found", "text/plain")
            else:
                self._send(200, index.encode(), "text/html; charset=utf-8")

        def _proxy(self) -> None:
            conn = http.client.HTTPConnection(target, timeout=60)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() in {"accept", "range"}}
            conn.request("GET", self.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            keep = {k: v for k, v in resp.getheaders()
                    if k.lower() not in {"content-length", "transfer-encoding", "connection",
                                         "content-type", "keep-alive"}}
            self._send(resp.status, body,
                       resp.getheader("Content-Type") or "application/octet-stream", keep)

    return Handler


@contextmanager
def orthanc_server(study: Study, dist: Path) -> Iterator[Server]:
    """Orthanc + DICOMweb on loopback with ``study`` stored, behind an OHIF site."""
    need_orthanc()
    http_port, dicom_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="orthanc-") as tmp:
        config = {
            "Name": "anchor", "StorageDirectory": f"{tmp}/db", "IndexDirectory": f"{tmp}/db",
            "HttpPort": http_port, "DicomPort": dicom_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [ORTHANC_PLUGINS],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpCompressionEnabled": False, "ConcurrentJobs": 2,
        }
        cfg = Path(tmp) / "orthanc.json"
        cfg.write_text(json.dumps(config))
        log = open(Path(tmp) / "orthanc.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{http_port}"
        try:
            def answers() -> bool:
                try:
                    urllib.request.urlopen(f"{base}/system", timeout=2).read()
                    return True
                except OSError:
                    assert proc.poll() is None, "Orthanc did not start (it exited)"
                    return False

            wait_until(answers, timeout=30, interval=0.2, message="Orthanc did not start")
            for path in study.paths:
                req = urllib.request.Request(f"{base}/instances", data=path.read_bytes(),
                                             method="POST")
                urllib.request.urlopen(req, timeout=30).read()
            site_port = free_port()
            timings: list[tuple[float, float, str]] = []
            httpd = ThreadingHTTPServer(("127.0.0.1", site_port),
                                        _ohif_site_handler(dist, base, timings))
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            try:
                yield Server(f"http://127.0.0.1:{site_port}", "", timings)
            finally:
                httpd.shutdown()
                httpd.server_close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


# --- the browser ----------------------------------------------------------------------

#: In the page: pixel statistics of the first viewport's canvas (is it not blank?).
CANVAS_STATS = """() => {
  const canvas = document.querySelector('.cornerstone-canvas, canvas');
  if (!canvas || !canvas.width) return null;
  const c = document.createElement('canvas');
  c.width = canvas.width; c.height = canvas.height;
  const ctx = c.getContext('2d');
  ctx.drawImage(canvas, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let n = 0, sum = 0, sq = 0, nonzero = 0;
  for (let i = 0; i < d.length; i += 16) {
    const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
    n++; sum += v; sq += v * v; if (v > 8) nonzero++;
  }
  const mean = sum / n;
  return {mean, std: Math.sqrt(Math.max(0, sq / n - mean * mean)), nonzero: nonzero / n,
          width: c.width, height: c.height};
}"""


def launch(sync_api: Any) -> tuple[Any, Any]:
    pw = sync_api.sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    return pw, browser


@dataclass
class Opened:
    page: Any
    console: list[str]
    failed: list[str]  # "STATUS URL" of failed requests
    first_image_s: float
    all_slices_s: float | None
    #: Sum of the server's request times for the requests begun until the first image.
    server_first_s: float = 0.0


def token_fragment(token: str) -> str:
    return f"#token={token}" if token else ""


def _note_failed(failed: list[str], request: Any) -> None:
    """Record a request that failed, unless it never left the browser.

    ``blob:`` and ``data:`` URLs are object URLs OHIF makes from bytes it already holds
    (decoded frames, worker scripts); when a navigation (``page.goto``) tears the page
    down, Chromium aborts them and reports ``requestfailed``. They never reach pacslab,
    so they say nothing about it; every http(s) request still counts.
    """
    url = str(request.url)
    if url.startswith(("blob:", "data:")):
        return
    failed.append(f"failed {url} ({request.failure})")


def open_viewer(browser: Any, server: Server, study: Study, *, wait_all: bool = True,
                timeout_s: float = 90.0) -> Opened:
    """Open the deep link for ``study``; time the first image and all slices."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    console: list[str] = []
    failed: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: _note_failed(failed, r))
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400
            else None)
    url = (f"{server.base}/ohif/viewer?StudyInstanceUIDs={study.study}"
           + token_fragment(server.token))
    start = time.monotonic()
    page.goto(url)

    def rendered() -> bool:
        stats = page.evaluate(CANVAS_STATS)
        return bool(stats and stats["std"] > 5 and stats["nonzero"] > 0.05)

    wait_until(rendered, timeout=timeout_s,
               message=lambda: f"no image rendered in {timeout_s:.0f} s; console: "
               f"{console[-20:]}; failed: {failed[:20]}")
    first = time.monotonic() - start
    all_s = None
    if wait_all:
        # Every slice fetched (each frame is one WADO-RS /frames request, completed),
        # within what is left of timeout_s; else all_s stays None.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: len(_frame_urls(page)) >= study.slices,
                       timeout=max(0.0, start + timeout_s - time.monotonic()))
            all_s = time.monotonic() - start
    return Opened(page, console, failed, first, all_s,
                  server.server_s(start, start + first))


def _frame_urls(page: Any) -> list[str]:
    entries = page.evaluate("() => performance.getEntriesByType('resource')"
                            ".map(e => e.name).filter(n => /\\/frames\\/\\d/.test(n))")
    return list(dict.fromkeys(entries))


def screenshot_png(page: Any) -> bytes:
    data: bytes = page.screenshot()
    return data


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
