"""journal_marks: the original journal's record of what the index has (issue 19)

An instance kept in a receiver's original journal (storage/journal.py) is indexed
without flushing the index's WAL; ``(journal, seq)`` is inserted in the same
transaction, so that after a power cut the journal replays exactly the records whose
commit was lost; with the original's key and the record's location, where readers find
an original not written out yet. Rows live until the record's segment is written out.

Revision ID: 0015_journal_marks
Revises: 0014_pir_change_patients
Create Date: 2026-12-04 13:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_journal_marks"
down_revision = "0014_pir_change_patients"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "journal_marks",
        sa.Column("journal", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("blob_key", sa.String(length=64), nullable=False),
        sa.Column("location", sa.String(length=160), nullable=False),
        sa.PrimaryKeyConstraint("journal", "seq", name=op.f("pk_journal_marks")),
    )
    op.create_index(op.f("ix_journal_marks_blob_key"), "journal_marks", ["blob_key"])


def downgrade() -> None:
    op.drop_index(op.f("ix_journal_marks_blob_key"), table_name="journal_marks")
    op.drop_table("journal_marks")
