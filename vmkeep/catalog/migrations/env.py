"""Alembic environment: runs the catalog's migrations against the configured URL."""

from alembic import context
from sqlalchemy import create_engine, pool

from vmkeep.catalog.models import Base

config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
