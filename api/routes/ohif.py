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

import json
import logging
import mimetypes
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response

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
    body: bytes | None  # None: served as the file is


_cache: dict[Path, _Cached] = {}
_cache_lock = threading.Lock()

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
    st = path.stat()
    with _cache_lock:
        hit = _cache.get(path)
    if hit is not None and hit.mtime_ns == st.st_mtime_ns and hit.size == st.st_size:
        return hit
    body = None
    if path.suffix in {".js", ".css"} or path.name == "manifest.json":
        body = rewrite_asset(path.name, path.read_bytes())
    entry = _Cached(st.st_mtime_ns, st.st_size, body)
    with _cache_lock:
        _cache[path] = entry
    return entry


def _not_installed() -> PlainTextResponse:
    return PlainTextResponse(NOT_INSTALLED, status_code=503,
                             headers={"Cache-Control": "no-store", "Retry-After": "3600"})


def _index(request: Request, dist: Path) -> Response:
    html = rewrite_index((dist / "index.html").read_text(encoding="utf-8"))
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
        return _index(request, dist)
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
    if entry.body is not None:
        return Response(entry.body, media_type=media, headers=headers)
    return FileResponse(path, media_type=media, headers=headers)
