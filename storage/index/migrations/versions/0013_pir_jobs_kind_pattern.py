"""PostgreSQL: index jobs.kind for prefix LIKE whatever the database's collation (issue 21)

Revision ID: 0013_pir_jobs_kind_pattern
Revises: 0012_scale_work_notify
Create Date: 2026-12-03 15:40:00.000000

``/metrics`` and the forwarding and commitment queues count and list jobs by kind
prefix (``kind LIKE 'fwd:%'``, storage/index/qr.py). A PostgreSQL btree index serves
``LIKE 'prefix%'`` only when the database's collation is C or the index uses a
``*_pattern_ops`` class: the test server is initdb'd ``--locale=C``, a production
server usually is not (``en_US.UTF-8``, ``C.UTF-8``), and there every scrape read the
whole of ``jobs`` (an index read end to end: 25,000 rows at 100,000 instances, all the
pending jobs of an ingest on top). ``ix_jobs_target (kind, target)`` is rebuilt with
``varchar_pattern_ops`` on ``kind``: that class serves equality too, so the lookups by
``kind = … AND target = …`` keep it, and no index is added to a table every received
instance writes. SQLite: nothing (its LIKE prefix rule does not depend on this).
"""

from __future__ import annotations

from alembic import op

revision = "0013_pir_jobs_kind_pattern"
down_revision = "0012_scale_work_notify"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_jobs_target", table_name="jobs")
    op.create_index("ix_jobs_target", "jobs", ["kind", "target"],
                    postgresql_ops={"kind": "varchar_pattern_ops"})


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_jobs_target", table_name="jobs")
    op.create_index("ix_jobs_target", "jobs", ["kind", "target"])
