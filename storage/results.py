"""Signed results: every signed version kept, none ever changed (issue 7 §3).

A version is the exact canonical bytes that were signed plus the detached JWS. A new
version can only be added on top of the latest (``replaces_version``), so an
amendment keeps the original, as the EMR rules ask; UPDATE is never issued.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, and_, func, select
from sqlalchemy.exc import IntegrityError

from core.errors import SignedResultError
from storage.index.schema_emr import signed_results
from storage.index.sqlite import read_only

__all__ = ["SignedResult", "SignedResultStore"]


@dataclass(frozen=True, slots=True)
class SignedResult:
    resource_type: str
    resource_id: str
    version: int
    status: str
    canonical_json: str
    jws: str
    cert_sha256: str
    signer: str
    signed_at: datetime
    replaces_version: int | None = None
    patient_key: str = ""


class SignedResultStore:
    """The ``signed_results`` table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, result: SignedResult) -> None:
        """Insert a version; it must be exactly the next one after the latest."""
        with self.engine.begin() as conn:
            latest = conn.execute(
                select(func.max(signed_results.c.version)).where(and_(
                    signed_results.c.resource_type == result.resource_type,
                    signed_results.c.resource_id == result.resource_id,
                ))
            ).scalar_one_or_none() or 0
            if result.version != latest + 1 or (result.replaces_version or 0) != latest:
                raise SignedResultError(
                    f"{result.resource_type}/{result.resource_id} is at version {latest}"
                )
            try:
                conn.execute(signed_results.insert().values(**{
                    k: getattr(result, k) for k in SignedResult.__slots__
                }))
            except IntegrityError as exc:
                raise SignedResultError("a concurrent signature won") from exc

    def versions(self, resource_type: str, resource_id: str) -> list[SignedResult]:
        with read_only(self.engine) as conn:
            rows = conn.execute(
                select(signed_results).where(and_(
                    signed_results.c.resource_type == resource_type,
                    signed_results.c.resource_id == resource_id,
                )).order_by(signed_results.c.version)
            ).mappings().all()
        return [
            SignedResult(**{k: r[k] for k in SignedResult.__slots__})
            for r in rows
        ]

    def latest(self, resource_type: str, resource_id: str) -> SignedResult | None:
        found = self.versions(resource_type, resource_id)
        return found[-1] if found else None

    def ensure_editable(self, resource_type: str, resource_id: str) -> None:
        """Refuse an in-place change of a signed resource (for PUT/PATCH/DELETE routes)."""
        if self.latest(resource_type, resource_id) is not None:
            raise SignedResultError(
                f"{resource_type}/{resource_id} is signed: amend it with a new signed version"
            )
