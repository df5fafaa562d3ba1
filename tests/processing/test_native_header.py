"""The fast native header reader gives exactly what the pydicom path gives, or declines."""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

import processing.decode as decode
from core.errors import InvalidDatasetError
from core.synthetic import write_ct_series
from processing._native_header import read_native_header
from tests.processing.test_decode import FILES

Testdata = Callable[[str], str]


def _both(path: str, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """``read_instance_info`` as it runs, and with the fast reader switched off."""

    def run() -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return decode.read_instance_info(path)
            except InvalidDatasetError as exc:
                return ("InvalidDatasetError", str(exc))

    as_is = run()
    with monkeypatch.context() as m:
        m.setattr(decode, "read_native_header", lambda _path: None)
        reference = run()
    return as_is, reference


@pytest.mark.parametrize("name", [*FILES, "MR_truncated.dcm", "MR2_UNCR.dcm"])
def test_agrees_with_pydicom_on_real_files(name: str, testdata: Testdata,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = testdata(name)
    fast, reference = _both(path, monkeypatch)
    assert fast == reference
    if name in {"CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "RG1_UNCR.dcm",
                "MR_truncated.dcm"}:
        assert read_native_header(path) is not None  # these do take the fast path
    if name in {"MR_small_bigendian.dcm", "image_dfl.dcm", "JPEG2000.dcm",
                "eCT_Supplemental.dcm"}:
        assert read_native_header(path) is None  # big endian, deflate, encapsulated, enhanced


def test_agrees_on_a_synthetic_ct_series(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for path in write_ct_series(tmp_path, slices=3, rows=16, columns=16):
        assert read_native_header(str(path)) is not None
        fast, reference = _both(str(path), monkeypatch)
        assert fast == reference


def _ct(tmp_path: Path, name: str, edit: Callable[[Dataset], None], *,
        implicit: bool = False) -> str:
    (src,) = write_ct_series(tmp_path / name, slices=1, rows=8, columns=8)
    ds = pydicom.dcmread(src)
    edit(ds)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = str(tmp_path / f"{name}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def _undefined_length_sequences(ds: Dataset) -> None:
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3"
    inner.ReferencedFrameNumber = "1"
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.4"
    item.SourceImageSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    for elem in (ds["ReferencedImageSequence"], item["SourceImageSequence"]):
        elem.is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    # A wanted attribute after the sequences proves the reader found its way past them.
    ds.WindowCenterWidthExplanation = ["SOFT", "LUNG"]


def _big_private_header(ds: Dataset) -> None:
    block = ds.private_block(0x0029, "PACSLAB TEST", create=True)
    block.add_new(0x01, "OB", bytes(40_000))  # header longer than the first read
    ds.RescaleIntercept = "-1000"


def _padded_and_empty_values(ds: Dataset) -> None:
    ds.SliceThickness = None
    ds.RescaleType = ""
    ds.WindowCenter = "40 "
    ds.WindowWidth = "400"
    ds.WindowCenterWidthExplanation = "ABDOMEN "
    ds.InstanceNumber = " 7"
    ds.ImagePositionPatient = ["-1.5e1", "+2", "0.000"]


def _non_ascii_text(ds: Dataset) -> None:
    ds.WindowCenterWidthExplanation = ["MÔ MỀM", "PHỔI"]  # ISO_IR 192 (UTF-8)


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize(("name", "edit", "fast"), [
    ("sequences", _undefined_length_sequences, True),
    ("big_private", _big_private_header, True),
    ("padded", _padded_and_empty_values, True),
    ("non_ascii", _non_ascii_text, False),
])
def test_agrees_on_awkward_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   name: str, edit: Callable[[Dataset], None], fast: bool,
                                   implicit: bool) -> None:
    path = _ct(tmp_path, name, edit, implicit=implicit)
    assert (read_native_header(path) is not None) is fast
    as_is, reference = _both(path, monkeypatch)
    assert as_is == reference
    assert not isinstance(as_is, tuple)  # read, not refused


def test_un_of_undefined_length_holds_implicit_vr(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """PS3.5 6.2.2: an undefined-length UN is an implicit VR sequence."""
    path = _ct(tmp_path, "un", lambda ds: None)
    undefined = 0xFFFFFFFF
    element = (
        struct.pack("<HH2sHI", 0x0009, 0x1001, b"UN", 0, undefined)
        + struct.pack("<HHI", 0xFFFE, 0xE000, undefined)  # item, undefined length
        + struct.pack("<HHI", 0x0008, 0x0100, 4) + b"AB12"  # implicit VR element
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    # In tag order (PS3.5 7.1: ascending), before Patient's Name (0010,0010).
    raw = Path(path).read_bytes()
    at = raw.index(struct.pack("<HH2s", 0x0010, 0x0010, b"PN"))
    Path(path).write_bytes(raw[:at] + element + raw[at:])
    assert read_native_header(path) is not None
    as_is, reference = _both(path, monkeypatch)
    assert as_is == reference and not isinstance(as_is, tuple)


def test_declines_what_it_cannot_read(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 20)
    assert read_native_header(str(junk)) is None
    assert read_native_header(str(tmp_path / "missing.dcm")) is None
    bad_is = _ct(tmp_path, "bad_is", lambda ds: None)
    raw = Path(bad_is).read_bytes()
    # InstanceNumber "1" becomes "x": not a number, so pydicom decides what it means.
    tag = struct.pack("<HH2sH", 0x0020, 0x0013, b"IS", 2)
    i = raw.index(tag)
    Path(bad_is).write_bytes(raw[:i + 8] + b"x " + raw[i + 10:])
    assert read_native_header(bad_is) is None


def test_pixel_location_matches_pydicom(tmp_path: Path) -> None:
    for implicit in (False, True):
        path = _ct(tmp_path, f"loc{implicit}", lambda ds: None, implicit=implicit)
        header = read_native_header(path)
        assert header is not None
        ds = pydicom.dcmread(path)
        stored = np.frombuffer(Path(path).read_bytes()[
            header.pixel_offset:header.pixel_offset + header.pixel_length], dtype="<i2")
        np.testing.assert_array_equal(stored.reshape(8, 8), ds.pixel_array)
        assert header.transfer_syntax_uid == (ImplicitVRLittleEndian if implicit
                                              else ExplicitVRLittleEndian)
