"""Wire the processing worker of ``pacslab serve``: instance jobs and series pyramids."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydicom import dcmread

from core.instance import metadata_json
from core.settings import Settings
from pacslab.wiring import build_index, build_originals
from processing.integrity import verify_original
from processing.tiling import convert_series
from processing.worker import JobWorker
from storage.abc import Job

__all__ = ["build_worker", "start_worker"]

logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def build_worker(settings: Settings) -> JobWorker:
    index = build_index(settings, migrate=False)
    originals = build_originals(settings)
    zarr_root = settings.storage.zarr_url.rstrip("/")
    storage_options = settings.storage.storage_options or None
    scheduler = settings.dask.scheduler or None
    workers = settings.dask.workers or None

    def instance_job(job: Job) -> Mapping[str, Any]:
        inst = index.get_instance(job.target)
        verify_original(originals, inst)
        with originals.open(inst.blob_key) as fp:
            ds = dcmread(fp, defer_size=1024)
        index.set_metadata_json(inst.sop_instance_uid, inst.blob_key, metadata_json(ds))
        return {"blob_key": inst.blob_key, "verified": True}

    def series_job(job: Job) -> Mapping[str, Any]:
        members = index.series_instances(job.target)
        # Object-store originals are downloaded to a local cache first (decoders read
        # files); the dask workers must see that path (same machine, or shared disk).
        paths = [str(originals.path(i.blob_key)) for i in members]
        # One store per series and job: a re-run never rewrites tiles a viewer has
        # cached (tiles are immutable per store version, issue #6).
        out_url = f"{zarr_root}/{job.target}/{job.id}.zarr"
        result = convert_series(paths, out_url, scheduler=scheduler, workers=workers,
                                storage_options=storage_options)
        logger.info("series %s: %d instances -> %d image(s) in %.2f s (%d failed)",
                    job.target, len(paths), len(result.images), result.seconds,
                    len(result.failed_instances))
        out: dict[str, Any] = _jsonable(result)
        out["instances"] = len(paths)
        return out

    worker = JobWorker(index, {"instance": instance_job, "series": series_job},
                       name=f"{socket.gethostname()}-embedded",
                       poll_interval_s=settings.processing.poll_interval_s,
                       max_attempts=settings.processing.max_attempts)

    def roll_up() -> None:
        for uid in index.series_due(settings.processing.series_quiet_s):
            index.add_job("series", uid)

    worker.on_idle.append(roll_up)
    return worker


def _lower_priority() -> None:
    # Linux nice values are per thread: the worker yields the CPU to receivers, so a
    # burst of C-STOREs is acknowledged first and processed right after.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def start_worker(settings: Settings) -> Callable[[], None]:
    worker = build_worker(settings)
    worker.on_start.append(_lower_priority)
    worker.start()
    return worker.stop
