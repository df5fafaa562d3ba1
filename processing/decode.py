"""pydicom pixels → frames, for every transfer syntax the receiver accepts.

Two halves, kept apart as STYLE.md §6 asks:

* :func:`read_instance_info` reads the header only and returns an
  :class:`InstanceInfo` value (plain native little-endian files through the narrow
  reader in :mod:`processing._native_header`, everything else through pydicom with
  ``stop_before_pixels``): UIDs, the Image Pixel module (PS3.3 C.7.6.3), the
  Modality LUT (PS3.3 C.11.1), VOI LUT window presets (PS3.3 C.11.2), per-frame
  geometry (Image Plane, PS3.3 C.7.6.2, or the Multi-frame Functional Groups of
  enhanced objects, PS3.3 C.7.6.16) and, for native (uncompressed little-endian)
  pixel data, the byte offset of the Pixel Data value so that frames and row bands can
  be read without loading the file.
* :func:`iter_frames`, :func:`read_frames`, :func:`read_rows` and
  :func:`read_frame_into` decode pixels. Native data is read straight from the file
  (``memmap``, or ``preadv`` into the caller's buffer), which is what makes a 30000²
  image convertible in bounded memory; everything else goes
  through :func:`pydicom.pixels.iter_pixels`, i.e. pydicom's decoder plugins
  (pylibjpeg-libjpeg, -openjpeg, -rle, GDCM, numpy/RLE built-ins, tried in order).

What decoding guarantees, per PS3.3 C.7.6.3.1:

* YBR_FULL, YBR_FULL_422, YBR_ICT and YBR_RCT come out as RGB, interleaved
  ``(rows, columns, 3)``, whatever the Planar Configuration (0028,0006) was.
* MONOCHROME1 is *not* inverted; the interpretation is recorded so that a viewer can.
* PALETTE COLOR keeps the stored indices; the interpretation is recorded.
* The Modality LUT (Rescale Slope/Intercept, PS3.3 C.11.1.1.2) is applied only where
  the values are meant as Hounsfield units (CT, or Rescale Type ``HU``); otherwise the
  stored values are kept and slope/intercept are recorded in metadata.

Every pydicom or codec failure is translated into
:class:`core.errors.InvalidDatasetError` (STYLE.md §3), naming the SOP Instance UID,
the frame and the transfer syntax but no patient data.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from core.errors import InvalidDatasetError
from core.transfer_syntax import DECODED
from processing._native_header import read_native_header

__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "FramePlane",
    "InstanceInfo",
    "PixelLocation",
    "WindowPreset",
    "iter_frames",
    "read_frame_into",
    "read_frames",
    "read_instance_info",
    "read_rows",
]

logger = logging.getLogger(__name__)

#: Transfer syntaxes this module decodes (:data:`core.transfer_syntax.DECODED`); the
#: receiver accepts these and video, which is stored but never decoded.
ACCEPTED_TRANSFER_SYNTAXES: Final[frozenset[str]] = frozenset(DECODED)

_NATIVE_LE: Final = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
_FAST_PHOTOMETRIC: Final = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB"})
_YBR: Final = frozenset({"YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"})
_PIXEL_DATA_TAG: Final = (0x7FE0, 0x0010)
_INT16: Final = np.iinfo(np.int16)


@dataclass(frozen=True, slots=True)
class WindowPreset:
    """One VOI LUT window (Window Center/Width, PS3.3 C.11.2.1.2)."""

    center: float
    width: float
    explanation: str = ""


@dataclass(frozen=True, slots=True)
class FramePlane:
    """Geometry and Modality LUT of one frame (PS3.3 C.7.6.2 / C.7.6.16.2).

    ``position`` and ``orientation`` are ``None`` for images without patient geometry
    (CR/DX/MG/US). ``pixel_spacing`` is (row spacing, column spacing) in mm.
    """

    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    rescale_slope: float
    rescale_intercept: float


@dataclass(frozen=True, slots=True)
class PixelLocation:
    """Byte offset and length of a native little-endian Pixel Data value in its file."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """The header facts processing needs from one instance; no patient data.

    ``dtype`` is the dtype of the frames that :func:`read_frames` returns (after the
    Modality LUT where ``modality_lut_applied``), ``stored_dtype`` that of the stored
    values. ``photometric_interpretation`` is as stored; ``output_photometric`` is
    what the decoded frames are (``RGB`` for every 3-sample image).
    """

    path: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    transfer_syntax_uid: str
    rows: int
    columns: int
    number_of_frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    output_photometric: str
    planar_configuration: int
    stored_dtype: str
    dtype: str
    modality_lut_applied: bool
    rescale_type: str
    windows: tuple[WindowPreset, ...]
    frames: tuple[FramePlane, ...]
    instance_number: int | None
    acquisition_number: int | None
    frame_time_ms: float | None
    pixel_location: PixelLocation | None

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """Shape of one decoded frame: ``(rows, columns)`` or ``(rows, columns, 3)``."""
        if self.samples_per_pixel == 1:
            return (self.rows, self.columns)
        return (self.rows, self.columns, self.samples_per_pixel)

    @property
    def rescale_slope(self) -> float:
        """Rescale Slope of the first frame (PS3.3 C.11.1.1.2)."""
        return self.frames[0].rescale_slope if self.frames else 1.0

    @property
    def rescale_intercept(self) -> float:
        """Rescale Intercept of the first frame (PS3.3 C.11.1.1.2)."""
        return self.frames[0].rescale_intercept if self.frames else 0.0


# ---------------------------------------------------------------- header parsing


class _FlatHeader(dict[str, Any]):
    """Top-level values from :func:`read_native_header`, read like a ``Dataset``.

    Only what the header helpers below use: ``get``, ``in`` and attribute access.
    It never holds sequences, so the functional-group lookups find nothing, as they
    would in a pydicom ``Dataset`` without them.
    """

    def __getattr__(self, keyword: str) -> Any:
        try:
            return self[keyword]
        except KeyError:
            raise AttributeError(keyword) from None


_Header = Dataset | _FlatHeader


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        seq = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return tuple(seq) if len(seq) == n and all(math.isfinite(v) for v in seq) else None


def _first_item(ds: _Header | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _lookup(keyword: str, seq_keyword: str, *sources: _Header | None) -> Any:
    """Return ``keyword`` from the first functional group macro that has it."""
    for src in sources:
        item = _first_item(src, seq_keyword)
        if item is not None and keyword in item and item[keyword].value not in (None, ""):
            return item[keyword].value
    return None


def _frame_planes(ds: _Header, frames: int) -> tuple[FramePlane, ...]:
    """Per-frame geometry and rescale, from functional groups or the top level."""
    top_slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    top_intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    top_pos = _floats(ds.get("ImagePositionPatient"), 3)
    top_ori = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    top_ps = _floats(spacing, 2)
    top_thick = float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None

    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if shared is None and not per_frame:
        plane = FramePlane(top_pos, top_ori, top_ps, top_thick, top_slope, top_intercept)  # type: ignore[arg-type]
        return (plane,) * frames

    planes = []
    for i in range(frames):
        pf = per_frame[i] if per_frame and i < len(per_frame) else None
        pos = _lookup("ImagePositionPatient", "PlanePositionSequence", pf, shared)
        ori = _lookup("ImageOrientationPatient", "PlaneOrientationSequence", pf, shared)
        ps = _lookup("PixelSpacing", "PixelMeasuresSequence", pf, shared)
        th = _lookup("SliceThickness", "PixelMeasuresSequence", pf, shared)
        slope = _lookup("RescaleSlope", "PixelValueTransformationSequence", pf, shared)
        icpt = _lookup("RescaleIntercept", "PixelValueTransformationSequence", pf, shared)
        planes.append(
            FramePlane(
                _floats(pos, 3) if pos is not None else top_pos,  # type: ignore[arg-type]
                _floats(ori, 6) if ori is not None else top_ori,  # type: ignore[arg-type]
                _floats(ps, 2) if ps is not None else top_ps,  # type: ignore[arg-type]
                float(th) if th is not None else top_thick,
                float(slope) if slope is not None else top_slope,
                float(icpt) if icpt is not None else top_intercept,
            )
        )
    return tuple(planes)


def _rescale_type(ds: _Header) -> str:
    value = ds.get("RescaleType")
    if value is None:
        value = _lookup(
            "RescaleType",
            "PixelValueTransformationSequence",
            _first_item(ds, "SharedFunctionalGroupsSequence"),
        )
    return str(value or "")


def _windows(ds: _Header) -> tuple[WindowPreset, ...]:
    src: _Header | None = ds
    if "WindowCenter" not in ds:
        src = _first_item(_first_item(ds, "SharedFunctionalGroupsSequence"), "FrameVOILUTSequence")
        if src is None:
            pf = ds.get("PerFrameFunctionalGroupsSequence")
            src = _first_item(pf[0], "FrameVOILUTSequence") if pf else None
    if src is None or "WindowCenter" not in src or "WindowWidth" not in src:
        return ()

    def _list(v: Any) -> list[Any]:
        return list(v) if isinstance(v, Sequence) and not isinstance(v, str) else [v]

    centers = _list(src.WindowCenter)
    widths = _list(src.WindowWidth)
    expl = _list(src.get("WindowCenterWidthExplanation", [""] * len(centers)))
    presets = []
    for i, (c, w) in enumerate(zip(centers, widths, strict=False)):
        try:
            presets.append(WindowPreset(float(c), float(w), str(expl[i]) if i < len(expl) else ""))
        except (TypeError, ValueError):
            continue
    return tuple(presets)


def _stored_dtype(ds: _Header) -> np.dtype[Any]:
    if "FloatPixelData" in ds:
        return np.dtype(np.float32)
    if "DoubleFloatPixelData" in ds:
        return np.dtype(np.float64)
    bits = int(ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if bits == 1:
        return np.dtype(np.uint8)
    if bits not in (8, 16, 32, 64):
        raise InvalidDatasetError(f"Bits Allocated {bits} is not supported (PS3.5 8.1.1)")
    return np.dtype(f"{'i' if signed else 'u'}{bits // 8}")


def _output_dtype(
    stored: np.dtype[Any], bits_stored: int, signed: bool, planes: Sequence[FramePlane]
) -> np.dtype[Any]:
    """Dtype that holds stored values after the Modality LUT (PS3.3 C.11.1.1.2).

    Integral slope and intercept give int16 (the HU range, PS3.3 C.8.2.1.1.6 extended
    CT scale included); out-of-range values are clipped and reported by the reader.
    """
    if stored.kind == "f":
        return np.dtype(np.float32)
    integral = all(
        float(p.rescale_slope).is_integer() and float(p.rescale_intercept).is_integer()
        for p in planes
    )
    if not integral:
        return np.dtype(np.float32)
    del bits_stored, signed  # The output range is fixed at int16 (see docstring).
    return np.dtype(np.int16)




def _checked_location(offset: int, length: int, size: int, expected: int) -> PixelLocation:
    available = max(0, min(length, size - offset))
    if available < expected:
        raise InvalidDatasetError(
            f"truncated pixel data: {available} of {expected} bytes present (PS3.5 8.1.1)"
        )
    return PixelLocation(offset, length)


def _native_location(fp: Any, ts: str, expected: int) -> PixelLocation | None:
    """Parse the Pixel Data element header at the file position after the header."""
    if ts not in _NATIVE_LE:
        return None
    pos = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return None
    group, elem = struct.unpack("<HH", head[:4])
    if (group, elem) != _PIXEL_DATA_TAG:
        return None
    if ts == ImplicitVRLittleEndian:  # implicit VR: tag, 4-byte length
        (length,) = struct.unpack("<I", head[4:8])
        offset = pos + 8
    else:  # explicit VR OB/OW: tag, VR, 2 reserved, 4-byte length
        (length,) = struct.unpack("<I", head[8:12])
        offset = pos + 12
    if length == 0xFFFFFFFF:
        return None
    return _checked_location(offset, length, os.fstat(fp.fileno()).st_size, expected)


@dataclass(frozen=True, slots=True)
class _PixelModule:
    """The Image Pixel module values every reader checks (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    samples: int
    bits: int
    frames: int
    stored: np.dtype[Any]
    photometric: str
    #: Bytes of pixel data the module implies.
    expected: int


def _pixel_module(ds: _Header, ts: str) -> _PixelModule:
    if not ts:
        raise InvalidDatasetError("no Transfer Syntax UID in the file meta (PS3.10 7.1)")
    if ts not in ACCEPTED_TRANSFER_SYNTAXES:
        raise InvalidDatasetError(f"unsupported transfer syntax {UID(ts).name} ({ts})")
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel",
                    "PhotometricInterpretation"):
        if keyword not in ds:
            raise InvalidDatasetError(f"missing {keyword} (PS3.3 C.7.6.3)")
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.SamplesPerPixel)
    bits = int(ds.BitsAllocated)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise InvalidDatasetError("invalid Number of Frames (PS3.3 C.7.6.6)") from exc
    stored = _stored_dtype(ds)
    photometric = str(ds.PhotometricInterpretation).strip()
    expected = (rows * cols * spp * frames * bits + 7) // 8
    if photometric == "YBR_FULL_422":  # 2 luma + 2 chroma per 2 pixels
        expected = expected * 2 // 3
    return _PixelModule(rows, cols, spp, bits, frames, stored, photometric, expected)


