"""Pixel data for WADO-RS: transfer syntax negotiation, frames, rendered images (pure
over a file path).

* Instances (PS3.18 8.7.3.5.2): returned as stored, or re-encoded between the
  uncompressed little-endian transfer syntaxes, or decompressed to them when a pydicom
  decoder is available; anything else is not acceptable (406).
* Frames (PS3.18 8.7.3.3.2, 10.4.1.1.3): native pixel data as
  application/octet-stream, encapsulated frames exactly as stored with their media type
  (PS3.18 Table 8.7.3-3), read with pydicom's encapsulation helpers.
* Rendered and thumbnail (PS3.18 8.3.5.1, 10.4.1.1.4): the Modality LUT, then the VOI
  LUT or window (PS3.3 C.11.2.1.2), MONOCHROME1 inverted, encoded as JPEG or PNG with
  imagecodecs.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from pydicom.tag import Tag
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    MPEG2MPHL,
    MPEG2MPML,
    MPEG4HP41,
    MPEG4HP41BD,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from api.dicomweb._multipart import MediaRange
from core.errors import InvalidDatasetError, InvalidQueryError, NotFoundError

__all__ = [
    "EXPLICIT_LE",
    "IMPLICIT_LE",
    "Frame",
    "RenderOptions",
    "choose_frame_syntax",
    "choose_instance_syntax",
    "frame_media_type",
    "iter_frames",
    "read_bulkdata",
    "read_frames",
    "render",
    "transcode",
]

IMPLICIT_LE = ImplicitVRLittleEndian
EXPLICIT_LE = ExplicitVRLittleEndian
DEFLATED_LE = DeflatedExplicitVRLittleEndian
EXPLICIT_BE = ExplicitVRBigEndian
NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, EXPLICIT_BE})
_LITTLE_NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE})

# PS3.18 Table 8.7.3-3: media types of compressed frames, by transfer syntax.
_FRAME_MEDIA: dict[str, str] = {
    JPEGBaseline8Bit: "image/jpeg",
    JPEGExtended12Bit: "image/jpeg",
    JPEGLossless: "image/jpeg",
    JPEGLosslessSV1: "image/jpeg",
    JPEGLSLossless: "image/jls",
    JPEGLSNearLossless: "image/jls",
    JPEG2000Lossless: "image/jp2",
    JPEG2000: "image/jp2",
    JPEG2000MCLossless: "image/jpx",
    JPEG2000MC: "image/jpx",
    HTJ2KLossless: "image/jphc",
    HTJ2KLosslessRPCL: "image/jphc",
    HTJ2K: "image/jphc",
    RLELossless: "image/dicom-rle",
    MPEG2MPML: "video/mpeg2",
    MPEG2MPHL: "video/mpeg2",
    MPEG4HP41: "video/mp4",
    MPEG4HP41BD: "video/mp4",
}


def _can_decode(transfer_syntax_uid: str) -> bool:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(transfer_syntax_uid).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


def _reachable(stored: str, target: str) -> bool:
    if target == stored:
        return True
    if target not in (IMPLICIT_LE, EXPLICIT_LE):
        return False
    return stored in _LITTLE_NATIVE or (stored not in NATIVE and _can_decode(stored))


def choose_instance_syntax(accept: Sequence[MediaRange], stored: Sequence[str]) -> str | None:
    """The transfer syntax to send instances in: ``"*"`` (each as stored), a UID, or None
    when nothing acceptable can be produced for every instance (406).

    ``*/*`` (or no Accept header) means as stored; ``application/dicom`` without a
    ``transfer-syntax`` parameter means Explicit VR Little Endian (PS3.18 Table 8.7.3-2).
    """
    for rng in accept:
        if not rng.matches("application/dicom"):
            continue
        wanted = rng.transfer_syntax
        if wanted is None and rng.media_type != "application/dicom":
            return "*"
        if wanted == "*":
            return "*"
        target = wanted or EXPLICIT_LE
        if all(_reachable(ts, target) for ts in stored):
            return target
    return None


def frame_media_type(transfer_syntax_uid: str) -> str:
    return (
        "application/octet-stream"
        if transfer_syntax_uid in NATIVE
        else _FRAME_MEDIA.get(transfer_syntax_uid, "application/octet-stream")
    )


def choose_frame_syntax(accept: Sequence[MediaRange], stored: str) -> tuple[str, bool] | None:
    """``(content type, decode)`` for frames of an instance stored in ``stored``.

    Encapsulated frames go as stored when their media type (or octet-stream with
    ``transfer-syntax=*`` or the stored UID) is acceptable; octet-stream without a
    transfer syntax asks for native pixels, so they are decoded if pydicom can.
    """
    native_type = "application/octet-stream"
    for rng in accept:
        if stored in NATIVE:
            if rng.matches(native_type) and rng.transfer_syntax in (None, "*", EXPLICIT_LE, stored):
                return native_type, False
            continue
        media = _FRAME_MEDIA.get(stored, native_type)
        as_stored = f"{media}; transfer-syntax={stored}"
        if rng.media_type in ("*/*", "*") and rng.transfer_syntax in (None, "*", stored):
            return as_stored, False
        if (
            rng.matches(media)
            and rng.media_type != native_type
            and rng.transfer_syntax
            in (
                None,
                "*",
                stored,
            )
        ):
            return as_stored, False
        if rng.media_type == native_type:
            if rng.transfer_syntax in ("*", stored):
                return f"{native_type}; transfer-syntax={stored}", False
            if rng.transfer_syntax in (None, EXPLICIT_LE) and _can_decode(stored):
                return native_type, True
    return None


