"""Pyramid build throughput, peak memory and tile latency (issue 3).

``pytest benchmarks --benchmark-enable`` measures at full size; the default run
(``--benchmark-disable`` in addopts) is a quick smoke run on small inputs.

(a) CT 300×512² int16: ``convert_series`` MB/s next to the codec-only limit: the
    same levels, codec, chunks and shards written from ready numpy arrays by a
    plain thread pool over shards on all cores.
(b) 8192² uint16 2-D pyramid MB/s.
(c) 30000² RGB peak RSS of a conversion in a fresh subprocess (≤ 4 GiB).
(d) random 256² tile reads from level 0: p50/p99.

``./run bench --quick`` measures at the smoke sizes, a few rounds, without (c).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from benchmarks.support import Goal, per_round, quick, record
from core.synthetic import ct_phantom_slice, write_ct_series, write_projection_image
from processing.omezarr import zarr_codecs
from processing.pyramid import downsample, plan_pyramid
from processing.tiling import convert_instance, convert_series, enable_zarrs


def _full(request: pytest.FixtureRequest) -> bool:
    opt = request.config.getoption
    return (bool(opt("benchmark_enable")) or not opt("benchmark_disable")) and not quick()


def _measured(request: pytest.FixtureRequest) -> bool:
    """Measuring, at full or at quick sizes (rounds > 1)."""
    return _full(request) or quick()


def _round_seconds(benchmark: Any) -> list[float]:
    return list(benchmark.stats.stats.data) if benchmark.stats else []


def _report(benchmark: Any, **info: Any) -> None:
    benchmark.extra_info.update(info)
    print(" ".join(f"{k}={v}" for k, v in info.items()))


def _codec_only_mb_s(levels: list[np.ndarray], out: Path) -> float:
    """Write precomputed levels shard by shard on all cores: the codec-only limit."""
    plan = plan_pyramid(levels[0].shape, (0.625, 0.7, 0.7))  # type: ignore[arg-type]
    enable_zarrs()
    start = time.perf_counter()
    arrays = [
        zarr.create_array(str(out / str(k)), shape=a.shape, dtype=a.dtype,
                          chunks=plan.levels[k].chunks, shards=plan.levels[k].shards,
                          compressors=zarr_codecs(plan.codec), fill_value=0, overwrite=True)
        for k, a in enumerate(levels)
    ]
    jobs = []
    for k, (arr, data) in enumerate(zip(arrays, levels, strict=True)):
        for index in np.ndindex(*plan.levels[k].shard_grid):
            sel = tuple(slice(i * s, (i + 1) * s)
                        for i, s in zip(index, plan.levels[k].shards, strict=True))
            jobs.append((arr, sel, data))

    def write(job: tuple[Any, tuple[slice, ...], np.ndarray]) -> None:
        arr, sel, data = job
        arr[sel] = data[sel]

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, jobs))
    return levels[0].nbytes / (time.perf_counter() - start) / 1e6


def test_ct_volume_vs_codec_limit(benchmark: Any, request: pytest.FixtureRequest,
                                  tmp_path: Path) -> None:
    slices, size = (300, 512) if _full(request) else (64, 256) if quick() else (24, 128)
    paths = write_ct_series(tmp_path / "ct", slices=slices, rows=size, columns=size)
    nbytes = slices * size * size * 2
    full = _full(request)
    # Untimed: warms both pipelines up and gives the geometry the anchor's levels need.
    result = convert_series(paths, str(tmp_path / "ct.zarr"))

    vol = np.stack([(ct_phantom_slice(size, size, i / slices)).round().astype(np.int16)
                    for i in range(slices)])
    levels = [vol]
    plan = plan_pyramid(vol.shape, result.spacing)  # type: ignore[arg-type]
    for lv in plan.levels[1:]:
        levels.append(downsample(levels[-1], lv.step))
    # Both sides are the best of several runs, and the anchor runs before and after
    # ours: on this shared machine one run of either varies by ±25 %, and the
    # machine's state drifts over the minute the test takes.
    runs = 3 if full else 2 if quick() else 1
    limits = [_codec_only_mb_s(levels, tmp_path / f"before{r}") for r in range(runs)]

    result = benchmark.pedantic(convert_series, args=(paths, str(tmp_path / "ct.zarr")),
                                rounds=5 if full else 3 if quick() else 1, iterations=1)
    ours = nbytes / benchmark.stats.stats.min / 1e6 if benchmark.stats else 0.0
    if not benchmark.stats:  # benchmark disabled: time one call ourselves
        t = time.perf_counter()
        result = convert_series(paths, str(tmp_path / "ct.zarr"))
        ours = nbytes / (time.perf_counter() - t) / 1e6
    limits += [_codec_only_mb_s(levels, tmp_path / f"after{r}") for r in range(runs)]
    limit = max(limits)
    _report(benchmark, pyramid_mb_s=round(ours), codec_limit_mb_s=round(limit),
            ratio=round(ours / limit, 3), levels=result.levels)
    case = f"CT {slices}×{size}² int16 pyramid build, MB/s"
    record(case, "pacslab", ours, "MB/s",
           rounds=[nbytes / t / 1e6 for t in _round_seconds(benchmark)])
    record(case, "codec-only limit", limit, "MB/s", rounds=limits)


def test_2d_uint16_8192(benchmark: Any, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    n = 8192 if _full(request) else 1024
    rng = np.random.default_rng(0)
    base = (rng.normal(2000, 300, (n // 16, n // 16)).clip(0, 4095)).astype(np.uint16)
    image = np.repeat(np.repeat(base, 16, 0), 16, 1) + rng.integers(0, 16, (n, n),
                                                                      dtype=np.uint16)
    src = write_projection_image(tmp_path / "dx.dcm", n, n, lambda a, b: image[a:b])
    t = time.perf_counter()
    result = benchmark.pedantic(convert_instance, args=(src, str(tmp_path / "dx.zarr")),
                                rounds=3 if _measured(request) else 1, iterations=1)
    elapsed = benchmark.stats.stats.min if benchmark.stats else time.perf_counter() - t
    _report(benchmark, mb_s=round(image.nbytes / elapsed / 1e6), levels=result.levels)
    record(f"2-D {n}² uint16 pyramid build, MB/s", "pacslab", image.nbytes / elapsed / 1e6,
           "MB/s", rounds=[image.nbytes / s / 1e6 for s in _round_seconds(benchmark)])


_RGB_SCRIPT = """
import resource, sys, time
from processing.tiling import convert_instance
t = time.perf_counter()
r = convert_instance(sys.argv[1], sys.argv[2])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t, r.levels)
"""


def test_rgb_30000_peak_memory(benchmark: Any, request: pytest.FixtureRequest,
                               tmp_path: Path) -> None:
    if not _full(request):
        pytest.skip("30000² RGB (2.7 GB) runs only with --benchmark-enable, not --quick")
    n = 30000
    tile = np.random.default_rng(1).integers(0, 256, (1000, n, 3), dtype=np.uint8)
    src = write_projection_image(tmp_path / "rgb.dcm", n, n,
                                 lambda a, b: tile[: b - a], samples_per_pixel=3,
                                 band_rows=1000)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}

    def run() -> tuple[int, float, int]:
        out = subprocess.run([sys.executable, "-c", _RGB_SCRIPT, str(src),
                              str(tmp_path / "rgb.zarr")],
                             capture_output=True, text=True, check=True, env=env)
        rss, secs, levels = out.stdout.split()
        return int(rss), float(secs), int(levels)

    rss_kib, secs, levels = benchmark.pedantic(run, rounds=1, iterations=1)
    _report(benchmark, peak_rss_mib=rss_kib // 1024, seconds=round(secs, 1),
            mb_s=round(n * n * 3 / secs / 1e6), levels=levels)
    record("30000² RGB conversion, peak memory MiB", "pacslab", rss_kib / 1024, "MiB",
           goal=Goal("<", 4096.0))
    assert rss_kib * 1024 < 4 * 2**30


def test_random_tile_read(benchmark: Any, request: pytest.FixtureRequest,
                          tmp_path: Path) -> None:
    n = 8192 if _full(request) else 1024
    rng = np.random.default_rng(2)
    image = rng.integers(0, 4096, (n, n), dtype=np.uint16)
    src = write_projection_image(tmp_path / "dx.dcm", n, n, lambda a, b: image[a:b])
    convert_instance(src, str(tmp_path / "t.zarr"))
    enable_zarrs()
    arr = zarr.open_array(str(tmp_path / "t.zarr/0/0"), mode="r")
    tiles = [(int(y), int(x)) for y, x in rng.integers(0, n // 256, (400, 2))]
    times = []

    def read_all() -> None:
        for y, x in tiles:
            t = time.perf_counter()
            arr[y * 256:(y + 1) * 256, x * 256:(x + 1) * 256]
            times.append(time.perf_counter() - t)

    benchmark.pedantic(read_all, rounds=1, iterations=1)
    if not times:
        read_all()
    ms = np.array(times) * 1e3
    _report(benchmark, p50_ms=round(float(np.percentile(ms, 50)), 3),
            p99_ms=round(float(np.percentile(ms, 99)), 3))
    values = [float(v) for v in ms]
    for q in (50, 99):

        def pct(v: list[float], q: int = q) -> float:
            return float(np.percentile(v, q))

        record(f"random 256² tile read from level 0 ({n}²), p{q} ms", "pacslab",
               pct(values), "ms", samples=values if q == 50 else None,
               rounds=per_round(values, 5, pct))
