"""The task a proxy runs to bring a VM's replica to the point of its policy's newest run
(vmkeep.server.replicas queues it): vmkeep.engine.replica's replicate on the target hypervisor,
from the policy's repository opened read-only; or, asked through the API, its failover (start
the replica). The outcome goes into the replica's row.

The proxy reads the row's order through migration 0020's view (the target hypervisor's sealed
login and the repository's sealed passphrase, which only the master key opens) and writes only the
row's outcome columns. ``state`` is what the replica's own record on the host says afterwards
(vmkeep.hypervisors.base.ReplicaInfo): the truth about what its disks hold, a failed sync too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from procrastinate import JobContext
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.catalog.replica_models import Replica
from vmkeep.engine.replica import failover, replicas_of, replicate
from vmkeep.engine.throttle import throttled
from vmkeep.hypervisors.base import Connector
from vmkeep.jobs.queue import tasks
from vmkeep.jobs.registered import connector_for, open_registered
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.proxy.progress import RowProgress
from vmkeep.proxy.work import HypervisorOrder, RepositoryOrder, _hypervisor, _repository
from vmkeep.repository.repo import Repository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaOrder:
    vm_name: str
    replica_name: str
    point: str | None
    storage: str | None
    network: str | None
    action: str  # sync or failover
    failover_network: str | None
    hypervisor: HypervisorOrder
    repository: RepositoryOrder


def replica_order(session: Session, replica_id: int) -> ReplicaOrder | None:
    """The sync's order, or None when it is no longer to do (ended, or its hypervisor or repository removed)."""
    row = session.execute(text("SELECT * FROM proxy_replica_work WHERE replica_id = :id"), {"id": replica_id}).first()
    if row is None:
        return None
    return ReplicaOrder(row.vm_name, row.replica_name, row.pending_point, row.storage, row.network, row.action,
                        row.failover_network, _hypervisor(row), _repository(row))


@tasks.task(name="replicate_vm", pass_context=True)
def replicate_vm_task(context: JobContext, replica_id: int) -> None:
    state: dict[str, Any] = context.additional_context
    run_replica(state["sessions"], state["proxy"], replica_id, state.get("max_rate"))


def run_replica(sessions: sessionmaker[Session], proxy: str, replica_id: int, max_rate: float | None = None) -> None:
    """Sync the replica as its row says; the outcome (or why it failed) goes back into the row."""
    with sessions() as session:
        row = session.get(Replica, replica_id)
        order = replica_order(session, replica_id)
        if row is None or row.status not in ACTIVE:
            log.info("replica task %s: nothing to do (%s)", replica_id,
                     "its row is gone" if row is None else f"already {row.status}")
            return
        context = {"replica": replica_id, "vm": row.vm_name, "proxy": proxy}
        if order is None:
            log.warning("replica sync not started: its hypervisor or repository was removed", extra=context)
            row.status, row.updated = JobStatus.FAILED.value, datetime.now(UTC)
            row.error = "its target hypervisor or the policy's repository was removed before the sync started"
            session.commit()
            return
        row.status, row.proxy, row.attempts, row.error = JobStatus.RUNNING.value, proxy, row.attempts + 1, None
        session.commit()
        log.info("replica %s of %s on %s to point %s (attempt %d)", order.replica_name, order.vm_name,
                 order.hypervisor.name, order.point, row.attempts, extra=context)
        repo: Repository | None = None
        connector: Connector | None = None
        try:
            connector = connector_for(order.hypervisor)
            if order.action == "failover":
                info = failover(connector, order.vm_name, name=order.replica_name, network=order.failover_network)
                row.status = JobStatus.SUCCEEDED.value
                log.info("replica %s started (point %s)", order.replica_name, info.point, extra=context)
                return
            repo = open_registered(order.repository, read_only=True)
            rows = RowProgress(sessions, replica_id, Replica)  # its own connection, closed before this one writes
            try:
                report = replicate(repo, connector, order.vm_name, point=order.point, name=order.replica_name,
                                   storage=order.storage, network=order.network, progress=throttled(rows, max_rate))
            finally:
                rows.close()
            row.status, row.mode, row.bytes_written = JobStatus.SUCCEEDED.value, report.mode, report.bytes_written
            row.point_id = report.point
            log.info("replica %s: %s, %d bytes written", order.replica_name, report.mode, report.bytes_written,
                     extra=context)
        except Exception as exc:  # recorded for the user; the task itself ends cleanly
            row.status, row.error = JobStatus.FAILED.value, str(exc)[:4000] or type(exc).__name__
            log.warning("%s of replica %s of %s failed: %s", order.action, order.replica_name, order.vm_name, exc,
                        exc_info=log.isEnabledFor(logging.DEBUG), extra=context)
        finally:
            if connector is not None:
                row.state = host_state(connector, order.replica_name) or row.state
                connector.close()
            if repo is not None:
                repo.close()
            row.updated = datetime.now(UTC)
            session.commit()


def host_state(connector: Connector, name: str) -> str | None:
    """The replica's state as its record on the host says (None: no replica there, or unreadable)."""
    try:
        info = replicas_of(connector).get(name)
    except Exception as exc:  # noqa: BLE001 - the row keeps its last known state, the error says why
        log.warning("cannot read the state of replica %s: %s", name, exc)
        return None
    return info.state if info is not None else None