def _read_with_pydicom(path: str) -> tuple[Dataset, str, _PixelModule, PixelLocation | None]:
    with open(path, "rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        module = _pixel_module(ds, ts)
        location = _native_location(fp, ts, module.expected)
        if location is None and ts in _NATIVE_LE:
            # Not followed by a plain Pixel Data element: let pydicom find it.
            fp.seek(0)
            full = pydicom.dcmread(fp)
            if not any(k in full for k in ("PixelData", "FloatPixelData",
                                           "DoubleFloatPixelData")):
                raise InvalidDatasetError("no Pixel Data (7FE0,0010) in the dataset")
    return ds, ts, module, location


def read_instance_info(path: str | os.PathLike[str]) -> InstanceInfo:
    """Read one Part-10 file's header and describe its pixels.

    Plain native little-endian files are read by a narrow header reader
    (:mod:`processing._native_header`, ~10× faster than pydicom); everything else,
    and anything that reader declines, by pydicom. Both give the same result.

    Parameters
    ----------
    path
        A DICOM Part-10 file (PS3.10 7.1).

    Returns
    -------
    InstanceInfo
        The header summary; the pixel data itself is not read.

    Raises
    ------
    InvalidDatasetError
        The file is not DICOM, has no pixel data, misses a required Image Pixel
        attribute (PS3.3 C.7.6.3), uses a transfer syntax we do not accept, or its
        native pixel data is shorter than Rows × Columns × Samples × Frames requires.
    """
    path = os.fspath(path)
    ds: _Header
    try:
        native = read_native_header(path)
        if native is not None:
            ds, ts = _FlatHeader(native.values), native.transfer_syntax_uid
            module = _pixel_module(ds, ts)
            location: PixelLocation | None = _checked_location(
                native.pixel_offset, native.pixel_length, native.file_size, module.expected)
        else:
            ds, ts, module, location = _read_with_pydicom(path)
    except InvalidDatasetError as exc:
        raise InvalidDatasetError(f"{Path(path).name}: {exc}") from exc
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError,
            AttributeError, KeyError, struct.error, zlib.error) as exc:
        raise InvalidDatasetError(f"{Path(path).name}: unreadable DICOM header ({exc})") from exc

    rows, cols, spp, bits = module.rows, module.columns, module.samples, module.bits
    frames, stored, photometric = module.frames, module.stored, module.photometric
    planes = _frame_planes(ds, frames)
    rescale_type = _rescale_type(ds)
    modality = str(ds.get("Modality", "") or "")
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    apply_lut = spp == 1 and (modality == "CT" or rescale_type == "HU") and photometric.startswith(
        "MONOCHROME"
    )
    out_dtype = (
        _output_dtype(stored, int(ds.get("BitsStored", bits)), signed, planes)
        if apply_lut
        else stored
    )
    frame_time = ds.get("FrameTime")
    inst = ds.get("InstanceNumber")
    acq = ds.get("AcquisitionNumber")
    return InstanceInfo(
        path=path,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        modality=modality,
        transfer_syntax_uid=ts,
        rows=rows,
        columns=cols,
        number_of_frames=frames,
        samples_per_pixel=spp,
        bits_allocated=bits,
        bits_stored=int(ds.get("BitsStored", bits)),
        pixel_representation=int(ds.get("PixelRepresentation", 0)),
        photometric_interpretation=photometric,
        output_photometric="RGB" if spp == 3 else photometric,
        planar_configuration=int(ds.get("PlanarConfiguration", 0) or 0),
        stored_dtype=stored.str,
        dtype=out_dtype.str,
        modality_lut_applied=apply_lut,
        rescale_type=rescale_type,
        windows=_windows(ds),
        frames=planes,
        instance_number=int(inst) if inst not in (None, "") else None,
        acquisition_number=int(acq) if acq not in (None, "") else None,
        frame_time_ms=float(frame_time) if frame_time not in (None, "") else None,
        pixel_location=location,
    )


