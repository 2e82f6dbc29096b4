"""The task queue shared by master and proxies: procrastinate on the catalog's PostgreSQL.

Each proxy works its own queue (``proxy-<name>``); a VM's tasks carry a lock named after the
VM, so two backups of one VM never run at once, whichever proxies hold them.
"""

from __future__ import annotations

import logging

import procrastinate
from procrastinate import Blueprint

from vmkeep.catalog.db import hidden_password
from vmkeep.catalog.queue_schema import libpq_url

log = logging.getLogger(__name__)

tasks = Blueprint()


def queue_name(proxy: str) -> str:
    return f"proxy-{proxy}"


def vm_lock(hypervisor: str, vm_uuid: str) -> str:
    return f"vm:{hypervisor}:{vm_uuid}"


BACKUP_TASK = "vmkeep:backup_vm"  # what the master defers by name; the proxy registers the functions
RESTORE_TASK = "vmkeep:restore_vm"
MAINTENANCE_TASK = "vmkeep:maintain_repository"  # verify, prune, GC, usage (vmkeep.proxy.maintenance_task)
NAMESPACE = "vmkeep"


def make_app(database_url: str) -> procrastinate.App:
    """The queue as this process sees it: with whatever tasks it registered on ``tasks`` (a proxy
    imports its task modules first; the master registers none and defers by name)."""
    log.debug("task queue on %s", hidden_password(database_url))
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=libpq_url(database_url)))
    app.add_tasks_from(tasks, namespace=NAMESPACE)
    return app
