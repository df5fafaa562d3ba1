"""The processing job handlers: what happens to an instance after its acknowledgement.

The use cases the worker runs from the job rows the receivers commit with each
instance (issue 15: the application layer, not the composition root):

* ``instance`` jobs, run as one batch per series once the series has paused
  (``processing.instance_defer_s``, issue 19): the DICOM JSON kept for WADO-RS
  ``/metadata`` (PS3.18 F.2), forwarding (issue 16) and the order reconciliation
  (IHE RAD TF-2 4.8.4.1.3), with one index transaction for the whole batch;
* ``series`` jobs, queued by the roll-up when a series goes quiet or its MPPS
  completes (PS3.4 F.7.2.2.2): the pyramid;
* ``webhook`` jobs: an order's status change posted to the configured URL;
* ``fwd:<name>`` jobs: one stored instance sent to a forwarding destination.

The verification of the stored originals against their content keys is not a step
of the instance job any more: :class:`services.scrub.OriginalScrub` re-hashes them
while the worker is idle.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from core.errors import NotFoundError
from core.instance import metadata_json
from core.logging import correlation
from processing.tiling import convert_series
from processing.webhook import post_json
from services.forwarding import ForwardingService, InstanceFacts, job_kind
from services.orders import order_keys, status_notice
from storage.abc import Job, OriginalStore, StoredInstance
from storage.index.qr import calling_ae_of

if TYPE_CHECKING:
    from processing.worker import BatchHandler, JobHandler
    from services.orders import OrderService
    from storage.index.sql import SqlIndex

__all__ = ["IngestJobs"]

logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclasses.dataclass
class IngestJobs:
    """The handlers of the worker's job kinds, over one index and original store.

    ``zarr_root``: where series pyramids go (one store per series and job);
    ``webhook_url``: order status notices (no ``webhook`` handler when empty).
    """

    index: SqlIndex
    originals: OriginalStore
    orders: OrderService
    forwarding: ForwardingService
    zarr_root: str
    storage_options: dict[str, Any] | None = None
    scheduler: str | None = None
    workers: int | None = None
    webhook_url: str = ""
    webhook_timeout_s: float = 10.0

    def handlers(self) -> dict[str, JobHandler]:
        """One handler per job kind run one job at a time."""
        out: dict[str, JobHandler] = {"instance": self.instance_job, "series": self.series_job}
        if self.webhook_url:
            out["webhook"] = self.webhook_job
        for name in self.forwarding.settings.destinations:
            # Forwarding (issue 16 §4): one job kind per destination, "fwd:<name>".
            out[job_kind(name)] = partial(self.forward_job, name)
        return out

    def batch_handlers(self) -> dict[str, BatchHandler]:
        """The kinds run as batches: instance jobs share one metadata transaction."""
        return {"instance": self.instance_jobs}

    # -- instance jobs -------------------------------------------------------------

    def instance_job(self, job: Job) -> Mapping[str, Any]:
        """One instance job (a retried one, which is claimed alone)."""
        outcome = self.instance_jobs([job])[job.id]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def instance_jobs(self, jobs: list[Job]) -> dict[int, Mapping[str, Any] | BaseException]:
        """Instance jobs of one claim: each header read once, the DICOM JSON of all of
        them stored in one transaction, each study reconciled with its order once.

        A job whose instance cannot be read fails alone; if the metadata transaction
        fails, the whole batch raises and every job is retried (nothing was done that
        a re-run would not do again: forwarding's ``add_job`` queues no duplicate of an
        unfinished job, the reconciliation is idempotent).
        """
        results: dict[int, Mapping[str, Any] | BaseException] = {}
        metadata: list[tuple[str, str, str]] = []
        links: dict[tuple[str, str, str], str] = {}
        for job in jobs:
            with correlation(job.correlation_id or None):
                try:
                    inst = self.index.get_instance(job.target)
                    with self.originals.open(inst.blob_key) as fp:
                        ds = dcmread(fp, defer_size=1024)
                    metadata.append((inst.sop_instance_uid, inst.blob_key, metadata_json(ds)))
                    routed = (
                        self.forwarding.enqueue(self._facts(inst, ds))
                        if self.forwarding.enabled
                        else []
                    )
                    # Reconciliation (issue #4): after the C-STORE was acknowledged,
                    # never in it; once per study and keys in a batch.
                    keys = order_keys(ds)
                    key = (
                        keys.study_instance_uid,
                        keys.accession_number,
                        keys.requested_procedure_id,
                    )
                    if key not in links:
                        link = self.orders.reconcile(
                            keys.study_instance_uid,
                            accession=keys.accession_number,
                            procedure_id=keys.requested_procedure_id,
                        )
                        links[key] = link.order_id
                except Exception as exc:
                    results[job.id] = exc
                    continue
                out: dict[str, Any] = {"blob_key": inst.blob_key, "order": links[key] or None}
                if routed:
                    out["forwarded_to"] = routed
                results[job.id] = out
        self.index.set_metadata_many(metadata)
        return results

    def _facts(self, inst: StoredInstance, ds: Dataset) -> InstanceFacts:
        """What forwarding rules match on, from the index row and the header just read."""
        calling = calling_ae_of(self.index, inst.sop_instance_uid, inst.blob_key)
        study = {
            key: str(ds.get(key, "") or "")
            for key in (
                "StudyDescription",
                "InstitutionName",
                "AccessionNumber",
                "ReferringPhysicianName",
                "StationName",
                "StudyID",
            )
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

    # -- series, webhook and forwarding jobs ----------------------------------------

    def series_job(self, job: Job) -> Mapping[str, Any]:
        """The series pyramid, in a new store per job."""
        members = self.index.series_instances(job.target)
        if not members:
            return {"instances": 0}
        link = self.orders.reconcile(members[0].study_instance_uid)
        # Object-store originals are downloaded to a local cache first (decoders read
        # files); the dask workers must see that path (same machine, or shared disk).
        paths = [str(self.originals.path(i.blob_key)) for i in members]
        # One store per series and job: a re-run never rewrites tiles a viewer has
        # cached (tiles are immutable per store version, issue #6).
        out_url = f"{self.zarr_root}/{job.target}/{job.id}.zarr"
        result = convert_series(
            paths,
            out_url,
            scheduler=self.scheduler,
            workers=self.workers,
            storage_options=self.storage_options,
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

    def webhook_job(self, job: Job) -> Mapping[str, Any]:
        """Post an order's status at one version to the webhook."""
        public_id, _, version = job.target.rpartition(":")
        history = {v.version: v for v in self.orders.history(public_id)}
        kept = history.get(int(version))
        if kept is None:
            raise NotFoundError(f"order {public_id} has no version {version}")
        rec = self.orders.get(public_id)
        at_version = replace(
            rec,
            item=kept.item,
            status=kept.status,
            version=kept.version,
            updated_at=kept.changed_at,
        )
        notice = status_notice(at_version, kept.event)
        status = post_json(self.webhook_url, notice, timeout_s=self.webhook_timeout_s)
        return {"http_status": status}

    def forward_job(self, name: str, job: Job) -> Mapping[str, Any]:
        return self.forwarding.send(name, job.target, job.attempts)