# ---------------------------------------------------------------- pixel decoding


def _apply_lut(info: InstanceInfo, frame: np.ndarray, index: int) -> np.ndarray:
    """Apply the Modality LUT of frame ``index`` when ``info`` says so (PS3.3 C.11.1)."""
    if not info.modality_lut_applied:
        # Big-endian sources decode to '>' dtypes; frames are always native order.
        return frame.astype(np.dtype(info.dtype).newbyteorder("="), copy=False)
    plane = info.frames[index] if index < len(info.frames) else info.frames[0]
    out = np.dtype(info.dtype)
    slope, icpt = plane.rescale_slope, plane.rescale_intercept
    if out.kind == "f":
        return (frame.astype(np.float32) * np.float32(slope) + np.float32(icpt)).astype(out)
    if slope == 1.0 and frame.dtype == np.int16 and icpt == 0.0:
        return frame
    wide = frame.astype(np.int32)
    if slope != 1.0:
        wide *= int(slope)
    if icpt != 0.0:
        wide += int(icpt)
    # int16 holds the HU range; only padding-like values can fall outside it.
    np.clip(wide, _INT16.min, _INT16.max, out=wide)
    return wide.astype(np.int16)


def _fail(info: InstanceInfo, index: int | str, exc: BaseException) -> InvalidDatasetError:
    name = UID(info.transfer_syntax_uid).name
    return InvalidDatasetError(
        f"instance {info.sop_instance_uid}: cannot decode frame {index} "
        f"({name}): {exc}"
    )


