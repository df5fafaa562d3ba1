"""A data dir holding a converted synthetic CT series (tile tests and benchmarks).

The series goes the production way: instances are accepted into the archive and the
embedded worker's series job writes ``<zarr_root>/<series>/<job>.zarr`` (as in
``tests/processing/test_worker_series.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def tiles_settings(root: Path) -> Settings:
    """Settings of a fresh data dir under ``root`` (index created, auth off)."""
    from pacslab.wiring import build_index

    # Authentication has its own tests (tests/security); the browser test turns it on.
    settings = Settings(data_dir=root / "data", processing={"series_quiet_s": 0},
                        dicom={"port": 0, "host": "127.0.0.1"}, auth={"enabled": False})
    build_index(settings, migrate=True).close()
    return settings


def convert(settings: Settings, paths: list[Path]) -> dict[str, int]:
    """Store Part-10 files and run the worker until each of their series is converted.

    Returns the series job id (the store version) by Series Instance UID.
    """
    from pacslab.worker_process import build_worker

    store(settings, paths)
    worker = build_worker(settings)
    wanted = {str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in paths}
    jobs: dict[str, int] = {}

    def done() -> bool:
        for uid in wanted - set(jobs):
            job = worker.index.latest_job("series", uid)
            if job is not None:
                jobs[uid] = int(job.id)
        return len(jobs) == len(wanted)

    # Every instance's job runs before its series' job (which follows the idle
    # roll-up): the bound grows with the instances, and the last run's result is
    # looked at too.
    for _ in range(10 * len(wanted) + 2 * len(paths)):
        if done():
            break
        if not worker.run_once():
            for hook in worker.on_idle:
                hook()
    done()
    worker.index.close()
    assert set(jobs) == wanted, "the worker did not convert every series"
    return jobs


def convert_synthetic_ct(root: Path, *, slices: int = SLICES, rows: int = ROWS,
                         columns: int = COLUMNS) -> Converted:
    """A data dir under ``root`` with one synthetic CT series stored and converted."""
    from pacslab.wiring import build_index

    settings = tiles_settings(root)
    paths = write_ct_series(root / "dicom", slices=slices, rows=rows, columns=columns)
    first = dcmread(paths[0], stop_before_pixels=True)
    series_uid = str(first.SeriesInstanceUID)
    version = convert(settings, paths)[series_uid]
    index = build_index(settings)
    job = index.latest_job("series", series_uid)
    index.close()
    assert job is not None
    return Converted(settings, series_uid, str(first.StudyInstanceUID), version,
                     str(job.result["images"][0]["path"]), root / "dicom")


@contextmanager
def running(settings: Settings) -> Iterator[str]:
    """``create_app(settings)`` under uvicorn in a thread on a free loopback port."""
    from api.app import create_app
    from tests.support import serving

    with serving(create_app(settings), lifespan="on") as base:
        yield base


def write_mr_series(directory: Path, *, slices: int, rows: int, columns: int,
                    row_cosine: tuple[float, float, float],
                    column_cosine: tuple[float, float, float], study_uid: str,
                    series_number: int, spacing_mm: float = 4.0) -> list[Path]:
    """An MR series of parallel slices in any orientation (Image Orientation (Patient)).

    The phantom's pixels are reused; what matters is the geometry: positions advance
    ``spacing_mm`` along the slice normal (PS3.3 C.7.6.2.1.1).
    """
    from pydicom.uid import MRImageStorage

    from core.synthetic import ct_series

    r, c = row_cosine, column_cosine
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(ct_series(slices, rows, columns, study_instance_uid=study_uid)):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.SeriesNumber = series_number
        ds.SeriesDescription = f"MR {slices} slice(s)"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*r, *c)]
        ds.ImagePositionPatient = [f"{i * spacing_mm * n:.4f}" for n in normal]
        for keyword in ("KVP", "SliceLocation", "RescaleType"):
            delattr(ds, keyword)
        path = directory / f"MR_{series_number}_{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
