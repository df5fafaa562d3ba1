"""Render pyramid pixels for viewers: VOI windowing, planes, resampling, encoding. Pure.

Everything here works on numpy arrays and plain values; the tile routes
(:mod:`api.routes.tiles`) read the zarr levels and call these functions, so the API
imports only pure code from processing (STYLE.md §1).

* **Windowing** is the DICOM VOI LUT linear function (PS3.3 C.11.2.1.2.1) applied to
  modality values (PS3.3 C.11.1: ``slope × stored + intercept``; the pyramid may
  already hold them). MONOCHROME1 is inverted after the window, because its
  minimum sample is displayed white (PS3.3 C.7.6.3.1.2). RGB passes through.
  16-bit integers go through a 65536-entry lookup table, so a 256² tile costs one
  ``np.take``.
* **Planes** of a volume are the anatomical planes (axial, coronal, sagittal) chosen
  from the stack's direction cosines (PS3.3 C.7.6.2.1.1), displayed in the
  radiological convention: patient left on the right of an axial or coronal image,
  posterior on the right of a sagittal one, superior up. A plane's display pixel is
  the finer of its two in-plane spacings, so coronal and sagittal views of
  thick-slice stacks get their physical aspect by linear resampling of the coarser
  axis (usually z).
* **Encoding** produces PNG (8-bit, or 16-bit for viewers that window themselves),
  JPEG and WebP with Pillow.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Literal

import numpy as np

__all__ = [
    "FORMATS",
    "MIN_REFORMAT_SLICES",
    "PLANES",
    "PRESETS",
    "Axis",
    "PlaneView",
    "RawWindow",
    "Window",
    "acquisition_plane",
    "apply_window",
    "auto_window",
    "default_window",
    "encode",
    "level_axis",
    "orient",
    "parse_window",
    "plane_view",
    "planes_of",
    "raw_uint16",
    "resample_axis",
    "resize",
    "to_display",
]

#: Anatomical planes of a volume, and ``native`` for 2-D images and cine frames.
PLANES: Final = ("axial", "coronal", "sagittal", "native")

#: Output formats and their media types (IIIF Image API 3.0 §4.5).
FORMATS: Final = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True, slots=True)
class Window:
    """A VOI window: ``center`` and ``width`` in modality units (PS3.3 C.11.2.1.2).

    ``width`` must be ≥ 1 (PS3.3 C.11.2.1.2.1).
    """

    center: float
    width: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.width)) or self.width < 1:
            raise ValueError(f"window width must be ≥ 1 and finite, got {self.width}")


class RawWindow:
    """The request for stored values unwindowed (16-bit PNG); see :func:`raw_uint16`."""

    def __repr__(self) -> str:
        return "RAW"


RAW: Final = RawWindow()

#: Named presets (center, width) in Hounsfield units, the usual CT choices.
PRESETS: Final[Mapping[str, Window]] = {
    "lung": Window(-600, 1500),
    "bone": Window(300, 1500),
    "brain": Window(40, 80),
    "abdomen": Window(40, 400),
}


_WINDOW_NUMBER: Final = re.compile(r"[-+]?(?:[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})")


def parse_window(text: str | None) -> Window | RawWindow | None:
    """Parse ``?window=``: ``center,width``, a preset name, ``raw`` or ``default``.

    Returns ``None`` for the default (the stored window, see :func:`default_window`).

    Raises
    ------
    ValueError
        Unknown name, malformed numbers or a width below 1.
    """
    if text is None or text in ("", "default"):
        return None
    if text == "raw":
        return RAW
    if text in PRESETS:
        return PRESETS[text]
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"window must be center,width or one of {sorted(PRESETS)}, raw")
    # float() also takes unicode digits, "inf", "1e999" and thousands of digits: accept
    # only short ASCII decimals (hostile input, issue 14.8).
    if not all(_WINDOW_NUMBER.fullmatch(p) for p in parts):
        raise ValueError("window center and width must be decimal numbers (ASCII digits)")
    return Window(float(parts[0]), float(parts[1]))


def default_window(windows: Sequence[Mapping[str, Any]]) -> Window | None:
    """The first stored VOI window (Window Center/Width, PS3.3 C.11.2.1.2), if usable."""
    for w in windows:
        try:
            return Window(float(w["center"]), float(w["width"]))
        except (KeyError, TypeError, ValueError):
            continue
    return None


def auto_window(sample: np.ndarray, *, slope: float = 1.0, intercept: float = 0.0) -> Window:
    """A window over the 0.5–99.5 percentile of ``sample`` (modality units).

    Used when the instances carry no window; ``sample`` is a small pyramid level, so
    every tile of an image gets the same window.
    """
    values = sample.astype(np.float64, copy=False).ravel() * slope + intercept
    if values.size == 0:
        return Window(0.5, 1.0)
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi - lo < 1:
        lo, hi = float(values.min()), float(values.max())
    return Window((float(lo) + float(hi) + 1) / 2, max(float(hi) - float(lo) + 1, 1.0))


def _linear(x: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 with y ∈ [0, 255], as float64."""
    c, w = window.center, window.width
    if w == 1:  # the Note's threshold case: below c - 0.5 black, else white
        return np.where(x <= c - 0.5, 0.0, 255.0)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    lower = x <= c - 0.5 - (w - 1) / 2
    upper = x > c - 0.5 + (w - 1) / 2
    return np.where(lower, 0.0, np.where(upper, 255.0, y))


