"""Long-lived API keys for devices and integrations, stored as scrypt hashes (RFC 7914).

The key id is public (it names the key in logs and the action log); only
:func:`core.auth.hash_api_key` of the secret is stored, so a copy of the database
does not let anyone call the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, select, update

from core.auth import SCOPES, hash_api_key, new_api_key
from storage.index.schema_emr import api_keys
from storage.index.sqlite import read_only

__all__ = ["ApiKeyRecord", "ApiKeyStore"]


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_id: str
    name: str
    scopes: frozenset[str]
    secret_hash: str
    created_at: datetime
    revoked: bool


class ApiKeyStore:
    """The ``api_keys`` table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, name: str, scopes: list[str]) -> str:
        """Store a new key and return its full value ``plk_<id>_<secret>`` (shown once)."""
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scopes {unknown}; known: {', '.join(SCOPES)}")
        key = new_api_key()
        with self.engine.begin() as conn:
            conn.execute(
                api_keys.insert().values(
                    key_id=key.key_id,
                    name=name[:128],
                    scopes=" ".join(sorted(set(scopes))),
                    secret_hash=hash_api_key(key.secret),
                    created_at=datetime.now(UTC),
                    revoked=False,
                )
            )
        return key.token

    def get(self, key_id: str) -> ApiKeyRecord | None:
        with read_only(self.engine) as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        if row is None:
            return None
        return ApiKeyRecord(row.key_id, row.name, frozenset(row.scopes.split()),
                            row.secret_hash, row.created_at, bool(row.revoked))

    def list(self) -> list[ApiKeyRecord]:
        with read_only(self.engine) as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        return [ApiKeyRecord(r.key_id, r.name, frozenset(r.scopes.split()), r.secret_hash,
                             r.created_at, bool(r.revoked)) for r in rows]

    def revoke(self, key_id: str) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(
                update(api_keys).where(api_keys.c.key_id == key_id).values(revoked=True)
            )
        return bool(result.rowcount)
