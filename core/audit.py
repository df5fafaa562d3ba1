"""The action log's values and its hash chain, as pure functions (no I/O).

Each entry records who (token subject, API key or AE title), what (resource and a
keyed patient reference, never a name or identifier), which action, when, from where
and the outcome: the elements of a FHIR R4 ``AuditEvent`` and of a DICOM PS3.15 A.5
audit message. Entry *n* carries ``prev_hash``, the SHA-256 of entry *n-1*'s
canonical bytes (RFC 8785 JSON of every field but ``seq`` and ``hash``), so editing,
removing or reordering an entry breaks the chain at that point, and
:func:`verify_chain` says where.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

from core.canonical import canonicalize

__all__ = [
    "GENESIS",
    "AuditEntry",
    "ChainProblem",
    "ChainedEntry",
    "action_for_method",
    "chain",
    "entry_hash",
    "outcome_for_dimse",
    "outcome_for_http",
    "patient_key",
    "verify_chain",
]

#: ``prev_hash`` of the first entry.
GENESIS: Final = "0" * 64


def patient_key(secret: bytes, patient_id: str, issuer: str = "") -> str:
    """A keyed, stable reference to a patient: HMAC-SHA256(issuer ␀ id), 32 hex digits.

    The log and the FHIR export carry only this, so they hold no identifier
    (Circular 13/2025 asks for the least PHI needed); whoever holds the installation's
    secret can compute it for a search. Empty ``patient_id`` gives ``""``.
    """
    if not patient_id:
        return ""
    msg = f"{issuer}\x00{patient_id}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()[:32]


def action_for_method(method: str) -> str:
    """FHIR R4 AuditEvent.action for an HTTP method: C, R, U, D (E for others)."""
    return {"GET": "R", "HEAD": "R", "POST": "C", "PUT": "U", "PATCH": "U", "DELETE": "D"}.get(
        method.upper(), "E"
    )


def outcome_for_http(status: int) -> str:
    """FHIR R4 AuditEvent.outcome: 0 success, 4 minor failure (4xx), 8 serious (5xx)."""
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


def outcome_for_dimse(status: int) -> str:
    """AuditEvent.outcome for a DIMSE status (PS3.7 C): success/warning 0, failure 4/8."""
    if status in (0x0000, 0x0001, 0x0107, 0x0116, 0xFE00, 0xFF00, 0xFF01) or (
        0xB000 <= status <= 0xBFFF
    ):
        return "0"
    return "8" if 0xA700 <= status <= 0xA7FF else "4"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One action, before it has a place in the chain."""

    action: str  # C R U D E
    event_type: str  # rest | dicom.c-store | dicom.c-find | dicom.mpps | lab.file | sign …
    outcome: str  # 0 4 8 12
    agent: str
    agent_type: Literal["user", "apikey", "ae", "system", "anonymous"]
    source: str = ""
    resource: str = ""
    patient_key: str = ""
    correlation_id: str = ""
    outcome_desc: str = ""
    #: Canonical JSON object text with extra non-PHI facts (method, query keys, counts).
    detail: str = "{}"
    #: ISO 8601 UTC with microseconds; filled by :meth:`stamped` when empty.
    recorded: str = ""

    @staticmethod
    def details(values: Mapping[str, Any]) -> str:
        """``detail`` text from a mapping (RFC 8785 canonical, so the hash is stable)."""
        return canonicalize(dict(values)).decode()

    def stamped(self, when: datetime | None = None) -> AuditEntry:
        if self.recorded:
            return self
        moment = (when or datetime.now(UTC)).astimezone(UTC)
        return replace(self, recorded=moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


@dataclass(frozen=True, slots=True)
class ChainedEntry:
    """An entry at position ``seq`` of the chain, with its links."""

    seq: int
    recorded: str
    action: str
    event_type: str
    outcome: str
    outcome_desc: str
    agent: str
    agent_type: str
    source: str
    resource: str
    patient_key: str
    correlation_id: str
    detail: str
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: Any) -> ChainedEntry:
        """From a mapping (e.g. a SQLAlchemy ``RowMapping``) with every field."""
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        # Every field is a str or int: a flat copy is what asdict's deep copy gives.
        return {name: getattr(self, name) for name in _CHAINED_FIELDS}


