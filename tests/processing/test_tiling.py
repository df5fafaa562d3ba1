"""processing.tiling end to end: stores validate, level 0 is bit-exact, failures isolate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zarr
from ome_zarr_models.v05.image import Image
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from core.errors import InvalidDatasetError
from core.synthetic import write_projection_image
from processing.pyramid import downsample
from processing.tiling import ConversionResult, convert_instance, convert_series


def _validate(result: ConversionResult) -> None:
    """Every image group is valid OME-Zarr 0.5 (ome-zarr-models)."""
    for img in result.images:
        group = zarr.open_group(img.path, mode="r")
        model = Image.from_zarr(group)
        assert model.attributes.ome.version == "0.5"
        axes = [a.name for a in model.attributes.ome.multiscales[0].axes]
        assert tuple(axes) == img.axes
        for level in range(img.levels):
            arr = zarr.open_array(f"{img.path}/{level}", mode="r")
            assert tuple(arr.metadata.dimension_names) == img.axes


def _hu(paths: list[Path]) -> np.ndarray:
    """pydicom's decoded pixels after the Modality LUT, sorted along the normal (+z)."""
    dss = sorted((pydicom.dcmread(p) for p in paths),
                 key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                     for d in dss]).astype(np.int16)


def test_series_level0_is_bit_exact_and_valid(ct_paths: list[Path], tmp_path: Path) -> None:
    out = str(tmp_path / "ct.zarr")
    result = convert_series(ct_paths, out)
    _validate(result)
    (img,) = result.images
    assert img.kind == "volume" and img.axes == ("z", "y", "x") and img.dtype == "int16"
    assert img.shape == (40, 96, 80) and result.levels == 1 and not result.failed_instances
    level0 = zarr.open_array(f"{out}/0/0", mode="r")[:]
    np.testing.assert_array_equal(level0, _hu(ct_paths))
    attrs = zarr.open_group(f"{out}/0", mode="r").attrs.asdict()
    ds = pydicom.dcmread(ct_paths[0])
    assert attrs["pacslab"]["series_instance_uid"] == ds.SeriesInstanceUID
    assert attrs["pacslab"]["rescale"] == {"slope": 1.0, "intercept": -1024.0, "type": "HU",
                                           "applied": True}
    assert attrs["pacslab"]["windows"][1] == {"center": -600.0, "width": 1500.0,
                                              "explanation": "LUNG"}
    assert len(attrs["pacslab"]["sop_instance_uids"]) == 40
    scale = attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert scale[0]["scale"] == pytest.approx([1.25, 0.7, 0.7])
    assert scale[1]["translation"] == pytest.approx([img.origin[2], img.origin[1],
                                                     img.origin[0]])


def test_multi_level_volume_levels_are_means(tmp_path: Path) -> None:
    from core.synthetic import write_ct_series

    paths = write_ct_series(tmp_path / "big", slices=70, rows=300, columns=520)
    out = str(tmp_path / "v.zarr")
    result = convert_series(paths, out)
    _validate(result)
    assert result.levels == 3
    l0, l1, l2 = (zarr.open_array(f"{out}/0/{k}", mode="r")[:] for k in range(3))
    np.testing.assert_array_equal(l0, _hu(paths))
    np.testing.assert_array_equal(l1, downsample(l0, (2, 2, 2)))
    np.testing.assert_array_equal(l2, downsample(l1, (2, 2, 2)))


def test_bad_instances_are_reported_and_the_rest_converts(ct_paths: list[Path],
                                                          tmp_path: Path) -> None:
    truncated, undecodable = sorted(ct_paths)[0], sorted(ct_paths)[9]  # 0: no gap
    truncated.write_bytes(truncated.read_bytes()[:-500])
    ds = pydicom.dcmread(undecodable)
    ds.compress(RLELossless)
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 200])  # garbage RLE segment
    ds.save_as(undecodable)
    bad_uid = ds.SOPInstanceUID

    result = convert_series(ct_paths, str(tmp_path / "ct.zarr"))
    _validate(result)
    reasons = dict(result.failed_instances)
    assert "truncated pixel data" in reasons[truncated.name]
    assert "cannot decode frame 0 (RLE Lossless)" in reasons[bad_uid]
    assert result.images[0].shape == (39, 96, 80)  # the truncated one has no header geometry

    with pytest.raises(InvalidDatasetError, match="truncated pixel data"):
        convert_instance(truncated, str(tmp_path / "one.zarr"))
    with pytest.raises(InvalidDatasetError, match="RLE Lossless"):
        convert_instance(undecodable, str(tmp_path / "two.zarr"))


