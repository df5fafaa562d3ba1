"""Share links (issue 17 item 4): create, list, revoke, and check a token on each use.

The use cases behind ``POST/GET/DELETE /admin/shares`` and ``pacslab share``. A link
names one study for ``expires_in`` seconds (at most :data:`MAX_TTL_S`); its token is
made and checked by :mod:`core.sharing` and only its SHA-256 is stored
(:class:`storage.shares.ShareStore`). Creation and revocation are written to the
action log here; every request made with a token is logged by the HTTP audit
middleware with the agent ``share:<id>`` (refusals too, naming the share), so the log
tells who opened what, when and from where. The clock is injected (``now``), so
expiry is tested without waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from core.audit import AuditEntry, patient_key
from core.errors import InvalidQueryError, NotFoundError, UnauthorizedError
from core.sharing import (
    ShareGrant,
    hash_share_token,
    is_share_token,
    new_share_id,
    new_share_token,
    share_state,
)
from storage.audit import AuditLog
from storage.shares import ShareRecord, ShareStore

__all__ = ["DEFAULT_TTL_S", "MAX_TTL_S", "CreatedShare", "ShareService"]

logger = logging.getLogger(__name__)

DEFAULT_TTL_S: Final = 72 * 3600
#: A link is for a consultation, not an archive: 30 days at most.
MAX_TTL_S: Final = 30 * 24 * 3600
MIN_TTL_S: Final = 1


@dataclass(frozen=True, slots=True)
class CreatedShare:
    """A new share and its token (shown once: only its hash is kept)."""

    record: ShareRecord
    token: str

    def url(self, base_url: str) -> str:
        """``{base}/viewer/shared#token=…``: no UID in the URL, the token in the fragment."""
        return f"{base_url.rstrip('/')}/viewer/shared#token={self.token}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ShareService:
    """Share links over a :class:`ShareStore`, writing to ``audit`` when given."""

    def __init__(
        self,
        store: ShareStore,
        *,
        audit: AuditLog | None = None,
        patient_secret: bytes | None = None,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.store = store
        self.audit = audit
        self.patient_secret = patient_secret
        self.now = now

    def create(
        self,
        study_uid: str,
        *,
        expires_in_s: int = DEFAULT_TTL_S,
        note: str = "",
        by: str = "",
        by_kind: str = "user",
        source: str = "",
    ) -> CreatedShare:
        """Share ``study_uid`` for ``expires_in_s`` seconds.

        Raises
        ------
        InvalidQueryError
            ``expires_in_s`` out of range, or a note that is too long.
        NotFoundError
            The study is not in the index.
        """
        if not MIN_TTL_S <= expires_in_s <= MAX_TTL_S:
            raise InvalidQueryError(
                f"expires_in must be between {MIN_TTL_S} and {MAX_TTL_S} seconds"
            )
        if len(note) > 200:
            raise InvalidQueryError("note: at most 200 characters")
        if self.store.study_series(study_uid) is None:
            raise NotFoundError("no such study")
        now = self.now()
        record = ShareRecord(
            new_share_id(),
            study_uid,
            note,
            by[:128],
            now,
            now + timedelta(seconds=expires_in_s),
            None,
            "",
        )
        token = new_share_token()
        self.store.add(record, hash_share_token(token))
        logger.info(
            "share %s created for study %s until %s",
            record.share_id,
            study_uid,
            record.expires_at.isoformat(),
        )
        self._audit(
            "C",
            "share.create",
            record,
            by=by,
            by_kind=by_kind,
            source=source,
            detail={"expires_at": record.expires_at.isoformat(), "study": study_uid},
        )
        return CreatedShare(record, token)

    def list(self, *, study_uid: str | None = None) -> list[ShareRecord]:
        return self.store.list(study_uid=study_uid)

    def state(self, record: ShareRecord) -> str:
        return share_state(record.expires_at, record.revoked_at, self.now())

    def revoke(
        self, share_id: str, *, by: str = "", by_kind: str = "user", source: str = ""
    ) -> ShareRecord:
        """Revoke a share now; its token is refused from the next request on.

        Raises
        ------
        NotFoundError
            No share ``share_id`` (or it was revoked already).
        """
        if not self.store.revoke(share_id, by=by, at=self.now()):
            raise NotFoundError("no such active share")
        record = self.store.get(share_id)
        assert record is not None
        logger.info("share %s revoked", share_id)
        self._audit("D", "share.revoke", record, by=by, by_kind=by_kind, source=source, detail={})
        return record

    def resolve(self, token: str) -> ShareGrant:
        """The grant of a valid token (checked on every request: revocation is immediate).

        Raises
        ------
        UnauthorizedError
            Unknown, expired or revoked; the message names the share id (public), never
            the token.
        """
        if not is_share_token(token):
            raise UnauthorizedError("share link not accepted")
        record = self.store.by_token_hash(hash_share_token(token))
        if record is None:
            raise UnauthorizedError("share link not accepted")
        state = self.state(record)
        if state != "active":
            raise UnauthorizedError(f"share link {record.share_id} {state}")
        series = self.store.study_series(record.study_uid)
        return ShareGrant(
            record.share_id, record.study_uid, series or frozenset(), record.expires_at
        )

    def _audit(
        self,
        action: str,
        event_type: str,
        record: ShareRecord,
        *,
        by: str,
        by_kind: str,
        source: str,
        detail: dict[str, str],
    ) -> None:
        if self.audit is None:
            return
        try:
            key = ""
            if self.patient_secret is not None:
                key = patient_key(self.patient_secret, *self.store.study_patient(record.study_uid))
            self.audit.record(
                AuditEntry(
                    action=action,
                    event_type=event_type,
                    outcome="0",
                    outcome_desc=event_type,
                    agent=(by or "operator")[:128],
                    agent_type=by_kind if by_kind in ("user", "apikey") else "system",  # type: ignore[arg-type]
                    source=source[:64],
                    resource=f"share/{record.share_id}",
                    patient_key=key,
                    detail=AuditEntry.details(detail),
                )
            )
        except Exception:
            logger.error("could not record a share audit entry", exc_info=True)
