"""Index queries of Query/Retrieve and forwarding (issue 16) that the shared modules lack.

Kept apart from ``sql.py``/``queries.py`` so both can change without conflicts. Every
function takes the :class:`~storage.index.sql.SqlIndex` and uses its engine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from storage.index.schema import instances, jobs
from storage.index.sqlite import read_only

if TYPE_CHECKING:
    from storage.index.sql import SqlIndex

__all__ = [
    "COMMIT_JOB",
    "CommitmentJob",
    "QueuedJob",
    "calling_ae_of",
    "commitment_jobs",
    "commitment_request",
    "delete_destination",
    "dicom_destinations",
    "get_destination",
    "job_counts",
    "list_destinations",
    "list_jobs",
    "note_commitment_error",
    "put_destination",
    "queue_commitment",
    "retry_job",
    "settle_commitment",
]


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """A job row as the forwarding queue API shows it."""

    id: int
    kind: str
    target: str
    status: str
    attempts: int
    error: str
    not_before: float
    updated_at: datetime


def calling_ae_of(index: SqlIndex, sop_instance_uid: str, blob_key: str) -> str:
    """The calling AE title the given version of an instance arrived from ("" if unknown)."""
    with read_only(index.engine) as conn:
        row = conn.execute(
            select(instances.c.calling_ae).where(
                and_(
                    instances.c.sop_instance_uid == sop_instance_uid,
                    instances.c.blob_key == blob_key,
                )
            )
        ).first()
    return str(row[0]) if row is not None else ""


def _kinds(prefix: str, exact: bool) -> ColumnElement[bool]:
    return jobs.c.kind == prefix if exact else jobs.c.kind.startswith(prefix, autoescape=True)


def job_counts(
    index: SqlIndex, prefix: str, *, exact: bool = False
) -> dict[tuple[str, str], int]:
    """Jobs per ``(kind, status)`` for kinds starting with ``prefix`` (or equal to it)."""
    with read_only(index.engine) as conn:
        rows = conn.execute(
            select(jobs.c.kind, jobs.c.status, func.count())
            .where(_kinds(prefix, exact))
            .group_by(jobs.c.kind, jobs.c.status)
        ).all()
    return {(str(k), str(s)): int(n) for k, s, n in rows}


def list_jobs(
    index: SqlIndex, prefix: str, *, status: str | None = None, limit: int = 100,
    exact: bool = False,
) -> list[QueuedJob]:
    """The newest jobs of the kinds starting with ``prefix`` (or equal to it with
    ``exact``), optionally of one status."""
    cond = _kinds(prefix, exact)
    if status is not None:
        cond = and_(cond, jobs.c.status == status)
    with read_only(index.engine) as conn:
        rows = conn.execute(
            select(
                jobs.c.id, jobs.c.kind, jobs.c.target, jobs.c.status, jobs.c.attempts,
                jobs.c.error, jobs.c.not_before, jobs.c.updated_at,
            )
            .where(cond)
            .order_by(jobs.c.id.desc())
            .limit(limit)
        ).all()
    return [QueuedJob(*row) for row in rows]


def retry_job(index: SqlIndex, job_id: int, prefix: str, *, exact: bool = False) -> bool:
    """Put a ``failed`` job of a ``prefix`` kind (``exact``: of that kind) back to
    pending, tries reset (manual retry)."""
    with index.write() as conn:
        result = conn.execute(
            update(jobs)
            .where(
                and_(
                    jobs.c.id == job_id,
                    jobs.c.status == "failed",
                    _kinds(prefix, exact),
                )
            )
            .values(status="pending", attempts=0, not_before=time.time(),
                    updated_at=datetime.now(UTC))
        )
    return bool(result.rowcount)


# -- C-MOVE destinations added through the admin API (migration 0007) ---------------

dicom_destinations = Table(
    "dicom_destinations",
    MetaData(),  # its own: schema.py's metadata belongs to the shared tables
    Column("ae_title", String(16), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("updated_by", String(128), nullable=False, server_default=""),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def get_destination(index: SqlIndex, ae_title: str) -> tuple[str, int] | None:
    with read_only(index.engine) as conn:
        row = conn.execute(
            select(dicom_destinations.c.host, dicom_destinations.c.port).where(
                dicom_destinations.c.ae_title == ae_title
            )
        ).first()
    return (str(row[0]), int(row[1])) if row is not None else None


def list_destinations(index: SqlIndex) -> dict[str, tuple[str, int]]:
    with read_only(index.engine) as conn:
        rows = conn.execute(
            select(
                dicom_destinations.c.ae_title,
                dicom_destinations.c.host,
                dicom_destinations.c.port,
            ).order_by(dicom_destinations.c.ae_title)
        ).all()
    return {str(a): (str(h), int(p)) for a, h, p in rows}


def put_destination(index: SqlIndex, ae_title: str, host: str, port: int, by: str) -> bool:
    """Add or replace; True when it was new."""
    now = datetime.now(UTC)
    with index.write() as conn:
        gone = conn.execute(
            delete(dicom_destinations).where(dicom_destinations.c.ae_title == ae_title)
        )
        conn.execute(
            dicom_destinations.insert().values(
                ae_title=ae_title, host=host, port=port, updated_by=by[:128], updated_at=now
            )
        )
    return not gone.rowcount


def delete_destination(index: SqlIndex, ae_title: str) -> bool:
    with index.write() as conn:
        gone = conn.execute(
            delete(dicom_destinations).where(dicom_destinations.c.ae_title == ae_title)
        )
    return bool(gone.rowcount)


# -- Storage Commitment requests whose report is owed (migration 0011) ---------------

#: Job kind of an owed N-EVENT-REPORT; the job's target is the Transaction UID.
COMMIT_JOB = "commit"

commitment_requests = Table(
    "commitment_requests",
    MetaData(),
    Column("transaction_uid", String(64), primary_key=True),
    Column("calling_ae", String(16), nullable=False),
    Column("references_json", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def queue_commitment(
    index: SqlIndex,
    transaction_uid: str,
    calling_ae: str,
    references_json: str,
    *,
    delay_s: float,
    correlation_id: str = "",
) -> int:
    """Keep a request and queue its ``commit`` job in one transaction; the job id.

    The job is claimable after ``delay_s`` (the receiver tries first, on the
    association). A Transaction UID asked again replaces the request and keeps the
    unfinished job it has.
    """
    now = datetime.now(UTC)
    with index.write() as conn:
        conn.execute(
            delete(commitment_requests).where(
                commitment_requests.c.transaction_uid == transaction_uid
            )
        )
        conn.execute(
            commitment_requests.insert().values(
                transaction_uid=transaction_uid,
                calling_ae=calling_ae[:16],
                references_json=references_json,
                created_at=now,
            )
        )
        row = conn.execute(
            select(jobs.c.id).where(
                and_(
                    jobs.c.kind == COMMIT_JOB,
                    jobs.c.target == transaction_uid,
                    jobs.c.status.in_(("pending", "running")),
                )
            )
        ).first()
        if row is not None:
            return int(row.id)
        result = conn.execute(
            jobs.insert().values(
                kind=COMMIT_JOB,
                target=transaction_uid,
                status="pending",
                correlation_id=correlation_id[:32],
                not_before=time.time() + delay_s,
                created_at=now,
                updated_at=now,
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])


def commitment_request(index: SqlIndex, transaction_uid: str) -> tuple[str, str] | None:
    """``(calling AE, references JSON)`` of an owed report, or None."""
    with read_only(index.engine) as conn:
        row = conn.execute(
            select(commitment_requests.c.calling_ae, commitment_requests.c.references_json)
            .where(commitment_requests.c.transaction_uid == transaction_uid)
        ).first()
    return (str(row[0]), str(row[1])) if row is not None else None


def settle_commitment(index: SqlIndex, transaction_uid: str, how: str) -> None:
    """The report was delivered: its request goes, its unfinished job is done."""
    now = datetime.now(UTC)
    with index.write() as conn:
        conn.execute(
            delete(commitment_requests).where(
                commitment_requests.c.transaction_uid == transaction_uid
            )
        )
        conn.execute(
            update(jobs)
            .where(
                and_(
                    jobs.c.kind == COMMIT_JOB,
                    jobs.c.target == transaction_uid,
                    jobs.c.status.in_(("pending", "running")),
                )
            )
            .values(status="done", error="", updated_at=now,
                    result_json=json.dumps({"delivered": how}))
        )


def note_commitment_error(index: SqlIndex, transaction_uid: str, error: str) -> None:
    """Why the receiver could not deliver an owed report (the queue API shows it)."""
    with index.write() as conn:
        conn.execute(
            update(jobs)
            .where(
                and_(
                    jobs.c.kind == COMMIT_JOB,
                    jobs.c.target == transaction_uid,
                    jobs.c.status == "pending",
                )
            )
            .values(error=error[:2000], updated_at=datetime.now(UTC))
        )


@dataclass(frozen=True, slots=True)
class CommitmentJob:
    """A ``commit`` job as the admin API shows it, with the request it reports on."""

    job: QueuedJob
    calling_ae: str  # "" once the request is gone (its report was delivered)


def commitment_jobs(
    index: SqlIndex, *, status: str | None = None, limit: int = 100
) -> list[CommitmentJob]:
    """The newest ``commit`` jobs (optionally one status) and their SCU's AE title."""
    cond = jobs.c.kind == COMMIT_JOB
    if status is not None:
        cond = and_(cond, jobs.c.status == status)
    joined = jobs.outerjoin(
        commitment_requests, commitment_requests.c.transaction_uid == jobs.c.target
    )
    with read_only(index.engine) as conn:
        rows = conn.execute(
            select(
                jobs.c.id, jobs.c.kind, jobs.c.target, jobs.c.status, jobs.c.attempts,
                jobs.c.error, jobs.c.not_before, jobs.c.updated_at,
                commitment_requests.c.calling_ae,
            )
            .select_from(joined)
            .where(cond)
            .order_by(jobs.c.id.desc())
            .limit(limit)
        ).all()
    return [CommitmentJob(QueuedJob(*row[:8]), str(row[8] or "")) for row in rows]
