"""Storage seams (STYLE.md §6): Protocols the services depend on, with capability flags.

Only the standard library here, so every layer can import it without cycles.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, runtime_checkable

__all__ = [
    "AddOutcome",
    "Job",
    "MetadataIndex",
    "NewInstance",
    "OriginalStore",
    "StoredInstance",
]


@dataclass(frozen=True, slots=True)
class NewInstance:
    """An instance whose original is durably stored, ready to be indexed.

    ``record`` is a :class:`core.instance.InstanceRecord` (typed ``Any`` so this module
    needs nothing but the standard library).
    """

    record: Any
    blob_key: str
    size: int
    calling_ae: str
    received_at: datetime
    metadata_json: str = "{}"
    correlation_id: str = ""
    #: ``(journal id, sequence number, location)`` of its original journal record
    #: (storage/journal.py): kept with the row, so that a commit a power cut undid is
    #: replayed from the record, and only then, and so that readers find the record.
    journal_mark: tuple[str, int, str] | None = None


@dataclass(frozen=True, slots=True)
class AddOutcome:
    """What indexing one instance did.

    ``stored``: new SOP Instance; ``duplicate``: same UID and same bytes, nothing added;
    ``replaced``: same UID, other bytes: a new version is current, the old one kept;
    ``refused``: the SOP Instance was rejected (IHE IOCM), nothing added, ``reason``
    is the rejection's CID 7011 code; ``restored``: it was rejected for an expired
    retention period and is current again.
    """

    sop_instance_uid: str
    status: Literal["stored", "duplicate", "replaced", "refused", "restored"]
    version: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class StoredInstance:
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int
    version: int
    is_current: bool
    received_at: datetime
    instance_number: int | None = None
    metadata_json: str = "{}"


@dataclass(frozen=True, slots=True)
class Job:
    """A processing job row (the hand-off from ingest to processing, STYLE.md §1)."""

    id: int
    kind: str
    target: str
    status: str
    attempts: int
    correlation_id: str = ""
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)


class OriginalStore(Protocol):
    """Content-addressed store of Part-10 originals, keyed by SHA-256 of the data set."""

    @property
    def has_local_paths(self) -> bool:
        """True when :meth:`path` returns a file a decoder can open directly."""
        ...

    def staging_dir(self) -> Path:
        """A directory on the same file system, for files being received."""
        ...

    def commit(self, staged: Path, key: str, *, defer_sync: bool = False) -> bool:
        """Move a fully written, fsync'ed staged file into place under ``key``.

        Returns False when the key already existed (the staged file is removed).
        The original is durable when this returns: on a file system the rename and
        its parent directory are fsync'ed; in object storage the PUT has succeeded
        (and the staged file is removed). With ``defer_sync`` the directory fsync is
        left to the next :meth:`sync` (so a batch of commits shares one round of them).
        """
        ...

    def sync(self) -> None:
        """Make every ``commit(defer_sync=True)`` so far durable (OutOfResourcesError
        if it cannot)."""
        ...

    def path(self, key: str) -> Path:
        """A local file of the original (a cached download when not ``has_local_paths``)."""
        ...

    def open(self, key: str) -> BinaryIO: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...


@runtime_checkable
class MetadataIndex(Protocol):
    """The index of patients, studies, series, instances and processing jobs."""

    def add_instances(
        self, items: Sequence[NewInstance], *, sync: bool = True
    ) -> list[AddOutcome]:
        """Index a batch in one transaction, each with a pending ``instance`` job.

        Durable when this returns; with ``sync=False`` only once :meth:`sync_instances`
        has returned (so that the flush can be shared and leave the write path)."""
        ...

    def sync_instances(self) -> None:
        """Make every ``add_instances(sync=False)`` committed before this call durable
        (OutOfResourcesError if it cannot)."""
        ...

    def journal_marks(self, journal: str) -> set[int]:
        """The sequence numbers of ``journal``'s records indexed so far
        (``NewInstance.journal_mark``)."""
        ...

    def journal_locations(self, blob_key: str) -> list[str]:
        """Where journal records of ``blob_key`` are, newest first, while an instance
        references it (``NewInstance.journal_mark``)."""
        ...

    def pending_originals(self) -> list[tuple[str, str]]:
        """``(blob key, location)`` of every referenced original that may still be only
        in an original journal."""
        ...

    def drop_journal_locations(self, blob_key: str) -> None:
        """Forget where ``blob_key``'s journal records are (its original was deleted);
        the marks themselves stay."""
        ...

    def forget_journal_marks(self, journal: str, upto: int | None = None) -> None:
        """Drop ``journal``'s marks below ``upto`` (all when None)."""
        ...

    def get_instance(self, sop_instance_uid: str) -> StoredInstance:
        """The current version; raises ``NotFoundError``."""
        ...

    def instance_versions(self, sop_instance_uid: str) -> list[StoredInstance]: ...

    def series_instances(self, series_instance_uid: str) -> list[StoredInstance]: ...

    def iter_instances(self) -> Iterator[StoredInstance]: ...

    def blob_referenced(self, key: str) -> bool:
        """True if any instance version's original has this content key."""
        ...

    def counts(self) -> dict[str, int]:
        """Rows per table and jobs per status, for /metrics and tests."""
        ...

    def claim_jobs(
        self,
        worker: str,
        *,
        kind: str | None = None,
        limit: int = 1,
        defer_arriving_s: float = 0.0,
    ) -> list[Job]:
        """Claim pending jobs; with ``defer_arriving_s``, not the ``instance`` jobs of
        a series that received an instance that recently (it is still arriving)."""
        ...

    def finish_job(self, job_id: int, *, result: dict[str, Any] | None = None) -> None: ...

    def finish_jobs(self, done: Sequence[tuple[int, dict[str, Any]]]) -> None: ...

    def fail_job(self, job_id: int, error: str, *, retry_in_s: float | None = None) -> None: ...

    def fail_jobs(self, failed: Sequence[tuple[int, str, float | None]]) -> None: ...

    def requeue_worker_jobs(self, worker: str, *, give_up_after: int = 0) -> int: ...

    def renew_jobs(self, worker: str, job_ids: Sequence[int]) -> int:
        """Extend the lease of jobs ``worker`` still runs (``claimed_at`` = now); how
        many were renewed. A job another worker took over meanwhile is not."""
        ...

    def requeue_stale_jobs(self, older_than_s: float, *, give_up_after: int = 0) -> int:
        """Running jobs whose worker died go back to pending (restart safety); those
        claimed ``give_up_after`` times already fail instead (poison inputs)."""
        ...

    def close(self) -> None: ...
