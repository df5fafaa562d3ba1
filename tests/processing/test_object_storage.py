"""Originals and OME-Zarr pyramids in S3 (issue #8 §3), on a local moto server.

zarr opens ``s3://`` URLs with its ``FsspecStore``; ``processing.tiling`` passes the
fsspec ``storage_options`` (endpoint) through, to the tasks too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest_s3 import S3Bucket
from pydicom import dcmread

from core.settings import Settings
from core.synthetic import write_ct_series
from pacslab.wiring import build_index
from pacslab.worker_process import build_worker
from processing.tiling import convert_series

pytestmark = pytest.mark.network


def _levels(url: str, levels: int, options: dict[str, object] | None = None
            ) -> list[np.ndarray]:
    kwargs = {"storage_options": options} if options else {}
    return [zarr.open_array(f"{url}/{n}", mode="r", **kwargs)[:]  # type: ignore[arg-type]
            for n in range(levels)]


def test_convert_series_to_s3_equals_local(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    paths = write_ct_series(tmp_path / "ct", slices=70, rows=300, columns=300)
    local = convert_series(paths, str(tmp_path / "local.zarr"))
    url = f"{s3_bucket.url}/zarr/series.zarr"
    remote = convert_series(paths, url, storage_options=s3_bucket.storage_options)
    assert remote.store_path == url and remote.levels == local.levels >= 2
    ours = _levels(remote.images[0].path, remote.levels, s3_bucket.storage_options)
    ref = _levels(local.images[0].path, local.levels)
    assert all(np.array_equal(a, b) for a, b in zip(ours, ref, strict=True))
    group = zarr.open_group(url, mode="r", storage_options=s3_bucket.storage_options)
    assert group.attrs["pacslab"]["images"] == ["0"]


def test_receive_and_process_with_everything_in_s3(
    tmp_path: Path, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    for key in list(os.environ):
        if key.startswith("PACSLAB_"):
            monkeypatch.delenv(key)
    settings = Settings(data_dir=tmp_path / "data", processing={"series_quiet_s": 0},
                        storage={"originals_url": f"{s3_bucket.url}/originals",
                                 "zarr_url": f"{s3_bucket.url}/zarr",
                                 "storage_options": s3_bucket.storage_options})
    build_index(settings, migrate=True).close()
    paths = write_ct_series(tmp_path / "ct", slices=12, rows=64, columns=64)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_worker_series import store

    store(settings, paths)
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options, skip_instance_cache=True)
    assert len(fs.find(f"{s3_bucket.name}/originals")) == 12
    assert settings.storage.originals_dir is not None
    local = [p for p in settings.storage.originals_dir.rglob("*") if p.is_file()]
    assert local == [], "originals are uploaded, and staged files removed"

    worker = build_worker(settings)
    for _ in range(10):
        if not worker.run_once():
            for hook in worker.on_idle:
                hook()
    index = worker.index
    counts = index.counts()
    assert counts["jobs_done"] == 13 and counts.get("jobs_failed", 0) == 0, index.get_jobs()
    series_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    job = index.latest_job("series", series_uid)
    assert job is not None
    image = job.result["images"][0]
    assert image["path"].startswith(f"{s3_bucket.url}/zarr/{series_uid}/")
    ours = zarr.open_array(f"{image['path']}/0", mode="r",
                           storage_options=s3_bucket.storage_options)[:]
    ref = convert_series(paths, str(tmp_path / "local.zarr"))
    assert np.array_equal(ours, zarr.open_array(f"{ref.images[0].path}/0", mode="r")[:])
    index.close()