@lru_cache(maxsize=64)
def _lut16(dtype: str, window: Window, slope: float, intercept: float,
           invert: bool) -> np.ndarray:
    """A uint8 table indexed by the uint16 view of ``dtype`` values."""
    codes = np.arange(65536, dtype=np.uint16)
    values = codes.view(np.dtype(dtype)).astype(np.float64) * slope + intercept
    out: np.ndarray = np.rint(_linear(values, window))
    if invert:
        out = 255.0 - out
    return out.astype(np.uint8)


def apply_window(values: np.ndarray, window: Window, *, slope: float = 1.0,
                 intercept: float = 0.0, invert: bool = False) -> np.ndarray:
    """Window single-sample ``values`` to uint8 (PS3.3 C.11.2.1.2.1).

    Parameters
    ----------
    values
        Stored values (``slope``/``intercept`` apply the Modality LUT first,
        PS3.3 C.11.1.1.2) or modality values (the defaults).
    window
        Center and width in modality units.
    invert
        MONOCHROME1: the minimum is white (PS3.3 C.7.6.3.1.2).
    """
    if values.dtype in (np.int16, np.uint16):
        lut = _lut16(values.dtype.str, window, float(slope), float(intercept), invert)
        return np.take(lut, values.view(np.uint16))
    if values.dtype in (np.int8, np.uint8):
        lut = _lut16("<i2", window, float(slope), float(intercept), invert)
        return np.take(lut, values.astype(np.int16).view(np.uint16))
    out: np.ndarray = np.rint(_linear(values.astype(np.float64) * slope + intercept, window))
    if invert:
        out = 255.0 - out
    return out.astype(np.uint8)


