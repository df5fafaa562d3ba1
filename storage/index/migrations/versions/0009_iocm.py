"""IHE IOCM: rejections, and study attribute versions (issue 17, corrections)

Revision ID: 0009_iocm
Revises: 0008_pir
Create Date: 2026-12-02 19:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_iocm"
down_revision = "0008_pir"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejections",
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), server_default="", nullable=False),
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("note_uid", sa.String(length=64), server_default="", nullable=False),
        sa.Column("rejected_by", sa.String(length=128), server_default="", nullable=False),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("sop_instance_uid", name=op.f("pk_rejections")),
    )
    op.create_index(op.f("ix_rejections_study_instance_uid"), "rejections", ["study_instance_uid"])
    op.create_table(
        "study_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("previous_json", sa.Text(), nullable=False),
        sa.Column("cause", sa.String(length=16), nullable=False),
        sa.Column("cause_uid", sa.String(length=64), server_default="", nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_versions")),
        sa.UniqueConstraint(
            "study_instance_uid", "version", name="uq_study_versions_study_version"
        ),
    )
    op.create_index(
        op.f("ix_study_versions_study_instance_uid"), "study_versions", ["study_instance_uid"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_study_versions_study_instance_uid"), table_name="study_versions")
    op.drop_table("study_versions")
    op.drop_index(op.f("ix_rejections_study_instance_uid"), table_name="rejections")
    op.drop_table("rejections")
