"""PostgreSQL: NOTIFY the job worker when work is committed (issue 21)

Revision ID: 0012_scale_work_notify
Revises: 0011_qr_commitment
Create Date: 2026-12-03 11:00:00.000000

An idle worker on SQLite polls ``PRAGMA data_version`` and reads the job queue only
when it moved; PostgreSQL has no such counter, so its worker ran the claim queries
twice a second. These triggers send ``NOTIFY pacslab_work`` (storage/index/postgres.py
``WORK_CHANNEL``) from every transaction that

* inserts or updates jobs leaving one ``pending`` (a new job from any store: the
  receiver's instance jobs, ``add_job``, orders, Storage Commitment; a retry; a job
  requeued after its worker died). Claims (``running``), finishes (``done``, ``failed``)
  and lease renewals leave none pending and notify no one;
* inserts instances (the series roll-up's ``rollup_due_at`` is set in the same
  transaction).

Per statement, not per row: a batch of 5,000 instances is one call, and PostgreSQL
folds identical notifications of one transaction into one. A notification is
delivered only when its transaction commits, so the worker never looks too early.
SQLite: nothing (its commit counter needs no help).
"""

from __future__ import annotations

from alembic import op

revision = "0012_scale_work_notify"
down_revision = "0011_qr_commitment"
branch_labels = None
depends_on = None

#: The literal channel: a migration must not change when the code's constant does.
_CHANNEL = "pacslab_work"

_FUNCTIONS = [
    f"""
CREATE OR REPLACE FUNCTION pacslab_notify_work() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('{_CHANNEL}', '');
  RETURN NULL;
END $$ LANGUAGE plpgsql""",
    f"""
CREATE OR REPLACE FUNCTION pacslab_notify_pending_jobs() RETURNS trigger AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM new_rows WHERE status = 'pending') THEN
    PERFORM pg_notify('{_CHANNEL}', '');
  END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql""",
]

_TRIGGERS = [
    "CREATE TRIGGER nw_jobs_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION pacslab_notify_pending_jobs()",
    "CREATE TRIGGER nw_jobs_update AFTER UPDATE ON jobs REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION pacslab_notify_pending_jobs()",
    "CREATE TRIGGER nw_instances_insert AFTER INSERT ON instances "
    "FOR EACH STATEMENT EXECUTE FUNCTION pacslab_notify_work()",
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for sql in (*_FUNCTIONS, *_TRIGGERS):
        op.execute(sql)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, table in (("nw_jobs_insert", "jobs"), ("nw_jobs_update", "jobs"),
                        ("nw_instances_insert", "instances")):
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    op.execute("DROP FUNCTION IF EXISTS pacslab_notify_work()")
    op.execute("DROP FUNCTION IF EXISTS pacslab_notify_pending_jobs()")
