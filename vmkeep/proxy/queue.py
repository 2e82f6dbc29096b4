"""The task queue shared by master and proxies: procrastinate on the catalog's PostgreSQL.

Each proxy works its own queue (``proxy-<name>``); a VM's tasks carry a lock named after the
VM, so two backups of one VM never run at once, whichever proxies hold them.
"""

from __future__ import annotations

import procrastinate
from procrastinate import Blueprint

tasks = Blueprint()


def queue_name(proxy: str) -> str:
    return f"proxy-{proxy}"


def vm_lock(hypervisor: str, vm_uuid: str) -> str:
    return f"vm:{hypervisor}:{vm_uuid}"


def libpq_url(database_url: str) -> str:
    """procrastinate speaks libpq URLs; the catalog's are SQLAlchemy's."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def make_app(database_url: str) -> procrastinate.App:
    from vmkeep.proxy import backup_task, restore_task  # noqa: F401 - register the tasks on the blueprint

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=libpq_url(database_url)))
    app.add_tasks_from(tasks, namespace="vmkeep")
    return app


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