def to_display(values: np.ndarray, window: Window | None, *, photometric: str,
               slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """8-bit display pixels: windowed greyscale ``(h, w)`` or RGB ``(h, w, 3)``.

    RGB (``values.ndim == 3``) passes through; 16-bit colour keeps its high byte.
    A greyscale image needs a ``window`` (see :func:`default_window`,
    :func:`auto_window`).
    """
    if values.ndim == 3:
        if values.dtype == np.uint8:
            return values
        info = np.iinfo(values.dtype) if values.dtype.kind in "iu" else None
        rgb: np.ndarray
        if info is None:
            rgb = np.clip(values, 0, 255).astype(np.uint8)
        else:
            rgb = (values.astype(np.int64) >> max(info.bits - 8, 0)).clip(0, 255)
        return rgb.astype(np.uint8)
    if window is None:
        raise ValueError("a greyscale image needs a window")
    return apply_window(values, window, slope=slope, intercept=intercept,
                        invert=photometric == "MONOCHROME1")


def raw_uint16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Stored values as uint16 for a 16-bit PNG, and the offset to add back.

    Signed values are shifted by 32768 (PNG samples are unsigned), so a viewer
    recovers them as ``png - 32768``; the returned offset is ``-32768`` then, else 0.
    """
    if values.dtype == np.uint16:
        return values, 0
    if values.dtype == np.uint8:
        return values.astype(np.uint16), 0
    if values.dtype == np.int16:
        return (values.view(np.uint16) ^ np.uint16(0x8000)), -32768
    if values.dtype == np.int8:
        return (values.astype(np.int32) + 32768).astype(np.uint16), -32768
    raise ValueError(f"no 16-bit representation of {values.dtype}")


# ------------------------------------------------------------------ planes


@dataclass(frozen=True, slots=True)
class Axis:
    """One display axis of a plane: which stack axis (0 = z, 1 = y, 2 = x) and flip."""

    source: int
    flip: bool


@dataclass(frozen=True, slots=True)
class PlaneView:
    """How a plane of a stack is shown.

    Attributes
    ----------
    plane
        ``axial``, ``coronal``, ``sagittal`` or ``native``.
    fixed
        The stack axis held at the slice index.
    rows, cols
        Stack axes along display rows (downwards) and columns (rightwards).
    width, height
        Level-0 display size in pixels of ``pixel_mm``.
    depth
        Slices in this plane (level-0 length of ``fixed``).
    pixel_mm
        Display pixel size at level 0: the finer of the two in-plane spacings.
    """

    plane: str
    fixed: int
    rows: Axis
    cols: Axis
    width: int
    height: int
    depth: int
    pixel_mm: float

    @property
    def exact(self) -> bool:
        """Display pixels are the stored pixels (no resampling, no transpose)."""
        return self.rows.source < self.cols.source and not (self.rows.flip or self.cols.flip)


# Patient directions (LPS) of each plane: (normal, display right, display down).
_LPS: Final = {
    "axial": ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return float(sum(x * y for x, y in zip(a, b, strict=True)))


def _fixed_axes(direction: Sequence[Sequence[float]]) -> dict[str, int]:
    """Stack axis normal to each anatomical plane: the assignment of the three axes
    (z = slice normal, y = column cosine, x = row cosine) that best matches."""
    from itertools import permutations

    axis_dirs = {0: direction[2], 1: direction[1], 2: direction[0]}
    best: tuple[float, tuple[int, ...]] = (-1.0, (0, 1, 2))
    for perm in permutations((0, 1, 2)):
        score = sum(abs(_dot(axis_dirs[a], _LPS[p][0]))
                    for p, a in zip(("axial", "coronal", "sagittal"), perm, strict=True))
        if score > best[0] + 1e-9:
            best = (score, perm)
    return dict(zip(("axial", "coronal", "sagittal"), best[1], strict=True))


#: Parallel slices a volume needs before its other two anatomical planes are offered:
#: a reformat of fewer slices is only a few pixels high (a line, issue 13.10).
MIN_REFORMAT_SLICES: Final = 5


def acquisition_plane(kind: str, direction: Sequence[Sequence[float]]) -> str:
    """The plane a stack was acquired in: the anatomical plane whose normal is the
    stack's slice axis (from Image Orientation (Patient), PS3.3 C.7.6.2.1.1).

    A sagittal or oblique MR series opens in its own plane, never in a reformatted
    "axial" one; 2-D images and cine have only ``native``.
    """
    if kind != "volume":
        return "native"
    return next(p for p, axis in _fixed_axes(direction).items() if axis == 0)


def planes_of(kind: str, shape: Sequence[int], direction: Sequence[Sequence[float]]
              ) -> tuple[str, ...]:
    """The planes a stack offers, its acquisition plane first.

    A volume of at least :data:`MIN_REFORMAT_SLICES` parallel slices adds the two
    reformatted anatomical planes; a thinner one (a single oblique slice, a
    three-slice localizer) has only its acquisition plane. Every stack also serves
    ``native`` (stored rows and columns), which is not listed.
    """
    first = acquisition_plane(kind, direction)
    if kind != "volume" or int(shape[0]) < MIN_REFORMAT_SLICES:
        return (first,)
    return (first, *(p for p in ("axial", "coronal", "sagittal") if p != first))


def plane_view(kind: str, shape: Sequence[int], spacing: Sequence[float],
               direction: Sequence[Sequence[float]], plane: str) -> PlaneView:
    """The display geometry of ``plane`` of a stack at level 0.

    Parameters
    ----------
    kind
        ``volume``, ``plane`` or ``cine``; only volumes have anatomical planes,
        the others have ``native`` (frames for cine).
    shape, spacing
        ``(z, y, x)`` of level 0 (``spacing`` in mm).
    direction
        Row cosine, column cosine and slice normal (PS3.3 C.7.6.2.1.1).

    Raises
    ------
    ValueError
        A plane this kind of stack does not have.
    """
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {', '.join(PLANES)}")
    z, y, x = (int(n) for n in shape)
    if kind != "volume" or plane == "native":
        if plane != "native" and kind != "volume":
            raise ValueError(f"a {kind} image has only the native plane")
        rows, cols, fixed = Axis(1, False), Axis(2, False), 0
    else:
        fixed = _fixed_axes(direction)[plane]
        axis_dirs = {0: direction[2], 1: direction[1], 2: direction[0]}
        _, right, down = _LPS[plane]
        a, b = (ax for ax in (0, 1, 2) if ax != fixed)
        # Columns take the in-plane axis closest to the display's rightward direction.
        if abs(_dot(axis_dirs[a], right)) >= abs(_dot(axis_dirs[b], right)):
            c_ax, r_ax = a, b
        else:
            c_ax, r_ax = b, a
        cols = Axis(c_ax, _dot(axis_dirs[c_ax], right) < 0)
        rows = Axis(r_ax, _dot(axis_dirs[r_ax], down) < 0)
    n = (z, y, x)
    sp = tuple(float(s) if s and s > 0 else 1.0 for s in spacing)
    if kind != "volume":
        sp = (1.0, *sp[1:])
    pixel = min(sp[rows.source], sp[cols.source])
    height = max(1, round(n[rows.source] * sp[rows.source] / pixel))
    width = max(1, round(n[cols.source] * sp[cols.source] / pixel))
    return PlaneView(plane, fixed, rows, cols, width, height, n[fixed], pixel)


def level_axis(pixel_mm: float, level: int, stored: int, stored_mm: float,
               start: int, stop: int, flip: bool) -> np.ndarray:
    """Stored-array positions (float) of display pixels ``start:stop`` at ``level``.

    Display pixel *j* of level *k* (size ``pixel_mm × 2**k``) is centred at
    ``(j + 0.5) × pixel`` from the image edge; the stored level-*k* axis has
    ``stored`` samples of ``stored_mm``. Flipped axes count from the far edge.
    """
    j = np.arange(start, stop, dtype=np.float64)
    # The ratio first: it is exactly 1.0 when display and stored pixels agree, so the
    # positions are then exact integers (see resample_axis's fast path).
    ratio = pixel_mm * (1 << level) / stored_mm
    pos = (j + 0.5) * ratio - 0.5
    if flip:
        # Mirror around the centre of the physical extent covered by the stored axis.
        pos = (stored - 1) - pos
    return pos


def resample_axis(block: np.ndarray, positions: np.ndarray, axis: int,
                  offset: int = 0) -> np.ndarray:
    """Linear interpolation of ``block`` along ``axis`` at ``positions`` (float).

    ``positions`` are in the coordinates of the whole stored axis; ``block`` starts
    at ``offset`` on it. Integer positions return the stored samples unchanged.
    """
    n = block.shape[axis]
    p = np.clip(positions - offset, 0, n - 1)
    start = float(p[0]) if p.size else 0.0
    if start.is_integer() and np.array_equal(p, start + np.arange(p.size)):
        # display pixels are stored pixels (the common case): a view, no copy
        i0 = int(start)
        view: np.ndarray = block[(slice(None),) * axis + (slice(i0, i0 + p.size),)]
        return view
    if np.all(p == np.rint(p)):
        same: np.ndarray = np.take(block, p.astype(np.intp), axis=axis)
        return same
    lo = np.floor(p).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    t = (p - lo).astype(np.float32)
    shape = [1] * block.ndim
    shape[axis] = t.size
    t = t.reshape(shape)
    a = np.take(block, lo, axis=axis).astype(np.float32)
    b = np.take(block, hi, axis=axis).astype(np.float32)
    out: np.ndarray = a + (b - a) * t
    if block.dtype.kind in "iu":
        info = np.iinfo(block.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(block.dtype)


def orient(block: np.ndarray, rows_first: bool) -> np.ndarray:
    """``block`` with display rows first (``(r, c[, s])``); transposes if needed."""
    if rows_first:
        return block
    axes = (1, 0, *range(2, block.ndim))
    return np.ascontiguousarray(block.transpose(axes))


# ------------------------------------------------------------------ resize, encode


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize display or raw pixels to ``width × height`` (area-weighted when shrinking).

    Works on uint8 greyscale/RGB and on 16-bit greyscale (through float32).
    """
    from PIL import Image

    if img.shape[1] == width and img.shape[0] == height:
        return img
    if img.dtype == np.uint8:
        out = Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(out)
    f = Image.fromarray(img.astype(np.float32), mode="F")
    res: np.ndarray = np.asarray(f.resize((width, height), Image.Resampling.BILINEAR))
    if img.dtype.kind in "iu":
        info = np.iinfo(img.dtype)
        res = np.clip(np.rint(res), info.min, info.max)
    return res.astype(img.dtype)


def encode(img: np.ndarray, fmt: Literal["png", "jpg", "webp"] | str, *,
           quality: int = 90) -> bytes:
    """Encode 8-bit greyscale/RGB (any format) or uint16 greyscale (PNG only).

    PNG uses zlib level 1 and WebP is lossless: tiles are cached by clients for a
    year, and the encode time is the largest part of a warm tile request. JPEG is the
    one lossy format (``quality``).
    """
    from PIL import Image

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    buf = io.BytesIO()
    if img.dtype == np.uint16:
        if fmt != "png":
            raise ValueError("16-bit output is PNG only")
        # Pillow's "I;16" mode is written as a 16-bit greyscale PNG.
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    if img.dtype != np.uint8:
        raise ValueError(f"cannot encode {img.dtype}")
    im = Image.fromarray(np.ascontiguousarray(img))
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpg":
        im.save(buf, format="JPEG", quality=quality)
    else:
        # Lossless at the fastest effort: diagnostic pixels stay exact, and it encodes
        # ~4x faster than lossy WebP here (0.6 ms vs 2.3 ms for a 256² CT tile).
        im.save(buf, format="WEBP", lossless=True, quality=0, method=0)
    return buf.getvalue()
