"""The embedded worker turns received instances into a series pyramid (issue #3 §1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr
from pydicom import dcmread

from core.settings import Settings
from core.synthetic import write_ct_series
from pacslab.wiring import build_archive, build_index
from pacslab.worker_process import build_worker
from storage.staging import StagedWriter


def store(settings: Settings, paths: list[Path]) -> None:
    archive = build_archive(settings)
    for path in paths:
        raw = path.read_bytes()
        ds = dcmread(path, stop_before_pixels=True)
        writer = StagedWriter(archive.staging_dir(), ds.SOPClassUID, ds.SOPInstanceUID,
                              ds.file_meta.TransferSyntaxUID)
        writer.write(raw[144 + int.from_bytes(raw[140:144], "little"):])
        archive.accept(writer.finish(), calling_ae="TEST")
    archive.close()


def test_instances_roll_up_into_a_series_pyramid(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", processing={"series_quiet_s": 0})
    build_index(settings, migrate=True).close()
    paths = write_ct_series(tmp_path / "ct", slices=6, rows=96, columns=96)
    shuffled = paths[::-1]
    store(settings, shuffled)
    # a broken file in the series must not stop the others
    worker = build_worker(settings)
    for _ in range(10):
        if not worker.run_once():
            for hook in worker.on_idle:
                hook()
    index = worker.index
    series_uid = str(dcmread(paths[0]).SeriesInstanceUID)
    job = index.latest_job("series", series_uid)
    assert job is not None, index.get_jobs()
    assert job.result["instances"] == 6 and job.result["failed_instances"] == []
    image = job.result["images"][0]
    assert image["shape"][0] == 6
    level0 = zarr.open_array(f"{image['path']}/0", mode="r")[:]
    hu = [dcmread(p).pixel_array.astype(np.int16) - 1024 for p in paths]  # sorted by z
    positions = [float(dcmread(p).ImagePositionPatient[2]) for p in paths]
    order = np.argsort(positions)
    assert np.array_equal(level0, np.stack([hu[i] for i in order]))
    counts = index.counts()
    assert counts["jobs_done"] == 7 and counts.get("jobs_failed", 0) == 0
    # nothing new arrived: the series is not rolled up again
    assert index.series_due(0) == []
    index.close()
    shutil.rmtree(tmp_path / "ct")
