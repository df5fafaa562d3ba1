"""Alembic environment: uses the connection handed over by ``storage.index.migrate``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from storage.index import schema_emr as _emr  # noqa: F401  (registers the issue-7 tables)
from storage.index.schema import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # `alembic` run by hand with sqlalchemy.url set
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
