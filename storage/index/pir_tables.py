"""The tables of patient identity changes (IHE PIR; issue 17, migration ``0008_pir``).

Kept apart from ``schema.py`` (own ``MetaData``, as ``qr.py`` does) so that parallel
work on the shared tables does not conflict, and apart from ``patients.py`` (which
imports ``sql.py``) so that the query builder (``queries.py``, imported by ``sql.py``)
can hide merged-away patients without an import cycle.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text

__all__ = ["patient_changes", "patient_links"]

_meta = MetaData()  # its own: schema.py's metadata belongs to the shared tables

patient_changes = Table(
    "patient_changes",
    _meta,
    Column("id", Integer, primary_key=True),
    Column("change_id", String(32), nullable=False, unique=True),
    Column("kind", String(24), nullable=False),
    Column("source", String(16), nullable=False, server_default=""),
    Column("agent", String(128), nullable=False, server_default=""),
    # ",pk,pk," of the patient rows involved (review lists filter on it).
    Column("patient_pks", String(255), nullable=False, server_default=""),
    Column("summary_json", Text, nullable=False, server_default="{}"),
    Column("rows_json", Text, nullable=False, server_default="{}"),
    Column("undoes", String(32), nullable=False, server_default=""),
    Column("undone_by", String(32), nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: A merged-away (obsolete) patient row → the row it was merged into.
patient_links = Table(
    "patient_links",
    _meta,
    Column("obsolete_pk", Integer, primary_key=True),
    Column("surviving_pk", Integer, nullable=False, index=True),
    Column("change_id", String(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
