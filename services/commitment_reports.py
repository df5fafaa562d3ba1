"""Owed Storage Commitment reports as the admin API and ``/metrics`` show them (issue 16 §3).

The worker's ``commit`` jobs (:class:`services.commitment.CommitmentQueue`) whose tries
ran out are ``failed``: the dead-letter list, kept with the request they report on and
their last error, until an admin retries one (tries reset; the worker decides again and
sends the report on a new association), as forwarding's dead letters. A module of its
own so the API does not import the commitment decision (``processing.integrity``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from core.errors import NotFoundError
from storage.index import qr as qr_index

if TYPE_CHECKING:
    from storage.index.sql import SqlIndex

__all__ = ["commitment_gauges", "report_jobs", "report_summary", "retry_report"]

logger = logging.getLogger(__name__)


def report_summary(index: SqlIndex) -> dict[str, int]:
    """``commit`` jobs per status (pending, running, done, failed)."""
    out = {"pending": 0, "running": 0, "done": 0, "failed": 0}
    counts = qr_index.job_counts(index, qr_index.COMMIT_JOB, exact=True)
    for (_kind, status), n in counts.items():
        out[status] = n
    return out


def report_jobs(
    index: SqlIndex, *, status: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """The newest ``commit`` jobs with their SCU and last error (the dead-letter list
    when ``status="failed"``)."""
    return [
        {
            "id": c.job.id,
            "transaction_uid": c.job.target,
            "calling_ae": c.calling_ae,
            "status": c.job.status,
            "attempts": c.job.attempts,
            "last_error": c.job.error,
            "next_try_at": c.job.not_before if c.job.status == "pending" else None,
            "updated_at": c.job.updated_at.isoformat() if c.job.updated_at else None,
        }
        for c in qr_index.commitment_jobs(index, status=status, limit=limit)
    ]


def retry_report(index: SqlIndex, job_id: int) -> None:
    """Manual retry of a dead-lettered report: pending again, tries reset; the worker
    decides again and sends it. :class:`NotFoundError` unless the job failed."""
    if not qr_index.retry_job(index, job_id, qr_index.COMMIT_JOB, exact=True):
        raise NotFoundError(f"no failed storage commitment job {job_id}")
    logger.info("storage commitment job %d queued again by hand", job_id)


def commitment_gauges(index: SqlIndex) -> str:
    """Prometheus text exposition of the owed reports: ``commit`` jobs per status
    (``failed``: the dead-letter list)."""
    lines = [
        "# HELP pacslab_commit_jobs Storage Commitment report jobs by status.",
        "# TYPE pacslab_commit_jobs gauge",
    ]
    for status, n in report_summary(index).items():
        lines.append(f'pacslab_commit_jobs{{status="{status}"}} {n}')
    return "\n".join(lines) + "\n"
