"""OHIF Viewer v3 served same-origin under ``/ohif`` (issue 20).

OHIF's npm package ``@ohif/app`` ships a ready-built ``dist/``; ``./run`` installs a
pinned version under ``.ohif/dist`` (``ohif.dist_dir``), never in git. That build was
made for ``PUBLIC_URL=/``: its ``index.html`` links ``/app.bundle….js``, the bundles
load their chunks, workers and WebAssembly codecs from webpack's public path ``"/"``
and its CSS names the font at ``url(/…)``. Serving it under a prefix therefore needs
small, exact rewrites, done here at serve time so the installed files stay the
package's own (a new version is an unpacked tarball, nothing else):

* ``index.html``: every root-relative ``href``/``src`` gets the ``/ohif`` prefix, and
  its two inline scripts (``window.PUBLIC_URL`` and ``browserImportFunction``) move
  into the generated ``app-config.js``, so the page's CSP needs no ``'unsafe-inline'``
  script;
* bundles and workers: ``__webpack_require__.p = "/"`` becomes ``"/ohif/"``;
* CSS ``url(/…)`` and ``manifest.json`` icon paths.

``app-config.js`` is generated (:func:`app_config_js`): one DICOMweb data source over
this server's ``/dicomweb``, the study list on, ``routerBasename`` ``/ohif``, and
authentication either by OpenID Connect (``ohif.oidc_*``) or, by default, the same
per-tab token the built-in viewer keeps: given once as ``#token=…``, kept in
``sessionStorage`` and taken out of the address bar. OHIF reads its Authorization
header from its ``userAuthenticationService``; the config, given to OHIF as a function
(``appInit`` calls it with the ``servicesManager``), installs our header function on
that service the moment OHIF registers it, so every QIDO/WADO/thumbnail request of the
study list and of the viewer carries the token.

Deep link an EMR opens for one study: ``/ohif/viewer?StudyInstanceUIDs=<uid>#token=…``
(:func:`deep_link`). Every other path that is not a file of the build is OHIF's own
client-side route and gets ``index.html`` (the package's ``serve.json`` rewrite).
If the viewer is not installed, ``/ohif`` answers 503 with how to install it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import mimetypes
import os
import re
import stat
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response

from api.conditional import not_modified
from core.settings import OhifSettings, Settings

__all__ = ["PREFIX", "app_config_js", "deep_link", "page_csp", "rewrite_asset", "rewrite_index",
           "router"]

logger = logging.getLogger(__name__)

PREFIX: Final = "/ohif"
router = APIRouter(prefix=PREFIX, tags=["ohif"], include_in_schema=False)

#: Longest path below /ohif we look up (OHIF's own names are short).
_MAX_PATH: Final = 512
#: A path segment of the build: no dot-files, no traversal, no backslashes.
_SEGMENT: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]*$")
#: Content-hashed names (``app.bundle.0f61….js``, ``37fa….wasm``): cacheable for good.
_HASHED: Final = re.compile(r"(?:\.[0-9a-f]{16}\.js|^[0-9a-f]{16}\.(?:wasm|woff2))$")

NOT_INSTALLED: Final = (
    "OHIF Viewer is not installed.\n\n"
    "pacslab serves OHIF's ready-built viewer (npm package @ohif/app) under /ohif.\n"
    "Install it with `./run serve` or `./run test` (they fetch the pinned version into\n"
    ".ohif/dist with `npm pack`), or unpack @ohif/app's dist/ anywhere and point\n"
    "PACSLAB_OHIF__DIST_DIR at it.\n"
)


def page_csp(settings: Settings) -> str:
    """Content-Security-Policy of OHIF's pages and scripts (CSP Level 3).

    Stricter than nothing, looser than ``/viewer``'s, because OHIF needs it:
    ``'wasm-unsafe-eval'`` compiles its WebAssembly codecs (JPEG 2000, JPEG-LS, HTJ2K)
    without allowing JavaScript ``eval``; ``worker-src blob:`` for the decode and
    compute workers; ``style-src 'unsafe-inline'`` because React sets ``style``
    attributes; ``img-src blob: data:`` for thumbnails and canvases. Scripts, fonts
    and data come only from this origin (plus the identity provider when OIDC is on).
    """
    connect = "'self'"
    if settings.ohif.oidc_authority:
        origin = re.match(r"^https?://[^/]+", settings.ohif.oidc_authority)
        if origin:
            connect += " " + origin.group(0)
    return ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; "
            "worker-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' blob: data:; font-src 'self' data:; media-src 'self' blob:; "
            f"connect-src {connect}; object-src 'none'; base-uri 'self'; "
            "form-action 'self'; frame-ancestors "
            + " ".join(settings.http.viewer_frame_ancestors))


def worker_csp(settings: Settings) -> str:
    """CSP sent with OHIF's scripts: it governs only the workers started from them.

    A CSP header on a script loaded by ``<script>`` is ignored (the page's policy
    applies); a dedicated worker, though, runs under the policy delivered with its own
    script (CSP Level 3, 'Initialize a Worker's policy'). The image decoders' worker
    (cornerstone's dicomImageLoader: OpenJPEG for JPEG 2000, CharLS …) is an
    Emscripten build that evaluates strings, so ``'unsafe-eval'`` is allowed there and
    only there; the page itself never gets it.
    """
    return page_csp(settings).replace("'wasm-unsafe-eval'", "'wasm-unsafe-eval' 'unsafe-eval'")


def _headers(settings: Settings, *, script: bool = False) -> dict[str, str]:
    csp = worker_csp(settings) if script else page_csp(settings)
    return {"Content-Security-Policy": csp, "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def deep_link(study_uid: str) -> str:
    """The path an EMR opens for one study (append ``#token=…`` for the token)."""
    return f"{PREFIX}/viewer?StudyInstanceUIDs={quote(study_uid, safe='')}"


def app_config_js(ohif: OhifSettings) -> str:
    """OHIF's ``app-config.js`` for this server (OHIF 3 ``window.config``)."""
    data_source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "pacslab",
        "configuration": {
            "friendlyName": "pacslab",
            "name": "pacslab",
            # Filled with location.origin + "/dicomweb" below (same origin).
            "wadoUriRoot": "", "qidoRoot": "", "wadoRoot": "",
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "thumbnail",
            "thumbnailRequestStrategy": "fetch",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "supportsReject": False,
            "staticWado": False,
            "singlepart": "bulkdata,video,pdf",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config: dict[str, object] = {
        "routerBasename": PREFIX,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "production",
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "pacslab",
        "dataSources": [data_source],
    }
    if ohif.oidc_authority:
        config["oidc"] = [{
            "authority": ohif.oidc_authority,
            "client_id": ohif.oidc_client_id,
            "redirect_uri": "/callback",
            "response_type": "code",
            "scope": ohif.oidc_scope,
        }]
    return _CONFIG_TEMPLATE.replace("@PREFIX@", json.dumps(PREFIX + "/")).replace(
        "@CONFIG@", json.dumps(config, indent=1)).replace(
        "@OIDC@", "true" if ohif.oidc_authority else "false")


_CONFIG_TEMPLATE: Final = """\
/* OHIF app-config.js generated by pacslab (api/routes/ohif.py); not the package's. */
(function () {
  "use strict";
  // What index.html's inline scripts did (moved here so the CSP allows no inline code).
  window.PUBLIC_URL = @PREFIX@;
  window.browserImportFunction = function (n) { return import(n); };

  // The access token (RFC 6750), as in the built-in viewer: given once as #token=…,
  // kept for this tab only (sessionStorage) and taken out of the address bar.
  var TOKEN_KEY = "pacslab.token";
  var fromHash = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (fromHash) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(fromHash[1]));
    history.replaceState(history.state, "", location.pathname + location.search);
  }
  function authorizationHeader() {
    var token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: "Bearer " + token } : {};
  }

  var config = @CONFIG@;
  var root = location.origin + "/dicomweb";
  config.dataSources.forEach(function (source) {
    var c = source.configuration;
    c.wadoUriRoot = c.qidoRoot = c.wadoRoot = root;
  });
  config.httpErrorHandler = function (error) {
    if (error && error.status === 401) {
      console.warn("pacslab: not signed in (open the link with #token=<access token>)");
    }
  };

  // OHIF calls a function config with its servicesManager before it registers the
  // services; catch the registration of userAuthenticationService and give it our
  // header function, so every DICOMweb request (study list and viewer) carries it.
  function withAuth(ctx) {
    var services = ctx.servicesManager.services, service;
    if (!@OIDC@) {
      Object.defineProperty(services, "userAuthenticationService", {
        configurable: true, enumerable: true,
        get: function () { return service; },
        set: function (value) {
          service = value;
          value.setServiceImplementation({ getAuthorizationHeader: authorizationHeader });
        },
      });
    }
    return config;
  }
  // Parts of OHIF read window.config.<key> directly: keep the keys on the function.
  Object.keys(config).forEach(function (key) { withAuth[key] = config[key]; });
  window.config = withAuth;
})();
"""


# --- serving the build --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Cached:
    mtime_ns: int
    size: int
    body: bytes | None  # None: served from the file (too large to keep)
    etag: str = ""
    gzipped: bytes | None = None  # the body gzip-compressed, once asked for


_cache: dict[Path, _Cached] = {}
_cache_lock = threading.Lock()
#: Files of the build kept in memory once served, so a page load's ~30 MB of scripts
#: go out in one write each (a FileResponse reads 64 KiB per thread hop, and each hop
#: waits for the event loop again on a busy machine). Bounded: the whole build is
#: 200 MB, a viewer page needs the same few dozen files every time.
_MEMORY_MAX_FILE: Final = 32 * 1024 * 1024
_MEMORY_MAX_TOTAL: Final = 128 * 1024 * 1024
_memory_total = 0
#: What is worth compressing (text and WebAssembly; images and fonts already are).
_COMPRESSIBLE: Final = frozenset({".js", ".mjs", ".css", ".json", ".wasm", ".svg", ".map"})
#: Add the viewer route's preload hints (:func:`preload_links`).
_PRELOAD = True
#: Serve compressible files gzip-encoded to clients that accept it.
_GZIP = True
#: gzip only above this size (below, the header overhead is most of the gain).
_GZIP_MIN: Final = 1024

_WEBPACK_PUBLIC_PATH: Final = b'__webpack_require__.p = "/";'


def rewrite_asset(name: str, data: bytes, prefix: str = PREFIX) -> bytes | None:
    """The file's bytes for serving under ``prefix``, or None if they need no change.

    Exact, anchored replacements only (see the module docstring); anything else in
    the build is left alone.
    """
    p = prefix.encode() + b"/"
    if name.endswith(".js"):
        out = data.replace(_WEBPACK_PUBLIC_PATH, b'__webpack_require__.p = "' + p + b'";')
        # The microscopy mode's viewer is imported by absolute path.
        out = out.replace(b"'/dicom-microscopy-viewer/", b"'" + p + b"dicom-microscopy-viewer/")
        return out if out != data else None
    if name.endswith(".css"):
        out = data.replace(b"url(/", b"url(" + p)
        return out if out != data else None
    if name == "manifest.json":
        out = data.replace(b'"/assets/', b'"' + p + b"assets/")
        return out if out != data else None
    return None


def rewrite_index(html: str, prefix: str = PREFIX) -> str:
    """``index.html`` for ``prefix``: root-relative links prefixed, inline scripts out.

    The two inline scripts only set ``window.PUBLIC_URL`` and define
    ``browserImportFunction``; the generated ``app-config.js`` does both.
    """
    html = re.sub(r"<script>[^<]*</script>", "", html)
    return re.sub(r'((?:href|src)=")/(?!/)', lambda m: m.group(1) + prefix + "/", html)


def _dist(request: Request) -> Path | None:
    settings: Settings = request.app.state.settings
    dist = settings.ohif.dist_dir
    if not settings.ohif.enabled or not (dist / "index.html").is_file():
        return None
    return dist


def _lookup(dist: Path, rel: str) -> Path | None:
    """The regular file ``rel`` below ``dist``, or None; never follows a symlink."""
    if not rel or len(rel) > _MAX_PATH:
        return None
    parts = rel.split("/")
    if not all(_SEGMENT.match(p) for p in parts):
        return None
    path = dist
    for part in parts:
        path = path / part
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return None
    return path if stat.S_ISREG(st.st_mode) else None


def _rewritten(path: Path) -> _Cached:
    """The file as served (rewritten for the prefix), kept in memory when it fits.

    The ETag is strong (RFC 9110 8.8.3): a digest of the bytes served, so a rewrite
    rule that changes gives new tags.
    """
    global _memory_total
    st = path.stat()
    with _cache_lock:
        hit = _cache.get(path)
    if hit is not None and hit.mtime_ns == st.st_mtime_ns and hit.size == st.st_size:
        return hit
    if st.st_size > _MEMORY_MAX_FILE or _memory_total + st.st_size > _MEMORY_MAX_TOTAL:
        body = None
        if path.suffix in {".js", ".css"} or path.name == "manifest.json":
            body = rewrite_asset(path.name, path.read_bytes())
        tag = f"{st.st_mtime_ns:x}-{st.st_size:x}"
        entry = _Cached(st.st_mtime_ns, st.st_size, body, f'"{tag}"' if body is None else
                        '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    else:
        data = path.read_bytes()
        body = rewrite_asset(path.name, data) or data
        entry = _Cached(st.st_mtime_ns, st.st_size, body,
                        '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    with _cache_lock:
        old = _cache.get(path)
        if old is not None and old.body is not None:
            _memory_total -= len(old.body)
        if entry.body is not None:
            _memory_total += len(entry.body)
        _cache[path] = entry
    return entry


_compressing: set[Path] = set()


def _gzipped(path: Path, entry: _Cached) -> bytes | None:
    """``entry``'s body gzip-compressed, or None while that is being done.

    Compressing the 17 MB ``app.bundle`` takes a second or two of CPU: the first
    request for a file never waits for it; it gets the plain bytes and starts the
    compression in the background, once per file (level 6, kept with the entry).
    """
    if entry.gzipped is not None:
        return entry.gzipped
    with _cache_lock:
        if path in _compressing:
            return None
        _compressing.add(path)

    def compress() -> None:
        try:
            assert entry.body is not None
            packed = gzip.compress(entry.body, compresslevel=6, mtime=0)
            with _cache_lock:
                if _cache.get(path) is entry:
                    _cache[path] = replace(entry, gzipped=packed)
        finally:
            with _cache_lock:
                _compressing.discard(path)

    threading.Thread(target=compress, name="ohif-gzip", daemon=True).start()
    return None


def _accepts_gzip(request: Request) -> bool:
    """Whether the client takes ``Content-Encoding: gzip`` (RFC 9110 12.5.3)."""
    for item in request.headers.get("accept-encoding", "").lower().split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip() in {"gzip", "x-gzip"}:
            q = params.strip().removeprefix("q=").strip()
            return not (params and q in {"0", "0.0", "0.00", "0.000"})
    return False


#: What OHIF's viewer route loads, after ``app.bundle``, before its first image, by
#: package version: the lazily loaded chunks of the default mode (webpack loads them
#: in four or five waves, each one only when the previous one has run), its styles and
#: the font. Recorded from Chromium's resource timing on the demo CT's deep link
#: (benchmarks/test_ohif_viewer.py). Names are content-hashed: a file not in the
#: installed build is left out, so another version just gets no hints.
_VIEWER_PRELOAD: Final[dict[str, tuple[str, ...]]] = {
    "3.13.2": (
        "1673.bundle.76779c7722e8c6c0.js", "6938.bundle.34415aaeea5935b3.js",
        "6489.bundle.95cb243641a61a2f.js", "6495.bundle.8e8306fedff44999.js",
        "8478.bundle.4520037e6185b95f.js", "89.bundle.b327bf3664812958.js",
        "6214.css", "2779.bundle.4621e305af9e2c6a.js",
        "2623.css", "2623.bundle.44c0c8ec6fa40d03.js",
        "6749.bundle.2a95108fde2dedb6.js", "5696.bundle.292d30e7e9e1fab1.js",
        "1483.bundle.256a358f0af21ca9.js", "9383.bundle.40008913697b48b8.js",
        "7499.bundle.796480e788eda09a.js", "8492.css", "8492.bundle.f30e427e47ad3932.js",
        "9290.bundle.90bacace23d695b0.js", "4683.bundle.d4913bffd8e587b7.js",
        "1180.bundle.762993518ea30ae3.js",
        "7248.bundle.e874b288ff479513.js", "3833.css", "781.css",
        "781.bundle.54774b486e83a5e1.js", "9415.css", "9415.bundle.95b6a277cf9bd823.js",
        "3500.bundle.e96688cc0e82b35f.js", "9116.bundle.391de9ce46a7ca19.js",
        "100.bundle.cb02411ce321d4e4.js", "5406.bundle.4dcfa7c697973300.js", "3760.css",
        "3760.bundle.dc948e0d7fbed387.js", "9068.bundle.e1d5946c370fd4ee.js",
        "899.bundle.3ea5c8d021b1e60d.js", "5448.bundle.ac180bf858959dd5.js", "5910.css",
        "5910.bundle.f969465957013c3e.js", "7463.css", "7463.bundle.40668aa8d083d077.js",
        "1206.bundle.786e5b556f903028.js", "a34f9d1faa5f3315.woff2",
    ),
}
#: The stamp ``./run`` writes into the installed build.
_VERSION_STAMP: Final = ".pacslab-ohif-version"


def preload_links(dist: Path, prefix: str = PREFIX) -> str:
    """``<link rel="preload">`` tags for the viewer route's chunks in ``dist``.

    Without them the browser finds each wave of chunks only after running the
    previous one, and waits for the network in between; with them it fetches all of
    them while it compiles ``app.bundle`` (their use then is a memory-cache hit).
    ``fetchpriority="low"``: ``app.bundle`` itself comes first.
    """
    try:
        version = (dist / _VERSION_STAMP).read_text(encoding="utf-8").strip()
    except OSError:
        return ""
    tags = []
    for name in _VIEWER_PRELOAD.get(version, ()):
        if not (dist / name).is_file():
            continue
        href = f"{prefix}/{name}"
        if name.endswith(".js"):
            tags.append(f'<link rel="preload" as="script" fetchpriority="low" href="{href}">')
        elif name.endswith(".css"):
            tags.append(f'<link rel="preload" as="style" fetchpriority="low" href="{href}">')
        elif name.endswith(".woff2"):
            tags.append(f'<link rel="preload" as="font" type="font/woff2" crossorigin '
                        f'fetchpriority="low" href="{href}">')
    return "".join(tags)


def _not_installed() -> PlainTextResponse:
    return PlainTextResponse(NOT_INSTALLED, status_code=503,
                             headers={"Cache-Control": "no-store", "Retry-After": "3600"})


def _index(request: Request, dist: Path, *, viewer: bool = False) -> Response:
    html = rewrite_index((dist / "index.html").read_text(encoding="utf-8"))
    if viewer and _PRELOAD:
        html = html.replace("</head>", preload_links(dist) + "</head>", 1)
    return Response(html, media_type="text/html; charset=utf-8",
                    headers=_headers(request.app.state.settings))


@router.get("")
def ohif_root(request: Request) -> Response:
    """The study list (OHIF's ``/`` route under ``/ohif``)."""
    dist = _dist(request)
    return _not_installed() if dist is None else _index(request, dist)


@router.get("/app-config.js")
def ohif_app_config(request: Request) -> Response:
    """The generated configuration (see :func:`app_config_js`)."""
    settings: Settings = request.app.state.settings
    return Response(app_config_js(settings.ohif), media_type="text/javascript; charset=utf-8",
                    headers=_headers(settings))


@router.get("/{rel:path}")
def ohif_file(rel: str, request: Request) -> Response:
    """A file of the build, or ``index.html`` for OHIF's client-side routes."""
    dist = _dist(request)
    if dist is None:
        return _not_installed()
    path = _lookup(dist, rel)
    if path is None:
        last = rel.rsplit("/", 1)[-1]
        if "." in last:  # an asset that is not there: 404, not the page
            return PlainTextResponse("not found", status_code=404)
        return _index(request, dist, viewer=rel.split("/", 1)[0] == "viewer")
    if path.name == "index.html":
        return _index(request, dist)
    settings: Settings = request.app.state.settings
    headers = _headers(settings, script=path.suffix in {".js", ".mjs"})
    if _HASHED.search(path.name):
        headers["Cache-Control"] = "public, max-age=31536000, immutable"
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.suffix in {".js", ".mjs"}:
        media = "text/javascript"
    elif path.suffix == ".wasm":
        media = "application/wasm"
    entry = _rewritten(path)
    compressible = path.suffix in _COMPRESSIBLE or path.name == "manifest.json"
    packed = None
    if (_GZIP and compressible and entry.body is not None and len(entry.body) >= _GZIP_MIN
            and _accepts_gzip(request)):
        packed = _gzipped(path, entry)
    etag = entry.etag[:-1] + '-gz"' if packed is not None else entry.etag
    headers["ETag"] = etag
    if compressible:
        headers["Vary"] = "Accept-Encoding"
    if not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    if packed is not None:
        headers["Content-Encoding"] = "gzip"
        return Response(packed, media_type=media, headers=headers)
    if entry.body is not None:
        return Response(entry.body, media_type=media, headers=headers)
    return FileResponse(path, media_type=media, headers=headers)
