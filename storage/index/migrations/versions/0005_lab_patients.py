"""lab results belong to patients: patient rows, ordered panel, held conflicts (issues 13, 14)

Revision ID: 0005_lab_patients
Revises: 0004
Create Date: 2026-12-02 15:45:00.000000

Adds ``patient_pk`` (a row of ``patients``, the Patient id space imaging uses) and the
issuer to ``lab_reports`` and ``lab_results``; the ordered panel code to
``lab_reports``; the review state of results held as conflicts to ``lab_results``.
Existing lab rows get their patient from ``patients`` (issuer unknown: ``""``, the
value imaging uses for an absent Issuer of Patient ID), created when missing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_lab_patients"
down_revision = "0004"
branch_labels = None
depends_on = None


def _patient_pk(table: str) -> None:
    """Add ``<table>.patient_pk`` referencing ``patients.id``, without a table rebuild.

    SQLite cannot add a constraint to a table; batch mode would copy and drop the
    table, which the foreign keys pointing at ``lab_reports`` refuse (and a copy of
    a large result table is slow). ``ALTER TABLE ADD COLUMN … REFERENCES`` is allowed
    for a column that defaults to NULL, so SQLite gets the reference inline.
    """
    name = f"fk_{table}_patient_pk_patients"
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            f"ALTER TABLE {table} ADD COLUMN patient_pk INTEGER "
            f"CONSTRAINT {name} REFERENCES patients (id)"
        )
    else:
        op.add_column(table, sa.Column("patient_pk", sa.Integer(), nullable=True))
        op.create_foreign_key(name, table, "patients", ["patient_pk"], ["id"])
    op.create_index(f"ix_{table}_patient_pk", table, ["patient_pk"])


def _text(table: str, name: str, length: int) -> None:
    op.add_column(
        table, sa.Column(name, sa.String(length=length), server_default="", nullable=False)
    )


def upgrade() -> None:
    _patient_pk("lab_reports")
    _text("lab_reports", "patient_issuer", 64)
    _text("lab_reports", "order_code", 64)
    _text("lab_reports", "order_system", 64)
    _text("lab_reports", "order_display", 255)
    _text("lab_reports", "status", 24)
    op.create_index("ix_lab_reports_status", "lab_reports", ["status"])
    _patient_pk("lab_results")
    _text("lab_results", "patient_issuer", 64)
    _text("lab_results", "review", 16)
    _text("lab_results", "conflict_with", 64)
    op.add_column("lab_results", sa.Column("conflict_patient_pk", sa.Integer(), nullable=True))
    op.create_index("ix_lab_results_review", "lab_results", ["review"])
    op.create_index("ix_lab_results_order_ref", "lab_results", ["order_ref"])
    _backfill()
    _report_statuses()


def _report_statuses() -> None:
    """Each existing group's DiagnosticReport.status, from its current results."""
    from storage.lab import report_status

    results = sa.table(
        "lab_results",
        sa.column("report_pk", sa.Integer),
        sa.column("status", sa.String),
        sa.column("is_current", sa.Boolean),
    )
    reports = sa.table("lab_reports", sa.column("id", sa.Integer), sa.column("status", sa.String))
    bind = op.get_bind()
    statuses: dict[int, list[str]] = {}
    rows = bind.execute(
        sa.select(results.c.report_pk, results.c.status).where(results.c.is_current == sa.true())
    )
    for report_pk, status in rows:
        statuses.setdefault(int(report_pk), []).append(status)
    if statuses:
        bind.execute(
            reports.update()
            .where(reports.c.id == sa.bindparam("pk"))
            .values(status=sa.bindparam("st")),
            [{"pk": pk, "st": report_status(found)} for pk, found in statuses.items()],
        )


def _backfill() -> None:
    """Give existing lab rows their patient row (issuer ``""``: it was not kept)."""
    patients = sa.table(
        "patients",
        sa.column("id", sa.Integer),
        sa.column("patient_id", sa.String),
        sa.column("issuer", sa.String),
        sa.column("name", sa.String),
        sa.column("birth_date", sa.String),
        sa.column("sex", sa.String),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    results = sa.table(
        "lab_results",
        sa.column("patient_id", sa.String),
        sa.column("patient_name", sa.String),
        sa.column("patient_birth_date", sa.String),
        sa.column("patient_sex", sa.String),
        sa.column("is_qc", sa.Boolean),
        sa.column("patient_pk", sa.Integer),
    )
    reports = sa.table(
        "lab_reports",
        sa.column("patient_id", sa.String),
        sa.column("is_qc", sa.Boolean),
        sa.column("patient_pk", sa.Integer),
    )
    existing = (
        sa.select(patients.c.id)
        .where(patients.c.patient_id == results.c.patient_id, patients.c.issuer == "")
        .exists()
    )
    source = (
        sa.select(
            results.c.patient_id,
            sa.literal(""),
            sa.func.max(results.c.patient_name),
            sa.func.substr(
                sa.func.replace(sa.func.max(results.c.patient_birth_date), "-", ""), 1, 8
            ),
            sa.func.max(results.c.patient_sex),
            sa.func.current_timestamp(),
        )
        .where(results.c.patient_id != "", results.c.is_qc == sa.false(), ~existing)
        .group_by(results.c.patient_id)
    )
    op.execute(
        patients.insert().from_select(
            ["patient_id", "issuer", "name", "birth_date", "sex", "updated_at"], source
        )
    )
    for table in (results, reports):
        pk = (
            sa.select(patients.c.id)
            .where(patients.c.patient_id == table.c.patient_id, patients.c.issuer == "")
            .scalar_subquery()
        )
        op.execute(
            table.update()
            .where(table.c.patient_id != "", table.c.is_qc == sa.false())
            .values(patient_pk=pk)
        )


def downgrade() -> None:
    with op.batch_alter_table("lab_results", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_lab_results_patient_pk_patients"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_lab_results_order_ref"))
        batch_op.drop_index(batch_op.f("ix_lab_results_review"))
        batch_op.drop_index(batch_op.f("ix_lab_results_patient_pk"))
        for name in (
            "conflict_patient_pk",
            "conflict_with",
            "review",
            "patient_issuer",
            "patient_pk",
        ):
            batch_op.drop_column(name)
    with op.batch_alter_table("lab_reports", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_lab_reports_patient_pk_patients"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_lab_reports_patient_pk"))
        batch_op.drop_index(batch_op.f("ix_lab_reports_status"))
        for name in (
            "status",
            "order_display",
            "order_system",
            "order_code",
            "patient_issuer",
            "patient_pk",
        ):
            batch_op.drop_column(name)
