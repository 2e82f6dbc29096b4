"""What a proxy reads of the catalog to run one backup, restore or repository maintenance: a work order.

A proxy's database role has no rights on hypervisors, policies, repositories or VMs; the master's
migrations define views (``proxy_backup_work``, ``proxy_restore_work``, ``proxy_maintenance_work``)
that show exactly the fields a task in progress needs, sealed credentials included (they open only
with the master key).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from vmkeep.hypervisors.base import NbdTls, Quiesce

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HypervisorOrder:
    name: str
    kind: str
    uri: str
    username: str | None
    secret_sealed: bytes | None
    allow_plain_tcp: bool
    allow_unsafe_options: bool


@dataclass(frozen=True)
class RepositoryOrder:
    id: int
    name: str
    location: str
    s3_endpoint: str | None
    passphrase_sealed: bytes | None
    repo_id: str
    encrypted: bool


@dataclass(frozen=True)
class BackupOrder:
    vm_name: str
    vm_uuid: str
    hypervisor: HypervisorOrder
    repository: RepositoryOrder
    transports: str
    quiesce: Quiesce
    nbd_tls: NbdTls  # the view holds what PolicyIn's pattern let through: require, auto or off
    full_every: int | None
    verify_after: bool
    verify_boot: bool
    retention: dict[str, Any]


@dataclass(frozen=True)
class MaintenanceOrder:
    kind: str
    params: dict[str, Any]
    repository: RepositoryOrder  # a copy's source
    target: RepositoryOrder | None = None  # a copy's target (migration 0019's view)


@dataclass(frozen=True)
class RestoreOrder:
    hypervisor: HypervisorOrder
    repository: RepositoryOrder
    # every repository the catalog holds the point in that the restore may read, its own first
    # (migration 0019's view): the copies a restore falls back on when its own repository fails
    sources: tuple[RepositoryOrder, ...] = ()


def _hypervisor(row: Any) -> HypervisorOrder:
    return HypervisorOrder(row.hypervisor, row.hypervisor_kind, row.hypervisor_uri, row.hypervisor_username,
                           row.hypervisor_secret_sealed, row.allow_plain_tcp, row.allow_unsafe_options)


def _repository(row: Any) -> RepositoryOrder:
    return RepositoryOrder(row.repository_id, row.repository, row.repository_location, row.repository_s3_endpoint,
                           row.repository_passphrase_sealed, row.repository_repo_id, row.repository_encrypted)


def backup_order(session: Session, job_vm_id: int) -> BackupOrder | None:
    """The backup's order, or None when it is no longer to do (finished, cancelled, removed)."""
    row = session.execute(text("SELECT * FROM proxy_backup_work WHERE job_vm_id = :id"), {"id": job_vm_id}).first()
    if row is None:
        log.info("backup %s is no longer to do", job_vm_id)
        return None
    return BackupOrder(row.vm_name, row.vm_uuid, _hypervisor(row), _repository(row), row.transports, row.quiesce,
                       row.nbd_tls, row.full_every, row.verify_after, row.verify_boot, row.retention or {})


def restore_order(session: Session, restore_id: int) -> RestoreOrder | None:
    """The restore's order, or None when it is no longer to do."""
    row = session.execute(text("SELECT * FROM proxy_restore_work WHERE restore_id = :id"), {"id": restore_id}).first()
    if row is None:
        log.info("restore %s is no longer to do", restore_id)
        return None
    sources = session.execute(text("SELECT * FROM proxy_restore_sources WHERE restore_id = :id "
                                   "ORDER BY is_primary DESC, repository_id"), {"id": restore_id}).all()
    return RestoreOrder(_hypervisor(row), _repository(row), tuple(_repository(s) for s in sources))


def maintenance_order(session: Session, run_id: int) -> MaintenanceOrder | None:
    """A repository maintenance run's order (migration 0015's view), or None when it is no longer to do."""
    row = session.execute(text("SELECT * FROM proxy_maintenance_work WHERE run_id = :id"), {"id": run_id}).first()
    if row is None:
        log.info("maintenance run %s is no longer to do", run_id)
        return None
    target = None
    if row.kind == "copy":
        found = session.execute(text("SELECT * FROM proxy_copy_work WHERE run_id = :id"), {"id": run_id}).first()
        target = _repository(found) if found is not None else None
    return MaintenanceOrder(row.kind, row.params or {}, _repository(row), target)
