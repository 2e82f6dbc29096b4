"""The task queue's tables (procrastinate) live in the catalog's database, created with its schema."""

from __future__ import annotations

import procrastinate


def libpq_url(database_url: str) -> str:
    """procrastinate speaks libpq URLs; the catalog's are SQLAlchemy's."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def ensure_schema(database_url: str) -> bool:
    """Create procrastinate's tables once; whether they were created now."""
    import psycopg

    with psycopg.connect(libpq_url(database_url)) as conn:
        exists = conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()
    if exists and exists[0]:
        return False
    app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=libpq_url(database_url)))
    with app.open():
        app.schema_manager.apply_schema()
    return True