_CHAINED_FIELDS: Final = tuple(f.name for f in fields(ChainedEntry))
_ENTRY_FIELDS: Final = tuple(f.name for f in fields(AuditEntry))


_HASHED: Final = tuple(
    f.name for f in fields(ChainedEntry) if f.name not in ("seq", "hash")
)


def entry_hash(values: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical bytes of an entry (all fields but ``seq``, ``hash``)."""
    return hashlib.sha256(canonicalize({k: values[k] for k in _HASHED})).hexdigest()


def chain(entries: Iterable[AuditEntry], *, last_seq: int, last_hash: str) -> list[ChainedEntry]:
    """Give ``entries`` the next positions after ``(last_seq, last_hash)`` and link them."""
    out: list[ChainedEntry] = []
    prev, seq = last_hash, last_seq
    for entry in entries:
        seq += 1
        stamped = entry.stamped()
        values = {name: getattr(stamped, name) for name in _ENTRY_FIELDS}
        values["prev_hash"] = prev
        digest = entry_hash(values)
        out.append(ChainedEntry(seq=seq, hash=digest, **values))
        prev = digest
    return out


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """Where the chain is broken and the most likely reason."""

    kind: Literal["edited", "removed", "reordered", "truncated", "head"]
    seq: int
    message: str


def verify_chain(
    entries: Iterable[ChainedEntry], head: tuple[int, str] | None = None
) -> list[ChainProblem]:
    """Check every entry's hash and link; an empty list means the log is intact.

    Parameters
    ----------
    entries
        The log in ``seq`` order.
    head
        ``(seq, hash)`` of the last entry as the writer recorded it, to detect a
        removed tail.
    """
    rows = list(entries)
    position = {row.hash: row.seq for row in rows}
    problems: list[ChainProblem] = []
    prev: ChainedEntry | None = None
    for row in rows:
        if entry_hash(row.as_dict()) != row.hash:
            problems.append(
                ChainProblem("edited", row.seq, f"entry {row.seq} was edited: its content "
                              "does not match its hash")
            )
        expected = prev.hash if prev is not None else GENESIS
        if row.prev_hash != expected:
            problems.append(_link_problem(row, prev, position))
        prev = row
    if head is not None:
        last_seq, last_hash = (prev.seq, prev.hash) if prev is not None else (0, GENESIS)
        if head[0] > last_seq:
            problems.append(
                ChainProblem("truncated", last_seq + 1,
                             f"entries {last_seq + 1}..{head[0]} were removed from the end")
            )
        elif head != (last_seq, last_hash):
            problems.append(
                ChainProblem("head", last_seq,
                             f"the last entry ({last_seq}) is not the one the writer recorded")
            )
    return problems


def _link_problem(
    row: ChainedEntry, prev: ChainedEntry | None, position: Mapping[str, int]
) -> ChainProblem:
    expected_seq = prev.seq + 1 if prev is not None else 1
    if row.seq != expected_seq:
        return ChainProblem(
            "removed", expected_seq,
            f"entries {expected_seq}..{row.seq - 1} were removed"
            if row.seq - 1 > expected_seq
            else f"entry {expected_seq} was removed",
        )
    origin = position.get(row.prev_hash)
    if origin is not None:
        return ChainProblem(
            "reordered", row.seq,
            f"entry {row.seq} was moved: it was written after entry {origin}",
        )
    if prev is not None:
        # prev's stored hash is not what row was linked to: prev was rewritten with a
        # recomputed hash, or the entry between them was removed and the rest renumbered.
        return ChainProblem(
            "edited", prev.seq,
            f"entry {prev.seq} was changed and re-hashed, or the entry after it removed",
        )
    return ChainProblem("removed", row.seq, f"the entries before {row.seq} were removed")


def to_json_line(entry: ChainedEntry) -> str:
    """One entry as a JSON line (for exports and backups)."""
    return json.dumps(entry.as_dict(), sort_keys=True, ensure_ascii=False)