def _native_rows(
    info: InstanceInfo, index: int, row_start: int, row_stop: int, col_start: int, col_stop: int
) -> np.ndarray:
    """Read a row/column window of one frame of native little-endian data."""
    loc = info.pixel_location
    assert loc is not None
    dtype = np.dtype(info.stored_dtype).newbyteorder("<")
    rows, cols, spp = info.rows, info.columns, info.samples_per_pixel
    frame_items = rows * cols * spp
    start = loc.offset + index * frame_items * dtype.itemsize
    mm = np.memmap(info.path, dtype=dtype, mode="r", offset=start, shape=(frame_items,))
    try:
        if spp == 1:
            band = mm.reshape(rows, cols)[row_start:row_stop, col_start:col_stop]
        elif info.planar_configuration == 0:
            band = mm.reshape(rows, cols, spp)[row_start:row_stop, col_start:col_stop]
        else:
            band = np.moveaxis(
                mm.reshape(spp, rows, cols)[:, row_start:row_stop, col_start:col_stop], 0, -1
            )
        return np.array(band, dtype=dtype.newbyteorder("="), copy=True)
    finally:
        del mm


def _fast_path(info: InstanceInfo) -> bool:
    return (
        info.pixel_location is not None
        and info.bits_allocated in (8, 16, 32)
        and info.photometric_interpretation in _FAST_PHOTOMETRIC
        and info.stored_dtype[1] in "iu"
    )


