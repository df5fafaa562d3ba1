"""Tiles from the OME-Zarr pyramids: the use case behind IIIF, Deep Zoom and the viewer.

Resolves an image id (``{series}[@{version}]:{stack}:{plane}:{index}[:{window}]``,
parsed at the edge by :func:`api.iiif.parse_image_id`) against the index's finished
series conversions, and renders a region of one plane with the pure functions of
:mod:`processing.render`; levels are read through :class:`storage.pyramids.PyramidReader`
(an LRU of decoded chunks) and encoded responses are kept by ETag in a
:class:`ResponseCache`. No HTTP here: the routes in ``api/routes/tiles.py`` and
``api/routes/viewer.py`` parse requests, time them and write the caching headers.

Every request maps onto one stored level: the largest level whose pixels are at least
as fine as the requested output (IIIF Image API 3.0 §5.4 scale factors are the
pyramid levels), so other sizes are resized from that level, never from level 0.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import InvalidQueryError, NotFoundError
from processing.render import (
    PlaneView,
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
from storage.pyramids import PyramidImage, PyramidReader

__all__ = ["ImageId", "Resolved", "ResponseCache", "TileService"]


@dataclass(frozen=True, slots=True)
class ImageId:
    """A parsed image identifier (syntax: :func:`api.iiif.parse_image_id`)."""

    series_uid: str
    version: int | None
    stack: int
    plane: str
    index: int
    window: str | None = None

    def text(self, *, version: int | None = None, window: str | None = None) -> str:
        """The identifier, optionally pinned to a store ``version`` or a window."""
        v = self.version if version is None else version
        w = self.window if window is None else window
        head = self.series_uid if v is None else f"{self.series_uid}@{v}"
        tail = f":{w}" if w not in (None, "", "default") else ""
        return f"{head}:{self.stack}:{self.plane}:{self.index}{tail}"


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
        text = (
            f"{self.id.series_uid}|{self.version}|{self.id.stack}|{self.id.plane}|"
            f"{self.id.index}|{self.window_key}|{request_key}"
        )
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
    """Resolve image ids against the index and render tiles (thread-safe).

    Parameters
    ----------
    index
        The index (``latest_job``, ``get_jobs``): which conversion is current.
    reader : PyramidReader, optional
        Reads pyramid levels through its LRU of decoded chunks.
    """

    def __init__(self, index: Any, reader: PyramidReader | None = None) -> None:
        self.index = index
        self.reader = reader or PyramidReader()
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
            job = next(
                (
                    j
                    for j in self.index.get_jobs(target=series_uid)
                    if j.id == version and j.kind == "series" and j.status == "done"
                ),
                None,
            )
            if job is None:
                with self._lock:
                    self._jobs.pop((series_uid, version), None)
                raise NotFoundError("no such pyramid version for the series")
            result = job.result
            with self._lock:
                self._jobs[(series_uid, version)] = result
                self._checked[(series_uid, version)] = time.monotonic()
        return version, result

    def image(self, series_uid: str, version: int | None, stack: int) -> tuple[int, PyramidImage]:
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
            return plane_view(
                image.kind, image.shapes[0], image.spacings[0], _direction(image), plane
            )
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
            window = (
                requested
                or default_window(image.attrs.get("windows") or [])
                or self._auto_window(image, slope, intercept)
            )
            key = f"{window.center:g},{window.width:g}"
        return Resolved(image_id, version, image, view, window, key, photometric, slope, intercept)

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

    def plane_values(
        self, r: Resolved, level: int, x0: int, x1: int, y0: int, y1: int
    ) -> np.ndarray:
        """Stored values of display pixels ``[y0:y1, x0:x1]`` of ``level``.

        Returns ``(h, w)`` or ``(h, w, c)`` in the stored dtype. Axes whose display
        pixel equals the stored pixel are sliced, the others linearly resampled
        (:func:`processing.render.resample_axis`).
        """
        image, view = r.image, r.view
        shape, spacing = image.shapes[level], image.spacings[level]
        # The fixed axis may be downsampled at this level (z of thin-slice volumes).
        factor = (
            max(1, round(image.shapes[0][view.fixed] / shape[view.fixed]))
            if image.kind == "volume" or view.fixed != 0
            else 1
        )
        fixed = min(r.id.index // factor, shape[view.fixed] - 1)
        pos_r = level_axis(
            view.pixel_mm,
            level,
            shape[view.rows.source],
            spacing[view.rows.source],
            y0,
            y1,
            view.rows.flip,
        )
        pos_c = level_axis(
            view.pixel_mm,
            level,
            shape[view.cols.source],
            spacing[view.cols.source],
            x0,
            x1,
            view.cols.flip,
        )
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

    def render(
        self,
        r: Resolved,
        x: int,
        y: int,
        w: int,
        h: int,
        tw: int,
        th: int,
        *,
        fmt: str,
        quality: str = "default",
        mirror: bool = False,
        rotation: int = 0,
    ) -> tuple[bytes, dict[str, str]]:
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
        pixels = to_display(
            values, r.window, photometric=r.photometric, slope=r.slope, intercept=r.intercept
        )
        if quality in ("gray", "bitonal") and pixels.ndim == 3:
            # ITU-R BT.601 luma, as Pillow's "L" conversion.
            pixels = np.rint(pixels @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        if quality == "bitonal":
            # IIIF Image API 3.0 §4.4: each pixel black or white (threshold at mid-grey).
            pixels = np.where(pixels >= 128, 255, 0).astype(np.uint8)
        return encode(pixels, fmt), headers


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
