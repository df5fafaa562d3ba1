"""Wire the processing worker of ``pacslab serve``."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pydicom import dcmread

from core.instance import metadata_json
from core.settings import Settings
from pacslab.wiring import build_index
from processing.integrity import verify_original
from processing.worker import JobWorker
from storage.abc import Job
from storage.originals import FileOriginalStore

__all__ = ["build_worker", "start_worker"]


def build_worker(settings: Settings) -> JobWorker:
    index = build_index(settings, migrate=False)
    assert settings.storage.originals_dir is not None
    originals = FileOriginalStore(settings.storage.originals_dir, fsync=settings.storage.fsync)

    def instance_job(job: Job) -> Mapping[str, Any]:
        inst = index.get_instance(job.target)
        verify_original(originals, inst)
        with originals.open(inst.blob_key) as fp:
            ds = dcmread(fp, defer_size=1024)
        index.set_metadata_json(inst.sop_instance_uid, inst.blob_key, metadata_json(ds))
        return {"blob_key": inst.blob_key, "verified": True}

    return JobWorker(
        index,
        {"instance": instance_job},
        name=f"{socket.gethostname()}-embedded",
        poll_interval_s=settings.processing.poll_interval_s,
        max_attempts=settings.processing.max_attempts,
    )


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
