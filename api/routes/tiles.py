"""Tiles from the OME-Zarr pyramids: IIIF Image API 3.0 (``/iiif``) and Deep Zoom (``/dzi``).

Image ids and request syntax are in :mod:`api.iiif`; resolving an id and rendering
are the use case :class:`services.tiles.TileService` (``TilesDep``); this module
parses, times (``pacslab_tile_request_duration_seconds`` in :mod:`api.metrics`) and
writes the caching headers.

Every tile request maps onto one stored level: the largest level whose pixels are
at least as fine as the requested output (IIIF §5.4 scale factors are the pyramid
levels). A request aligned with the tile grid at a listed scale factor returns the
stored level's pixels exactly (only windowed and encoded); other sizes are resized
from that level, never from level 0.

Caching (RFC 9111, RFC 9110 §13): the response of a request is a function of the
store version (the series job id), the image id and the canonical request (IIIF
§4.7), so its strong ``ETag`` is computed before rendering and ``If-None-Match``
is answered with 304 without touching the store. Versioned ids are
``max-age=31536000, immutable``; unversioned ids (the newest conversion) are
``no-cache`` so clients revalidate. Both are ``public`` only where the route is open
(authentication off, or on ``auth.public_paths``); behind a token they are ``private``
with ``Vary: Authorization`` (:func:`cache_headers`), so no shared cache hands a
patient's tiles to a caller without one (RFC 9111 §5.2.2.7). Problems are
``no-store``. In the process, decoded chunks (:class:`storage.pyramids.ChunkCache`,
256 MiB) and encoded responses by ETag (:class:`services.tiles.ResponseCache`, 64 MiB) are kept in
LRUs.

Errors are ``application/problem+json`` (RFC 9457): 400 bad syntax, 404 unknown
image or a value this image does not support, 501 unimplemented features (IIIF
Image API 3.0 §7).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Final

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from api.conditional import not_modified
from api.deps import TilesDep, base_url
from api.iiif import (
    canonical,
    dzi_descriptor,
    dzi_tile,
    info_json,
    parse_dzi_numbers,
    parse_image_id,
    parse_image_request,
)
from api.metrics import HttpMetrics
from core.auth import is_public
from core.errors import InvalidQueryError, ServiceError
from processing.render import FORMATS
from services.tiles import Resolved, TileService

__all__ = ["cache_headers", "dzi_router", "iiif_router"]

IMMUTABLE: Final = "public, max-age=31536000, immutable"
REVALIDATE: Final = "no-cache"
#: The same for a response that needed credentials: only the browser's own cache may
#: keep it (RFC 9111 §5.2.2.7 private), never a shared proxy or CDN.
PRIVATE_IMMUTABLE: Final = "private, max-age=31536000, immutable"
PRIVATE_REVALIDATE: Final = "private, no-cache"
PROBLEM_JSON: Final = "application/problem+json"
LD_JSON: Final = 'application/ld+json;profile="http://iiif.io/api/image/3/context.json"'
LEVEL2: Final = '<http://iiif.io/api/image/3/level2.json>;rel="profile"'

iiif_router = APIRouter(prefix="/iiif", tags=["tiles"])
dzi_router = APIRouter(prefix="/dzi", tags=["tiles"])


# ------------------------------------------------------------------ HTTP helpers


def _problem(request: Request, exc: ServiceError) -> JSONResponse:
    """RFC 9457 problem details from a :class:`ServiceError` (STYLE.md §3)."""
    body = {
        "type": "about:blank",
        "title": exc.title,
        "status": exc.http_status,
        "detail": str(exc),
        "instance": request.url.path,
    }
    # no-store: 404 is heuristically cacheable (RFC 9111 §4.2.2), and an image that
    # is not converted yet may exist a minute later.
    return JSONResponse(
        body,
        status_code=exc.http_status,
        media_type=PROBLEM_JSON,
        headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-store"},
    )


def cache_headers(request: Request, *, immutable: bool) -> dict[str, str]:
    """``Cache-Control`` (and ``Vary``) for a response to ``request`` (RFC 9111 §5.2.2).

    ``public`` only when the route is open to anyone (authentication off, or the path on
    ``auth.public_paths``); a response that needed a token is ``private`` and varies on
    ``Authorization``, so no shared cache serves it to a caller without one.
    """
    auth = request.app.state.settings.auth
    if not auth.enabled or is_public(request.url.path, auth.public_paths):
        return {"Cache-Control": IMMUTABLE if immutable else REVALIDATE}
    return {
        "Cache-Control": PRIVATE_IMMUTABLE if immutable else PRIVATE_REVALIDATE,
        "Vary": "Authorization",
    }


def _cached(
    request: Request,
    service: TileService,
    r: Resolved,
    key: str,
    media_type: str,
    produce: Callable[[], tuple[bytes, dict[str, str]]],
    *,
    vary: str | None = None,
) -> Response:
    etag = r.etag(key)
    headers = {
        "ETag": etag,
        **cache_headers(request, immutable=r.immutable),
        "Access-Control-Allow-Origin": "*",
    }
    varies = ", ".join(v for v in (vary, headers.get("Vary")) if v)
    if varies:
        headers["Vary"] = varies
    if not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    cache = service.responses
    hit = cache.get(etag)
    if hit is None:
        hit = produce()
        cache.put(etag, hit)
    body, extra = hit
    return Response(body, media_type=media_type, headers={**headers, **extra})


def _timed(api: str, call: Callable[[], Response], request: Request) -> Response:
    start = time.perf_counter()
    try:
        response = call()
    except ServiceError as exc:
        response = _problem(request, exc)
    metrics: HttpMetrics = request.app.state.metrics
    metrics.observe_tile(api, response.status_code, time.perf_counter() - start)
    return response


# ------------------------------------------------------------------ IIIF routes

_WINDOW_DOC = (
    "center,width (PS3.3 C.11.2.1.2), a preset (lung, bone, brain, abdomen), "
    "default, or raw (16-bit PNG of the stored values)"
)


@iiif_router.get("/{image}", include_in_schema=False)
def iiif_base(image: str, request: Request) -> Response:
    """IIIF Image API 3.0 §2.2: the base URI redirects to ``info.json`` (303)."""
    return RedirectResponse(f"{request.url.path}/info.json", status_code=303)


@iiif_router.get("/{image}/info.json", summary="IIIF image information (Image API 3.0 §5)")
def iiif_info(
    image: str,
    request: Request,
    service: TilesDep,
    window: str | None = Query(None, description=_WINDOW_DOC),
) -> Response:
    """Image information: size, the pyramid's scale factors, formats and features.

    For an unversioned id the ``id`` names the current store version, so the tiles
    a viewer then requests are immutable.
    """

    def call() -> Response:
        r = service.resolve(parse_image_id(image), window)
        pinned = r.id.text(version=r.version, window=window)
        base = base_url(request, "")
        doc = info_json(
            f"{base}/iiif/{pinned}", r.view.width, r.view.height, r.image.levels, color=r.color
        )
        accept = request.headers.get("accept", "")
        media = LD_JSON if "application/ld+json" in accept else "application/json"
        body = json.dumps(doc, separators=(",", ":")).encode()
        return _cached(
            request,
            service,
            r,
            f"info|{base}|{media}|{pinned}",
            media,
            lambda: (body, {"Link": LEVEL2}),
            vary="Accept",
        )

    return _timed("iiif_info", call, request)


@iiif_router.get(
    "/{image}/{region}/{size}/{rotation}/{quality_format}",
    summary="IIIF image request (Image API 3.0 §4)",
    response_class=Response,
    responses={200: {"content": {m: {} for m in FORMATS.values()}}},
)
def iiif_image(
    image: str,
    region: str,
    size: str,
    rotation: str,
    quality_format: str,
    request: Request,
    service: TilesDep,
    window: str | None = Query(None, description=_WINDOW_DOC),
) -> Response:
    """A region of a slice, scaled, rotated by multiples of 90°, windowed, encoded."""

    def call() -> Response:
        r = service.resolve(parse_image_id(image), window)
        req = parse_image_request(
            region,
            size,
            rotation,
            quality_format,
            width=r.view.width,
            height=r.view.height,
            color=r.color,
        )
        key = canonical(req, r.view.width, r.view.height)
        return _cached(
            request,
            service,
            r,
            key,
            FORMATS[req.format],
            lambda: _link(
                service.render(
                    r,
                    req.x,
                    req.y,
                    req.w,
                    req.h,
                    req.width,
                    req.height,
                    fmt=req.format,
                    quality=req.quality,
                    mirror=req.mirror,
                    rotation=req.rotation,
                )
            ),
        )

    return _timed("iiif", call, request)


def _link(result: tuple[bytes, dict[str, str]]) -> tuple[bytes, dict[str, str]]:
    body, headers = result
    return body, {**headers, "Link": LEVEL2}


# ------------------------------------------------------------------ Deep Zoom routes


@dzi_router.get(
    "/{image}.dzi",
    summary="Deep Zoom descriptor",
    response_class=Response,
    responses={200: {"content": {"application/xml": {}}}},
)
def dzi_descriptor_route(
    image: str,
    request: Request,
    service: TilesDep,
    window: str | None = Query(None, description=_WINDOW_DOC),
    format: str = Query("png", pattern="^(png|jpg|webp)$"),
) -> Response:
    """The ``.dzi`` of a slice: its display size, TileSize 256, Overlap 0."""

    def call() -> Response:
        r = service.resolve(parse_image_id(image), window)
        body = dzi_descriptor(r.view.width, r.view.height, format).encode()
        return _cached(request, service, r, f"dzi|{format}", "application/xml", lambda: (body, {}))

    return _timed("dzi_descriptor", call, request)


# Path parameters are strings parsed by parse_dzi_numbers: Starlette's ``int``
# convertor passes any run of digits to int(), which raises (a 500) beyond 4300 digits.
@dzi_router.get(
    "/{image}_files/{level}/{col}_{row}.{fmt}",
    summary="Deep Zoom tile",
    response_class=Response,
    responses={200: {"content": {m: {} for m in FORMATS.values()}}},
)
def dzi_tile_route(
    image: str,
    level: str,
    col: str,
    row: str,
    fmt: str,
    request: Request,
    service: TilesDep,
    window: str | None = Query(None, description=_WINDOW_DOC),
) -> Response:
    """Tile ``col_row`` of Deep Zoom level ``level`` (0 is 1×1; the last is full size)."""

    def call() -> Response:
        n_level, n_col, n_row = parse_dzi_numbers(level, col, row)
        if fmt not in FORMATS:
            raise InvalidQueryError(f"format must be one of {', '.join(FORMATS)}")
        r = service.resolve(parse_image_id(image), window)
        x, y, w, h, tw, th = dzi_tile(r.view.width, r.view.height, n_level, n_col, n_row)
        return _cached(
            request,
            service,
            r,
            f"dzi|{n_level}|{n_col}|{n_row}|{fmt}",
            FORMATS[fmt],
            lambda: service.render(r, x, y, w, h, tw, th, fmt=fmt),
        )

    return _timed("dzi", call, request)
