"""Archive scale (issue 21): name keys, per-study modalities, roll-up column, counters

Revision ID: 0006
Revises: 0004 (0005, lab/patient columns, is written on another branch at the same
    time; the lead re-chains this onto it when both are merged)
Create Date: 2026-12-02 16:00:00.000000

Adds, and fills for an existing archive:

* ``patients.name_key``: :func:`core.person_name.person_name_key` of the name, indexed,
  and ``patient_name_words``, its words (for "starts with any part" searches);
* ``study_modalities``: each study's distinct series modalities, indexed by modality;
* ``series.num_instances``: current instances of the series (per-study counts);
* ``series.rollup_due_at``: the newest instance's arrival while the series' roll-up is
  owed (the old roll-up's rule: no series job queued since that instance);
* ``index_counters`` and the triggers that keep it: row counts of patients, studies,
  series, instances (all and current) and jobs per status, so ``/metrics`` reads a few
  rows instead of counting tables. On PostgreSQL the triggers are per statement (over
  transition tables) and each backend bumps its own shard (``pg_backend_pid() % 16``):
  receivers on separate connections do not queue on one counter row;
* ``instances.metadata_z``: the DICOM JSON compressed (older rows keep their text);
* ``ix_instances_blob_key`` instead of two single-column indexes the composite ones
  already cover.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.person_name import name_words, person_name_key

revision = "0006"
down_revision = "0005_lab_patients"
branch_labels = None
depends_on = None

_SHARDS = 16
_NAMES = (
    "patients",
    "studies",
    "series",
    "instances",
    "instances_current",
    "jobs_pending",
    "jobs_running",
    "jobs_done",
    "jobs_failed",
)

_BUMP = "UPDATE index_counters SET value = value {sign} 1 WHERE shard = 0 AND {cond};"

_SQLITE_TRIGGERS = [
    *(
        f"CREATE TRIGGER ic_{t}_insert AFTER INSERT ON {t} BEGIN "
        + _BUMP.format(sign="+", cond=f"name = '{t}'")
        + " END"
        for t in ("patients", "studies", "series")
    ),
    *(
        f"CREATE TRIGGER ic_{t}_delete AFTER DELETE ON {t} BEGIN "
        + _BUMP.format(sign="-", cond=f"name = '{t}'")
        + " END"
        for t in ("patients", "studies", "series")
    ),
    "CREATE TRIGGER ic_instances_insert AFTER INSERT ON instances BEGIN "
    + _BUMP.format(
        sign="+", cond="(name = 'instances' OR (name = 'instances_current' AND NEW.is_current))"
    )
    + " END",
    "CREATE TRIGGER ic_instances_delete AFTER DELETE ON instances BEGIN "
    + _BUMP.format(
        sign="-", cond="(name = 'instances' OR (name = 'instances_current' AND OLD.is_current))"
    )
    + " END",
    "CREATE TRIGGER ic_instances_current AFTER UPDATE OF is_current ON instances "
    "WHEN OLD.is_current <> NEW.is_current BEGIN "
    "UPDATE index_counters SET value = value + (CASE WHEN NEW.is_current THEN 1 ELSE -1 END) "
    "WHERE shard = 0 AND name = 'instances_current'; END",
    "CREATE TRIGGER ic_jobs_insert AFTER INSERT ON jobs BEGIN "
    + _BUMP.format(sign="+", cond="name = 'jobs_' || NEW.status")
    + " END",
    "CREATE TRIGGER ic_jobs_delete AFTER DELETE ON jobs BEGIN "
    + _BUMP.format(sign="-", cond="name = 'jobs_' || OLD.status")
    + " END",
    "CREATE TRIGGER ic_jobs_status AFTER UPDATE OF status ON jobs "
    "WHEN OLD.status <> NEW.status BEGIN "
    "UPDATE index_counters SET value = value + "
    "(CASE WHEN name = 'jobs_' || NEW.status THEN 1 ELSE -1 END) "
    "WHERE shard = 0 AND name IN ('jobs_' || NEW.status, 'jobs_' || OLD.status); END",
]

# PostgreSQL: statement-level triggers over transition tables (PostgreSQL 10+), one
# bump per statement and counter. Row-level ones bumped the same counter row once per
# row, and PostgreSQL keeps every version of a row updated within one transaction: a
# bulk UPDATE or DELETE of n rows walked ever longer version chains, O(n²).
_PG_FUNCTIONS = [
    f"""
