"""processing.decode against pydicom's own decoding of real files of every kind."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, iter_pixels

from core.errors import InvalidDatasetError
from processing.decode import (
    iter_frames,
    read_frame_into,
    read_frames,
    read_instance_info,
    read_rows,
)

Testdata = Callable[[str], str]

# One or more files per transfer syntax and photometric interpretation in
# pydicom/pydicom-data (HTJ2K has none there: tests/processing/test_archive.py
# makes HTJ2K files and decodes them).
FILES = [
    # native: implicit / explicit little endian, big endian, deflate
    "MR_small_implicit.dcm", "CT_small.dcm", "MR_small.dcm", "MR_small_padded.dcm",
    "MR_small_bigendian.dcm", "SC_rgb_expb_16bit_2frame.dcm", "image_dfl.dcm",
    # JPEG baseline / extended / lossless
    "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm", "SC_jpeg_no_color_transform.dcm", "SC_rgb_small_odd_jpeg.dcm",
    "color3d_jpeg_baseline.dcm", "examples_ybr_color.dcm", "JPGExtended.dcm", "JPEG-LL.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_jpeg.dcm",
    # JPEG-LS
    "MR_small_jpeg_ls_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_jls_lossy_sample.dcm",
    # JPEG 2000 (YBR_RCT / YBR_ICT decode to RGB)
    "MR_small_jp2klossless.dcm", "emri_small_jpeg_2k_lossless.dcm", "693_J2KR.dcm",
    "693_J2KI.dcm", "MR2_J2KR.dcm", "RG1_J2KR.dcm", "US1_J2KR.dcm", "US1_J2KI.dcm",
    "GDCMJ2K_TextGBR.dcm", "SC_rgb_gdcm_KY.dcm", "JPEG2000.dcm",
    # RLE
    "MR_small_RLE.dcm", "emri_small_RLE.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_rle_32bit.dcm", "OBXXXX1A_rle_2frame.dcm", "rtdose_rle.dcm",
    # photometric interpretations and bit depths
    "RG1_UNCR.dcm", "RG3_UNCI.dcm", "6154",  # MONOCHROME1, 12/15/10 bits
    "OBXXXX1A.dcm", "examples_palette.dcm", "gdcm-US-ALOKA-16.dcm",  # PALETTE COLOR
    "SC_rgb.dcm", "color-pl.dcm", "color-px.dcm", "SC_rgb_32bit_2frame.dcm",  # RGB planar 0/1
    "SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm",  # YBR native
    "liver.dcm", "rtdose.dcm", "emri_small.dcm", "eCT_Supplemental.dcm", "vlut_04.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
]

# Files pydicom's decoders cannot read; ours must still decode them (fallbacks) or
# fail with InvalidDatasetError.
NO_PYDICOM_REFERENCE = {"JPEG-lossy.dcm"}


def _reference(path: str, info_lut: bool) -> list[np.ndarray]:
    """pydicom's decoded frames, with the Modality LUT where we apply it."""
    ds = pydicom.dcmread(path)
    frames = list(iter_pixels(ds))
    if not info_lut:
        return frames
    if "PerFrameFunctionalGroupsSequence" in ds:
        out = []
        for i, f in enumerate(frames):
            item = ds.PerFrameFunctionalGroupsSequence[i]
            seq = item.get("PixelValueTransformationSequence") or \
                ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
            out.append(f * float(seq[0].RescaleSlope) + float(seq[0].RescaleIntercept))
        return out
    return [apply_modality_lut(f, ds) for f in frames]


