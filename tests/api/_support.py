"""Helpers of the API tests: instances stored through the same path as C-STORE and
STOW-RS (``stage_part10`` → ``Archive.accept``). The fixtures built on them (``app``,
``client``, ``ct``, ``catalogue``) are in ``tests/conftest.py``: a second
``conftest.py`` here would shadow the root one for modules that ``import conftest``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from pydicom import dcmread

from api.app import create_app
from core.settings import Settings
from core.synthetic import write_ct_series
from storage.archive import Archive
from storage.index.sql import SqlIndex
from storage.staging import stage_part10


@contextmanager
def running_app(settings: Settings) -> Iterator[FastAPI]:
    """``create_app`` over a freshly migrated index, without fsync (it costs tens of ms
    per file on CI disks and proves nothing here)."""
    storage = settings.storage.model_copy(update={"fsync": False})
    settings = settings.model_copy(update={"storage": storage})
    SqlIndex(settings.index).close()  # migrate the fresh index
    application = create_app(settings)
    try:
        yield application
    finally:
        application.state.archive.close()
        application.state.index.close()


def store_files(archive: Archive, paths: list[Path], *, calling_ae: str = "TEST") -> None:
    for path in paths:
        with path.open("rb") as fp:
            staged = stage_part10(archive.staging_dir(), fp, fsync=False)
        archive.accept(staged, calling_ae=calling_ae)


def dataset_bytes(raw: bytes) -> bytes:
    """The data set of a Part-10 file (after the File Meta Information)."""
    assert raw[128:132] == b"DICM"
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


@dataclass
class Stored:
    study: str
    series: str
    sops: list[str]
    paths: list[Path]


def store_ct(app: FastAPI, directory: Path) -> Stored:
    """Four small CT slices of one series, stored and indexed."""
    paths = write_ct_series(directory, slices=4, rows=32, columns=32)
    store_files(app.state.archive, paths)
    ds = [dcmread(p, stop_before_pixels=True) for p in paths]
    return Stored(
        str(ds[0].StudyInstanceUID),
        str(ds[0].SeriesInstanceUID),
        [str(d.SOPInstanceUID) for d in ds],
        paths,
    )


def make_study(
    directory: Path,
    *,
    slices: int = 2,
    modality: str = "CT",
    **attributes: str,
) -> list[Path]:
    """A small synthetic series with some header attributes overridden (keywords)."""
    from core.synthetic import ct_series

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(ct_series(slices, 16, 16)):
        ds.Modality = modality
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        path = directory / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def store_catalogue(app: FastAPI, tmp_path: Path) -> dict[str, str]:
    """Three studies of two patients for matching tests; returns their Study UIDs."""
    studies = {
        "a": make_study(
            tmp_path / "a",
            PatientName="NGUYEN^VAN AN",
            PatientID="P1",
            StudyDate="20240105",
            StudyTime="083000",
            AccessionNumber="ACC-A",
            StudyDescription="CT CHEST",
        ),
        "b": make_study(
            tmp_path / "b",
            slices=3,
            modality="MR",
            PatientName="Tran^Thi Binh",
            PatientID="P2",
            StudyDate="20240220",
            StudyTime="141500",
            AccessionNumber="ACC-B",
            StudyDescription="MR BRAIN",
        ),
        "c": make_study(
            tmp_path / "c",
            PatientName="NGUYEN^VAN AN",
            PatientID="P1",
            StudyDate="20231231",
            StudyTime="235900",
            AccessionNumber="ACC-C",
            StudyDescription="CT ABDOMEN",
        ),
    }
    out = {}
    for name, paths in studies.items():
        store_files(app.state.archive, paths)
        out[name] = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    return out


def run_metadata_step(app: FastAPI) -> int:
    """What the instance job does for /metadata (pacslab/worker_process.py): DICOM JSON
    of each current instance into ``instances.metadata_json``."""
    from core.instance import metadata_json

    index = app.state.index
    originals = app.state.archive.originals
    done = 0
    for inst in list(index.iter_instances()):  # iter_instances holds a transaction
        if inst.metadata_json != "{}":
            continue
        with originals.open(inst.blob_key) as fp:
            meta = metadata_json(dcmread(fp, defer_size=1024))
        index.set_metadata_json(inst.sop_instance_uid, inst.blob_key, meta)
        done += 1
    return done