def _mask_unused_bits(info: InstanceInfo, frame: np.ndarray) -> np.ndarray:
    """Keep only Bits Stored of each value, as pydicom does (PS3.5 8.1.1)."""
    bits, stored = info.bits_allocated, info.bits_stored
    if stored >= bits or frame.dtype.kind not in "iu":
        return frame
    if info.pixel_representation == 1:
        shift = bits - stored
        return (frame << shift) >> shift  # sign-extend from the high bit
    masked: np.ndarray = frame & np.array((1 << stored) - 1, dtype=frame.dtype)
    return masked


def _rescale_in_place(info: InstanceInfo, out: np.ndarray, index: int) -> bool:
    """Apply an integral Modality LUT to 16-bit stored values in ``out`` itself.

    ``out`` is the int16 output buffer holding the stored bits. When every stored
    value plus the intercept fits in int16, wrapping int16 addition gives the exact
    result (two's complement: the bits of ``v + c`` do not depend on whether ``v`` was
    read as signed or unsigned), so one in-place add replaces the widen, add, clip and
    narrow of :func:`_apply_lut`. Returns ``False`` when that does not hold; the
    caller then takes the general path.
    """
    plane = info.frames[index] if index < len(info.frames) else info.frames[0]
    slope, icpt = plane.rescale_slope, plane.rescale_intercept
    if slope != 1.0 or not _INT16.min <= icpt <= _INT16.max:
        return False
    stored = out.view(np.dtype(info.stored_dtype).newbyteorder("="))
    # Bits Stored bounds the (already masked) values; look at the data only on the
    # side where that bound could overflow, usually one pass or none.
    bits = info.bits_stored if 0 < info.bits_stored < info.bits_allocated else info.bits_allocated
    signed = stored.dtype.kind == "i"
    lowest = -(1 << (bits - 1)) if signed else 0
    highest = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    if lowest + icpt < _INT16.min and int(stored.min()) + icpt < _INT16.min:
        return False
    if highest + icpt > _INT16.max and int(stored.max()) + icpt > _INT16.max:
        return False
    if icpt:
        out += np.int16(icpt)
    return True


