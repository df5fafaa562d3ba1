"""C-FIND response identifiers encoded straight to Little Endian bytes (PS3.5 section 7).

pynetdicom encodes every Pending identifier with pydicom's ``write_dataset``. For a
pydicom-built response that costs more than matching, SQL and the DIMSE layer
together: each element is validated and converted when it is added, then written
through a per-VR writer with a fresh buffer and charset lookup, and the Scheduled
Procedure Step Sequence recurses through all of that again. A modality's poll at
10,000 scheduled items returns ~20 entries, so this was the largest share of a
query's latency.

:func:`raw_response` writes the values of a :class:`~worklist.query.Projection`
(the same projection :func:`worklist.query.respond` turns into a Dataset, so both
answer with the same keys and values) directly as bytes, and hands pynetdicom a
Dataset of :class:`~pydicom.dataelem.RawDataElement` with matching original
encoding, which ``write_dataset`` copies without conversion. The bytes are those
pydicom would write (tests/worklist/test_worklist_wire.py compares them): defined
lengths, values padded to even length with a space (``\\0`` for UI, PS3.5 6.2),
text in the response's Specific Character Set (PS3.5 6.1; only ISO_IR 100 and
ISO_IR 192 are chosen, neither uses code extensions), and explicit VR headers with
a 4-byte length for SQ, UC, UT and the other VRs of PS3.5 Table 7.1-1.

Anything this encoder does not cover (Big Endian, an ambiguous VR such as
``US or SS`` on a requested key we do not hold, a binary VR other than the empty or
US values we hold, non-ASCII text in a VR without character set) raises
:class:`Unencodable`; the caller then answers with the pydicom Dataset.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from worklist._attributes import Node
from worklist.query import Projection

__all__ = ["Unencodable", "raw_response"]

_SPECIFIC_CHARACTER_SET = 0x00080005
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
# PS3.5 Table 7.1-1: explicit VRs with two reserved bytes and a 4-byte length.
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
# VRs whose text is in the Specific Character Set (PS3.5 6.1.2.3); the others are
# from the Default Character Repertoire.
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_BINARY = {"US": "<H", "SS": "<h", "UL": "<I", "SL": "<i", "FL": "<f", "FD": "<d"}
_CODECS = {None: "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


class Unencodable(ValueError):
    """The response needs pydicom's general encoder."""


def _value(vr: str, value: Any, codec: str, implicit: bool) -> bytes:
    if len(vr) != 2:
        # "US or SS" and the like: pydicom resolves them from the data set first.
        raise Unencodable(vr)
    if vr == "SQ":
        return b"".join(_item(item, codec, implicit) for item in value)
    if value is None or value == "":
        return b""
    if vr in _BINARY:
        if not isinstance(value, int):
            raise Unencodable(vr)
        return struct.pack(_BINARY[vr], value)
    if not isinstance(value, str):
        raise Unencodable(vr)
    text: str = value
    if vr == "PN":
        # Trailing empty component groups are insignificant (PS3.5 6.2.1) and
        # pydicom drops them: "DOE^JANE=" is written "DOE^JANE".
        text = "\\".join(v.rstrip("=") for v in text.split("\\"))
    if vr in _CHARSET_VRS:
        data = text.encode(codec)
    elif text.isascii():
        data = text.encode("ascii")
    else:
        raise Unencodable(vr)
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in _LONG_VRS:
        return head + vr.encode("ascii") + b"\0\0" + struct.pack("<I", len(value)) + value
    if len(value) > 0xFFFF:
        raise Unencodable(vr)
    return head + vr.encode("ascii") + struct.pack("<H", len(value)) + value


def _item(nodes: list[Node], codec: str, implicit: bool) -> bytes:
    body = b"".join(
        _element(tag, vr, _value(vr, value, codec, implicit), implicit)
        for tag, vr, value in sorted(nodes, key=lambda n: n[0])
    )
    return _ITEM + struct.pack("<I", len(body)) + body


def raw_response(projection: Projection, *, implicit_vr: bool) -> Dataset:
    """The response as a Dataset of raw Little Endian elements (PS3.5 7.1, 7.5).

    Parameters
    ----------
    projection : Projection
        The requested keys with the entry's values, and the charset they need.
    implicit_vr : bool
        The presentation context's transfer syntax is Implicit VR Little Endian;
        otherwise Explicit VR Little Endian (or its deflated form, which pynetdicom
        compresses after encoding).

    Raises
    ------
    Unencodable
        A value outside what this encoder writes; use ``projection.to_dataset()``.
    """
    charset = projection.charset
    try:
        codec = _CODECS[charset]
    except KeyError:
        raise Unencodable(str(charset)) from None
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    nodes = projection.nodes
    if charset is not None:
        nodes = [*nodes, (_SPECIFIC_CHARACTER_SET, "CS", charset)]
    for tag, vr, value in nodes:
        data = _value(vr, value, codec, implicit_vr)
        if not implicit_vr and vr not in _LONG_VRS and len(data) > 0xFFFF:
            raise Unencodable(vr)
        key = BaseTag(tag)
        elements[key] = RawDataElement(key, vr, len(data), data, 0, implicit_vr, True)
    # As pydicom's reader builds a dataset: from a dict of raw elements.
    ds = Dataset(elements)
    # write_dataset copies raw values only when the dataset's original encoding and
    # character set are the ones it writes with.
    ds.set_original_encoding(
        implicit_vr, True, convert_encodings(charset) if charset else default_encoding
    )
    return ds
