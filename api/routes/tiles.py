"""Tiles from the OME-Zarr pyramids: IIIF Image API 3.0 (``/iiif``) and Deep Zoom (``/dzi``).

Image ids and request syntax are in :mod:`api.iiif`; pixels are rendered by the
pure functions of :mod:`processing.render`; levels are read through
:class:`storage.pyramids.PyramidReader` (an LRU of decoded chunks).

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
256 MiB) and encoded responses by ETag (:class:`ResponseCache`, 64 MiB) are kept in
LRUs.

Errors are ``application/problem+json`` (RFC 9457): 400 bad syntax, 404 unknown
image or a value this image does not support, 501 unimplemented features (IIIF
Image API 3.0 §7).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from api.deps import base_url
from api.iiif import (
    ImageId,
    canonical,
    dzi_descriptor,
    dzi_tile,
    info_json,
    parse_dzi_numbers,
    parse_image_id,
    parse_image_request,
)
from core.auth import is_public
from core.errors import InvalidQueryError, NotFoundError, ServiceError
from processing.render import (
    FORMATS,
    RawWindow,
    Window,
    auto_window,
    default_window,
    encode,
    level_axis,
    parse_window,
    plane_view,
    planes_of,
    raw_uint16,
    resample_axis,
    resize,
    to_display,
)
from processing.render import PlaneView as PlaneView
from storage.pyramids import PyramidImage, PyramidReader

__all__ = [
    "ResponseCache",
    "TileLatency",
    "TileService",
    "cache_headers",
    "dzi_router",
    "iiif_router",
    "tile_service",
    "tile_service_of",
]

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


# ------------------------------------------------------------------ metrics


class TileLatency:
    """A Prometheus histogram of tile handling time, by API and status.

    Kept dependency-free: a few buckets and counters under a lock, rendered in the
    text exposition format 0.0.4.
    """

    BUCKETS: Final = (0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
    NAME: Final = "pacslab_tile_request_duration_seconds"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], list[float]] = {}

    def observe(self, api: str, status: int, seconds: float) -> None:
        key = (api, str(status))
        with self._lock:
            s = self._series.setdefault(key, [0.0] * (len(self.BUCKETS) + 2))
            s[bisect.bisect_left(self.BUCKETS, seconds)] += 1
            s[-1] += seconds

    def exposition(self) -> str:
        lines = [f"# HELP {self.NAME} Tile requests (IIIF, DZI) from parse to encoded bytes.",
                 f"# TYPE {self.NAME} histogram"]
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for (api, status), s in items:
            labels = f'api="{api}",status="{status}"'
            total = 0.0
            for le, n in zip((*self.BUCKETS, math.inf), s[:-1], strict=True):
                total += n
                le_text = "+Inf" if le == math.inf else repr(le)
                lines.append(f'{self.NAME}_bucket{{{labels},le="{le_text}"}} {total:g}')
            lines.append(f"{self.NAME}_sum{{{labels}}} {s[-1]:.6f}")
            lines.append(f"{self.NAME}_count{{{labels}}} {total:g}")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the service


@dataclass(frozen=True, slots=True)
class Resolved:
    """An image id bound to its stored image and effective window."""

    id: ImageId
    version: int
    image: PyramidImage
    view: PlaneView
    window: Window | RawWindow | None
    window_key: str
    photometric: str
    slope: float
    intercept: float

    @property
    def color(self) -> bool:
        return self.image.samples > 1

    @property
    def immutable(self) -> bool:
        return self.id.version is not None

    def etag(self, request_key: str) -> str:
        text = (f"{self.id.series_uid}|{self.version}|{self.id.stack}|{self.id.plane}|"
                f"{self.id.index}|{self.window_key}|{request_key}")
        return '"' + hashlib.blake2b(text.encode(), digest_size=16).hexdigest() + '"'


def _direction(image: PyramidImage) -> list[list[float]]:
    """The stack's row cosine, column cosine and slice normal (identity if unknown)."""
    direction = image.attrs.get("direction_cosines")
    return direction or [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def _choose_level(w: int, h: int, tw: int, th: int, levels: int) -> int:
    """The coarsest level that still has at least ``tw × th`` pixels for the region."""
    for k in reversed(range(levels)):
        if math.ceil(w / (1 << k)) >= tw and math.ceil(h / (1 << k)) >= th:
            return k
    return 0


#: Seconds a cached pyramid version is served before its job is looked up again.
_RECHECK_S = 1.0


class TileService:
    """Resolve image ids against the index and render tiles (thread-safe)."""

    def __init__(self, index: Any, reader: PyramidReader | None = None) -> None:
        self.index = index
        self.reader = reader or PyramidReader()
        self.latency = TileLatency()
        self.responses = ResponseCache()
        self._jobs: dict[tuple[str, int], dict[str, Any]] = {}
        self._checked: dict[tuple[str, int], float] = {}
        self._auto: dict[str, Window] = {}
        self._lock = threading.Lock()

    # -- resolution ---------------------------------------------------------

    def conversion(self, series_uid: str, version: int | None) -> tuple[int, dict[str, Any]]:
        """The job id and ConversionResult JSON of a series' pyramid.

        Raises
        ------
        NotFoundError
            The series has no finished conversion (or not that version).
        """
        if version is None:
            job = self.index.latest_job("series", series_uid)
            if job is None:
                raise NotFoundError("series has no pyramid")
            with self._lock:
                self._jobs.setdefault((series_uid, job.id), job.result)
            return int(job.id), job.result
        with self._lock:
            result = self._jobs.get((series_uid, version))
            checked = self._checked.get((series_uid, version), 0.0)
        # A cached version is looked up again now and then: an IHE IOCM rejection
        # retires the pyramids that showed rejected instances (their series job is no
        # longer "done", storage/index/rejection.py), possibly from another process.
        if result is None or time.monotonic() - checked > _RECHECK_S:
            job = next((j for j in self.index.get_jobs(target=series_uid)
                        if j.id == version and j.kind == "series" and j.status == "done"),
                       None)
            if job is None:
                with self._lock:
                    self._jobs.pop((series_uid, version), None)
                raise NotFoundError("no such pyramid version for the series")
            result = job.result
            with self._lock:
                self._jobs[(series_uid, version)] = result
                self._checked[(series_uid, version)] = time.monotonic()
        return version, result

    def image(self, series_uid: str, version: int | None, stack: int
              ) -> tuple[int, PyramidImage]:
        version, result = self.conversion(series_uid, version)
        images = result.get("images") or []
        if not 0 <= stack < len(images):
            raise NotFoundError("no such stack in the series")
        return version, self.reader.open(str(images[stack]["path"]))

    def views(self, image: PyramidImage) -> dict[str, PlaneView]:
        """The planes a viewer offers for an image, its acquisition plane first.

        See :func:`processing.render.planes_of`: reformats only for real volumes.
        """
        return {p: self._view(image, p) for p in self.planes(image)}

    @staticmethod
    def planes(image: PyramidImage) -> tuple[str, ...]:
        """The offered planes of ``image`` (acquisition plane first)."""
        return planes_of(image.kind, image.shapes[0], _direction(image))

    @staticmethod
    def _view(image: PyramidImage, plane: str) -> PlaneView:
        if plane != "native" and plane not in TileService.planes(image):
            # A reformat of a single slice or a thin stack is a line, not an image.
            raise NotFoundError(f"this {image.kind} has no {plane} plane (too few slices)")
        try:
            return plane_view(image.kind, image.shapes[0], image.spacings[0],
                              _direction(image), plane)
        except ValueError as exc:
            raise NotFoundError(str(exc)) from None

    def resolve(self, image_id: ImageId, window_text: str | None = None) -> Resolved:
        """Bind an id (and an optional ``?window=``) to its image.

        Raises
        ------
        NotFoundError
            Unknown series/version/stack, a plane the image does not have, or a
            slice index beyond the plane's depth.
        InvalidQueryError
            A malformed window.
        """
        version, image = self.image(image_id.series_uid, image_id.version, image_id.stack)
        view = self._view(image, image_id.plane)
        if image_id.index >= view.depth:
            raise NotFoundError(f"slice {image_id.index} beyond {view.depth} in this plane")
        text = window_text if window_text is not None else image_id.window
        try:
            requested = parse_window(text)
        except ValueError as exc:
            raise InvalidQueryError(str(exc)) from None
        rescale = image.attrs.get("rescale") or {}
        applied = bool(rescale.get("applied", True))
        slope = 1.0 if applied else float(rescale.get("slope") or 1.0)
        intercept = 0.0 if applied else float(rescale.get("intercept") or 0.0)
        photometric = str(image.attrs.get("photometric_interpretation") or "MONOCHROME2")
        window: Window | RawWindow | None
        if image.samples > 1:
            if isinstance(requested, RawWindow):
                raise NotFoundError("colour images have no raw 16-bit rendering")
            window, key = None, "rgb"
        elif isinstance(requested, RawWindow):
            window, key = requested, "raw"
        else:
            window = requested or default_window(image.attrs.get("windows") or []) \
                or self._auto_window(image, slope, intercept)
            key = f"{window.center:g},{window.width:g}"
        return Resolved(image_id, version, image, view, window, key, photometric, slope,
                        intercept)

    def _auto_window(self, image: PyramidImage, slope: float, intercept: float) -> Window:
        with self._lock:
            cached = self._auto.get(image.path)
        if cached is not None:
            return cached
        top = image.levels - 1
        z, y, x = image.shapes[top]
        sample = self.reader.read(image, top, ((z // 2, z // 2 + 1), (0, y), (0, x)))
        window = auto_window(sample, slope=slope, intercept=intercept)
        with self._lock:
            self._auto[image.path] = window
        return window

    # -- pixels -------------------------------------------------------------

    def plane_values(self, r: Resolved, level: int, x0: int, x1: int, y0: int, y1: int
                     ) -> np.ndarray:
        """Stored values of display pixels ``[y0:y1, x0:x1]`` of ``level``.

        Returns ``(h, w)`` or ``(h, w, c)`` in the stored dtype. Axes whose display
        pixel equals the stored pixel are sliced, the others linearly resampled
        (:func:`processing.render.resample_axis`).
        """
        image, view = r.image, r.view
        shape, spacing = image.shapes[level], image.spacings[level]
        # The fixed axis may be downsampled at this level (z of thin-slice volumes).
        factor = max(1, round(image.shapes[0][view.fixed] / shape[view.fixed])) \
            if image.kind == "volume" or view.fixed != 0 else 1
        fixed = min(r.id.index // factor, shape[view.fixed] - 1)
        pos_r = level_axis(view.pixel_mm, level, shape[view.rows.source],
                           spacing[view.rows.source], y0, y1, view.rows.flip)
        pos_c = level_axis(view.pixel_mm, level, shape[view.cols.source],
                           spacing[view.cols.source], x0, x1, view.cols.flip)
        box: list[tuple[int, int]] = [(0, 1)] * 3
        box[view.fixed] = (fixed, fixed + 1)
        lo: dict[int, int] = {}
        for axis, pos in ((view.rows.source, pos_r), (view.cols.source, pos_c)):
            n = shape[axis]
            a = int(min(max(math.floor(float(pos.min())), 0), n - 1))
            b = int(min(max(math.floor(float(pos.max())) + 2, a + 1), n))
            box[axis] = (a, b)
            lo[axis] = a
        block = self.reader.read(image, level, box)
        block = np.take(block, 0, axis=view.fixed)
        # After dropping the fixed axis, the remaining stack axes keep their order.
        r_axis = 0 if view.rows.source < view.cols.source else 1
        block = resample_axis(block, pos_r, r_axis, lo[view.rows.source])
        block = resample_axis(block, pos_c, 1 - r_axis, lo[view.cols.source])
        if r_axis == 1:
            block = np.swapaxes(block, 0, 1)
        return block

    def render(self, r: Resolved, x: int, y: int, w: int, h: int, tw: int, th: int, *,
               fmt: str, quality: str = "default", mirror: bool = False,
               rotation: int = 0) -> tuple[bytes, dict[str, str]]:
        """Encode the full-image region ``(x, y, w, h)`` at ``tw × th``.

        Returns the bytes and extra headers (the raw value offset for 16-bit PNG).
        """
        view = r.view
        k = _choose_level(w, h, tw, th, r.image.levels)
        f = 1 << k
        lw, lh = math.ceil(view.width / f), math.ceil(view.height / f)
        x0, y0 = x // f, y // f
        x1, y1 = min(lw, math.ceil((x + w) / f)), min(lh, math.ceil((y + h) / f))
        values = self.plane_values(r, k, x0, x1, y0, y1)
        values = resize(values, tw, th)
        if mirror:
            values = values[:, ::-1]
        if rotation:
            values = np.rot90(values, k=-(rotation // 90))
        headers: dict[str, str] = {}
        if isinstance(r.window, RawWindow):
            if fmt != "png":
                raise InvalidQueryError("raw 16-bit output is PNG only")
            raw, offset = raw_uint16(np.ascontiguousarray(values))
            headers["X-Pacslab-Value-Offset"] = str(offset)
            return encode(raw, "png"), headers
        pixels = to_display(values, r.window, photometric=r.photometric, slope=r.slope,
                            intercept=r.intercept)
        if quality in ("gray", "bitonal") and pixels.ndim == 3:
            # ITU-R BT.601 luma, as Pillow's "L" conversion.
            pixels = np.rint(pixels @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        if quality == "bitonal":
            # IIIF Image API 3.0 §4.4: each pixel black or white (threshold at mid-grey).
            pixels = np.where(pixels >= 128, 255, 0).astype(np.uint8)
        return encode(pixels, fmt), headers


def tile_service(request: Request) -> TileService:
    """The request's app's :class:`TileService`."""
    return tile_service_of(request.app)


def tile_service_of(app: Any) -> TileService:
    """The app's :class:`TileService`, created on first use from ``app.state.index``."""
    state = app.state
    service = getattr(state, "tiles", None)
    if service is None:
        with _CREATE_LOCK:
            service = getattr(state, "tiles", None)
            if service is None:
                service = TileService(state.index)
                state.tiles = service
    assert isinstance(service, TileService)
    return service


_CREATE_LOCK = threading.Lock()


# ------------------------------------------------------------------ HTTP helpers


def _problem(request: Request, exc: ServiceError) -> JSONResponse:
    """RFC 9457 problem details from a :class:`ServiceError` (STYLE.md §3)."""
    body = {"type": "about:blank", "title": exc.title, "status": exc.http_status,
            "detail": str(exc), "instance": request.url.path}
    # no-store: 404 is heuristically cacheable (RFC 9111 §4.2.2), and an image that
    # is not converted yet may exist a minute later.
    return JSONResponse(body, status_code=exc.http_status, media_type=PROBLEM_JSON,
                        headers={"Access-Control-Allow-Origin": "*",
                                 "Cache-Control": "no-store"})


def _not_modified(request: Request, etag: str) -> bool:
    """RFC 9110 §13.1.2: weak comparison of ``If-None-Match`` against ``etag``."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    if header.strip() == "*":
        return True
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return etag in tags


class ResponseCache:
    """A byte-bounded LRU of encoded responses by ETag (thread-safe).

    Tiles are immutable per ETag, so a repeat (another client, a cache-less
    proxy) costs a dictionary lookup instead of a window and an encode.
    """

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[bytes, dict[str, str]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, etag: str) -> tuple[bytes, dict[str, str]] | None:
        with self._lock:
            item = self._items.get(etag)
            if item is not None:
                self._items.move_to_end(etag)
            return item

    def put(self, etag: str, item: tuple[bytes, dict[str, str]]) -> None:
        size = len(item[0])
        if size > self.max_bytes // 8:
            return
        with self._lock:
            if etag in self._items:
                return
            self._items[etag] = item
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (old, _) = self._items.popitem(last=False)
                self._bytes -= len(old)


def cache_headers(request: Request, *, immutable: bool) -> dict[str, str]:
    """``Cache-Control`` (and ``Vary``) for a response to ``request`` (RFC 9111 §5.2.2).

    ``public`` only when the route is open to anyone (authentication off, or the path on
    ``auth.public_paths``); a response that needed a token is ``private`` and varies on
    ``Authorization``, so no shared cache serves it to a caller without one.
    """
    auth = request.app.state.settings.auth
    if not auth.enabled or is_public(request.url.path, auth.public_paths):
        return {"Cache-Control": IMMUTABLE if immutable else REVALIDATE}
    return {"Cache-Control": PRIVATE_IMMUTABLE if immutable else PRIVATE_REVALIDATE,
            "Vary": "Authorization"}


def _cached(request: Request, r: Resolved, key: str, media_type: str,
            produce: Callable[[], tuple[bytes, dict[str, str]]], *,
            vary: str | None = None) -> Response:
    etag = r.etag(key)
    headers = {
        "ETag": etag,
        **cache_headers(request, immutable=r.immutable),
        "Access-Control-Allow-Origin": "*",
    }
    varies = ", ".join(v for v in (vary, headers.get("Vary")) if v)
    if varies:
        headers["Vary"] = varies
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    cache = tile_service(request).responses
    hit = cache.get(etag)
    if hit is None:
        hit = produce()
        cache.put(etag, hit)
    body, extra = hit
    return Response(body, media_type=media_type, headers={**headers, **extra})


def _timed(service: TileService, api: str, call: Callable[[], Response],
           request: Request) -> Response:
    start = time.perf_counter()
    try:
        response = call()
    except ServiceError as exc:
        response = _problem(request, exc)
    service.latency.observe(api, response.status_code, time.perf_counter() - start)
    return response


# ------------------------------------------------------------------ IIIF routes

_WINDOW_DOC = ("center,width (PS3.3 C.11.2.1.2), a preset (lung, bone, brain, abdomen), "
               "default, or raw (16-bit PNG of the stored values)")


@iiif_router.get("/{image}", include_in_schema=False)
def iiif_base(image: str, request: Request) -> Response:
    """IIIF Image API 3.0 §2.2: the base URI redirects to ``info.json`` (303)."""
    return RedirectResponse(f"{request.url.path}/info.json", status_code=303)


@iiif_router.get("/{image}/info.json", summary="IIIF image information (Image API 3.0 §5)")
def iiif_info(image: str, request: Request,
              window: str | None = Query(None, description=_WINDOW_DOC)) -> Response:
    """Image information: size, the pyramid's scale factors, formats and features.

    For an unversioned id the ``id`` names the current store version, so the tiles
    a viewer then requests are immutable.
    """
    service = tile_service(request)

    def call() -> Response:
        r = service.resolve(parse_image_id(image), window)
        pinned = r.id.text(version=r.version, window=window)
        base = base_url(request, "")
        doc = info_json(f"{base}/iiif/{pinned}", r.view.width, r.view.height,
                        r.image.levels, color=r.color)
        accept = request.headers.get("accept", "")
        media = LD_JSON if "application/ld+json" in accept else "application/json"
        body = json.dumps(doc, separators=(",", ":")).encode()
        return _cached(request, r, f"info|{base}|{media}|{pinned}", media,
                       lambda: (body, {"Link": LEVEL2}), vary="Accept")

    return _timed(service, "iiif_info", call, request)


@iiif_router.get("/{image}/{region}/{size}/{rotation}/{quality_format}",
                 summary="IIIF image request (Image API 3.0 §4)",
                 response_class=Response,
                 responses={200: {"content": {m: {} for m in FORMATS.values()}}})
def iiif_image(image: str, region: str, size: str, rotation: str, quality_format: str,
               request: Request,
               window: str | None = Query(None, description=_WINDOW_DOC)) -> Response:
    """A region of a slice, scaled, rotated by multiples of 90°, windowed, encoded."""
    service = tile_service(request)

    def call() -> Response:
        r = service.resolve(parse_image_id(image), window)
        req = parse_image_request(region, size, rotation, quality_format,
                                  width=r.view.width, height=r.view.height, color=r.color)
        key = canonical(req, r.view.width, r.view.height)
        return _cached(request, r, key, FORMATS[req.format], lambda: _link(service.render(
            r, req.x, req.y, req.w, req.h, req.width, req.height, fmt=req.format,
            quality=req.quality, mirror=req.mirror, rotation=req.rotation)))

    return _timed(service, "iiif", call, request)


def _link(result: tuple[bytes, dict[str, str]]) -> tuple[bytes, dict[str, str]]:
    body, headers = result
    return body, {**headers, "Link": LEVEL2}


# ------------------------------------------------------------------ Deep Zoom routes


@dzi_router.get("/{image}.dzi", summary="Deep Zoom descriptor",
                response_class=Response,
                responses={200: {"content": {"application/xml": {}}}})
def dzi_descriptor_route(image: str, request: Request,
                         window: str | None = Query(None, description=_WINDOW_DOC),
                         format: str = Query("png", pattern="^(png|jpg|webp)$")) -> Response:
    """The ``.dzi`` of a slice: its display size, TileSize 256, Overlap 0."""
    service = tile_service(request)

    def call() -> Response:
        r = service.resolve(parse_image_id(image), window)
        body = dzi_descriptor(r.view.width, r.view.height, format).encode()
        return _cached(request, r, f"dzi|{format}", "application/xml", lambda: (body, {}))

    return _timed(service, "dzi_descriptor", call, request)


# Path parameters are strings parsed by parse_dzi_numbers: Starlette's ``int``
# convertor passes any run of digits to int(), which raises (a 500) beyond 4300 digits.
@dzi_router.get("/{image}_files/{level}/{col}_{row}.{fmt}",
                summary="Deep Zoom tile", response_class=Response,
                responses={200: {"content": {m: {} for m in FORMATS.values()}}})
def dzi_tile_route(image: str, level: str, col: str, row: str, fmt: str, request: Request,
                   window: str | None = Query(None, description=_WINDOW_DOC)) -> Response:
    """Tile ``col_row`` of Deep Zoom level ``level`` (0 is 1×1; the last is full size)."""
    service = tile_service(request)

    def call() -> Response:
        n_level, n_col, n_row = parse_dzi_numbers(level, col, row)
        if fmt not in FORMATS:
            raise InvalidQueryError(f"format must be one of {', '.join(FORMATS)}")
        r = service.resolve(parse_image_id(image), window)
        x, y, w, h, tw, th = dzi_tile(r.view.width, r.view.height, n_level, n_col, n_row)
        return _cached(request, r, f"dzi|{n_level}|{n_col}|{n_row}|{fmt}", FORMATS[fmt],
                       lambda: service.render(r, x, y, w, h, tw, th, fmt=fmt))

    return _timed(service, "dzi", call, request)
