"""IIIF Image API 3.0 and Deep Zoom request syntax, image ids and descriptors. Pure.

The routes in :mod:`api.routes.tiles` parse with these functions and render with
:mod:`processing.render`; nothing here reads a store.

Image identifiers (IIIF Image API 3.0 §3 leaves their form to the server)::

    {series_uid}[@{version}]:{stack}:{plane}:{index}[:{window}]

``series_uid``
    Series Instance UID (digits and dots, PS3.5 9.1).
``version``
    The store version: the id of the series job that wrote the pyramid. Without it
    the newest conversion is used, and responses must be revalidated; with it the
    bytes never change, so tiles are ``immutable``. ``info.json`` and ``.dzi`` of an
    unversioned id answer with the versioned id, so viewers fetch immutable tiles.
``stack``
    Image number in the conversion (0 is the main stack; a localizer is another).
``plane``
    ``axial``, ``coronal`` or ``sagittal`` for volumes; ``native`` for 2-D images
    and cine (see :func:`processing.render.plane_view`).
``index``
    Slice in that plane, 0-based, in level-0 samples of the stack axis normal to it
    (the frame for cine, 0 for 2-D).
``window``
    Optional: ``default``, a preset (``lung``, ``bone``, ``brain``, ``abdomen``),
    ``center,width`` (PS3.3 C.11.2.1.2) or ``raw`` (16-bit PNG of the stored values).
    A ``?window=`` query parameter, when given, takes precedence.

``:`` and ``@`` are allowed in a URI path segment (RFC 3986 ``pchar``), so ids need
no percent-encoding; encoded forms (``%3A``) are decoded by the router and accepted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final

from core.errors import InvalidQueryError, NotFoundError, UnsupportedRequestError
from processing.render import FORMATS, PLANES, parse_window
from services.tiles import ImageId

__all__ = [
    "CONTEXT",
    "TILE",
    "ImageId",
    "ImageRequest",
    "canonical",
    "dzi_descriptor",
    "dzi_levels",
    "dzi_tile",
    "info_json",
    "parse_dzi_numbers",
    "parse_image_id",
    "parse_image_request",
]

CONTEXT: Final = "http://iiif.io/api/image/3/context.json"
PROTOCOL: Final = "http://iiif.io/api/image"
#: Tile edge of info.json ``tiles`` and of Deep Zoom (the pyramid's chunk edge).
TILE: Final = 256
#: Largest response in pixels (IIIF §5.2 ``maxArea``).
MAX_AREA: Final = 4096 * 4096

# Explicit [0-9] (not \d, not str.isdigit): ASCII digits only, and bounded lengths,
# so int() never sees "²" or a number beyond its 4300-digit limit.
_UID = re.compile(r"[0-9]{1,64}(?:\.[0-9]{1,64}){0,63}")
_VERSION = re.compile(r"[0-9]{1,18}")
_NUMBER = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"(?:[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})")
_DEGREES = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,9})?")
#: Longest identifier or request parameter we parse (far above any valid one).
_MAX_ID: Final = 200
_MAX_PARAM: Final = 100


def parse_image_id(text: str) -> ImageId:
    """Parse an image id.

    Every number is ASCII digits of bounded length (``str.isdigit`` accepts ``²``
    and ``int`` of thousands of digits raises), so hostile ids fail here.

    Raises
    ------
    NotFoundError
        Malformed id: IIIF Image API 3.0 §7 answers an identifier that names no
        image with 404, whatever its syntax (and the ``iiif-validator`` expects it).
    """
    if len(text) > _MAX_ID:
        raise NotFoundError("no such image (identifier too long)")
    parts = text.split(":")
    if len(parts) not in (4, 5):
        raise NotFoundError("no such image: ids are {series}[@{version}]:{stack}:{plane}:"
                            "{index}[:{window}]")
    head, stack, plane, index = parts[:4]
    uid, at, version = head.partition("@")
    if not _UID.fullmatch(uid) or len(uid) > 64:
        raise NotFoundError("no such image: the series UID is digits and dots, at most 64")
    if at and not _VERSION.fullmatch(version):
        raise NotFoundError("no such image: the version is a job id (ASCII digits)")
    if not _NUMBER.fullmatch(stack) or not _NUMBER.fullmatch(index):
        raise NotFoundError("no such image: stack and index are non-negative integers")
    if plane not in PLANES:
        raise NotFoundError(f"no such image: the plane is one of {', '.join(PLANES)}")
    window = parts[4] if len(parts) == 5 else None
    if window is not None:
        try:
            parse_window(window)
        except ValueError as exc:
            raise NotFoundError(f"no such image: {exc}") from None
    return ImageId(uid, int(version) if version else None, int(stack), plane, int(index),
                   window)


# ------------------------------------------------------------------ IIIF requests


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """A resolved IIIF image request (IIIF Image API 3.0 §4, order of §4.6).

    ``x, y, w, h`` is the region in full-image pixels; ``width, height`` the size of
    the returned image before rotation.
    """

    x: int
    y: int
    w: int
    h: int
    width: int
    height: int
    mirror: bool
    rotation: int
    quality: str
    format: str


def _ints(text: str, n: int) -> list[int]:
    parts = text.split(",")
    if len(parts) != n or not all(_NUMBER.fullmatch(p) for p in parts):
        raise InvalidQueryError(f"expected {n} non-negative integers of at most 9 ASCII "
                                "digits")
    return [int(p) for p in parts]


def _floats(text: str, n: int) -> list[float]:
    parts = text.split(",")
    if len(parts) != n or not all(_DECIMAL.fullmatch(p) for p in parts):
        raise InvalidQueryError(f"expected {n} non-negative decimal numbers of ASCII digits")
    return [float(p) for p in parts]


def _region(text: str, width: int, height: int) -> tuple[int, int, int, int]:
    """IIIF Image API 3.0 §4.1: full, square, x,y,w,h, pct:x,y,w,h."""
    if text == "full":
        return 0, 0, width, height
    if text == "square":
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, side, side
    if text.startswith("pct:"):
        px, py, pw, ph = _floats(text[4:], 4)
        x, y = round(px * width / 100), round(py * height / 100)
        w, h = round(pw * width / 100), round(ph * height / 100)
    else:
        x, y, w, h = _ints(text, 4)
    if w <= 0 or h <= 0:
        raise InvalidQueryError("region width and height must be greater than zero")
    if x >= width or y >= height:
        raise InvalidQueryError("region is entirely outside the image")
    return x, y, min(w, width - x), min(h, height - y)


def _size(text: str, rw: int, rh: int) -> tuple[int, int]:
    """IIIF Image API 3.0 §4.2: max, w,, ,h, pct:n, w,h, !w,h, each with optional ^."""
    up = text.startswith("^")
    spec = text[1:] if up else text
    if spec == "max":
        scale = min(1.0, math.sqrt(MAX_AREA / (rw * rh)))
        w, h = max(1, math.floor(rw * scale)), max(1, math.floor(rh * scale))
        return w, h
    if spec.startswith("pct:"):
        (n,) = _floats(spec[4:], 1)
        w, h = round(rw * n / 100), round(rh * n / 100)
    elif spec.startswith("!"):
        bw, bh = _ints(spec[1:], 2)
        scale = min(bw / rw, bh / rh)
        if not up and scale > 1:
            # §4.2: a size without ^ whose scaled region is larger than the extracted
            # region is a 400. The "!w,h" sentence ("not larger than the extracted
            # region") could be read as a clamp, but the IIIF validator (size_noup),
            # Cantaloupe and IIPImage treat a box that would upscale as this error;
            # clients that want "fit, whatever the size" send ^!w,h.
            raise InvalidQueryError("a !w,h box larger than the region needs the ^ "
                                    "(upscaling) prefix")
        w, h = max(1, math.floor(rw * scale + 1e-9)), max(1, math.floor(rh * scale + 1e-9))
    elif spec.endswith(",") and spec.count(",") == 1:
        (w,) = _ints(spec[:-1], 1)
        h = round(rh * w / rw)
    elif spec.startswith(",") and spec.count(",") == 1:
        (h,) = _ints(spec[1:], 1)
        w = round(rw * h / rh)
    else:
        w, h = _ints(spec, 2)
    if w <= 0 or h <= 0:
        raise InvalidQueryError("size must be at least one pixel")
    if not up and (w > rw or h > rh):
        raise InvalidQueryError("size larger than the region needs the ^ (upscaling) prefix")
    if w * h > MAX_AREA:
        # §7: a size above the advertised limits is 404.
        raise NotFoundError(f"requested size exceeds maxArea {MAX_AREA}")
    return w, h


def _rotation(text: str) -> tuple[bool, int]:
    """IIIF Image API 3.0 §4.3: optional ``!`` (mirror) then degrees clockwise."""
    mirror = text.startswith("!")
    spec = text[1:] if mirror else text
    if not _DEGREES.fullmatch(spec):
        raise InvalidQueryError("rotation must be a number of degrees")
    value = float(spec)
    if value >= 360:
        raise InvalidQueryError("rotation must be below 360 degrees")
    if value not in (0, 90, 180, 270):
        raise UnsupportedRequestError("only rotations by multiples of 90 degrees")
    return mirror, int(value)


_QUALITIES: Final = ("default", "color", "gray", "bitonal")
#: Formats IIIF names that we do not produce (§4.5): 501 rather than 400.
_KNOWN_FORMATS: Final = ("tif", "gif", "pdf", "jp2")


def parse_image_request(region: str, size: str, rotation: str, quality_format: str, *,
                        width: int, height: int, color: bool) -> ImageRequest:
    """Parse the four path parameters of an image request against a width × height image.

    Raises
    ------
    InvalidQueryError
        Bad syntax, zero or out-of-image regions, upscaling without ``^`` (400).
    NotFoundError
        A quality the image does not have (``color`` of greyscale), or a size
        beyond ``maxArea`` (404, §7).
    UnsupportedRequestError
        Arbitrary rotation, tif/gif/pdf/jp2 (501).
    """
    if max(len(region), len(size), len(rotation), len(quality_format)) > _MAX_PARAM:
        raise InvalidQueryError(f"request parameters are at most {_MAX_PARAM} characters")
    quality, dot, fmt = quality_format.rpartition(".")
    if not dot or not quality:
        raise InvalidQueryError("expected {quality}.{format}")
    if quality not in _QUALITIES:
        raise InvalidQueryError(f"quality must be one of {', '.join(_QUALITIES)}")
    if fmt not in FORMATS:
        if fmt in _KNOWN_FORMATS:
            raise UnsupportedRequestError(f"format {fmt} is not produced")
        raise InvalidQueryError(f"format must be one of {', '.join(FORMATS)}")
    x, y, w, h = _region(region, width, height)
    out_w, out_h = _size(size, w, h)
    mirror, degrees = _rotation(rotation)
    if quality == "color" and not color:
        raise NotFoundError("a greyscale image has no color quality")
    return ImageRequest(x, y, w, h, out_w, out_h, mirror, degrees, quality, fmt)


def canonical(req: ImageRequest, width: int, height: int) -> str:
    """The canonical URI path of a request (IIIF Image API 3.0 §4.7)."""
    full = (req.x, req.y, req.w, req.h) == (0, 0, width, height)
    region = "full" if full else f"{req.x},{req.y},{req.w},{req.h}"
    size = "max" if (req.width, req.height) == (req.w, req.h) else f"{req.width},{req.height}"
    rotation = f"{'!' if req.mirror else ''}{req.rotation}"
    return f"{region}/{size}/{rotation}/{req.quality}.{req.format}"


def info_json(service_id: str, width: int, height: int, levels: int, *,
              color: bool) -> dict[str, Any]:
    """The image information document (IIIF Image API 3.0 §5).

    ``tiles`` has one entry of :data:`TILE` px with a scale factor per pyramid level
    (§5.4), so each tile request maps onto one stored level; ``sizes`` lists the
    whole image at each of those levels (§5.3), smallest first.
    """
    factors = [1 << k for k in range(levels)]
    sizes = [{"width": math.ceil(width / f), "height": math.ceil(height / f)}
             for f in reversed(factors) if math.ceil(width / f) * math.ceil(height / f)
             <= MAX_AREA]
    return {
        "@context": CONTEXT,
        "id": service_id,
        "type": "ImageService3",
        "protocol": PROTOCOL,
        "profile": "level2",
        "width": width,
        "height": height,
        "maxArea": MAX_AREA,
        "sizes": sizes,
        "tiles": [{"width": TILE, "height": TILE, "scaleFactors": factors}],
        "preferredFormats": ["png"],
        "extraFormats": ["png", "webp"],
        # §5.5: every quality beyond default; bitonal is required at level 2 (§6).
        "extraQualities": ["color", "gray", "bitonal"] if color else ["gray", "bitonal"],
        "extraFeatures": ["cors", "jsonldMediaType", "mirroring", "sizeUpscaling"],
    }


# ------------------------------------------------------------------ Deep Zoom


def dzi_levels(width: int, height: int) -> int:
    """Number of Deep Zoom levels: level 0 is 1×1, the last is full size."""
    return math.ceil(math.log2(max(width, height, 1))) + 1


def dzi_descriptor(width: int, height: int, fmt: str) -> str:
    """The ``.dzi`` XML (Deep Zoom ``Image`` element; TileSize 256, Overlap 0)."""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
            f'Format="{fmt}" Overlap="0" TileSize="{TILE}">'
            f'<Size Width="{width}" Height="{height}"/></Image>\n')


def parse_dzi_numbers(level: str, col: str, row: str) -> tuple[int, int, int]:
    """The level, column and row of a Deep Zoom tile path, as ASCII digits (≤ 9 each).

    Raises
    ------
    InvalidQueryError
        Anything else (unicode digits, signs, thousands of digits): 400.
    """
    if not (_NUMBER.fullmatch(level) and _NUMBER.fullmatch(col) and _NUMBER.fullmatch(row)):
        raise InvalidQueryError("Deep Zoom level, column and row are non-negative integers "
                                "of at most 9 ASCII digits")
    return int(level), int(col), int(row)


def dzi_tile(width: int, height: int, level: int, col: int, row: int
             ) -> tuple[int, int, int, int, int, int]:
    """Full-image region ``(x, y, w, h)`` and output ``(tw, th)`` of a Deep Zoom tile.

    Deep Zoom level ``n`` is the image scaled by ``2 ** (n - last)`` (sizes rounded
    up); its tiles are 256² from the top left, the last row and column cut short.

    Raises
    ------
    NotFoundError
        No such level or tile.
    """
    last = dzi_levels(width, height) - 1
    if not 0 <= level <= last:
        raise NotFoundError(f"Deep Zoom level {level} outside 0..{last}")
    sf = 1 << (last - level)
    lw, lh = math.ceil(width / sf), math.ceil(height / sf)
    if not (0 <= col * TILE < lw and 0 <= row * TILE < lh):
        raise NotFoundError(f"no tile {col}_{row} at level {level}")
    tw, th = min(TILE, lw - col * TILE), min(TILE, lh - row * TILE)
    x, y = col * TILE * sf, row * TILE * sf
    return x, y, min(TILE * sf, width - x), min(TILE * sf, height - y), tw, th
