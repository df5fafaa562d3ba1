"""Plan multiscale levels, chunks, shards and codecs; downsample blocks. Pure.

Rules (issue 3):

* Each level halves rows and columns until both are ≤ 256 px.
* z (slices) is halved only while the z spacing is smaller than the in-plane spacing
  after that level's in-plane halving, so thin-slice CT becomes roughly isotropic
  and thick-slice stacks keep every slice. Time (cine) is never downsampled.
* Volumes: chunks 1×256×256 inside shards 64×512×512; 2-D: 256² chunks in 4096²
  shards. A dimension smaller than the chunk gets one chunk of its own size.
* Codecs: Blosc zstd level 3 with bit shuffle for greyscale; zstd level 1 for RGB.

The shard grid is what :mod:`processing.tiling` aligns its tasks with: a shard is
only ever written whole, by one task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

__all__ = [
    "CodecSpec",
    "LevelPlan",
    "PyramidPlan",
    "codec_for",
    "downsample",
    "plan_pyramid",
]

MAX_TOP_LEVEL: Final = 256
VOLUME_CHUNK: Final = (1, 256, 256)
VOLUME_SHARD: Final = (64, 512, 512)
PLANE_CHUNK: Final = (256, 256)
PLANE_SHARD: Final = (4096, 4096)


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """Which compressor a level uses; turned into zarr codecs by the I/O shell."""

    name: Literal["blosc", "zstd"]
    level: int
    shuffle: Literal["bitshuffle", "shuffle", "noshuffle"] = "noshuffle"


@dataclass(frozen=True, slots=True)
class LevelPlan:
    """One level of the pyramid, in ``(z, y, x)`` order (``z`` = 1 for 2-D).

    ``factor`` is the cumulative downsampling relative to level 0; ``step`` the
    factor from the previous level (``(1, 1, 1)`` at level 0).
    """

    index: int
    shape: tuple[int, int, int]
    factor: tuple[int, int, int]
    step: tuple[int, int, int]
    spacing: tuple[float, float, float]
    chunks: tuple[int, int, int]
    shards: tuple[int, int, int]

    @property
    def shard_grid(self) -> tuple[int, int, int]:
        """Number of shards along each axis."""
        return tuple(math.ceil(n / s) for n, s in zip(self.shape, self.shards, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class PyramidPlan:
    """All levels of one image plus its codec."""

    levels: tuple[LevelPlan, ...]
    codec: CodecSpec
    volumetric: bool
    downsample_z: bool


def codec_for(samples_per_pixel: int) -> CodecSpec:
    """Blosc zstd 3 + bit shuffle for greyscale, zstd 1 for RGB (issue 3)."""
    if samples_per_pixel == 1:
        return CodecSpec("blosc", 3, "bitshuffle")
    return CodecSpec("zstd", 1)


def _fit(n: int, chunk: int, shard: int) -> tuple[int, int]:
    """Chunk and shard sizes along one axis of length ``n``."""
    if n <= chunk:
        return n, n
    return chunk, min(shard, math.ceil(n / chunk) * chunk)


def plan_pyramid(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    *,
    samples_per_pixel: int = 1,
    volumetric: bool = True,
    downsample_z: bool = True,
    max_top: int = MAX_TOP_LEVEL,
) -> PyramidPlan:
    """Plan the levels of one stack.

    Parameters
    ----------
    shape
        ``(z, y, x)`` of level 0; ``z`` = 1 for a single plane.
    spacing
        ``(z, y, x)`` in mm.
    samples_per_pixel
        1 for greyscale, 3 for RGB (PS3.3 C.7.6.3.1.1); selects the codec.
    volumetric
        Volume chunking (1×256² in 64×512²) rather than 2-D (256² in 4096²).
    downsample_z
        ``False`` for time axes (cine), which are never downsampled.
    max_top
        Stop once rows and columns are both ≤ this.
    """
    if min(shape) < 1:
        raise ValueError(f"empty shape {shape}")
    chunk_base = VOLUME_CHUNK if volumetric else (1, *PLANE_CHUNK)
    shard_base = VOLUME_SHARD if volumetric else (1, *PLANE_SHARD)

    def level(index: int, shp: tuple[int, int, int], factor: tuple[int, int, int],
              step: tuple[int, int, int]) -> LevelPlan:
        cs = [_fit(n, c, s) for n, c, s in zip(shp, chunk_base, shard_base, strict=True)]
        if volumetric:
            cs[0] = (1, min(shp[0], shard_base[0]))
        sp = tuple(s * f for s, f in zip(spacing, factor, strict=True))
        return LevelPlan(index, shp, factor, step, sp,  # type: ignore[arg-type]
                         tuple(c for c, _ in cs), tuple(s for _, s in cs))  # type: ignore[arg-type]

    levels = [level(0, shape, (1, 1, 1), (1, 1, 1))]
    while max(levels[-1].shape[1:]) > max_top:
        prev = levels[-1]
        zs, ys, xs = prev.spacing
        sz = 2 if (downsample_z and prev.shape[0] > 1 and zs < min(ys, xs) * 2) else 1
        step = (sz, 2 if prev.shape[1] > 1 else 1, 2 if prev.shape[2] > 1 else 1)
        shp = tuple(math.ceil(n / s) for n, s in zip(prev.shape, step, strict=True))
        factor = tuple(f * s for f, s in zip(prev.factor, step, strict=True))
        levels.append(level(len(levels), shp, factor, step))  # type: ignore[arg-type]
    return PyramidPlan(tuple(levels), codec_for(samples_per_pixel), volumetric, downsample_z)


#: Input bytes per downsampled piece: the int32 temporaries of a piece this size stay
#: in a core's L2 cache, which made a 64×512² int16 block 2.5× faster to reduce than
#: whole-block passes that stream every temporary through memory.
_PIECE_BYTES: Final = 1 << 20


def _mean_piece(block: np.ndarray, step: tuple[int, int, int]) -> np.ndarray:
    """Mean of each ``step`` cell of a small piece; edges padded by repetition."""
    pad = [(0, (-n) % s) for n, s in zip(block.shape[:3], step, strict=True)]
    pad += [(0, 0)] * (block.ndim - 3)
    if any(p[1] for p in pad):
        block = np.pad(block, pad, mode="edge")
    n = step[0] * step[1] * step[2]
    floating = block.dtype.kind == "f"
    acc_dtype: Any = np.float64 if floating else (
        np.int64 if block.dtype.itemsize >= 4 else np.int32)
    # Pairwise adds of strided views, one axis at a time: each pass halves the data,
    # several times faster than a reshape-and-sum over a 6-D view.
    acc: np.ndarray | None = None
    for axis, s in enumerate(step):
        if s == 1:
            continue
        src = block if acc is None else acc
        lo = (slice(None),) * axis + (slice(0, None, 2),)
        hi = (slice(None),) * axis + (slice(1, None, 2),)
        acc = np.add(src[lo], src[hi], dtype=acc_dtype)
    assert acc is not None
    if floating:
        return (acc / n).astype(block.dtype)
    acc += n // 2
    if n & (n - 1) == 0:  # a power of two: the shift is floor division, and cheaper
        acc >>= n.bit_length() - 1
    else:
        acc //= n
    return acc.astype(block.dtype)


def downsample(block: np.ndarray, step: tuple[int, int, int]) -> np.ndarray:
    """Mean-downsample a ``(z, y, x[, c])`` block by ``step``, keeping its dtype.

    Odd edges are padded by repeating the last plane/row/column, so an edge voxel
    is the mean of what exists. Integers are rounded half up; floats are averaged.

    Parameters
    ----------
    block
        ``(z, y, x)`` or ``(z, y, x, c)``; colour samples are averaged per channel.
    step
        Factor per spatial axis, each 1 or 2.
    """
    if step == (1, 1, 1):
        return block
    sz, sy, _ = step
    out_shape = tuple(math.ceil(n / s) for n, s in zip(block.shape[:3], step, strict=True))
    out = np.empty(out_shape + block.shape[3:], dtype=block.dtype)
    # Work in pieces of ``sz`` planes × ``band`` output rows, so that temporaries
    # stay in cache. Cutting at multiples of the step changes nothing: a piece's
    # padding happens only where the block itself ends.
    row_bytes = sz * sy * block[0, 0].nbytes
    band = max(1, _PIECE_BYTES // max(1, row_bytes))
    for oz in range(out_shape[0]):
        planes = block[oz * sz:(oz + 1) * sz]
        for oy in range(0, out_shape[1], band):
            piece = planes[:, oy * sy:(oy + band) * sy]
            out[oz, oy:oy + band] = _mean_piece(piece, step)
    return out
