"""Wire the processing worker of ``pacslab serve``."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from pydicom import dcmread

from core.errors import NotFoundError
from core.instance import metadata_json
from core.settings import Settings
from pacslab.wiring import build_index, build_order_service
from processing.integrity import verify_original
from processing.orders import order_keys, status_notice
from processing.webhook import post_json
from processing.worker import JobWorker
from storage.abc import Job
from storage.originals import FileOriginalStore

__all__ = ["build_worker", "start_worker"]


def build_worker(settings: Settings) -> JobWorker:
    index = build_index(settings, migrate=False)
    assert settings.storage.originals_dir is not None
    originals = FileOriginalStore(settings.storage.originals_dir, fsync=settings.storage.fsync)

    orders = build_order_service(settings, index)

    def instance_job(job: Job) -> Mapping[str, Any]:
        inst = index.get_instance(job.target)
        verify_original(originals, inst)
        with originals.open(inst.blob_key) as fp:
            ds = dcmread(fp, defer_size=1024)
        index.set_metadata_json(inst.sop_instance_uid, inst.blob_key, metadata_json(ds))
        # Reconciliation (issue #4): after the C-STORE was acknowledged, never in it.
        keys = order_keys(ds)
        link = orders.reconcile(
            keys.study_instance_uid,
            accession=keys.accession_number,
            procedure_id=keys.requested_procedure_id,
        )
        return {"blob_key": inst.blob_key, "verified": True, "order": link.order_id or None}

    def series_job(job: Job) -> Mapping[str, Any]:
        # Queued when an MPPS completes (PS3.4 F.7.2.2.2) or the series goes quiet.
        # Pyramid building joins here (processing issue); for now: link the study.
        members = index.series_instances(job.target)
        if not members:
            return {"instances": 0}
        study_uid = members[0].study_instance_uid
        link = orders.reconcile(study_uid)
        return {"instances": len(members), "order": link.order_id or None}

    def webhook_job(job: Job) -> Mapping[str, Any]:
        public_id, _, version = job.target.rpartition(":")
        history = {v.version: v for v in orders.history(public_id)}
        kept = history.get(int(version))
        if kept is None:
            raise NotFoundError(f"order {public_id} has no version {version}")
        rec = orders.get(public_id)
        at_version = replace(
            rec,
            item=kept.item,
            status=kept.status,
            version=kept.version,
            updated_at=kept.changed_at,
        )
        notice = status_notice(at_version, kept.event)
        status = post_json(
            settings.orders.webhook_url, notice, timeout_s=settings.orders.webhook_timeout_s
        )
        return {"http_status": status}

    handlers: dict[str, Any] = {"instance": instance_job, "series": series_job}
    if settings.orders.webhook_url:
        handlers["webhook"] = webhook_job
    return JobWorker(
        index,
        handlers,
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
