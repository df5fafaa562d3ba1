"""A narrow, fast reader for the header of plain native little-endian Part-10 files.

:func:`processing.decode.read_instance_info` needs about thirty top-level attributes
of each instance. pydicom parses and converts every element of the header, which
costs ~0.7 ms per CT slice here; for a 300-slice series that is ~0.2 s of one core,
before any pixel can be placed (the slice order needs every position), and it was
the largest serial step of a series conversion. This reader walks the elements with
:func:`core.header.walk_header` (the receiver's index read uses the same walk), which
skips what is not wanted (sequences included), and converts only the wanted values,
~10× faster.

It handles only what it can read exactly like pydicom does, and *declines*
(returns ``None``) for everything else, so that the caller falls back to pydicom:

* files with a preamble and ``DICM`` prefix (PS3.10 7.1) whose transfer syntax is
  Implicit or Explicit VR Little Endian (PS3.5 A.1, A.2); every other one, deflated
  and big endian included, declines;
* a flat header: enhanced objects (functional group sequences, PS3.3 C.7.6.16),
  Float/Double Float Pixel Data, and encapsulated or undefined-length Pixel Data
  decline;
* text values that are not plain ASCII decline (pydicom applies the Specific
  Character Set, PS3.5 6.1); so do malformed values, unexpected VRs and anything
  that does not parse.

Values are returned as pydicom returns them, up to type: US as ``int``, IS as
``int``, DS as ``float``, text stripped of trailing spaces and NULs; a value with
several items is a ``list``, an empty value is ``None``. Equality with the pydicom
path is tested on every file in ``tests/processing/test_decode.py``.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Final

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from core.errors import InvalidDatasetError
from core.header import HeaderCutShort, HeaderUnsure, walk_header
from storage.staging import read_file_meta

__all__ = ["NativeHeader", "read_native_header"]

_IMPLICIT_LE: Final = ImplicitVRLittleEndian
_EXPLICIT_LE: Final = ExplicitVRLittleEndian
_UNDEFINED: Final = 0xFFFFFFFF
#: A first read this long holds the whole header of almost every file.
_FIRST_READ: Final = 16 * 1024

#: (group, element) → (keyword, VR) of every attribute read_instance_info uses.
WANTED: Final[dict[tuple[int, int], tuple[str, str]]] = {
    (0x0008, 0x0016): ("SOPClassUID", "UI"),
    (0x0008, 0x0018): ("SOPInstanceUID", "UI"),
    (0x0008, 0x0060): ("Modality", "CS"),
    (0x0018, 0x0050): ("SliceThickness", "DS"),
    (0x0018, 0x1063): ("FrameTime", "DS"),
    (0x0018, 0x1164): ("ImagerPixelSpacing", "DS"),
    (0x0020, 0x000D): ("StudyInstanceUID", "UI"),
    (0x0020, 0x000E): ("SeriesInstanceUID", "UI"),
    (0x0020, 0x0012): ("AcquisitionNumber", "IS"),
    (0x0020, 0x0013): ("InstanceNumber", "IS"),
    (0x0020, 0x0032): ("ImagePositionPatient", "DS"),
    (0x0020, 0x0037): ("ImageOrientationPatient", "DS"),
    (0x0020, 0x0052): ("FrameOfReferenceUID", "UI"),
    (0x0028, 0x0002): ("SamplesPerPixel", "US"),
    (0x0028, 0x0004): ("PhotometricInterpretation", "CS"),
    (0x0028, 0x0006): ("PlanarConfiguration", "US"),
    (0x0028, 0x0008): ("NumberOfFrames", "IS"),
    (0x0028, 0x0010): ("Rows", "US"),
    (0x0028, 0x0011): ("Columns", "US"),
    (0x0028, 0x0030): ("PixelSpacing", "DS"),
    (0x0028, 0x0100): ("BitsAllocated", "US"),
    (0x0028, 0x0101): ("BitsStored", "US"),
    (0x0028, 0x0103): ("PixelRepresentation", "US"),
    (0x0028, 0x1050): ("WindowCenter", "DS"),
    (0x0028, 0x1051): ("WindowWidth", "DS"),
    (0x0028, 0x1052): ("RescaleIntercept", "DS"),
    (0x0028, 0x1053): ("RescaleSlope", "DS"),
    (0x0028, 0x1054): ("RescaleType", "LO"),
    (0x0028, 0x1055): ("WindowCenterWidthExplanation", "LO"),
}
#: Attributes whose presence means pydicom has to read the file.
_DECLINE: Final = frozenset(
    {
        (0x5200, 0x9229),  # Shared Functional Groups Sequence
        (0x5200, 0x9230),  # Per-frame Functional Groups Sequence
        (0x7FE0, 0x0008),  # Float Pixel Data
        (0x7FE0, 0x0009),  # Double Float Pixel Data
    }
)
WANTED_BY_TAG: Final = {(g << 16) | e: entry for (g, e), entry in WANTED.items()}
_WANTED_VR: Final = {tag: vr for tag, (_keyword, vr) in WANTED_BY_TAG.items()}
_DECLINE_TAGS: Final = frozenset((g << 16) | e for g, e in _DECLINE)


# Declining is core.header's "unsure"; a header longer than the first read is "cut short".
_DeclineError = HeaderUnsure
_ShortBufferError = HeaderCutShort


@dataclass(frozen=True, slots=True)
class NativeHeader:
    """What :func:`read_native_header` found.

    ``values`` maps keywords (see ``WANTED``) to values; ``pixel_offset`` and
    ``pixel_length`` locate the Pixel Data value in the file.
    """

    transfer_syntax_uid: str
    values: dict[str, Any]
    pixel_offset: int
    pixel_length: int
    file_size: int


def _text(raw: bytes) -> str:
    if not raw.isascii() or b"\x1b" in raw:  # non-ASCII, or ISO 2022 escapes
        raise _DeclineError
    return raw.decode("ascii")


def _convert(raw: bytes, vr: str) -> Any:
    """Decode one value as pydicom's converters do (values.py), up to type."""
    if not raw:  # pydicom's empty_value_for_VR: "" for text VRs, None for numbers
        return "" if vr in ("CS", "LO", "UI") else None
    if vr == "US":
        if len(raw) % 2:
            raise _DeclineError
        items: list[Any] = [v for (v,) in struct.iter_unpack("<H", raw)]
        return items[0] if len(items) == 1 else items
    parts = _text(raw).rstrip(" \x00").split("\\")
    if vr in ("DS", "IS"):
        if not all(p.strip() for p in parts):
            raise _DeclineError  # blank numbers: leave pydicom's quirks to pydicom
        try:
            items = [float(p) if vr == "DS" else _int_string(p) for p in parts]
        except ValueError as exc:
            raise _DeclineError from exc
        if not all(math.isfinite(v) for v in items):
            raise _DeclineError
    elif vr == "LO":
        items = [p.rstrip(" \x00") for p in parts]
    else:
        items = parts
    return items[0] if len(items) == 1 else items


