"""The in-memory header walk (core.header) against pydicom, over real files.

Every Part-10 file of pydicom's test data and of pydicom-data is read both ways: where
the walk answers, the index record and the Pixel Data position must equal what
``dcmread`` gives (or both refuse the file the same way); where it is unsure it must
say so (None) rather than guess.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files

from core.errors import ServiceError
from core.header import HeaderValues, scan_header
from core.instance import INT_KEYWORDS, TEXT_KEYWORDS, DatasetValues, HeaderSource, record_from
from storage.staging import HEAD_BYTES, read_file_meta

_PIXEL = 0x7FE00010


def _corpus() -> list[Path]:
    files = {Path(f) for f in get_testdata_files("*")}
    return sorted(f for f in files if f.is_file() and f.stat().st_size < 64 << 20)


def _record(src: HeaderSource, ts: str) -> object:
    try:
        return record_from(src, transfer_syntax_uid=ts)
    except ServiceError as exc:
        return type(exc).__name__


def _scan(data: bytes, ts: str, head: int = HEAD_BYTES) -> HeaderValues | None:
    return scan_header(data[:head], ts, text_keywords=TEXT_KEYWORDS,
                       int_keywords=INT_KEYWORDS, complete=len(data) <= head, tail=data[-8:])


def test_walk_agrees_with_pydicom_on_every_real_file() -> None:
    answered = compared = 0
    for path in _corpus():
        raw = path.read_bytes()
        try:
            meta, offset = read_file_meta(raw[:65536])
            ts = meta[0x0010].rstrip(b"\x00 ").decode("ascii")
            ds = dcmread(path, defer_size=1024)
        except Exception:
            continue  # not a readable Part-10 file: nothing to compare with
        compared += 1
        values = _scan(raw[offset:], ts)
        if values is None:
            continue
        answered += 1
        assert _record(values, ts) == _record(DatasetValues(ds), ts), path.name
        elem = ds._dict.get(_PIXEL)
        if elem is None:
            assert values.pixel_data is None, path.name
        else:
            assert values.pixel_data is not None, path.name
            assert values.pixel_data.length == elem.length, path.name
            assert offset + values.pixel_data.value_offset == elem.value_tell, path.name
        for keyword in ("SamplesPerPixel",):
            assert values.get_int(keyword) == DatasetValues(ds).get_int(keyword), path.name
    assert compared > 100
    # The walk must carry the common case, not hand everything back to pydicom.
    print(f"walk answered {answered} of {compared} files")
    assert answered > compared * 0.7, (answered, compared)


def test_walk_is_unsure_when_the_header_is_cut_short() -> None:
    path = Path(get_testdata_files("CT_small.dcm")[0])
    raw = path.read_bytes()
    meta, offset = read_file_meta(raw)
    ts = meta[0x0010].rstrip(b"\x00 ").decode()
    data = raw[offset:]
    full = _scan(data, ts)
    assert full is not None and full.pixel_data is not None
    # Cut inside the header: the walk cannot know what follows.
    assert _scan(data, ts, head=full.pixel_data.value_offset - 40) is None


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"SQ", b"UN", b"OB", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def test_walk_skips_nested_undefined_length_sequences() -> None:
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    inner = (struct.pack("<HH2sHI", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF)
             + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
             + _explicit(0x00100010, b"PN", b"Not^Me") + item_end + seq_end)
    data = b"".join((
        _explicit(0x00080016, b"UI", b"1.2.3\x00"),
        _explicit(0x00080018, b"UI", b"1.2.3.4\x00"),
        struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF),
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF), inner, item_end, seq_end,
        _explicit(0x00100010, b"PN", b"Nguy\xe1\xbb\x85n^An"),
        _explicit(0x00080005, b"CS", b"ISO_IR 192"),  # out of order: not trusted
    ))
    assert scan_header(data, "1.2.840.10008.1.2.1", text_keywords=TEXT_KEYWORDS,
                       int_keywords=INT_KEYWORDS, complete=True) is None
    charset = _explicit(0x00080005, b"CS", b"ISO_IR 192")
    ordered = charset + data[: data.rindex(charset)]
    values = scan_header(ordered, "1.2.840.10008.1.2.1", text_keywords=TEXT_KEYWORDS,
                         int_keywords=INT_KEYWORDS, complete=True)
    assert values is not None
    assert values.get_text("PatientName") == "Nguyễn^An"  # the top level, not the nested one
    assert values.get_text("SOPInstanceUID") == "1.2.3.4"
    assert values.pixel_data is None


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"])
def test_walk_leaves_big_endian_and_deflate_to_pydicom(ts: str) -> None:
    data = _explicit(0x00080018, b"UI", b"1.2.3.4\x00")
    assert scan_header(data, ts, text_keywords=TEXT_KEYWORDS, int_keywords=INT_KEYWORDS,
                       complete=True) is None