def test_a_failed_plane_is_zero_even_in_a_recycled_block(tmp_path: Path) -> None:
    """Leaves reuse level-0 blocks; a plane that fails must not show an older shard."""
    from core.synthetic import write_ct_series

    paths = write_ct_series(tmp_path / "ct", slices=150, rows=16, columns=16)
    # Positions descend with the file number, so file i lands at z = 149 - i. One bad
    # plane in each of the two 64-slice shards: whichever leaf runs second (one
    # thread) reads into the block the first one used.
    bad = {paths[149 - z]: z for z in (10, 100)}
    uids = set()
    for path in bad:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 200])
        ds.save_as(path)
        uids.add(ds.SOPInstanceUID)
    out = str(tmp_path / "ct.zarr")
    result = convert_series(paths, out, workers=1)
    assert uids <= set(dict(result.failed_instances))
    level0 = zarr.open_array(f"{out}/0/0", mode="r")[:]
    assert not level0[sorted(bad.values())].any()
    np.testing.assert_array_equal(np.delete(level0, sorted(bad.values()), axis=0),
                                  _hu([p for p in paths if p not in bad]))


@pytest.mark.parametrize(("name", "axes", "kind"), [
    ("US1_J2KR.dcm", ("c", "y", "x"), "plane"),  # YBR_RCT → RGB
    ("RG1_UNCR.dcm", ("y", "x"), "plane"),  # MONOCHROME1 CR, 1955×1841
    ("examples_ybr_color.dcm", ("t", "c", "y", "x"), "cine"),  # US cine, 30 frames
    ("emri_small_jpeg_ls_lossless.dcm", ("t", "y", "x"), "cine"),  # MF, no plane geometry
    ("eCT_Supplemental.dcm", ("z", "y", "x"), "volume"),  # enhanced CT
])
def test_instances_of_every_kind(name: str, axes: tuple[str, ...], kind: str,
                                 testdata: Callable[[str], str], tmp_path: Path) -> None:
    src = testdata(name)
    out = str(tmp_path / "i.zarr")
    result = convert_instance(src, out)
    _validate(result)
    img = result.images[0]
    assert (img.kind, img.axes) == (kind, axes)
    level0 = zarr.open_array(f"{img.path}/0", mode="r")[:]
    ds = pydicom.dcmread(src)
    ref = ds.pixel_array
    if ds.Modality == "CT":
        ref = ref * float(ds.SharedFunctionalGroupsSequence[0]
                          .PixelValueTransformationSequence[0].RescaleSlope) + float(
            ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
            .RescaleIntercept)
    if kind == "plane" and "c" in axes:
        ref = np.moveaxis(ref, -1, 0)
    if kind == "cine" and "c" in axes:
        ref = np.moveaxis(ref, -1, 1)
    if kind == "volume":  # frames are ordered along the normal, not by frame number
        order = [p[1] for p in zarr.open_group(img.path).attrs["pacslab"]["frames"] or []]
        ref = ref[order] if order else ref
    np.testing.assert_array_equal(level0, ref.astype(level0.dtype))


def test_large_2d_image_builds_whole_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 4096, (4500, 4300), dtype=np.uint16)
    src = write_projection_image(tmp_path / "dx.dcm", 4500, 4300, lambda a, b: image[a:b])
    out = str(tmp_path / "dx.zarr")
    result = convert_instance(src, out, workers=2)
    _validate(result)
    assert result.images[0].axes == ("y", "x") and result.levels == 6
    arr0 = zarr.open_array(f"{out}/0/0", mode="r")
    assert arr0.shards == (4096, 4096) and arr0.chunks == (256, 256)
    np.testing.assert_array_equal(arr0[:], image)
    level = image[None]
    for k in range(1, result.levels):
        level = downsample(level, (1, 2, 2))
        np.testing.assert_array_equal(zarr.open_array(f"{out}/0/{k}", mode="r")[:], level[0])


def test_distributed_local_cluster(ct_paths: list[Path], tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        result = convert_series(ct_paths, str(tmp_path / "d.zarr"),
                                scheduler=cluster.scheduler_address)
    _validate(result)
    np.testing.assert_array_equal(zarr.open_array(f"{tmp_path}/d.zarr/0/0", mode="r")[:],
                                  _hu(ct_paths))
