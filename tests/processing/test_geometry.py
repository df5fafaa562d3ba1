"""processing.geometry: pure stacking, checked against SimpleITK's series reader."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk

from core.synthetic import write_ct_series
from processing.decode import read_instance_info
from processing.geometry import PlaneRef, build_stacks
from processing.tiling import _plane_refs


def _stacks(paths: list[Path]):  # type: ignore[no-untyped-def]
    return build_stacks([r for p in paths for r in _plane_refs(read_instance_info(p))])


def _sitk(directory: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    return reader.Execute()


def _assert_matches_sitk(stack, image: sitk.Image) -> None:  # type: ignore[no-untyped-def]
    assert stack.shape == (image.GetDepth(), image.GetHeight(), image.GetWidth())
    assert stack.origin == pytest.approx(image.GetOrigin(), abs=1e-4)
    sx, sy, sz = image.GetSpacing()
    assert stack.spacing == pytest.approx((sz, sy, sx), abs=1e-4)
    d = image.GetDirection()
    columns = [(d[0], d[3], d[6]), (d[1], d[4], d[7]), (d[2], d[5], d[8])]
    for ours, theirs in zip(stack.direction, columns, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-6)


def test_shuffled_series_matches_simpleitk(ct_paths: list[Path]) -> None:
    (stack,) = _stacks(ct_paths)  # ct_paths arrive shuffled
    assert stack.kind == "volume" and not stack.gantry_tilt and stack.warnings == ()
    _assert_matches_sitk(stack, _sitk(ct_paths[0].parent))
    z = [pydicom.dcmread(stack.planes[i].key).ImagePositionPatient[2] for i in (0, 1, -1)]
    assert z[0] < z[1] < z[2]


def test_order_ignores_instance_number(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "s", slices=6, rows=16, columns=16)
    numbers = [6, 2, 5, 1, 4, 3]
    for p, n in zip(paths, numbers, strict=True):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = n
        ds.save_as(p)
    (stack,) = _stacks(paths)
    assert [p.key for p in stack.planes] == [str(p) for p in reversed(paths)]


def test_two_stacks_and_a_localizer(tmp_path: Path) -> None:
    """One series: 12 slices at 1.25 mm, 8 at 2.5 mm further on, and a coronal scout."""
    uid = pydicom.uid.generate_uid()
    study = pydicom.uid.generate_uid()
    a = write_ct_series(tmp_path / "a", slices=12, rows=32, columns=32,
                        series_instance_uid=uid, study_instance_uid=study)
    b = write_ct_series(tmp_path / "b", slices=8, rows=32, columns=32,
                        series_instance_uid=uid, study_instance_uid=study)
    for i, p in enumerate(b):
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient[2] = -100.0 - 2.5 * i
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(p)
    scout_dir = tmp_path / "scout"
    scout = write_ct_series(scout_dir, slices=1, rows=24, columns=40,
                            series_instance_uid=uid, study_instance_uid=study)[0]
    ds = pydicom.dcmread(scout)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(scout)
    paths = a + b + [scout]
    random.Random(1).shuffle(paths)

    stacks = _stacks(paths)
    assert [s.shape for s in stacks] == [(12, 32, 32), (8, 32, 32), (1, 24, 40)]
    thin, thick, loc = stacks
    assert thin.spacing[0] == pytest.approx(1.25) and thick.spacing[0] == pytest.approx(2.5)
    assert loc.direction[2] == pytest.approx((0.0, 1.0, 0.0))
    assert {p.key for p in thin.planes} == {str(p) for p in a}
    assert {p.key for p in thick.planes} == {str(p) for p in b}
    # Each stack matches what SimpleITK reads from its own files.
    for stack, files in ((thin, a), (thick, b)):
        d = tmp_path / f"only{len(files)}"
        d.mkdir()
        for f in files:
            shutil.copy(f, d / f.name)
        _assert_matches_sitk(stack, _sitk(d))


def test_gantry_tilt_is_flagged(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "t", slices=10, rows=16, columns=16)
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + i * 1.25 * math.tan(
            math.radians(15))
        ds.save_as(p)
    (stack,) = _stacks(paths)
    assert stack.gantry_tilt
    assert any("gantry tilt" in w for w in stack.warnings)
    assert stack.spacing[0] == pytest.approx(1.25)


def test_projection_image_is_a_single_plane() -> None:
    ref = PlaneRef("cr", "1.2.3", 0, 100, 80, None, None, (0.2, 0.15))
    (stack,) = build_stacks([ref])
    assert stack.kind == "plane" and stack.shape == (1, 100, 80)
    assert stack.spacing == (1.0, 0.2, 0.15)


def test_cine_uses_frame_time() -> None:
    refs = [PlaneRef("us", "1.2.3", i, 40, 50, None, None, None, 30, 33.0) for i in range(30)]
    (stack,) = build_stacks(refs)
    assert stack.kind == "cine" and stack.shape == (30, 40, 50)
    assert stack.spacing[0] == pytest.approx(0.033)
    assert any("Pixel Spacing" in w for w in stack.warnings)


def test_repeated_positions_split_into_acquisitions() -> None:
    ori = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    refs = [PlaneRef(f"{k}-{z}", f"{k}.{z}", 0, 8, 8, (0.0, 0.0, float(z)), ori, (1.0, 1.0))
            for k in range(2) for z in range(5)]
    stacks = build_stacks(refs)
    assert [s.shape[0] for s in stacks] == [5, 5]
    assert all(s.spacing[0] == pytest.approx(1.0) for s in stacks)