CREATE OR REPLACE FUNCTION pacslab_bump(n text, d bigint) RETURNS void AS $$
  INSERT INTO index_counters (name, shard, value) VALUES (n, pg_backend_pid() % {_SHARDS}, d)
  ON CONFLICT (name, shard) DO UPDATE SET value = index_counters.value + EXCLUDED.value
$$ LANGUAGE sql""",
    """
CREATE OR REPLACE FUNCTION pacslab_count_inserted() RETURNS trigger AS $$
DECLARE n bigint;
BEGIN
  SELECT count(*) INTO n FROM new_rows;
  IF n <> 0 THEN PERFORM pacslab_bump(TG_TABLE_NAME, n); END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql""",
    """
CREATE OR REPLACE FUNCTION pacslab_count_deleted() RETURNS trigger AS $$
DECLARE n bigint;
BEGIN
  SELECT count(*) INTO n FROM old_rows;
  IF n <> 0 THEN PERFORM pacslab_bump(TG_TABLE_NAME, -n); END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql""",
    """
CREATE OR REPLACE FUNCTION pacslab_instances_inserted() RETURNS trigger AS $$
DECLARE n bigint; c bigint;
BEGIN
  SELECT count(*), count(*) FILTER (WHERE is_current) INTO n, c FROM new_rows;
  IF n <> 0 THEN PERFORM pacslab_bump('instances', n); END IF;
  IF c <> 0 THEN PERFORM pacslab_bump('instances_current', c); END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql""",
    """
CREATE OR REPLACE FUNCTION pacslab_instances_deleted() RETURNS trigger AS $$
DECLARE n bigint; c bigint;
BEGIN
  SELECT count(*), count(*) FILTER (WHERE is_current) INTO n, c FROM old_rows;
  IF n <> 0 THEN PERFORM pacslab_bump('instances', -n); END IF;
  IF c <> 0 THEN PERFORM pacslab_bump('instances_current', -c); END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql""",
    """
CREATE OR REPLACE FUNCTION pacslab_instances_updated() RETURNS trigger AS $$
DECLARE d bigint;
BEGIN
  SELECT (SELECT count(*) FROM new_rows WHERE is_current)
       - (SELECT count(*) FROM old_rows WHERE is_current) INTO d;
  IF d <> 0 THEN PERFORM pacslab_bump('instances_current', d); END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql""",
    """
