"""Forwarding / auto-routing of stored instances (issue 16 §4), run from the durable job queue.

Rules (:class:`core.settings.ForwardingRule`) are matched by :func:`route` (pure) once
an instance is stored and verified (the ``instance`` job); each destination it
routes to becomes a job of kind ``fwd:<destination>`` with the SOP Instance UID as
target, in the same index as the instance, so a restart loses nothing. The job
handler (:meth:`ForwardingService.send`) sends the stored original as it is:

* ``dicom``: C-STORE (PS3.4 B.2) to the destination AE, one association reused
  while it stays up;
* ``stow``: STOW-RS (PS3.18 10.5) ``POST {url}/studies`` with the configured
  ``Authorization``.

A failure raises :class:`~core.errors.PeerUnavailableError` with the backoff
(``retry_base_s`` doubling up to ``retry_max_s``): the job goes back to pending
with its last error. After ``max_attempts`` tries the job is ``failed``: the
dead-letter list, kept with its last error until someone retries it from the API.
Delivery is at least once: a send interrupted after the peer stored the instance
is sent again (C-STORE of the same SOP Instance is idempotent for an archive).
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from core.audit import AuditEntry
from core.errors import NotFoundError, PeerUnavailableError, ServiceError
from core.logging import correlation_id
from core.settings import ForwardingDestination, ForwardingRule, ForwardingSettings
from storage.abc import OriginalStore, StoredInstance
from storage.audit import AuditLog
from storage.index import qr as qr_index

if TYPE_CHECKING:
    from storage.index.sql import SqlIndex

__all__ = [
    "JOB_PREFIX",
    "ForwardingService",
    "InstanceFacts",
    "backoff_s",
    "destination_of",
    "job_kind",
    "queue_gauges",
    "queue_jobs",
    "queue_summary",
    "retry_dead_letter",
    "route",
]

logger = logging.getLogger(__name__)

#: Job kinds are ``fwd:<destination name>`` (the kind column holds 16 characters).
JOB_PREFIX = "fwd:"
MAX_DESTINATION_NAME = 12


def job_kind(destination: str) -> str:
    return f"{JOB_PREFIX}{destination}"


def destination_of(kind: str) -> str:
    return kind.removeprefix(JOB_PREFIX)


@dataclass(frozen=True, slots=True)
class InstanceFacts:
    """What rules look at: how the instance came, and a few of its attributes."""

    sop_instance_uid: str
    sop_class_uid: str
    calling_ae: str
    source: str  # "dicom" | "stow"
    modality: str
    study: Mapping[str, str]


def _matches(pattern: str, value: str) -> bool:
    """DICOM wildcard matching (PS3.4 C.2.2.2.4: ``*`` and ``?``), case-sensitive."""
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))
    return pattern == value


def _rule_matches(rule: ForwardingRule, facts: InstanceFacts) -> bool:
    if rule.calling_aes and facts.calling_ae not in rule.calling_aes:
        return False
    if rule.modalities and facts.modality not in rule.modalities:
        return False
    if rule.sop_classes and facts.sop_class_uid not in rule.sop_classes:
        return False
    if rule.sources and facts.source not in rule.sources:
        return False
    return all(_matches(p, facts.study.get(k, "")) for k, p in rule.study.items())


def route(rules: Sequence[ForwardingRule], facts: InstanceFacts) -> list[str]:
    """Destination names of every matching rule, each once, in rule order."""
    out: list[str] = []
    for rule in rules:
        if _rule_matches(rule, facts):
            out += [d for d in rule.destinations if d not in out]
    return out


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before try ``attempt + 1``: ``base * 2**(attempt-1)``, at most ``max_s``."""
    return float(min(max_s, base_s * 2.0 ** max(0, attempt - 1)))


class JobQueue(Protocol):
    def add_job(
        self, kind: str, target: str, *, correlation_id: str = "", delay_s: float = 0.0
    ) -> None: ...

    def get_instance(self, sop_instance_uid: str) -> StoredInstance: ...


