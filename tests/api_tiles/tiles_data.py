"""A data dir holding a converted synthetic CT series (tile tests and benchmarks).

The series goes the production way: instances are accepted into the archive and the
embedded worker's series job writes ``<zarr_root>/<series>/<job>.zarr`` (as in
``tests/processing/test_worker_series.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from core.settings import Settings
from core.synthetic import write_ct_series

#: 24 slices of 600²: three levels (600, 300, 150), z halved at each (1.25 mm < 2 × 0.7 mm),
#: and partial edge tiles at every level.
SLICES, ROWS, COLUMNS = 24, 600, 600


@dataclass
class Converted:
    settings: Settings
    series_uid: str
    study_uid: str
    version: int
    image_path: str
    dicom_dir: Path


def store(settings: Settings, paths: list[Path]) -> None:
    """Accept Part-10 files into the archive, as the C-STORE handler does."""
    from pacslab.wiring import build_archive
    from storage.staging import StagedWriter

    archive = build_archive(settings)
    for path in paths:
        raw = path.read_bytes()
        ds = dcmread(path, stop_before_pixels=True)
        writer = StagedWriter(archive.staging_dir(), ds.SOPClassUID, ds.SOPInstanceUID,
                              ds.file_meta.TransferSyntaxUID)
        writer.write(raw[144 + int.from_bytes(raw[140:144], "little"):])
        archive.accept(writer.finish(), calling_ae="TEST")
    archive.close()


def convert_synthetic_ct(root: Path, *, slices: int = SLICES, rows: int = ROWS,
                         columns: int = COLUMNS) -> Converted:
    """A data dir under ``root`` with one synthetic CT series stored and converted."""
    from pacslab.wiring import build_index
    from pacslab.worker_process import build_worker

    # Authentication has its own tests (tests/security); the browser test turns it on.
    settings = Settings(data_dir=root / "data", processing={"series_quiet_s": 0},
                        dicom={"port": 0, "host": "127.0.0.1"}, auth={"enabled": False})
    build_index(settings, migrate=True).close()
    paths = write_ct_series(root / "dicom", slices=slices, rows=rows, columns=columns)
    store(settings, paths)
    worker = build_worker(settings)
    first = dcmread(paths[0], stop_before_pixels=True)
    series_uid = str(first.SeriesInstanceUID)
    for _ in range(10):
        if worker.index.latest_job("series", series_uid) is not None:
            break
        if not worker.run_once():
            for hook in worker.on_idle:
                hook()
    job = worker.index.latest_job("series", series_uid)
    worker.index.close()
    assert job is not None, "the worker did not convert the series"
    return Converted(settings, series_uid, str(first.StudyInstanceUID), int(job.id),
                     str(job.result["images"][0]["path"]), root / "dicom")
