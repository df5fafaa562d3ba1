"""Tables for the EMR rules (issue 7): action log, device API keys, signed results, retention.

One definition for SQLite and PostgreSQL, on the index's :data:`~storage.index.schema.metadata`
(migration ``0004``).

Why the action log is a table and not an append-only file: every process (forked
receivers, API, worker) appends to one chain, which the database's write lock
serialises on either backend (an append-only file would need a shared file system
and its own lock when the index is PostgreSQL); FHIR ``AuditEvent`` searches by
patient, agent and date use indexes; and the online backup of the index takes the log
in the same consistent snapshot. Triggers refuse UPDATE and DELETE, and the hash
chain (``prev_hash``/``hash``) makes any change made around the triggers visible to
``pacslab audit verify``.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from storage.index.schema import metadata

__all__ = ["api_keys", "audit_events", "audit_head", "retention", "signed_results"]

audit_events = Table(
    "audit_events",
    metadata,
    # Position in the chain, assigned by the writer under the write lock (not autoincrement:
    # a gap must mean a removed entry).
    Column("seq", Integer, primary_key=True, autoincrement=False),
    # ISO 8601 UTC with microseconds, kept as text: the hashed bytes must survive the
    # round trip through either database unchanged.
    Column("recorded", String(32), nullable=False),
    Column("action", String(1), nullable=False),  # FHIR R4 AuditEvent.action C R U D E
    Column("event_type", String(32), nullable=False),  # rest, dicom.c-store, …
    Column("outcome", String(2), nullable=False),  # FHIR R4 AuditEvent.outcome 0 4 8 12
    Column("outcome_desc", String(64), nullable=False, server_default=""),
    Column("agent", String(128), nullable=False),  # token subject, api key id or AE title
    Column("agent_type", String(16), nullable=False),  # user | apikey | ae | system
    Column("source", String(64), nullable=False, server_default=""),  # peer address
    Column("resource", String(256), nullable=False, server_default=""),
    # HMAC-SHA256 of (issuer, Patient ID), 32 hex digits: no identifier in the log.
    Column("patient_key", String(32), nullable=False, server_default=""),
    Column("correlation_id", String(32), nullable=False, server_default=""),
    Column("detail", Text, nullable=False, server_default="{}"),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_events_patient_key", "patient_key"),
    Index("ix_audit_events_agent", "agent"),
    Index("ix_audit_events_recorded", "recorded"),
)

#: One row (id 1): the last entry's seq and hash, so a truncated tail is detected too.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("scopes", Text, nullable=False),  # space-separated, as the OAuth2 ``scope`` claim
    # scrypt (RFC 7914) of the secret part: ``scrypt$n$r$p$salt_hex$hash_hex``.
    Column("secret_hash", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked", Boolean, nullable=False, server_default="0"),
)

signed_results = Table(
    "signed_results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("resource_type", String(32), nullable=False),  # DiagnosticReport
    Column("resource_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # final | amended | corrected …
    # The exact signed bytes: RFC 8785 canonical JSON of the resource.
    Column("canonical_json", Text, nullable=False),
    Column("jws", Text, nullable=False),  # detached compact JWS (RFC 7515 Appendix F)
    Column("cert_sha256", String(64), nullable=False),
    Column("signer", String(128), nullable=False),
    Column("signed_at", DateTime(timezone=True), nullable=False),
    Column("replaces_version", Integer),
    Column("patient_key", String(32), nullable=False, server_default=""),
    UniqueConstraint("resource_type", "resource_id", "version", name="uq_signed_results_version"),
)

retention = Table(
    "retention",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("target_kind", String(16), nullable=False),  # study | result
    Column("target_id", String(64), nullable=False),
    Column("years", Integer, nullable=False),
    Column("rule", String(64), nullable=False, server_default=""),
    Column("reference_date", String(10), nullable=False),  # ISO date the period runs from
    Column("expires_on", String(10), nullable=False),
    Column("assigned_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("target_kind", "target_id", name="uq_retention_target"),
    Index("ix_retention_expires_on", "expires_on"),
)
