"""IHE IOCM in the index: apply rejections, list them, purge what they hid.

A rejection (IHE RAD TF-2 4.66, by a KOS rejection note or the admin API) writes one
``rejections`` row per SOP Instance UID and, in the same transaction, makes the
instance's versions not current, takes them off their series' ``num_instances``,
drops a modality no visible series of the study has any more from
``study_modalities``, and retires the series' pyramids (their done ``series`` jobs
become ``rejected``, and the series is due for a new roll-up). Every read of the
index shows only current instances and series with some (``queries._visible``,
``SqlIndex.get_instance``…), so the objects are gone from every answer at once.

The versions and their originals stay until :func:`purge_rejected` deletes them: an explicit
action, audited by its caller (services/rejection.py). The ``rejections`` row stays
after a purge, so the receiver still refuses the UID (sql.py ``_add``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, select, update

from core.errors import NotFoundError
from core.rejection import RejectedRef
from storage.index.schema import (
    instances,
    jobs,
    rejections,
    series,
    studies,
    study_modalities,
    study_versions,
)

if TYPE_CHECKING:
    from storage.abc import OriginalStore
    from storage.index.sql import SqlIndex

__all__ = [
    "Applied",
    "Purged",
    "RejectionRow",
    "apply_rejection",
    "conflicting_refs",
    "current_refs",
    "list_rejections",
    "purge_rejected",
    "study_versions_of",
]

logger = logging.getLogger(__name__)

#: UIDs per IN list: well under SQLite's 32766 bound parameters.
_CHUNK = 500

#: Rejections of up to this many instances lock them against concurrent receives.
_LOCKED_UP_TO = 2000


def _chunks(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i : i + _CHUNK]


@dataclass(frozen=True, slots=True)
class Applied:
    """What a rejection did: rows recorded, instances hidden, studies touched."""

    recorded: int
    hidden: int
    studies: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Purged:
    instances: int
    versions: int
    originals: int


@dataclass(frozen=True, slots=True)
class RejectionRow:
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    code: str
    source: str
    note_uid: str
    rejected_by: str
    rejected_at: datetime
    purged_at: datetime | None


def current_refs(
    index: SqlIndex, study: str, series_uid: str | None = None, sops: Sequence[str] = ()
) -> list[RejectedRef]:
    """The current instances of a study, one of its series, or the named SOP Instances
    of it (what the admin API rejects); NotFoundError when there is none."""
    conds = [studies.c.study_instance_uid == study, instances.c.is_current]
    if series_uid:
        conds.append(series.c.series_instance_uid == series_uid)
    if sops:
        conds.append(instances.c.sop_instance_uid.in_(list(sops)))
    query = (
        select(
            studies.c.study_instance_uid,
            series.c.series_instance_uid,
            instances.c.sop_instance_uid,
            instances.c.sop_class_uid,
        )
        .select_from(
            instances.join(series, instances.c.series_pk == series.c.id).join(
                studies, series.c.study_pk == studies.c.id
            )
        )
        .where(and_(*conds))
        .order_by(instances.c.id)
    )
    with index.read() as conn:
        refs = [RejectedRef(*row) for row in conn.execute(query)]
    if not refs:
        raise NotFoundError("no such study, series or instance")
    if sops and len(refs) != len(set(sops)):
        raise NotFoundError("some instances are not in the study (or series)")
    return refs


def conflicting_refs(index: SqlIndex, refs: Sequence[RejectedRef]) -> int:
    """How many of ``refs`` name a received instance under another study, series or
    SOP Class than the index holds (a rejection note must not hide what it misnames)."""
    by_uid = {r.sop_instance_uid: r for r in refs}
    bad = 0
    with index.read() as conn:
        for chunk in _chunks(list(by_uid)):
            rows = conn.execute(
                select(
                    instances.c.sop_instance_uid,
                    instances.c.sop_class_uid,
                    series.c.series_instance_uid,
                    studies.c.study_instance_uid,
                )
                .distinct()
                .select_from(
                    instances.join(series, instances.c.series_pk == series.c.id).join(
                        studies, series.c.study_pk == studies.c.id
                    )
                )
                .where(instances.c.sop_instance_uid.in_(chunk))
            )
            for uid, sop_class, series_uid, study_uid in rows:
                ref = by_uid[uid]
                if (ref.study_instance_uid, ref.series_instance_uid) != (study_uid, series_uid) or (
                    ref.sop_class_uid and ref.sop_class_uid != sop_class
                ):
                    bad += 1
    return bad


def apply_rejection(
    index: SqlIndex,
    refs: Sequence[RejectedRef],
    code: str,
    *,
    source: str,
    note_uid: str = "",
    by: str = "",
) -> Applied:
    """Record and apply a rejection in one transaction (idempotent: a note received
    again, or an instance already rejected, changes nothing but the recorded reason).

    References to instances not received yet are recorded too: they are refused when
    they arrive (IHE RAD TF-2 4.66.4.1.3).
    """
    now = datetime.now(UTC)
    by_uid = {r.sop_instance_uid: r for r in refs}
    uids = list(by_uid)
    hidden = 0
    touched_studies: set[int] = set()
    with index.write() as conn:
        if len(uids) <= _LOCKED_UP_TO:
            # The receiver's advisory locks on these UIDs (PostgreSQL; a no-op on
            # SQLite, whose writers are serialised): a C-STORE of one of them in
            # flight either commits first (and its version is hidden here) or sees
            # the rejection row (and is refused). Bounded: each lock takes a slot of
            # the server's shared lock table until commit.
            index._lock_keys(conn, uids)  # same package: the receiver's own lock keys
        known: set[str] = set()
        for chunk in _chunks(uids):
            known.update(
                r[0]
                for r in conn.execute(
                    select(rejections.c.sop_instance_uid).where(
                        rejections.c.sop_instance_uid.in_(chunk)
                    )
                )
            )
        new_rows = [
            {
                "sop_instance_uid": uid,
                "study_instance_uid": by_uid[uid].study_instance_uid[:64],
                "series_instance_uid": by_uid[uid].series_instance_uid[:64],
                "code": code,
                "source": source[:16],
                "note_uid": note_uid[:64],
                "rejected_by": by[:128],
                "rejected_at": now,
            }
            for uid in uids
            if uid not in known
        ]
        if new_rows:
            conn.execute(rejections.insert(), new_rows)
        if known:
            # The newest reason wins (a retention-expiry after a quality rejection).
            for chunk in _chunks(sorted(known)):
                conn.execute(
                    update(rejections)
                    .where(rejections.c.sop_instance_uid.in_(chunk))
                    .values(
                        code=code,
                        source=source[:16],
                        note_uid=note_uid[:64],
                        rejected_by=by[:128],
                        rejected_at=now,
                    )
                )
        per_series: dict[int, int] = {}
        for chunk in _chunks(uids):
            rows = conn.execute(
                select(instances.c.id, instances.c.series_pk).where(
                    and_(instances.c.sop_instance_uid.in_(chunk), instances.c.is_current)
                )
            ).all()
            if not rows:
                continue
            conn.execute(
                update(instances)
                .where(instances.c.id.in_([r.id for r in rows]))
                .values(is_current=False)
            )
            for r in rows:
                per_series[r.series_pk] = per_series.get(r.series_pk, 0) + 1
            hidden += len(rows)
        for pk, n in sorted(per_series.items()):
            conn.execute(
                update(series)
                .where(series.c.id == pk)
                .values(
                    num_instances=func.max(series.c.num_instances - n, 0)
                    if index.is_sqlite
                    else func.greatest(series.c.num_instances - n, 0),
                    updated_at=now,
                )
            )
        if per_series:
            affected = conn.execute(
                select(
                    series.c.id,
                    series.c.series_instance_uid,
                    series.c.study_pk,
                    series.c.num_instances,
                ).where(series.c.id.in_(list(per_series)))
            ).all()
            # Their pyramids showed the rejected instances: retired now (the tile
            # service looks up done series jobs); a series with instances left is
            # rolled up again by the worker (series.rollup_due_at).
            conn.execute(
                update(jobs)
                .where(
                    and_(
                        jobs.c.kind == "series",
                        jobs.c.status == "done",
                        jobs.c.target.in_([a.series_instance_uid for a in affected]),
                    )
                )
                .values(status="rejected", updated_at=now)
            )
            # Every affected series is rolled up again, an emptied one too: a series
            # job running now read the instances before this commit and would finish
            # "done" with the rejected ones; the newer job (empty for an emptied series,
            # worker_process.series_job) is the one the tile service then serves.
            conn.execute(
                update(series).where(series.c.id.in_(list(per_series))).values(rollup_due_at=now)
            )
            touched_studies = {a.study_pk for a in affected}
            for study_pk in sorted(touched_studies):
                visible = select(series.c.modality).where(
                    and_(series.c.study_pk == study_pk, series.c.num_instances > 0)
                )
                conn.execute(
                    delete(study_modalities).where(
                        and_(
                            study_modalities.c.study_pk == study_pk,
                            study_modalities.c.modality.not_in(visible),
                        )
                    )
                )
                conn.execute(update(studies).where(studies.c.id == study_pk).values(updated_at=now))
    study_uids = tuple(sorted({r.study_instance_uid for r in refs}))
    logger.info(
        "rejection %s (%s): %d recorded, %d instances hidden, %d studies",
        code,
        source,
        len(uids),
        hidden,
        len(study_uids),
    )
    return Applied(len(uids), hidden, study_uids)


def _row(r: Any) -> RejectionRow:
    return RejectionRow(
        r.sop_instance_uid,
        r.series_instance_uid,
        r.study_instance_uid,
        r.code,
        r.source,
        r.note_uid,
        r.rejected_by,
        r.rejected_at,
        r.purged_at,
    )


def list_rejections(
    index: SqlIndex,
    *,
    study: str | None = None,
    code: str | None = None,
    purged: bool | None = None,
    limit: int = 1000,
) -> list[RejectionRow]:
    """Rejections, newest first (the admin list and what :func:`purge_rejected` reads)."""
    conds: list[Any] = []
    if study:
        conds.append(rejections.c.study_instance_uid == study)
    if code:
        conds.append(rejections.c.code == code)
    if purged is not None:
        conds.append(
            rejections.c.purged_at.is_not(None) if purged else rejections.c.purged_at.is_(None)
        )
    query = select(rejections).order_by(rejections.c.rejected_at.desc()).limit(limit)
    if conds:
        query = query.where(and_(*conds))
    with index.read() as conn:
        return [_row(r) for r in conn.execute(query)]


def purge_rejected(
    index: SqlIndex, uids: Sequence[str], originals: OriginalStore | None = None
) -> Purged:
    """Delete every version of rejected instances and the originals no row uses any more.

    As :meth:`storage.retention.RetentionStore.delete_study` deletes a study: index rows
    (and the instances' jobs) in one transaction, then each original whose content key
    no row references. Only instances with a ``rejections`` row and no current version
    are touched; their rows get ``purged_at``. Series and study rows stay (a receiver
    may have cached their keys; with no current instance they are hidden anyway).
    """
    now = datetime.now(UTC)
    keys: set[str] = set()
    versions = 0
    done: list[str] = []
    with index.write() as conn:
        for chunk in _chunks(list(uids)):
            rejected = [
                r[0]
                for r in conn.execute(
                    select(rejections.c.sop_instance_uid).where(
                        and_(
                            rejections.c.sop_instance_uid.in_(chunk),
                            rejections.c.purged_at.is_(None),
                        )
                    )
                )
            ]
            if not rejected:
                continue
            rows: Sequence[Any] = conn.execute(
                select(instances.c.id, instances.c.blob_key, instances.c.is_current).where(
                    instances.c.sop_instance_uid.in_(rejected)
                )
            ).all()
            if any(r.is_current for r in rows):
                # A current version: restored since (retention expiry, re-sent).
                live = {
                    r[0]
                    for r in conn.execute(
                        select(instances.c.sop_instance_uid).where(
                            and_(instances.c.sop_instance_uid.in_(rejected), instances.c.is_current)
                        )
                    )
                }
                rejected = [u for u in rejected if u not in live]
                rows = conn.execute(
                    select(instances.c.id, instances.c.blob_key).where(
                        instances.c.sop_instance_uid.in_(rejected)
                    )
                ).all()
            conn.execute(
                delete(jobs).where(and_(jobs.c.kind == "instance", jobs.c.target.in_(rejected)))
            )
            conn.execute(delete(instances).where(instances.c.id.in_([r.id for r in rows])))
            conn.execute(
                update(rejections)
                .where(rejections.c.sop_instance_uid.in_(rejected))
                .values(purged_at=now)
            )
            keys.update(r.blob_key for r in rows)
            versions += len(rows)
            done += rejected
    removed = 0
    if originals is not None:
        for key in sorted(keys):
            if index.blob_referenced(key):
                continue  # the same bytes are another instance's (or version's) too
            with contextlib.suppress(OSError, NotFoundError):
                originals.delete(key)
                removed += 1
    logger.info(
        "purged %d rejected instances: %d versions, %d originals", len(done), versions, removed
    )
    return Purged(len(done), versions, removed)


def study_versions_of(index: SqlIndex, study: str) -> list[dict[str, Any]]:
    """The recorded attribute versions of a study, oldest first (issue 17.2): what each
    correction replaced, when, and which re-sent instance brought it."""
    query = (
        select(study_versions)
        .where(study_versions.c.study_instance_uid == study)
        .order_by(study_versions.c.version)
    )
    with index.read() as conn:
        return [
            {
                "version": r.version,
                "previous": json.loads(r.previous_json),
                "cause": r.cause,
                "cause_uid": r.cause_uid,
                "changed_at": r.changed_at.isoformat(),
            }
            for r in conn.execute(query)
        ]