def read_frame_into(
    info: InstanceInfo,
    index: int,
    out: np.ndarray,
    rows: slice | None = None,
    columns: slice | None = None,
) -> bool:
    """Decode frame ``index`` (or a window of it) of native data straight into ``out``.

    The file bytes are read into ``out`` itself (no intermediate copy and no memory
    map, whose page faults serialise threads on the process's mapping lock): whole
    frames and full-width row bands with one read, narrower windows with one read
    per row. Bits Stored masking and the Modality LUT are then applied in place.
    This is the hot path of CT series and large 2-D images; the result equals
    :func:`read_frames` (or :func:`read_rows` for a window).

    Parameters
    ----------
    info
        From :func:`read_instance_info`.
    index
        Frame number, 0-based.
    out
        C-contiguous, dtype ``info.dtype``, shape of the window (``info.frame_shape``
        for a whole frame).
    rows, columns
        The window (step 1); ``None`` means all rows or all columns.

    Returns
    -------
    bool
        ``False`` (and ``out`` untouched) when this frame needs the general decoder:
        compressed or big-endian data, planar RGB, float output, or stored and output
        dtypes of different sizes. Use :func:`read_frames` or :func:`read_rows` then.

    Raises
    ------
    InvalidDatasetError
        The file is shorter than the frame.
    """
    r0, r1, _ = (rows or slice(None)).indices(info.rows)
    c0, c1, _ = (columns or slice(None)).indices(info.columns)
    out_dtype = np.dtype(info.dtype)
    stored = np.dtype(info.stored_dtype)
    if not (
        _fast_path(info)
        and sys.byteorder == "little"
        and (info.samples_per_pixel == 1 or info.planar_configuration == 0)
        and out.shape == (r1 - r0, c1 - c0, *info.frame_shape[2:])
        and out.dtype == out_dtype.newbyteorder("=")
        and out.flags.c_contiguous
        and out_dtype.kind in "iu"
        and stored.itemsize == out_dtype.itemsize
        and (not info.modality_lut_applied or out_dtype.itemsize == 2)
    ):
        return False
    loc = info.pixel_location
    assert loc is not None
    pixel = info.samples_per_pixel * stored.itemsize
    row_bytes = info.columns * pixel
    start = loc.offset + index * info.rows * row_bytes + r0 * row_bytes + c0 * pixel
    try:
        with open(info.path, "rb", buffering=0) as fp:
            if c1 - c0 == info.columns or r1 - r0 <= 1:
                got = os.preadv(fp.fileno(), [out.data.cast("B")], start)
            else:
                got = sum(os.preadv(fp.fileno(), [out[r].data.cast("B")], start + r * row_bytes)
                          for r in range(r1 - r0))
    except OSError as exc:
        raise _fail(info, index, exc) from exc
    if got != out.nbytes:
        raise _fail(info, index, ValueError(f"{got} of {out.nbytes} bytes present"))
    view = out.view(stored.newbyteorder("="))
    if info.bits_stored < info.bits_allocated:
        # Same as _mask_unused_bits, in place.
        if info.pixel_representation == 1:
            shift = info.bits_allocated - info.bits_stored
            np.left_shift(view, shift, out=view)
            np.right_shift(view, shift, out=view)
        else:
            np.bitwise_and(view, (1 << info.bits_stored) - 1, out=view)
    if info.modality_lut_applied and not _rescale_in_place(info, out, index):
        out[...] = _apply_lut(info, view.copy(), index)
    return True