class ForwardingService:
    """Queue and run forwarding jobs (see the module docstring)."""

    def __init__(
        self,
        settings: ForwardingSettings,
        index: JobQueue,
        originals: OriginalStore,
        *,
        ae_title: str,
        audit: AuditLog | None = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.originals = originals
        self.ae_title = ae_title
        self.audit = audit
        self._assocs: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.sent = 0
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return bool(self.settings.rules)

    def kinds(self) -> list[str]:
        return [job_kind(name) for name in self.settings.destinations]

    def enqueue(self, facts: InstanceFacts) -> list[str]:
        """Queue one job per routed destination; their names."""
        names = route(self.settings.rules, facts)
        for name in names:
            self.index.add_job(
                job_kind(name), facts.sop_instance_uid, correlation_id=correlation_id.get()[:32]
            )
        if names:
            logger.info("instance %s routed to %s", facts.sop_instance_uid, ",".join(names))
        return names

    def send(self, destination: str, sop_instance_uid: str, attempt: int) -> dict[str, Any]:
        """Send one stored instance; raise :class:`PeerUnavailableError` to retry later."""
        dest = self.settings.destinations.get(destination)
        if dest is None:
            raise ServiceError(f"forwarding destination {destination!r} is not configured")
        inst = self.index.get_instance(sop_instance_uid)
        try:
            if dest.kind == "dicom":
                detail = self._c_store(destination, dest, inst)
            else:
                detail = self._stow(dest, inst)
        except PeerUnavailableError as exc:
            self.failures += 1
            if attempt >= self.settings.max_attempts:
                # Dead letter: failed, kept with the last error, retried by hand.
                raise ServiceError(f"gave up after {attempt} tries: {exc}") from exc
            exc.retry_in_s = backoff_s(
                attempt, self.settings.retry_base_s, self.settings.retry_max_s
            )
            raise
        self.sent += 1
        self._record(destination, inst)
        return {"destination": destination, **detail}

    # -- DICOM C-STORE -----------------------------------------------------------

    def _association(self, name: str, dest: ForwardingDestination, inst: StoredInstance) -> Any:
        from pynetdicom import AE
        from pynetdicom.presentation import build_context

        assoc = self._assocs.get(name)
        if assoc is not None and assoc.is_established:
            ok = any(
                cx.abstract_syntax == inst.sop_class_uid
                and cx.transfer_syntax[0] == inst.transfer_syntax_uid
                for cx in assoc.accepted_contexts
            )
            if ok:
                return assoc
            assoc.release()
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        ae.requested_contexts = [
            build_context(inst.sop_class_uid, [inst.transfer_syntax_uid]),
        ]
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            raise PeerUnavailableError(f"association with {dest.ae_title} refused or failed")
        self._assocs[name] = assoc
        return assoc

    def _c_store(
        self, name: str, dest: ForwardingDestination, inst: StoredInstance
    ) -> dict[str, Any]:
        with self._lock:
            for fresh in (False, True):
                if fresh:
                    self._drop(name)
                assoc = self._association(name, dest, inst)
                try:
                    if self.originals.has_local_paths:
                        status = assoc.send_c_store(self.originals.path(inst.blob_key))
                    else:
                        from pydicom import dcmread

                        with self.originals.open(inst.blob_key) as fp:
                            status = assoc.send_c_store(dcmread(fp))
                except (OSError, RuntimeError, ValueError) as exc:
                    if fresh:
                        self._drop(name)
                        raise PeerUnavailableError(f"C-STORE failed: {exc}") from exc
                    continue
                code = int(status.get("Status", 0xFFFF)) if status else None
                if code is None:
                    if fresh:
                        self._drop(name)
                        raise PeerUnavailableError("no C-STORE response (timeout or abort)")
                    continue
                if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
                    return {"status": f"0x{code:04X}"}
                raise PeerUnavailableError(f"C-STORE answered 0x{code:04X}")
        raise PeerUnavailableError("C-STORE not sent")  # pragma: no cover

    def _drop(self, name: str) -> None:
        assoc = self._assocs.pop(name, None)
        if assoc is not None:
            try:
                assoc.release() if assoc.is_established else assoc.abort()
            except Exception:
                logger.debug("closing a forwarding association failed", exc_info=True)

    def close(self) -> None:
        with self._lock:
            for name in list(self._assocs):
                self._drop(name)

    # -- STOW-RS -----------------------------------------------------------------

    def _stow(self, dest: ForwardingDestination, inst: StoredInstance) -> dict[str, Any]:
        import httpx

        with self.originals.open(inst.blob_key) as fp:
            part = fp.read()
        boundary = uuid.uuid4().hex
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + part
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        if dest.authorization:
            headers["Authorization"] = dest.authorization
        url = dest.url.rstrip("/") + "/studies"
        try:
            response = httpx.post(
                url, content=body, headers=headers, timeout=self.settings.timeout_s
            )
        except httpx.HTTPError as exc:
            raise PeerUnavailableError(f"STOW-RS {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise PeerUnavailableError(f"STOW-RS answered HTTP {response.status_code}")
        return {"http_status": response.status_code}

    def _record(self, destination: str, inst: StoredInstance) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record(AuditEntry(
                action="R", event_type="dicom.forward", outcome="0", outcome_desc="sent",
                agent="forwarding", agent_type="system", source="",
                resource=f"SOPInstance/{inst.sop_instance_uid}"[:256], patient_key="",
                correlation_id=correlation_id.get()[:32],
                detail=AuditEntry.details({
                    "destination": destination, "study": inst.study_instance_uid,
                }),
            ))
        except Exception:
            logger.error("forward not recorded in the action log", exc_info=True)


# -- the queue as the admin API shows it -------------------------------------------------


def queue_summary(index: SqlIndex, destinations: Sequence[str]) -> dict[str, dict[str, int]]:
    """Jobs per destination and status (pending, running, done, failed)."""
    counts = qr_index.job_counts(index, JOB_PREFIX)
    out: dict[str, dict[str, int]] = {
        name: {"pending": 0, "running": 0, "done": 0, "failed": 0} for name in destinations
    }
    for (kind, status), n in counts.items():
        out.setdefault(destination_of(kind), {})[status] = n
    return out


def queue_jobs(
    index: SqlIndex, *, status: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """The newest forwarding jobs, with the last error (the dead-letter list when
    ``status="failed"``)."""
    return [
        {
            "id": job.id,
            "destination": destination_of(job.kind),
            "sop_instance_uid": job.target,
            "status": job.status,
            "attempts": job.attempts,
            "last_error": job.error,
            "next_try_at": job.not_before if job.status == "pending" else None,
            "updated_at": job.updated_at.isoformat() if job.updated_at else None,
        }
        for job in qr_index.list_jobs(index, JOB_PREFIX, status=status, limit=limit)
    ]


def retry_dead_letter(index: SqlIndex, job_id: int) -> None:
    """Manual retry of a dead-lettered job: back to pending with its tries reset."""
    if not qr_index.retry_job(index, job_id, JOB_PREFIX):
        raise NotFoundError(f"no failed forwarding job {job_id}")


def queue_gauges(index: SqlIndex) -> str:
    """Prometheus text exposition of the forwarding queue: jobs per destination, status."""
    lines = [
        "# HELP pacslab_forward_jobs Forwarding jobs by destination and status.",
        "# TYPE pacslab_forward_jobs gauge",
    ]
    for (kind, status), n in sorted(qr_index.job_counts(index, JOB_PREFIX).items()):
        name = destination_of(kind).replace("\\", "").replace('"', "")
        lines.append(f'pacslab_forward_jobs{{destination="{name}",status="{status}"}} {n}')
    return "\n".join(lines) + "\n"