def transcode(path: Path, target: str) -> bytes:
    """The instance at ``path`` as a Part-10 file in ``target`` (little-endian native).

    The SOP Instance UID is kept: this is the same instance in another encoding.
    """
    try:
        ds = dcmread(path)
        if ds.file_meta.TransferSyntaxUID not in NATIVE:
            ds.decompress(generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = UID(target)
        out = io.BytesIO()
        ds.save_as(
            out, implicit_vr=target == IMPLICIT_LE, little_endian=True, enforce_file_format=True
        )
    except (ValueError, NotImplementedError, RuntimeError, AttributeError) as exc:
        raise InvalidDatasetError(f"cannot transcode: {type(exc).__name__}") from exc
    return out.getvalue()


@dataclass(frozen=True, slots=True)
class Frame:
    number: int
    data: bytes


def _header(path: Path) -> Dataset:
    try:
        return dcmread(path, defer_size=1024)
    except Exception as exc:  # pydicom raises many kinds on a corrupt file
        raise InvalidDatasetError(f"cannot read stored instance: {type(exc).__name__}") from exc


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _check_numbers(numbers: Sequence[int], count: int) -> None:
    for n in numbers:
        if not 1 <= n <= count:
            raise NotFoundError(f"frame {n} does not exist (instance has {count})")


def iter_frames(
    path: Path, numbers: Sequence[int] | None = None, *, decode: bool = False
) -> Iterator[Frame]:
    """Frames ``numbers`` (1-based; None: all) of the instance at ``path``, one at a time.

    Everything that can fail on the request (no Pixel Data, a frame out of range,
    unreadable Image Pixel attributes) is checked before this returns, so the route
    answers 404/400 before a streamed body has started; the frames themselves are
    produced lazily, one in memory at a time (issue 14.7). Native pixel data is read
    with seeks, not loaded whole; single-bit frames that do not start on a byte
    boundary are re-packed (PS3.5 8.1.1); ``decode`` decompresses encapsulated frames
    to native pixels with pydicom.
    """
    ds = _header(path)
    if "PixelData" not in ds:
        raise NotFoundError("instance has no Pixel Data")
    count = _frame_count(ds)
    if numbers is None:
        numbers = range(1, count + 1)
    _check_numbers(numbers, count)
    ts = str(ds.file_meta.TransferSyntaxUID)
    if decode:
        return _decoded(path, numbers)
    if ts not in NATIVE:
        return _encapsulated(path, ds, numbers, count)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidDatasetError("Image Pixel attributes missing") from exc
    return _native(path, ds, numbers, rows * cols * spp * bits, ts)


def read_frames(path: Path, numbers: Sequence[int], *, decode: bool = False) -> list[Frame]:
    """:func:`iter_frames` as a list (small frame lists only)."""
    return list(iter_frames(path, numbers, decode=decode))


def _decoded(path: Path, numbers: Sequence[int]) -> Iterator[Frame]:
    for n in numbers:
        try:
            arr = pixel_array(path, index=n - 1, raw=True)
        except (ValueError, NotImplementedError, RuntimeError, AttributeError, KeyError) as exc:
            raise InvalidDatasetError(f"cannot decode pixel data: {type(exc).__name__}") from exc
        yield Frame(n, np.ascontiguousarray(arr).tobytes())


def _encapsulated(
    path: Path, ds: Dataset, numbers: Sequence[int], count: int
) -> Iterator[Frame]:
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    raw = ds._dict.get(Tag(0x7FE00010))
    tell = getattr(raw, "value_tell", None)
    if isinstance(raw, RawDataElement) and raw.value is None and tell is not None:
        # Deferred by the header read: pydicom's get_frame seeks through the file
        # (offset tables, fragment headers), so a frame of a multi-gigabyte
        # whole-slide image costs its own size in memory, not the file's.
        with path.open("rb") as fp:
            for n in numbers:
                fp.seek(tell)
                yield Frame(n, _get_frame(fp, n, count, offsets))
        return
    data = ds.PixelData
    for n in numbers:
        yield Frame(n, _get_frame(data, n, count, offsets))


def _get_frame(buffer: Any, number: int, count: int, offsets: Any) -> bytes:
    try:
        return get_frame(buffer, number - 1, number_of_frames=count, extended_offsets=offsets)
    except (ValueError, IndexError, KeyError, struct.error, EOFError) as exc:
        raise InvalidDatasetError(f"encapsulated frames unreadable: {exc}") from exc


def _native(
    path: Path, ds: Dataset, numbers: Sequence[int], frame_bits: int, ts: str
) -> Iterator[Frame]:
    raw = ds._dict.get(Tag(0x7FE00010))
    tell = getattr(raw, "value_tell", None)
    if frame_bits % 8 == 0 and tell is not None and ts != DEFLATED_LE:
        size = frame_bits // 8
        with path.open("rb") as fp:
            for n in numbers:
                fp.seek(tell + (n - 1) * size)
                yield Frame(n, fp.read(size))
        return
    pixels = bytes(ds.PixelData)
    if frame_bits % 8 == 0:
        size = frame_bits // 8
        for n in numbers:
            yield Frame(n, pixels[(n - 1) * size : n * size])
        return
    bitstream = np.unpackbits(np.frombuffer(pixels, dtype=np.uint8), bitorder="little")
    for n in numbers:
        bits = bitstream[(n - 1) * frame_bits : n * frame_bits]
        yield Frame(n, np.packbits(bits, bitorder="little").tobytes())


def read_bulkdata(path: Path, tag: int) -> bytes:
    """The value of a top-level element as encoded in the file (PS3.18 10.4.1.1.5).

    Read with a seek where the file gives the offset, so large values are not parsed.
    """
    ds = _header(path)
    raw = ds._dict.get(Tag(tag))
    if raw is None or raw.VR == "SQ":
        raise NotFoundError(f"no bulk data element {tag:08X}")
    tell = getattr(raw, "value_tell", None)
    length = getattr(raw, "length", None)
    native_file = str(ds.file_meta.TransferSyntaxUID) != DEFLATED_LE
    seekable = isinstance(raw, RawDataElement) and native_file
    if seekable and tell is not None and length is not None and length != 0xFFFFFFFF:
        with path.open("rb") as fp:
            fp.seek(tell)
            return fp.read(length)
    value = ds[Tag(tag)].value
    if isinstance(value, bytes):
        return value
    raise NotFoundError(f"element {tag:08X} is not bulk data")


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """Query parameters of a rendered request (PS3.18 8.3.5.1)."""

    media_type: str = "image/jpeg"
    quality: int = 90
    window: tuple[float, float, str] | None = None  # center, width, VOI LUT function
    viewport: tuple[int, int] | None = None  # columns, rows


def parse_window(value: str | None) -> tuple[float, float, str] | None:
    """``window=center,width[,function]`` (PS3.18 8.3.5.1.5)."""
    if not value:
        return None
    parts = value.split(",")
    if len(parts) not in (2, 3):
        raise InvalidQueryError("window must be center,width[,function]")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError as exc:
        raise InvalidQueryError("window center and width must be numbers") from exc
    function = parts[2].strip().upper() if len(parts) == 3 else "LINEAR"
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") or not math.isfinite(center):
        raise InvalidQueryError("window function must be linear, linear_exact or sigmoid")
    if not math.isfinite(width) or width <= 0:
        raise InvalidQueryError("window width must be positive")
    return center, width, function


def parse_viewport(value: str | None) -> tuple[int, int] | None:
    """``viewport=vw,vh`` (PS3.18 8.3.5.1.3; the source rectangle form is not supported)."""
    if not value:
        return None
    parts = value.split(",")
    if len(parts) != 2:
        raise InvalidQueryError("viewport must be vw,vh")
    try:
        vw, vh = int(parts[0]), int(parts[1])
    except ValueError as exc:
        raise InvalidQueryError("viewport must be two integers") from exc
    if not (1 <= vw <= 8192 and 1 <= vh <= 8192):
        raise InvalidQueryError("viewport must be between 1 and 8192")
    return vw, vh


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI LUT function to 0..255 (PS3.3 C.11.2.1.2.1, C.11.2.1.3.1)."""
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        scaled = (values - center) / width + 0.5
    else:
        w = max(width - 1.0, 1.0)
        scaled = (values - (center - 0.5)) / w + 0.5
    return np.clip(scaled, 0.0, 1.0) * 255.0


def _first(value: object) -> float:
    """The first value of a possibly multi-valued DS (Window Center/Width, PS3.3 C.11.2)."""
    if not isinstance(value, str | bytes | int | float) and hasattr(value, "__getitem__"):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _to_uint8(ds: Dataset, arr: np.ndarray, options: RenderOptions) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric.startswith("MONOCHROME"):
        values = apply_modality_lut(arr, ds).astype(np.float64)
        if options.window is not None:
            out = _window(values, *options.window)
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
            out = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
        else:
            if "VOILUTSequence" in ds:
                values = apply_voi_lut(values, ds).astype(np.float64)
            lo, hi = float(values.min()), float(values.max())
            out = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
        if photometric == "MONOCHROME1":
            out = 255.0 - out
        return np.asarray(np.round(out), dtype=np.uint8)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.dtype != np.uint8:
        top = float(arr.max()) or 1.0
        arr = np.round(arr.astype(np.float64) * (255.0 / max(top, 255.0)))
    return np.asarray(arr, dtype=np.uint8)


def _fit(arr: np.ndarray, viewport: tuple[int, int]) -> np.ndarray:
    """Scale to fit the viewport, keeping the aspect ratio (area-free nearest neighbour)."""
    rows, cols = arr.shape[:2]
    vw, vh = viewport
    scale = min(vw / cols, vh / rows)
    new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    ri = np.minimum((np.arange(new_rows) + 0.5) / scale, rows - 1).astype(np.intp)
    ci = np.minimum((np.arange(new_cols) + 0.5) / scale, cols - 1).astype(np.intp)
    fitted: np.ndarray = arr[ri][:, ci]
    return fitted


def render(path: Path, frame_number: int, options: RenderOptions) -> bytes:
    """One frame as a consumer-format image (PS3.18 8.3.5.1, 10.4.1.1.4)."""
    import imagecodecs

    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise InvalidDatasetError(f"cannot read stored instance: {type(exc).__name__}") from exc
    if "Rows" not in ds or "Columns" not in ds:
        raise NotFoundError("instance has no image to render")
    _check_numbers([frame_number], _frame_count(ds))
    try:
        arr = pixel_array(path, index=frame_number - 1)
    except (ValueError, NotImplementedError, RuntimeError, AttributeError, KeyError) as exc:
        raise InvalidDatasetError(f"cannot decode pixel data: {type(exc).__name__}") from exc
    image = _to_uint8(ds, arr, options)
    if options.viewport is not None:
        image = _fit(image, options.viewport)
    image = np.ascontiguousarray(image)
    if options.media_type == "image/png":
        return bytes(imagecodecs.png_encode(image))
    return bytes(imagecodecs.jpeg8_encode(image, level=options.quality))