def read_frames(info: InstanceInfo, indices: Iterable[int]) -> Iterator[np.ndarray]:
    """Yield decoded frames ``indices`` (ascending) of one instance.

    Parameters
    ----------
    info
        From :func:`read_instance_info`.
    indices
        Frame numbers, 0-based, in ascending order.

    Yields
    ------
    numpy.ndarray
        ``(rows, columns)`` or ``(rows, columns, 3)`` RGB, dtype ``info.dtype``.

    Raises
    ------
    InvalidDatasetError
        The pixel data cannot be decoded (truncated, corrupt, no decoder).
    """
    wanted = sorted(set(indices))
    if not wanted:
        return
    if _fast_path(info):
        for i in wanted:
            try:
                frame = _native_rows(info, i, 0, info.rows, 0, info.columns)
            except (OSError, ValueError) as exc:
                raise _fail(info, i, exc) from exc
            yield _apply_lut(info, _mask_unused_bits(info, frame), i)
        return
    yielded = 0
    errors: list[str] = []
    for strategy in (_decode_streaming, _decode_dataset, _decode_imagecodecs):
        try:
            for pos, frame in enumerate(strategy(info, wanted)):
                if pos >= yielded:  # a fallback restarts at frame 0: skip what we gave
                    yield _apply_lut(info, frame, wanted[pos])
                    yielded += 1
        except _NotApplicableError:
            continue
        except Exception as exc:  # pydicom and codec plugins raise many types
            logger.debug("%s failed on %s: %s", strategy.__name__, info.sop_instance_uid, exc)
            errors.append(str(exc))
            last: BaseException = exc
            continue
        if yielded == len(wanted):
            return
        errors.append("fewer frames than Number of Frames")
        last = ValueError(errors[-1])
    index = wanted[yielded] if yielded < len(wanted) else "?"
    raise _fail(info, index, ValueError(errors[0] if errors else "no decoder")) from last


