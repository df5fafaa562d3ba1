"""patient identity changes: the change log and merge links (IHE PIR, issue 17)

Revision ID: 0008_pir
Revises: 0007 (the lead re-chains it when the branches merge)
Create Date: 2026-12-02 19:20:00.000000

``patient_changes`` keeps every applied identity change (update, merge, identifier
change, undo) with the before/after values of every row it touched, so that a merge
can be reviewed and undone exactly. ``patient_links`` says which patient row a merge
made obsolete and which one survived (FHIR ``Patient.link`` replaced-by / replaces).
``patients.demographics_source`` says the record system set a patient's demographics,
which images received later then no longer overwrite.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_pir"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "patients",
        sa.Column("demographics_source", sa.String(length=16), server_default="", nullable=False),
    )
    op.create_table(
        "patient_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("change_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("source", sa.String(length=16), server_default="", nullable=False),
        sa.Column("agent", sa.String(length=128), server_default="", nullable=False),
        sa.Column("patient_pks", sa.String(length=255), server_default="", nullable=False),
        sa.Column("summary_json", sa.Text(), server_default="{}", nullable=False),
        sa.Column("rows_json", sa.Text(), server_default="{}", nullable=False),
        sa.Column("undoes", sa.String(length=32), server_default="", nullable=False),
        sa.Column("undone_by", sa.String(length=32), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_changes")),
        sa.UniqueConstraint("change_id", name=op.f("uq_patient_changes_change_id")),
    )
    op.create_index("ix_patient_changes_created_at", "patient_changes", ["created_at"])
    op.create_table(
        "patient_links",
        sa.Column("obsolete_pk", sa.Integer(), nullable=False),
        sa.Column("surviving_pk", sa.Integer(), nullable=False),
        sa.Column("change_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("obsolete_pk", name=op.f("pk_patient_links")),
    )
    op.create_index("ix_patient_links_surviving_pk", "patient_links", ["surviving_pk"])


def downgrade() -> None:
    with op.batch_alter_table("patients", schema=None) as batch_op:
        batch_op.drop_column("demographics_source")
    op.drop_index("ix_patient_links_surviving_pk", table_name="patient_links")
    op.drop_table("patient_links")
    op.drop_index("ix_patient_changes_created_at", table_name="patient_changes")
    op.drop_table("patient_changes")
