"""Retention classes in the index (table ``retention``) and the deletions they allow.

Studies get a class from their series (modalities, institution) and study date the
first time :meth:`RetentionStore.assign_studies` sees them (``pacslab retention
report`` runs it); signed results get theirs when they are signed. An operator may
lengthen a class (a patient died: 30 years), never shorten it. Deleting before
``expires_on`` raises :class:`~core.errors.RetentionError`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import cast

from sqlalchemy import Engine, and_, delete, select, update

from core.errors import NotFoundError
from core.retention import RetentionDecision, RetentionFacts, check_deletable, decide
from core.settings import RetentionSettings
from storage.abc import OriginalStore
from storage.index.schema import instances, jobs, series, studies, study_modalities
from storage.index.schema_emr import retention
from storage.index.sqlite import read_only

__all__ = ["RetentionRow", "RetentionStore"]


@dataclass(frozen=True, slots=True)
class RetentionRow:
    target_kind: str
    target_id: str
    years: int
    rule: str
    reference_date: str
    expires_on: str


def _row(r: object) -> RetentionRow:
    return RetentionRow(r.target_kind, r.target_id, r.years, r.rule,  # type: ignore[attr-defined]
                        r.reference_date, r.expires_on)  # type: ignore[attr-defined]


def _parse_da(value: str, fallback: date) -> date:
    # DICOM DA is YYYYMMDD (PS3.5 6.2); an empty or odd date runs from when we got it.
    try:
        return datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return fallback


class RetentionStore:
    """The ``retention`` table and guarded deletion."""

    def __init__(self, engine: Engine, settings: RetentionSettings) -> None:
        self.engine = engine
        self.settings = settings

    def set(self, kind: str, target_id: str, decision: RetentionDecision, reference: date,
            *, lengthen_only: bool = True) -> RetentionRow:
        """Record a class; an existing longer class is kept unless ``lengthen_only`` is off."""
        with self.engine.begin() as conn:
            current = conn.execute(select(retention).where(and_(
                retention.c.target_kind == kind, retention.c.target_id == target_id))).first()
            values = {
                "years": decision.years, "rule": decision.rule[:64],
                "reference_date": reference.isoformat(),
                "expires_on": decision.expires_on.isoformat(),
                "assigned_at": datetime.now(UTC),
            }
            if current is None:
                conn.execute(retention.insert().values(target_kind=kind, target_id=target_id,
                                                       **values))
            elif not lengthen_only or decision.expires_on.isoformat() > current.expires_on:
                conn.execute(update(retention).where(retention.c.id == current.id).values(**values))
        found = self.get(kind, target_id)
        assert found is not None
        return found

    def get(self, kind: str, target_id: str) -> RetentionRow | None:
        with read_only(self.engine) as conn:
            r = conn.execute(select(retention).where(and_(
                retention.c.target_kind == kind, retention.c.target_id == target_id))).first()
        return _row(r) if r is not None else None

    def assign_result(self, target_id: str, facts: RetentionFacts) -> RetentionRow:
        return self.set("result", target_id, decide(facts, self.settings), facts.reference_date)

    def assign_studies(self, *, deceased_studies: frozenset[str] = frozenset()) -> int:
        """Give every study without a class one from the rules; return how many got one."""
        with read_only(self.engine) as conn:
            known = {r.target_id for r in conn.execute(
                select(retention.c.target_id).where(retention.c.target_kind == "study"))}
            rows = conn.execute(
                select(studies.c.study_instance_uid, studies.c.study_date,
                       studies.c.institution_name, studies.c.created_at, series.c.modality)
                .select_from(studies.outerjoin(series, series.c.study_pk == studies.c.id))
            ).all()
        facts: dict[str, dict[str, object]] = {}
        for r in rows:
            if r.study_instance_uid in known:
                continue
            f = facts.setdefault(r.study_instance_uid, {
                "date": _parse_da(r.study_date, r.created_at.date()),
                "modalities": set(), "departments": {r.institution_name} - {""}})
            if r.modality:
                f["modalities"].add(r.modality)  # type: ignore[attr-defined]
        for uid, f in facts.items():
            ref = f["date"]
            assert isinstance(ref, date)
            self.set("study", uid, decide(RetentionFacts(
                kind="study", reference_date=ref,
                modalities=frozenset(cast("set[str]", f["modalities"])),
                departments=frozenset(cast("set[str]", f["departments"])),
                deceased=uid in deceased_studies,
            ), self.settings), ref)
        return len(facts)

    def expired(self, today: date) -> list[RetentionRow]:
        """What may be deleted on ``today`` (retention ended), oldest first."""
        with read_only(self.engine) as conn:
            rows = conn.execute(select(retention).where(retention.c.expires_on <= today.isoformat())
                                .order_by(retention.c.expires_on)).all()
        return [_row(r) for r in rows]

    def all(self) -> list[RetentionRow]:
        with read_only(self.engine) as conn:
            return [_row(r) for r in conn.execute(select(retention).order_by(retention.c.id))]

    def check_delete(self, kind: str, target_id: str, today: date) -> None:
        """Raise RetentionError unless ``kind/target_id`` may be deleted ``today``."""
        row = self.get(kind, target_id)
        check_deletable(f"{kind} {target_id}",
                        date.fromisoformat(row.expires_on) if row else None, today)

    def delete_study(self, uid: str, today: date, originals: OriginalStore | None = None) -> int:
        """Delete a study whose retention ended: index rows, then unreferenced originals.

        Returns the number of instance versions removed. Processing outputs (Zarr
        pyramids) are left for the store's own clean-up.
        """
        self.check_delete("study", uid, today)
        with self.engine.begin() as conn:
            study = conn.execute(select(studies.c.id).where(
                studies.c.study_instance_uid == uid)).first()
            if study is None:
                raise NotFoundError(f"no study {uid}")
            series_rows = conn.execute(select(series.c.id, series.c.series_instance_uid)
                                       .where(series.c.study_pk == study.id)).all()
            pks = [s.id for s in series_rows]
            gone = conn.execute(select(instances.c.sop_instance_uid, instances.c.blob_key)
                                .where(instances.c.series_pk.in_(pks))).all()
            conn.execute(delete(jobs).where(jobs.c.target.in_(
                [g.sop_instance_uid for g in gone] + [s.series_instance_uid for s in series_rows])))
            conn.execute(delete(instances).where(instances.c.series_pk.in_(pks)))
            conn.execute(delete(study_modalities).where(study_modalities.c.study_pk == study.id))
            conn.execute(delete(series).where(series.c.study_pk == study.id))
            conn.execute(delete(studies).where(studies.c.id == study.id))
        if originals is not None:
            with read_only(self.engine) as conn:
                for g in gone:
                    still = conn.execute(select(instances.c.id).where(
                        instances.c.blob_key == g.blob_key).limit(1)).first()
                    if still is None:
                        with contextlib.suppress(OSError, NotFoundError):
                            originals.delete(g.blob_key)
        return len(gone)
