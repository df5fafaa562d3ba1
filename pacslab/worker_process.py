"""Wire the processing worker of ``pacslab serve``: instance jobs and series pyramids."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from pydicom import dcmread

from core.errors import NotFoundError
from core.instance import metadata_json
from core.settings import Settings
from pacslab.wiring import build_audit, build_index, build_order_service, build_originals
from processing.integrity import verify_original
from processing.tiling import convert_series
from processing.webhook import post_json
from processing.worker import JobWorker
from services.forwarding import ForwardingService, InstanceFacts, job_kind
from services.orders import order_keys, status_notice
from storage.abc import Job
from storage.index.qr import calling_ae_of

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


def build_worker(settings: Settings, *, name: str = "embedded") -> JobWorker:
    """The job worker of ``settings``; ``name`` (with the host name) identifies its claims.

    A worker restarted under the same name takes back the jobs it left ``running``,
    so each worker process on a host needs its own name (``pacslab serve`` uses
    ``embedded``, ``pacslab worker`` ``processing.worker_name``).
    """
    index = build_index(settings, migrate=False)
    originals = build_originals(settings)
    zarr_root = settings.storage.zarr_url.rstrip("/")
    storage_options = settings.storage.storage_options or None
    scheduler = settings.dask.scheduler or None
    workers = settings.dask.workers or None

    orders = build_order_service(settings, index)
    forwarding = ForwardingService(
        settings.forwarding,
        index,
        originals,
        ae_title=settings.dicom.ae_title,
        audit=build_audit(settings, index)[0] if settings.forwarding.rules else None,
    )

    def instance_job(job: Job) -> Mapping[str, Any]:
        inst = index.get_instance(job.target)
        verify_original(originals, inst)
        with originals.open(inst.blob_key) as fp:
            ds = dcmread(fp, defer_size=1024)
        index.set_metadata_json(inst.sop_instance_uid, inst.blob_key, metadata_json(ds))
        routed = forwarding.enqueue(_facts(index, inst, ds)) if forwarding.enabled else []
        # Reconciliation (issue #4): after the C-STORE was acknowledged, never in it.
        keys = order_keys(ds)
        link = orders.reconcile(
            keys.study_instance_uid,
            accession=keys.accession_number,
            procedure_id=keys.requested_procedure_id,
        )
        out: dict[str, Any] = {
            "blob_key": inst.blob_key, "verified": True, "order": link.order_id or None
        }
        if routed:
            out["forwarded_to"] = routed
        return out

    def series_job(job: Job) -> Mapping[str, Any]:
        # Queued when the series goes quiet or an MPPS completes (PS3.4 F.7.2.2.2).
        members = index.series_instances(job.target)
        if not members:
            return {"instances": 0}
        link = orders.reconcile(members[0].study_instance_uid)
        # Object-store originals are downloaded to a local cache first (decoders read
        # files); the dask workers must see that path (same machine, or shared disk).
        paths = [str(originals.path(i.blob_key)) for i in members]
        # One store per series and job: a re-run never rewrites tiles a viewer has
        # cached (tiles are immutable per store version, issue #6).
        out_url = f"{zarr_root}/{job.target}/{job.id}.zarr"
        result = convert_series(
            paths, out_url, scheduler=scheduler, workers=workers, storage_options=storage_options
        )
        logger.info(
            "series %s: %d instances -> %d image(s) in %.2f s (%d failed)",
            job.target,
            len(paths),
            len(result.images),
            result.seconds,
            len(result.failed_instances),
        )
        out: dict[str, Any] = _jsonable(result)
        out["instances"] = len(paths)
        out["order"] = link.order_id or None
        return out

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
    for name in settings.forwarding.destinations:
        # Forwarding (issue 16 §4): one job kind per destination, "fwd:<name>".
        handlers[job_kind(name)] = partial(_forward_job, forwarding, name)
    worker = JobWorker(
        index,
        handlers,
        name=f"{socket.gethostname()}-{name}",
        poll_interval_s=settings.processing.poll_interval_s,
        max_attempts=settings.processing.max_attempts,
        lease_s=settings.processing.lease_s,
        prune_after_s=settings.processing.done_job_retention_s,
    )

    def roll_up() -> None:
        for uid in index.series_due(settings.processing.series_quiet_s):
            index.add_job("series", uid)

    worker.on_idle.append(roll_up)
    # Forwarding keeps one association per destination while jobs keep coming; an
    # idle queue releases them rather than holding the peers' association slots.
    worker.on_idle.append(forwarding.close)
    return worker


def _forward_job(forwarding: ForwardingService, name: str, job: Job) -> Mapping[str, Any]:
    return forwarding.send(name, job.target, job.attempts)


def _facts(index: Any, inst: Any, ds: Any) -> InstanceFacts:
    """What forwarding rules match on, from the index row and the header just read."""
    calling = calling_ae_of(index, inst.sop_instance_uid, inst.blob_key)
    study = {
        key: str(ds.get(key, "") or "")
        for key in ("StudyDescription", "InstitutionName", "AccessionNumber",
                    "ReferringPhysicianName", "StationName", "StudyID")
    }
    return InstanceFacts(
        sop_instance_uid=inst.sop_instance_uid,
        sop_class_uid=inst.sop_class_uid,
        calling_ae=calling,
        # STOW-RS stores under the calling AE "STOW" (api/dicomweb/_stow.py).
        source="stow" if calling == "STOW" else "dicom",
        modality=str(ds.get("Modality", "") or ""),
        study=study,
    )


def _lower_priority() -> None:
    # Linux nice values are per thread: the worker yields the CPU to receivers, so a
    # burst of C-STOREs is acknowledged first and processed right after.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def start_worker(settings: Settings, *, name: str = "embedded") -> Callable[[], None]:
    worker = build_worker(settings, name=name)
    worker.on_start.append(_lower_priority)
    worker.start()
    return worker.stop
