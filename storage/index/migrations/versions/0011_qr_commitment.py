"""Storage Commitment: the requests whose N-EVENT-REPORT is owed (issue 16 §3)

A request is kept until its report is delivered, with a ``commit`` job in ``jobs``,
so a restart of the receiver still sends it (from the worker).

Revision ID: 0011_qr_commitment
Revises: 0010_share
Create Date: 2026-12-03 05:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_qr_commitment"
down_revision = "0010_share"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "commitment_requests",
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("references_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("transaction_uid", name=op.f("pk_commitment_requests")),
    )


def downgrade() -> None:
    op.drop_table("commitment_requests")
