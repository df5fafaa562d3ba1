"""Query/Retrieve: C-MOVE destinations added through the admin API (issue 16)

Revision ID: 0007
Revises: 0004 (the lead re-chains it after 0005/0006 when the branches merge)
Create Date: 2026-12-02 16:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_destinations",
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("updated_by", sa.String(length=128), server_default="", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("ae_title", name=op.f("pk_dicom_destinations")),
    )


def downgrade() -> None:
    op.drop_table("dicom_destinations")
