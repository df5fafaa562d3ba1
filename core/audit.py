"""The action log's values and its hash chain, as pure functions (no I/O).

Each entry records who (token subject, API key or AE title), what (resource and a
keyed patient reference, never a name or identifier), which action, when, from where
and the outcome: the elements of a FHIR R4 ``AuditEvent`` and of a DICOM PS3.15 A.5
audit message. Entry *n* carries ``prev_hash``, the hash of entry *n-1*'s canonical
bytes (RFC 8785 JSON of every field but ``seq`` and ``hash``), so editing, removing
or reordering an entry breaks the chain at that point, and :func:`verify_chain` says
where.

Anchoring (issue 14 item 5). A plain SHA-256 chain proves nothing to whoever can
write the database: they can recompute it. So entries are keyed: ``hash`` is
``k:`` + HMAC-SHA256 (RFC 2104) of the canonical bytes under a key kept outside the
database (:func:`keyed_hash`, 62 hex digits so it fits the 64-character column), and
the writer appends *checkpoints* — ``(seq, hash, keyed_from)`` with their own HMAC —
to a file outside the database (:func:`checkpoint_line`). Verification with the key
and the checkpoints detects a chain recomputed without the key (an unkeyed hash where
keying had begun), one recomputed with it (a checkpoint's hash no longer matches its
entry) and a cut tail with a moved head (a checkpoint names an entry beyond the end).

Entries written before keying began keep their SHA-256 hashes: rewriting them under
the key would be exactly the re-chaining this detects, and would have the key vouch
for entries it never saw. The first keyed entry's HMAC covers ``prev_hash``, the last
unkeyed hash, and the switch checkpoint records it, so the old part is anchored too.
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
    "Checkpoint",
    "action_for_method",
    "chain",
    "checkpoint_line",
    "entry_hash",
    "is_keyed",
    "keyed_hash",
    "outcome_for_dimse",
    "outcome_for_http",
    "parse_checkpoints",
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
    # hmac.digest: OpenSSL's one-shot HMAC, the same value as hmac.new(...).digest()
    # without building two hash objects in Python (it runs for every stored instance).
    return hmac.digest(secret, msg, "sha256").hex()[:32]


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
    agent_type: Literal["user", "apikey", "ae", "system", "anonymous", "share"]
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


#: Prefix of keyed hashes: ``k:`` + 62 hex digits (248 bits of HMAC-SHA256).
KEYED_PREFIX: Final = "k:"


def entry_hash(values: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical bytes of an entry (all fields but ``seq``, ``hash``)."""
    return hashlib.sha256(canonicalize({k: values[k] for k in _HASHED})).hexdigest()


def keyed_hash(values: Mapping[str, Any], key: bytes) -> str:
    """``k:`` + HMAC-SHA256 (RFC 2104) of the same canonical bytes, truncated to 62 hex.

    Truncating an HMAC is allowed (RFC 2104 5; 248 bits is far above its 80-bit
    floor); it keeps the value in the 64-character ``hash`` column without a migration.
    """
    mac = hmac.digest(key, canonicalize({k: values[k] for k in _HASHED}), "sha256")
    return KEYED_PREFIX + mac.hex()[:62]


def is_keyed(digest: str) -> bool:
    """True if ``digest`` is a :func:`keyed_hash` (else a plain SHA-256 one)."""
    return digest.startswith(KEYED_PREFIX)


def chain(entries: Iterable[AuditEntry], *, last_seq: int, last_hash: str,
          key: bytes | None = None) -> list[ChainedEntry]:
    """Give ``entries`` the next positions after ``(last_seq, last_hash)`` and link them.

    With ``key`` the hashes are :func:`keyed_hash` (the writer always has one), else
    plain SHA-256 (:func:`entry_hash`).
    """
    out: list[ChainedEntry] = []
    prev, seq = last_hash, last_seq
    for entry in entries:
        seq += 1
        stamped = entry.stamped()
        values = {name: getattr(stamped, name) for name in _ENTRY_FIELDS}
        values["prev_hash"] = prev
        digest = keyed_hash(values, key) if key is not None else entry_hash(values)
        out.append(ChainedEntry(seq=seq, hash=digest, **values))
        prev = digest
    return out


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """Where the chain is broken and the most likely reason."""

    kind: Literal["edited", "removed", "reordered", "truncated", "head", "rechained",
                  "checkpoint"]
    seq: int
    message: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """An entry's position and hash, as the writer saw it, kept outside the database.

    ``keyed_from`` is the first ``seq`` the writer keyed: every entry from there on
    must carry a keyed hash.
    """

    seq: int
    hash: str
    keyed_from: int
    at: str = ""

    def _fields(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "keyed_from": self.keyed_from, "at": self.at}


