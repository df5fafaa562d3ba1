"""processing.pyramid: level planning and downsampling (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from processing.pyramid import codec_for, downsample, plan_pyramid


def test_thin_ct_downsamples_z_while_thinner_than_in_plane() -> None:
    plan = plan_pyramid((300, 512, 512), (0.625, 0.7, 0.7))
    assert [lv.shape for lv in plan.levels] == [(300, 512, 512), (150, 256, 256)]
    assert plan.levels[1].spacing == pytest.approx((1.25, 1.4, 1.4))
    plan = plan_pyramid((300, 2048, 2048), (0.625, 0.35, 0.35))
    # in-plane 0.7 → z 0.625 < 0.7: halve; 1.4 → 1.25 < 1.4: halve; 2.8 → 2.5: halve
    assert [lv.step[0] for lv in plan.levels] == [1, 2, 2, 2]
    assert plan.levels[-1].shape == (38, 256, 256)


def test_thick_stack_keeps_every_slice() -> None:
    plan = plan_pyramid((40, 1024, 1024), (5.0, 0.5, 0.5))
    assert [lv.shape for lv in plan.levels] == [(40, 1024, 1024), (40, 512, 512), (40, 256, 256)]


def test_volume_chunks_and_shards() -> None:
    level0 = plan_pyramid((300, 512, 512), (1.0, 0.5, 0.5)).levels[0]
    assert level0.chunks == (1, 256, 256) and level0.shards == (64, 512, 512)
    small = plan_pyramid((10, 100, 700), (1.0, 0.5, 0.5)).levels[0]
    assert small.chunks == (1, 100, 256) and small.shards == (10, 100, 512)


def test_plane_chunks_and_shards_and_top_level() -> None:
    plan = plan_pyramid((1, 8192, 6000), (1.0, 0.1, 0.1), volumetric=False)
    assert plan.levels[0].chunks == (1, 256, 256)
    assert plan.levels[0].shards == (1, 4096, 4096)
    assert max(plan.levels[-1].shape[1:]) <= 256 < max(plan.levels[-2].shape[1:])
    assert all(lv.shape[0] == 1 for lv in plan.levels)


def test_codecs() -> None:
    assert codec_for(1).name == "blosc" and codec_for(1).shuffle == "bitshuffle"
    assert codec_for(1).level == 3
    assert codec_for(3).name == "zstd" and codec_for(3).level == 1


def test_downsample_mean_rounds_and_keeps_dtype() -> None:
    block = np.array([[[0, 1], [1, 1]]], dtype=np.int16)  # mean 0.75 → 1
    out = downsample(block, (1, 2, 2))
    assert out.dtype == np.int16 and out.tolist() == [[[1]]]
    neg = np.array([[[-3, -3], [-3, -2]]], dtype=np.int16)  # mean -2.75 → -3
    assert downsample(neg, (1, 2, 2)).tolist() == [[[-3]]]


def test_downsample_odd_edges_and_rgb() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)
    out = downsample(rgb, (1, 2, 2))
    assert out.shape == (1, 3, 4, 3) and out.dtype == np.uint8
    # the last column is the mean of the last column's two rows (edge replicated)
    expected = np.floor(rgb[0, 0:2, 6].astype(float).mean(axis=0) + 0.5)
    np.testing.assert_array_equal(out[0, 0, 3], expected)
    vol = rng.integers(-1024, 3000, (3, 4, 4), dtype=np.int16)
    assert downsample(vol, (2, 2, 2)).shape == (2, 2, 2)


def _whole_block_mean(block: np.ndarray, step: tuple[int, int, int]) -> np.ndarray:
    """The definition: pad by edge repetition, mean of each cell, round half up."""
    pad = [(0, (-n) % s) for n, s in zip(block.shape[:3], step, strict=True)]
    padded = np.pad(block, pad + [(0, 0)] * (block.ndim - 3), mode="edge")
    cells = padded.reshape(padded.shape[0] // step[0], step[0], padded.shape[1] // step[1],
                           step[1], padded.shape[2] // step[2], step[2], *block.shape[3:])
    mean = cells.astype(np.float64).mean(axis=(1, 3, 5))
    if block.dtype.kind == "f":
        return mean.astype(block.dtype)
    return np.floor(mean + 0.5).astype(block.dtype)


@pytest.mark.parametrize(("shape", "dtype", "step"), [
    ((64, 512, 512), np.int16, (2, 2, 2)),      # a CT shard: several pieces per plane pair
    ((7, 1031, 517), np.int16, (2, 2, 2)),      # odd in every axis, bands end mid-block
    ((1, 4097, 2050), np.uint16, (1, 2, 2)),    # a 2-D tile: many row bands
    ((5, 300, 301), np.int16, (1, 2, 2)),       # thick slices: z kept
    ((1, 999, 1001, 3), np.uint8, (1, 2, 2)),   # RGB
    ((3, 130, 66), np.float32, (2, 2, 2)),
])
def test_downsample_in_pieces_equals_the_whole_block_mean(
        shape: tuple[int, ...], dtype: type, step: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    if np.dtype(dtype).kind == "f":
        block = rng.normal(0, 100, shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        block = rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
    out = downsample(block, step)
    expected = _whole_block_mean(block, step)
    if block.dtype.kind == "f":
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    else:
        np.testing.assert_array_equal(out, expected)