class _NotApplicableError(Exception):
    """A decoding strategy that does not apply to this transfer syntax."""


def _decode_streaming(info: InstanceInfo, wanted: list[int]) -> Iterator[np.ndarray]:
    # pydicom reads frame by frame from the file; it cannot inflate Deflate files.
    if info.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        raise _NotApplicableError
    yield from iter_pixels(info.path, indices=wanted, as_rgb=True)


def _decode_dataset(info: InstanceInfo, wanted: list[int]) -> Iterator[np.ndarray]:
    # Some files (odd Basic Offset Tables, deflated datasets) only decode from a
    # fully parsed Dataset; this holds the whole pixel data in memory.
    ds = pydicom.dcmread(info.path)
    yield from iter_pixels(ds, indices=wanted, as_rgb=True)


_IMAGECODECS: Final[dict[str, str]] = {
    JPEGBaseline8Bit: "jpeg8_decode",
    JPEGExtended12Bit: "jpeg8_decode",
    JPEGLossless: "ljpeg_decode",
    JPEGLosslessSV1: "ljpeg_decode",
    JPEGLSLossless: "jpegls_decode",
    JPEGLSNearLossless: "jpegls_decode",
    JPEG2000Lossless: "jpeg2k_decode",
    JPEG2000: "jpeg2k_decode",
    HTJ2KLossless: "htj2k_decode",
    HTJ2KLosslessRPCL: "htj2k_decode",
    HTJ2K: "htj2k_decode",
}


def _decode_imagecodecs(info: InstanceInfo, wanted: list[int]) -> Iterator[np.ndarray]:
    # Last resort for encapsulated data that pydicom's plugins refuse (e.g. 12-bit
    # JPEG Extended streams libjpeg rejects): imagecodecs' libjpeg-turbo, CharLS,
    # OpenJPEG and OpenJPH builds.
    name = _IMAGECODECS.get(info.transfer_syntax_uid)
    if name is None:
        raise _NotApplicableError
    import imagecodecs
    from pydicom.encaps import generate_frames

    decode = getattr(imagecodecs, name)
    ds = pydicom.dcmread(info.path)
    want = set(wanted)
    dtype = np.dtype(info.stored_dtype)
    for i, data in enumerate(generate_frames(ds.PixelData, number_of_frames=info.number_of_frames)):
        if i in want:
            frame = np.asarray(decode(data))
            if frame.shape != info.frame_shape:
                raise ValueError(f"decoded shape {frame.shape} != {info.frame_shape}")
            yield frame.astype(dtype, copy=False)


def iter_frames(path: str | os.PathLike[str] | InstanceInfo) -> Iterator[np.ndarray]:
    """Yield every frame of one instance, one at a time (streaming).

    Parameters
    ----------
    path
        A Part-10 file, or its :class:`InstanceInfo`.

    Yields
    ------
    numpy.ndarray
        Frames as :func:`read_frames` describes.
    """
    info = path if isinstance(path, InstanceInfo) else read_instance_info(path)
    yield from read_frames(info, range(info.number_of_frames))


def read_rows(
    info: InstanceInfo,
    index: int,
    rows: slice,
    columns: slice | None = None,
) -> np.ndarray:
    """Return a window of one frame, reading only those bytes for native data.

    Compressed frames are decoded whole and then cut, so memory is one frame.

    Parameters
    ----------
    info
        From :func:`read_instance_info`.
    index
        Frame number, 0-based.
    rows, columns
        The window; ``columns=None`` means all columns.
    """
    r0, r1, _ = rows.indices(info.rows)
    c0, c1, _ = (columns or slice(None)).indices(info.columns)
    if _fast_path(info):
        try:
            band = _native_rows(info, index, r0, r1, c0, c1)
        except (OSError, ValueError) as exc:
            raise _fail(info, index, exc) from exc
        return _apply_lut(info, _mask_unused_bits(info, band), index)
    frame = next(read_frames(info, [index]))
    return np.ascontiguousarray(frame[r0:r1, c0:c1])