CREATE OR REPLACE FUNCTION pacslab_jobs_changed() RETURNS trigger AS $$
DECLARE r record;
BEGIN
  IF TG_OP = 'INSERT' THEN
    FOR r IN SELECT status, count(*) AS d FROM new_rows GROUP BY status LOOP
      PERFORM pacslab_bump('jobs_' || r.status, r.d);
    END LOOP;
  ELSIF TG_OP = 'DELETE' THEN
    FOR r IN SELECT status, count(*) AS d FROM old_rows GROUP BY status LOOP
      PERFORM pacslab_bump('jobs_' || r.status, -r.d);
    END LOOP;
  ELSE
    FOR r IN SELECT status, sum(d) AS d FROM (
        SELECT status, 1 AS d FROM new_rows UNION ALL SELECT status, -1 FROM old_rows
      ) AS changes GROUP BY status HAVING sum(d) <> 0 LOOP
      PERFORM pacslab_bump('jobs_' || r.status, r.d);
    END LOOP;
  END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql""",
]


def _pg_trigger(table: str, op: str, function: str) -> str:
    tables = {"INSERT": "NEW TABLE AS new_rows", "DELETE": "OLD TABLE AS old_rows",
              "UPDATE": "OLD TABLE AS old_rows NEW TABLE AS new_rows"}[op]
    return (f"CREATE TRIGGER ic_{table}_{op.lower()} AFTER {op} ON {table} "
            f"REFERENCING {tables} FOR EACH STATEMENT EXECUTE FUNCTION {function}()")


_PLAIN = ("patients", "studies", "series")
_PG_TRIGGERS = [
    *(_pg_trigger(t, "INSERT", "pacslab_count_inserted") for t in _PLAIN),
    *(_pg_trigger(t, "DELETE", "pacslab_count_deleted") for t in _PLAIN),
    _pg_trigger("instances", "INSERT", "pacslab_instances_inserted"),
    _pg_trigger("instances", "DELETE", "pacslab_instances_deleted"),
    _pg_trigger("instances", "UPDATE", "pacslab_instances_updated"),
    *(_pg_trigger("jobs", op, "pacslab_jobs_changed") for op in ("INSERT", "DELETE", "UPDATE")),
]
_PG_TRIGGER_NAMES = [
    *(f"ic_{t}_{e}" for t in ("patients", "studies", "series") for e in ("insert", "delete")),
    *(f"ic_{t}_{e}" for t in ("instances", "jobs") for e in ("insert", "delete", "update")),
]
_PG_FUNCTION_NAMES = [
    "pacslab_count_inserted()", "pacslab_count_deleted()", "pacslab_instances_inserted()",
    "pacslab_instances_deleted()", "pacslab_instances_updated()", "pacslab_jobs_changed()",
    "pacslab_bump(text, bigint)",
]

_TRIGGER_NAMES_SQLITE = [
    *(f"ic_{t}_{e}" for t in ("patients", "studies", "series") for e in ("insert", "delete")),
    "ic_instances_insert",
    "ic_instances_delete",
    "ic_instances_current",
    "ic_jobs_insert",
    "ic_jobs_delete",
    "ic_jobs_status",
]


def upgrade() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    if pg:
        # Writers of other processes wait until the counts below and the triggers are
        # in place together: a row inserted in between would be counted twice or never.
        op.execute(
            "LOCK TABLE patients, studies, series, instances, jobs IN SHARE ROW EXCLUSIVE MODE"
        )
    key_type = sa.String(length=512).with_variant(
        sa.String(length=512, collation="C"), "postgresql"
    )
    with op.batch_alter_table("patients") as batch:
        batch.add_column(sa.Column("name_key", key_type, nullable=False, server_default=""))
    op.create_index("ix_patients_name_key", "patients", ["name_key"])
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("rollup_due_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("num_instances", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_index("ix_series_rollup_due_at", "series", ["rollup_due_at"])
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("metadata_z", sa.LargeBinary(), nullable=True))
    # Redundant with uq_instances_sop_blob / ix_instances_current (same leading column):
    # each cost the receiver a B-tree insert per instance. blob_key lookups scanned.
    op.drop_index("ix_instances_sop_instance_uid", table_name="instances")
    op.drop_index("ix_instances_series_pk", table_name="instances")
    op.create_index("ix_instances_blob_key", "instances", ["blob_key"])
    op.create_table(
        "study_modalities",
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_pk"], ["studies.id"], name="fk_study_modalities_study_pk_studies"
        ),
        sa.PrimaryKeyConstraint("study_pk", "modality", name="pk_study_modalities"),
    )
    op.create_index(
        "ix_study_modalities_modality", "study_modalities", ["modality", "study_pk"]
    )
    op.create_table(
        "patient_name_words",
        sa.Column("word", key_type, nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_pk"], ["patients.id"], name="fk_patient_name_words_patient_pk_patients"
        ),
        sa.PrimaryKeyConstraint("word", "patient_pk", name="pk_patient_name_words"),
    )
    op.create_index(
        "ix_patient_name_words_patient_pk", "patient_name_words", ["patient_pk"]
    )
    op.create_table(
        "index_counters",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("shard", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("name", "shard", name="pk_index_counters"),
    )
    _backfill(bind)
    for stmt in (*_PG_FUNCTIONS, *_PG_TRIGGERS) if pg else _SQLITE_TRIGGERS:
        op.execute(stmt)


def _backfill(bind: sa.Connection) -> None:
    """Fill the new columns and tables from what an existing archive holds (once)."""
    rows = bind.execute(sa.text("SELECT id, name FROM patients WHERE name <> ''")).all()
    keyed = [{"pk": pk, "key": person_name_key(name)} for pk, name in rows]
    words = [{"pk": k["pk"], "word": w} for k in keyed for w in name_words(k["key"])]
    for start in range(0, len(keyed), 1000):
        bind.execute(
            sa.text("UPDATE patients SET name_key = :key WHERE id = :pk"),
            keyed[start : start + 1000],
        )
    for start in range(0, len(words), 1000):
        bind.execute(
            sa.text("INSERT INTO patient_name_words (word, patient_pk) VALUES (:word, :pk)"),
            words[start : start + 1000],
        )
    bind.execute(
        sa.text(
            "INSERT INTO study_modalities (study_pk, modality) "
            "SELECT DISTINCT study_pk, modality FROM series WHERE modality <> ''"
        )
    )
    bind.execute(
        sa.text(
            "UPDATE series SET num_instances = (SELECT count(*) FROM instances "
            "WHERE instances.series_pk = series.id AND instances.is_current)"
        )
    )
    # The old roll-up's rule, evaluated once: a series is owed a roll-up when no
    # series job was queued since its newest instance arrived.
    bind.execute(
        sa.text(
            "UPDATE series SET rollup_due_at = last.received_at FROM "
            "(SELECT series_pk, max(received_at) AS received_at FROM instances "
            " GROUP BY series_pk) AS last "
            "WHERE last.series_pk = series.id AND NOT EXISTS ("
            " SELECT 1 FROM jobs WHERE jobs.kind = 'series' "
            " AND jobs.target = series.series_instance_uid "
            " AND jobs.created_at >= last.received_at)"
        )
    )
    counts = {
        "patients": "SELECT count(*) FROM patients",
        "studies": "SELECT count(*) FROM studies",
        "series": "SELECT count(*) FROM series",
        "instances": "SELECT count(*) FROM instances",
        "instances_current": "SELECT count(*) FROM instances WHERE is_current",
    }
    values = {name: int(bind.execute(sa.text(sql)).scalar_one()) for name, sql in counts.items()}
    for status in ("pending", "running", "done", "failed"):
        values[f"jobs_{status}"] = int(
            bind.execute(
                sa.text("SELECT count(*) FROM jobs WHERE status = :s"), {"s": status}
            ).scalar_one()
        )
    bind.execute(
        sa.text("INSERT INTO index_counters (name, shard, value) VALUES (:name, 0, :value)"),
        [{"name": name, "value": values[name]} for name in _NAMES],
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in _PG_TRIGGER_NAMES:
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {name.split('_')[1]}")
        for fn in _PG_FUNCTION_NAMES:
            op.execute(f"DROP FUNCTION IF EXISTS {fn}")
    else:
        for name in _TRIGGER_NAMES_SQLITE:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("index_counters")
    op.drop_index("ix_patient_name_words_patient_pk", table_name="patient_name_words")
    op.drop_table("patient_name_words")
    op.drop_index("ix_study_modalities_modality", table_name="study_modalities")
    op.drop_table("study_modalities")
    op.drop_index("ix_instances_blob_key", table_name="instances")
    op.create_index("ix_instances_series_pk", "instances", ["series_pk"])
    op.create_index("ix_instances_sop_instance_uid", "instances", ["sop_instance_uid"])
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("metadata_z")
    op.drop_index("ix_series_rollup_due_at", table_name="series")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("num_instances")
        batch.drop_column("rollup_due_at")
    op.drop_index("ix_patients_name_key", table_name="patients")
    with op.batch_alter_table("patients") as batch:
        batch.drop_column("name_key")