def checkpoint_line(cp: Checkpoint, key: bytes) -> str:
    """One JSON line for the checkpoint file: the fields and their HMAC-SHA256 (``mac``)."""
    fields_ = cp._fields()
    mac = hmac.new(key, canonicalize(fields_), hashlib.sha256).hexdigest()
    return json.dumps(fields_ | {"mac": mac}, sort_keys=True) + "\n"


def parse_checkpoints(
    lines: Iterable[str], key: bytes | None
) -> tuple[list[Checkpoint], list[ChainProblem]]:
    """The checkpoints of a file whose MAC verifies under ``key``, and the lines that don't.

    A last line without its newline is a write in progress and is skipped. Without a
    key nothing can be trusted: no checkpoints are returned.
    """
    good: list[Checkpoint] = []
    bad: list[ChainProblem] = []
    if key is None:
        return good, bad
    for number, line in enumerate(lines, start=1):
        if not line.endswith("\n"):
            continue
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            cp = Checkpoint(int(raw["seq"]), str(raw["hash"]), int(raw["keyed_from"]),
                            str(raw.get("at", "")))
            mac = str(raw["mac"])
        except (ValueError, KeyError, TypeError):
            bad.append(ChainProblem("checkpoint", 0, f"checkpoint line {number} is unreadable"))
            continue
        expected = hmac.new(key, canonicalize(cp._fields()), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, mac):
            bad.append(ChainProblem("checkpoint", cp.seq, f"checkpoint line {number} (entry "
                                    f"{cp.seq}) was not written with the chain key"))
            continue
        good.append(cp)
    return good, bad


def verify_chain(
    entries: Iterable[ChainedEntry],
    head: tuple[int, str] | None = None,
    *,
    key: bytes | None = None,
    checkpoints: Iterable[Checkpoint] = (),
) -> list[ChainProblem]:
    """Check every entry's hash and link; an empty list means the log is intact.

    Parameters
    ----------
    entries
        The log in ``seq`` order.
    head
        ``(seq, hash)`` of the last entry as the writer recorded it, to detect a
        removed tail.
    key
        The chain key. Without it keyed entries are checked for their links only.
    checkpoints
        Verified :class:`Checkpoint` s (:func:`parse_checkpoints`): where keying began
        and entries that must still be there, unchanged.
    """
    rows = list(entries)
    cps = list(checkpoints)
    keyed_from = min((cp.keyed_from for cp in cps), default=None)
    position = {row.hash: row.seq for row in rows}
    problems: list[ChainProblem] = []
    prev: ChainedEntry | None = None
    seen_keyed = False
    for row in rows:
        problem = _content_problem(row, key, keyed_from, seen_keyed)
        if problem is not None:
            problems.append(problem)
        seen_keyed = seen_keyed or is_keyed(row.hash)
        expected = prev.hash if prev is not None else GENESIS
        if row.prev_hash != expected:
            problems.append(_link_problem(row, prev, position))
        prev = row
    last_seq, last_hash = (prev.seq, prev.hash) if prev is not None else (0, GENESIS)
    by_seq = {row.seq: row.hash for row in rows}
    beyond = max([cp.seq for cp in cps] + ([head[0]] if head is not None else []), default=0)
    if beyond > last_seq:
        problems.append(
            ChainProblem("truncated", last_seq + 1,
                         f"entries {last_seq + 1}..{beyond} were removed from the end")
        )
    elif head is not None and head != (last_seq, last_hash):
        problems.append(
            ChainProblem("head", last_seq,
                         f"the last entry ({last_seq}) is not the one the writer recorded")
        )
    for cp in sorted({(cp.seq, cp.hash) for cp in cps}):
        seq, digest = cp
        if seq in by_seq and seq > 0 and by_seq[seq] != digest:
            problems.append(
                ChainProblem("rechained", seq, f"entry {seq} is not the one checkpointed: "
                             "the log was rewritten and its chain recomputed")
            )
    return problems


def _content_problem(row: ChainedEntry, key: bytes | None, keyed_from: int | None,
                     seen_keyed: bool) -> ChainProblem | None:
    values = row.as_dict()
    if is_keyed(row.hash):
        if key is not None and not hmac.compare_digest(keyed_hash(values, key), row.hash):
            return ChainProblem("edited", row.seq, f"entry {row.seq} was edited: its content "
                                "does not match its hash")
        return None
    if entry_hash(values) != row.hash:
        return ChainProblem("edited", row.seq, f"entry {row.seq} was edited: its content "
                            "does not match its hash")
    if seen_keyed or (keyed_from is not None and row.seq >= keyed_from):
        return ChainProblem("edited", row.seq, f"entry {row.seq} was edited and re-hashed "
                            "without the chain key (keyed entries began before it)")
    return None


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
