"""The tables of patient identity changes (IHE PIR; issue 17, migration ``0008_pir``;
``patient_change_patients``: issue 21, migration ``0014_pir_change_patients``).

Kept apart from ``schema.py`` (own ``MetaData``, as ``qr.py`` does) so that parallel
work on the shared tables does not conflict, and apart from ``patients.py`` (which
imports ``sql.py``) so that the query builder (``queries.py``, imported by ``sql.py``)
can hide merged-away patients without an import cycle.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

__all__ = ["patient_change_patients", "patient_changes", "patient_links"]

_meta = MetaData()  # its own: schema.py's metadata belongs to the shared tables

patient_changes = Table(
    "patient_changes",
    _meta,
    Column("id", Integer, primary_key=True),
    Column("change_id", String(32), nullable=False, unique=True),
    Column("kind", String(24), nullable=False),
    Column("source", String(16), nullable=False, server_default=""),
    Column("agent", String(128), nullable=False, server_default=""),
    # ",pk,pk," of the patient rows involved, cut at 255 characters: kept for old
    # readers and display only; every reader uses patient_change_patients (issue 21).
    Column("patient_pks", String(255), nullable=False, server_default=""),
    Column("summary_json", Text, nullable=False, server_default="{}"),
    Column("rows_json", Text, nullable=False, server_default="{}"),
    Column("undoes", String(32), nullable=False, server_default=""),
    Column("undone_by", String(32), nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: The patient rows one change involved, one row each, none left out (issue 21,
#: migration ``0014_pir_change_patients``). The primary key leads with the patient, so
#: a patient's version (1 + its changes, FHIR ``meta.versionId``) and its changes newest
#: first are range reads of that key, not reads of the whole change log; ``position``
#: keeps the change's own order (surviving patient first), which the review API and
#: undo's audit record show; ``ix_…_change_pk`` lists a page of changes' patients.
patient_change_patients = Table(
    "patient_change_patients",
    _meta,
    Column(
        "change_pk",
        Integer,
        ForeignKey(
            "patient_changes.id", name="fk_patient_change_patients_change_pk_patient_changes"
        ),
        nullable=False,
    ),
    Column("patient_pk", Integer, nullable=False),
    Column("position", Integer, nullable=False),
    PrimaryKeyConstraint("patient_pk", "change_pk", name="pk_patient_change_patients"),
    Index("ix_patient_change_patients_change_pk", "change_pk", "position"),
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
