"""processing.archive: HTJ2K lossless transcode stays valid DICOM and bit-exact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import parse_basic_offsets
from pydicom.pixels import iter_pixels

from core.errors import InvalidDatasetError
from processing.archive import HTJ2K_LOSSLESS, transcode_htj2k
from processing.decode import iter_frames, read_instance_info


@pytest.mark.parametrize("name", [
    "CT_small.dcm", "MR_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm", "MR2_J2KR.dcm",
    "SC_rgb.dcm", "US1_J2KR.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "RG1_UNCR.dcm",
    "color-pl.dcm",
])
def test_transcode_is_bit_exact(name: str, testdata: Callable[[str], str],
                                tmp_path: Path) -> None:
    src = testdata(name)
    out = transcode_htj2k(src, tmp_path / name)
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID == HTJ2K_LOSSLESS
    assert ds["PixelData"].is_undefined_length
    frames = int(ds.get("NumberOfFrames", 1))
    with open(out, "rb") as fp:  # Basic Offset Table: one offset per frame (PS3.5 A.4)
        fp.seek(ds["PixelData"].file_tell)
        offsets = parse_basic_offsets(fp)
    assert len(offsets) == frames and offsets[0] == 0
    for a, b in zip(iter_pixels(src), iter_pixels(out), strict=True):  # pydicom decodes it
        np.testing.assert_array_equal(a, b)
    # and our own decoder (HTJ2K path) gives the same frames as the original
    for a, b in zip(iter_frames(read_instance_info(src)), iter_frames(read_instance_info(out)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_synthetic_ct_transcodes(ct_paths: list[Path], tmp_path: Path) -> None:
    out = transcode_htj2k(ct_paths[0], tmp_path / "ct.dcm")
    assert out.stat().st_size < ct_paths[0].stat().st_size
    np.testing.assert_array_equal(pydicom.dcmread(out).pixel_array,
                                  pydicom.dcmread(ct_paths[0]).pixel_array)


def test_float_pixels_are_refused(testdata: Callable[[str], str], tmp_path: Path) -> None:
    with pytest.raises(InvalidDatasetError):
        transcode_htj2k(testdata("rtdose.dcm"), tmp_path / "x.dcm")  # 32-bit
