"""Processing on a real ``distributed`` cluster (issue #8 §2).

A ``dask scheduler`` and two ``dask worker`` processes are started with the command
line, as an operator would; ``PACSLAB_DASK__SCHEDULER`` points the embedded worker
(``pacslab.worker_process.build_worker``) at them. The series pyramid they build is
identical, level by level, to the one built on local threads. The Zarr output is a
local path: scheduler and workers share this machine's file system.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from pydicom import dcmread

from core.settings import Settings
from core.synthetic import write_ct_series
from pacslab.wiring import build_index
from pacslab.worker_process import build_worker
from processing.tiling import convert_series
from tests.support import wait_until

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[2]


def _dask(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    return subprocess.Popen([sys.executable, "-m", "dask", *args], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture(scope="module")
def scheduler_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``tcp://…`` of a scheduler with two worker processes attached."""
    from distributed import Client

    tmp = tmp_path_factory.mktemp("dask")
    info = tmp / "scheduler.json"
    procs = [_dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                   "--scheduler-file", str(info), log=tmp / "scheduler.log")]
    try:
        def started() -> bool:
            if info.exists() and info.read_text().strip():
                return True
            assert procs[0].poll() is None, (tmp / "scheduler.log").read_text()
            return False

        wait_until(started, timeout=60, interval=0.1, message="dask scheduler did not start")
        address = str(json.loads(info.read_text())["address"])
        for n in range(2):
            procs.append(_dask("worker", address, "--no-nanny", "--nthreads", "2",
                               "--no-dashboard", "--name", f"w{n}", "--host", "127.0.0.1",
                               "--local-directory", str(tmp / f"w{n}"),
                               log=tmp / f"worker{n}.log"))
        with Client(address, timeout=30) as client:  # type: ignore[no-untyped-call]
            client.wait_for_workers(2, timeout=60)  # type: ignore[no-untyped-call]
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _store(settings: Settings, paths: list[Path]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_worker_series import store

    store(settings, paths)


def _executed(address: str) -> dict[str, int]:
    from distributed import Client

    with Client(address, timeout=30) as client:  # type: ignore[no-untyped-call]
        counts = client.run(lambda dask_worker: dask_worker.state.executed_count)
    return {str(k): int(v) for k, v in counts.items()}


def test_series_job_on_scheduler_and_two_workers_equals_local_threads(
    tmp_path: Path, scheduler_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith("PACSLAB_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PACSLAB_DASK__SCHEDULER", scheduler_address)
    monkeypatch.setenv("PACSLAB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PACSLAB_PROCESSING__SERIES_QUIET_S", "0")
    settings = Settings()
    assert settings.dask.scheduler == scheduler_address
    build_index(settings, migrate=True).close()
    # 150 slices of 300²: three 64-slice level-0 shards and a second level, i.e.
    # several tasks for the two workers to share.
    paths = write_ct_series(tmp_path / "ct", slices=150, rows=300, columns=300)
    _store(settings, paths)
    before = sum(_executed(scheduler_address).values())

    worker = build_worker(settings)
    for _ in range(40):
        if not worker.run_once():
            for hook in worker.on_idle:
                hook()
    index = worker.index
    series_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    job = index.latest_job("series", series_uid)
    assert job is not None, index.get_jobs(target=series_uid)
    assert job.result["instances"] == 150 and job.result["failed_instances"] == []
    ran = _executed(scheduler_address)
    assert sum(ran.values()) - before >= 3, ran  # the tasks ran on the cluster

    local = convert_series(paths, str(tmp_path / "local.zarr"), scheduler="threads")
    remote_image = job.result["images"][0]
    assert remote_image["levels"] == local.levels >= 2
    for level in range(local.levels):
        ours = zarr.open_array(f"{remote_image['path']}/{level}", mode="r")[:]
        ref = zarr.open_array(f"{local.images[0].path}/{level}", mode="r")[:]
        assert ours.dtype == ref.dtype and np.array_equal(ours, ref), level
    index.close()
