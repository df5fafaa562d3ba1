"""patient_change_patients: the patient rows of each identity change, one row each (issue 21)

Revision ID: 0014_pir_change_patients
Revises: 0013_pir_jobs_kind_pattern
Create Date: 2026-12-03 18:10:00.000000

IHE PIR's change log (``patient_changes``, 0008_pir) named the patient rows a change
involved only in ``patient_pks``, the text ``",pk,pk,"`` cut at 255 characters.
Readers matched it with ``LIKE '%,pk,%'``: a patient's version (FHIR
``meta.versionId``, checked for ``If-Match``), a search page's versions and a patient's
changes each read the whole log, which grows with the archive; and the pks past the
cut were lost, so those rows' versions were undercounted and an undo did not know them.
``patient_change_patients (change_pk, patient_pk, position)`` holds every one, keyed by
``(patient_pk, change_pk)`` so that those reads are index ranges, with an index on
``(change_pk, position)`` for the patients of a page of changes. The text column stays
(display, older readers); nothing reads it back any more.

Backfill, in Python, a page of 500 changes at a time (``rows_json`` of a big merge can be
megabytes, so the log is never read at once), inserted in batches:

* the pks the text holds, in its order; a text cut at 255 characters ends in part of a
  pk (no closing comma), which is dropped;
* then the pks ``rows_json`` names (storage/index/patients.py ``_commit``): its
  ``link`` ``[obsolete, surviving]``, ``created``, the ``patients`` rows it changed, and
  ``relinked`` (rows merged into the obsolete patient earlier, re-pointed to the
  survivor). Together with the text these are every row a change involved, so a cut
  text loses nothing. ``relinked`` rows were not in the text before this revision; the
  code now counts them as involved (their FHIR ``Patient.link`` changed with the merge),
  and the backfill does the same, so their version moves up by one per such merge;
* an undo involves the rows of the change it undid (``undoes``; that change is older,
  so already backfilled: only the pks of changes that were undone are kept in memory).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0014_pir_change_patients"
down_revision = "0013_pir_jobs_kind_pattern"
branch_labels = None
depends_on = None

_PAGE = 500
_BATCH = 1000


def _text_pks(text: str) -> list[int]:
    """The whole pks of ``",pk,pk,"``; the piece after the last comma is empty, or the
    start of a pk the 255-character cut broke off."""
    return [int(p) for p in text.split(",")[:-1] if p.isdigit()]


def _json_pks(rows_json: str) -> list[int]:
    """The patient pks ``rows_json`` names (see the module docstring)."""
    try:
        saved = json.loads(rows_json or "{}")
    except ValueError:
        return []
    if not isinstance(saved, dict):
        return []
    out: list[int] = []
    out.extend(saved.get("link") or [])
    out.extend(saved.get("created") or [])
    out.extend(row[0] for row in (saved.get("rows") or {}).get("patients") or [])
    out.extend(saved.get("relinked") or [])
    return [int(p) for p in out]


def involved(
    changes: Iterable[Any], undone: dict[str, list[int]]
) -> Iterator[tuple[int, list[int]]]:
    """``(change pk, patient pks in order)`` of each row of ``patient_changes``
    (id order); ``undone`` (change_id → pks) is filled for changes an undo follows."""
    for r in changes:
        pks = _text_pks(r.patient_pks) + _json_pks(r.rows_json)
        if r.undoes:
            pks += undone.pop(r.undoes, [])
        pks = list(dict.fromkeys(pks))
        if r.undone_by:
            undone[r.change_id] = pks
        yield int(r.id), pks


def upgrade() -> None:
    op.create_table(
        "patient_change_patients",
        sa.Column("change_pk", sa.Integer(), nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["change_pk"],
            ["patient_changes.id"],
            name="fk_patient_change_patients_change_pk_patient_changes",
        ),
        sa.PrimaryKeyConstraint("patient_pk", "change_pk", name="pk_patient_change_patients"),
    )
    op.create_index(
        "ix_patient_change_patients_change_pk",
        "patient_change_patients",
        ["change_pk", "position"],
    )
    # Lightweight tables: a migration must not follow the code's table definitions.
    changes = sa.table(
        "patient_changes",
        sa.column("id", sa.Integer()),
        sa.column("change_id", sa.String()),
        sa.column("patient_pks", sa.String()),
        sa.column("rows_json", sa.Text()),
        sa.column("undoes", sa.String()),
        sa.column("undone_by", sa.String()),
    )
    links = sa.table(
        "patient_change_patients",
        sa.column("change_pk", sa.Integer()),
        sa.column("patient_pk", sa.Integer()),
        sa.column("position", sa.Integer()),
    )
    conn = op.get_bind()
    undone: dict[str, list[int]] = {}
    batch: list[dict[str, int]] = []
    last = 0
    while True:
        page = conn.execute(
            sa.select(changes).where(changes.c.id > last).order_by(changes.c.id).limit(_PAGE)
        ).all()
        if not page:
            break
        last = int(page[-1].id)
        for change_pk, pks in involved(page, undone):
            batch.extend(
                {"change_pk": change_pk, "patient_pk": pk, "position": i}
                for i, pk in enumerate(pks)
            )
            if len(batch) >= _BATCH:
                conn.execute(links.insert(), batch)
                batch = []
    if batch:
        conn.execute(links.insert(), batch)


def downgrade() -> None:
    op.drop_index("ix_patient_change_patients_change_pk", table_name="patient_change_patients")
    op.drop_table("patient_change_patients")
