"""The ``shares`` table (migration 0008): share links by id and by token hash.

Rows keep only the SHA-256 of the token (:func:`core.sharing.hash_share_token`);
the rules (who may create, expiry, what a token may read) are in
:mod:`services.sharing` and :mod:`core.sharing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from storage.index.schema import patients, series, shares, studies

if TYPE_CHECKING:
    from storage.index.sql import SqlIndex

__all__ = ["ShareRecord", "ShareStore"]


def _utc(value: datetime | None) -> datetime | None:
    # SQLite gives naive datetimes back: every value written here was UTC.
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ShareRecord:
    share_id: str
    study_uid: str
    note: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_by: str

    @classmethod
    def from_row(cls, row: Any) -> ShareRecord:
        created, expires = _utc(row.created_at), _utc(row.expires_at)
        assert created is not None and expires is not None
        return cls(
            row.share_id,
            row.study_instance_uid,
            row.note,
            row.created_by,
            created,
            expires,
            _utc(row.revoked_at),
            row.revoked_by,
        )


class ShareStore:
    """Reads and writes of share rows on the index database."""

    def __init__(self, index: SqlIndex) -> None:
        self.index = index

    def add(self, record: ShareRecord, token_hash: str) -> None:
        with self.index.write() as conn:
            conn.execute(
                shares.insert().values(
                    share_id=record.share_id,
                    token_hash=token_hash,
                    study_instance_uid=record.study_uid,
                    note=record.note[:200],
                    created_by=record.created_by[:128],
                    created_at=record.created_at,
                    expires_at=record.expires_at,
                    revoked_at=None,
                    revoked_by="",
                )
            )

    def by_token_hash(self, token_hash: str) -> ShareRecord | None:
        with self.index.read() as conn:
            row = conn.execute(select(shares).where(shares.c.token_hash == token_hash)).first()
        return ShareRecord.from_row(row) if row is not None else None

    def get(self, share_id: str) -> ShareRecord | None:
        with self.index.read() as conn:
            row = conn.execute(select(shares).where(shares.c.share_id == share_id)).first()
        return ShareRecord.from_row(row) if row is not None else None

    def list(self, *, study_uid: str | None = None, limit: int = 1000) -> list[ShareRecord]:
        query = select(shares).order_by(shares.c.created_at.desc()).limit(limit)
        if study_uid:
            query = query.where(shares.c.study_instance_uid == study_uid)
        with self.index.read() as conn:
            return [ShareRecord.from_row(r) for r in conn.execute(query)]

    def revoke(self, share_id: str, *, by: str, at: datetime) -> bool:
        """Mark revoked (kept for the record); False if unknown or already revoked."""
        with self.index.write() as conn:
            result = conn.execute(
                update(shares)
                .where(shares.c.share_id == share_id, shares.c.revoked_at.is_(None))
                .values(revoked_at=at, revoked_by=by[:128])
            )
        return bool(result.rowcount)

    def study_series(self, study_uid: str) -> frozenset[str] | None:
        """The study's series UIDs; None if the study is not in the index."""
        with self.index.read() as conn:
            found = conn.execute(
                select(studies.c.id).where(studies.c.study_instance_uid == study_uid)
            ).first()
            if found is None:
                return None
            rows = conn.execute(
                select(series.c.series_instance_uid).where(series.c.study_pk == found.id)
            ).all()
        return frozenset(str(r[0]) for r in rows)

    def study_patient(self, study_uid: str) -> tuple[str, str]:
        """Patient ID and issuer of the study (for the keyed audit reference), or blanks."""
        query = (
            select(patients.c.patient_id, patients.c.issuer)
            .select_from(studies.join(patients, studies.c.patient_pk == patients.c.id))
            .where(studies.c.study_instance_uid == study_uid)
        )
        with self.index.read() as conn:
            row = conn.execute(query).first()
        return (str(row[0] or ""), str(row[1] or "")) if row is not None else ("", "")