@pytest.mark.parametrize("name", FILES)
def test_frames_match_pydicom(name: str, testdata: Testdata) -> None:
    path = testdata(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = read_instance_info(path)
        ours = list(iter_frames(info))
        ref = _reference(path, info.modality_lut_applied)
    assert len(ours) == info.number_of_frames == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == info.frame_shape
        assert a.dtype == np.dtype(info.dtype)
        np.testing.assert_array_equal(a, b.astype(a.dtype) if a.dtype.kind == "f" else b)


def test_ct_gets_hounsfield_units_as_int16(testdata: Testdata) -> None:
    info = read_instance_info(testdata("CT_small.dcm"))
    assert info.modality_lut_applied and info.dtype == "<i2"
    assert info.rescale_intercept == -1024.0


def test_mr_keeps_stored_values_and_records_rescale(testdata: Testdata) -> None:
    info = read_instance_info(testdata("MR2_UNCR.dcm"))
    assert not info.modality_lut_applied
    assert info.dtype == info.stored_dtype
    assert info.rescale_slope is not None


def test_monochrome1_is_recorded_not_inverted(testdata: Testdata) -> None:
    path = testdata("RG1_UNCR.dcm")
    info = read_instance_info(path)
    assert info.photometric_interpretation == "MONOCHROME1"
    np.testing.assert_array_equal(next(iter_frames(info)), pydicom.dcmread(path).pixel_array)


def test_ybr_becomes_rgb(testdata: Testdata) -> None:
    info = read_instance_info(testdata("SC_rgb_dcmtk_+eb+cy+np.dcm"))
    assert info.photometric_interpretation == "YBR_FULL_422"
    assert info.output_photometric == "RGB"
    frame = next(iter_frames(info))
    # The test image has a pure red band at the top (pydicom's SC_rgb).
    assert frame.shape == (100, 100, 3)
    assert frame[5, 50, 0] > 240 and frame[5, 50, 1] < 15


def test_enhanced_ct_per_frame_geometry(testdata: Testdata) -> None:
    info = read_instance_info(testdata("eCT_Supplemental.dcm"))
    assert info.number_of_frames == 2
    assert info.frames[0].position != info.frames[1].position
    assert info.frames[0].orientation == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert info.modality_lut_applied and info.rescale_intercept == -1024.0


def test_window_presets_from_voi_lut(ct_paths: list[Path]) -> None:
    info = read_instance_info(ct_paths[0])
    assert [(w.center, w.width, w.explanation) for w in info.windows] == [
        (40.0, 400.0, "ABDOMEN"), (-600.0, 1500.0, "LUNG")]


def test_read_rows_is_a_window_of_the_frame(testdata: Testdata) -> None:
    for name in ("SC_rgb.dcm", "color-pl.dcm", "MR_small.dcm", "US1_J2KR.dcm"):
        info = read_instance_info(testdata(name))
        frame = next(iter_frames(info))
        band = read_rows(info, 0, slice(10, 30), slice(5, 50))
        np.testing.assert_array_equal(band, frame[10:30, 5:50])


def test_read_frames_subset_of_multiframe(testdata: Testdata) -> None:
    info = read_instance_info(testdata("emri_small_RLE.dcm"))
    every = list(iter_frames(info))
    some = list(read_frames(info, [2, 7]))
    np.testing.assert_array_equal(some[0], every[2])
    np.testing.assert_array_equal(some[1], every[7])


def test_imagecodecs_fallback_decodes_what_pydicom_cannot(testdata: Testdata) -> None:
    info = read_instance_info(testdata("JPEG-lossy.dcm"))
    frame = next(iter_frames(info))
    assert frame.shape == (1024, 256) and frame.dtype == np.uint16 and frame.max() > 0


def test_truncated_native_pixel_data_is_invalid(testdata: Testdata) -> None:
    with pytest.raises(InvalidDatasetError, match="truncated pixel data"):
        read_instance_info(testdata("MR_truncated.dcm"))


def test_undecodable_jpeg2000_is_invalid(testdata: Testdata) -> None:
    info = read_instance_info(testdata("JPEG2000-embedded-sequence-delimiter.dcm"))
    with pytest.raises(InvalidDatasetError, match=r"cannot decode frame 0 \(JPEG 2000"):
        list(iter_frames(info))


def test_truncated_encapsulated_is_invalid(tmp_path: Path, testdata: Testdata) -> None:
    src = Path(testdata("MR_small_jp2klossless.dcm")).read_bytes()
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(src[: len(src) - 2000])
    with pytest.raises(InvalidDatasetError) as exc:
        info = read_instance_info(bad)
        list(iter_frames(info))
    assert isinstance(exc.value.__cause__, Exception)


def test_not_dicom_is_invalid(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"hello")
    with pytest.raises(InvalidDatasetError, match="unreadable DICOM header"):
        read_instance_info(junk)


def test_unsupported_transfer_syntax(tmp_path: Path, testdata: Testdata) -> None:
    ds = pydicom.dcmread(testdata("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    ds.PixelData = encapsulate([ds.PixelData])
    out = tmp_path / "mpeg.dcm"
    ds.save_as(out)
    with pytest.raises(InvalidDatasetError, match="unsupported transfer syntax"):
        read_instance_info(out)


@pytest.mark.parametrize("name", FILES)
def test_read_frame_into_equals_read_frames(name: str, testdata: Testdata) -> None:
    """The in-place native reader gives the general decoder's frames, or declines."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = read_instance_info(testdata(name))
        expected = list(iter_frames(info))
    for i, frame in enumerate(expected):
        out = np.full(info.frame_shape, 7, dtype=np.dtype(info.dtype))
        if read_frame_into(info, i, out):
            np.testing.assert_array_equal(out, frame)
        else:  # declined: the buffer is left alone
            assert (out == 7).all()
    native = info.transfer_syntax_uid in {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
    if name in {"CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "SC_rgb.dcm"}:
        assert native and read_frame_into(info, 0, np.empty_like(expected[0]))


def _native_ct(tmp_path: Path, stored: np.ndarray, *, bits_stored: int,
               intercept: str) -> str:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = stored.tobytes()
    del ds.DataSetTrailingPadding  # keep Pixel Data last, as most files have it
    path = str(tmp_path / f"ct_{bits_stored}_{stored.dtype}_{intercept}.dcm")
    ds.save_as(path)
    return path


@pytest.mark.parametrize(("dtype", "bits_stored", "intercept"), [
    ("uint16", 16, "-1024"),   # unsigned CT: values above 32767 + 1024 must clip
    ("uint16", 16, "-32768"),  # large negative intercept, still in range
    ("int16", 16, "-1024"),    # signed values near -32768 must clip
    ("int16", 12, "-1024"),    # 12 bits stored, garbage in the high bits: sign-extend
    ("uint16", 12, "1000"),    # 12 bits stored unsigned: mask, then add
])
def test_read_frame_into_edge_values(tmp_path: Path, dtype: str, bits_stored: int,
                                     intercept: str) -> None:
    rng = np.random.default_rng(5)
    info_range = np.iinfo(np.dtype(dtype))
    stored = rng.integers(info_range.min, info_range.max, (16, 24), endpoint=True,
                          dtype=np.dtype(dtype))
    stored[0, :4] = [info_range.min, info_range.max, 0, -1 if dtype == "int16" else 1]
    path = _native_ct(tmp_path, stored, bits_stored=bits_stored, intercept=intercept)
    info = read_instance_info(path)
    out = np.empty(info.frame_shape, dtype=np.dtype(info.dtype))
    assert read_frame_into(info, 0, out)
    np.testing.assert_array_equal(out, next(iter_frames(info)))
    # and both equal pydicom's decode + Modality LUT, clipped to int16
    ref = apply_modality_lut(pydicom.dcmread(path).pixel_array, pydicom.dcmread(path))
    np.testing.assert_array_equal(out, np.clip(ref, -32768, 32767).astype(np.int16))


def test_read_frame_into_in_range_values_take_the_in_place_add(tmp_path: Path) -> None:
    stored = np.arange(0, 4096, dtype=np.uint16).reshape(64, 64)
    info = read_instance_info(_native_ct(tmp_path, stored, bits_stored=16,
                                         intercept="-1024"))
    out = np.empty(info.frame_shape, dtype=np.int16)
    assert read_frame_into(info, 0, out)
    np.testing.assert_array_equal(out, stored.astype(np.int32) - 1024)


def test_read_frame_into_truncated_file_is_invalid(tmp_path: Path) -> None:
    stored = np.zeros((32, 32), dtype=np.int16)
    path = _native_ct(tmp_path, stored, bits_stored=16, intercept="-1024")
    info = read_instance_info(path)
    Path(path).write_bytes(Path(path).read_bytes()[:-100])  # shrunk after the header read
    with pytest.raises(InvalidDatasetError, match="cannot decode frame 0"):
        read_frame_into(info, 0, np.empty(info.frame_shape, dtype=np.int16))


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "MR_small.dcm", "CT_small.dcm", "color-pl.dcm",
                                  "SC_rgb_32bit_2frame.dcm", "US1_J2KR.dcm"])
def test_read_frame_into_a_window_equals_read_rows(name: str, testdata: Testdata) -> None:
    info = read_instance_info(testdata(name))
    native_interleaved = name in {"SC_rgb.dcm", "MR_small.dcm", "CT_small.dcm",
                                  "SC_rgb_32bit_2frame.dcm"}
    windows = [(slice(10, 30), slice(5, 50)), (slice(3, 40), None), (slice(7, 8), slice(0, 9))]
    for frame in range(info.number_of_frames):
        for rows, columns in windows:
            expected = read_rows(info, frame, rows, columns)
            out = np.full(expected.shape, 7, dtype=expected.dtype)
            assert read_frame_into(info, frame, out, rows, columns) is native_interleaved
            np.testing.assert_array_equal(out, expected if native_interleaved else 7)