def _int_string(text: str) -> int:
    # pydicom's IS accepts "12", " 12 " and integral decimals such as "12.0".
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def _parse(buf: bytes, file_size: int) -> NativeHeader:
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise _DeclineError
    try:
        meta, pos = read_file_meta(buf)  # PS3.10 7.1, the receiver's own reader
    except InvalidDatasetError as exc:
        raise (_ShortBufferError if len(buf) < file_size else _DeclineError)() from exc
    ts = _text(meta.get(0x0010, b"")).rstrip(" \x00")
    if ts not in (_IMPLICIT_LE, _EXPLICIT_LE):
        raise _DeclineError
    explicit = ts == _EXPLICIT_LE
    # The element walk (sequences skipped, VRs checked) is core.header's, shared with
    # the receiver's index read; what is done with the values is ours.
    found, pixel = walk_header(
        buf,
        implicit=not explicit,
        wanted=_WANTED_VR,
        refuse=_DECLINE_TAGS,
        start=pos,
        complete=len(buf) >= file_size,
    )
    if pixel is None or pixel.length == _UNDEFINED:
        raise _DeclineError  # no Pixel Data, or encapsulated
    if explicit and pixel.vr not in (b"OB", b"OW"):
        raise _DeclineError
    values = {}
    for tag, raw in found.items():
        keyword, dict_vr = WANTED_BY_TAG[tag]
        values[keyword] = _convert(raw, dict_vr)
    return NativeHeader(ts, values, pixel.value_offset, pixel.length, file_size)


def read_native_header(path: str) -> NativeHeader | None:
    """Read the header of a native little-endian file, or ``None`` to let pydicom.

    Never raises for a file it cannot handle, corrupt ones included: the pydicom
    path then reads it and reports what is wrong.
    """
    try:
        with open(path, "rb", buffering=0) as fp:
            size = os.fstat(fp.fileno()).st_size
            buf = fp.read(_FIRST_READ)
            try:
                return _parse(buf, size)
            except _ShortBufferError:
                if len(buf) >= size:
                    return None
                buf += fp.read()
            return _parse(buf, size)
    except (_DeclineError, _ShortBufferError, OSError, struct.error, ValueError,
            UnicodeDecodeError):
        return None
