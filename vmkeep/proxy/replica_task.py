"""The task a proxy runs to bring a VM's replica to the point of its policy's newest run
(vmkeep.server.replicas queues it): vmkeep.engine.replica's replicate on the target hypervisor,
from the policy's repository opened read-only; or, asked through the API, its failover (start
the replica). The outcome goes into the replica's row.

The proxy reads the row's order through migration 0020's view (the target hypervisor's sealed
login and, for a sync, the repository's sealed passphrase, which only the master key opens) and
writes only the row's outcome columns. A task does anything only while the row names it as its
current task (``task_id``, which the master writes right after deferring the task: one taken
sooner waits for it), and records its outcome only if it still is then: a task the master gave
up and queued again (vmkeep.server.replica_rescue) cannot overwrite what the new one does.
``state`` and the point are what the replica's own record on the host says afterwards
(vmkeep.hypervisors.base.ReplicaInfo): the truth about what its disks hold, a failed sync too;
"absent" when the host holds no replica of the VM by that name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from procrastinate import JobContext
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.catalog.replica_models import Replica
from vmkeep.engine.replica import failover, replicas_of, replicate
from vmkeep.engine.throttle import throttled
from vmkeep.errors import UsageError
from vmkeep.hypervisors.base import Connector, ReplicaInfo
from vmkeep.jobs.queue import tasks
from vmkeep.jobs.registered import connector_for, open_registered
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.proxy.progress import RowProgress
from vmkeep.proxy.work import HypervisorOrder, RepositoryOrder, _hypervisor, _repository
from vmkeep.repository.repo import Repository

log = logging.getLogger(__name__)


ABSENT = "absent"  # the row's state when the host holds no replica of the VM by its name
HOLDS_POINT = ("standby", "failed-over", "diverged")  # states whose record's point is what the disks hold
NAMING_WAIT = 30.0  # seconds a task waits for the master to name it in its row (it does so right after deferring)


@dataclass(frozen=True)
class ReplicaOrder:
    vm_name: str
    replica_name: str
    policy: str
    point: str | None
    storage: str | None
    network: str | None
    action: str  # sync or failover
    failover_network: str | None
    hypervisor: HypervisorOrder
    repository: RepositoryOrder | None  # a sync's (None: a failover, or the repository was removed)


def replica_order(session: Session, replica_id: int) -> ReplicaOrder | None:
    """The row's order, or None when it is no longer to do (ended, or its hypervisor removed)."""
    row = session.execute(text("SELECT * FROM proxy_replica_work WHERE replica_id = :id"), {"id": replica_id}).first()
    if row is None:
        return None
    repository = _repository(row) if row.repository_id is not None else None
    return ReplicaOrder(row.vm_name, row.replica_name, row.policy_name, row.pending_point, row.storage, row.network,
                        row.action, row.failover_network, _hypervisor(row), repository)


@tasks.task(name="replicate_vm", pass_context=True)
def replicate_vm_task(context: JobContext, replica_id: int) -> None:
    state: dict[str, Any] = context.additional_context
    assert context.job.id is not None
    run_replica(state["sessions"], state["proxy"], replica_id, context.job.id, state.get("max_rate"))


def run_replica(sessions: sessionmaker[Session], proxy: str, replica_id: int, task_id: int,
                max_rate: float | None = None) -> None:
    """Do what the row asks if ``task_id`` is its current task; the outcome (or why it failed)
    goes back into the row while it still is."""
    with sessions() as session:
        row = _own_row(session, replica_id, task_id)
        if row is None:
            return
        order = replica_order(session, replica_id)
        context = {"replica": replica_id, "vm": row.vm_name, "proxy": proxy}
        if order is None or (order.action == "sync" and order.repository is None):
            action, gone = row.action, "target hypervisor" if order is None else "policy's repository"
            log.warning("replica %s not started: its %s was removed", action, gone, extra=context)
            session.rollback()
            _record(session, replica_id, task_id, {"status": JobStatus.FAILED.value,
                                                   "error": f"its {gone} was removed before the {action} started"})
            return
        row.status, row.proxy, row.attempts, row.error = JobStatus.RUNNING.value, proxy, row.attempts + 1, None
        attempt = row.attempts
        session.commit()
        log.info("replica %s of %s on %s: %s to point %s (attempt %d, task %s)", order.replica_name, order.vm_name,
                 order.hypervisor.name, order.action, order.point, attempt, task_id, extra=context)
        _record(session, replica_id, task_id, _carry_out(sessions, replica_id, order, max_rate, context))


def _own_row(session: Session, replica_id: int, task_id: int) -> Replica | None:
    """The row, locked, when ``task_id`` is its current task and it is still to do. The master
    names a task in its row just after deferring it: a task taken sooner waits for that."""
    deadline = time.monotonic() + NAMING_WAIT
    while True:
        row = session.scalar(select(Replica).where(Replica.id == replica_id).with_for_update()
                             .execution_options(populate_existing=True))
        if row is None or row.task_id is not None or row.status not in ACTIVE or time.monotonic() > deadline:
            break
        session.rollback()
        time.sleep(0.2)
    if row is not None and row.task_id == task_id and row.status in ACTIVE:
        return row
    why = ("its row is gone" if row is None else f"already {row.status}" if row.status not in ACTIVE
           else f"the row names task {row.task_id}")
    log.info("replica task %s of row %s: nothing to do (%s)", task_id, replica_id, why)
    session.rollback()
    return None


def _carry_out(sessions: sessionmaker[Session], replica_id: int, order: ReplicaOrder, max_rate: float | None,
               context: dict[str, Any]) -> dict[str, Any]:
    """The sync or failover itself; the row's new outcome columns."""
    outcome: dict[str, Any] = {}
    repo: Repository | None = None
    connector: Connector | None = None
    try:
        connector = connector_for(order.hypervisor)
        if order.action == "failover":
            info = failover(connector, order.vm_name, name=order.replica_name, network=order.failover_network)
            log.info("replica %s started (point %s)", order.replica_name, info.point, extra=context)
            outcome["status"] = JobStatus.SUCCEEDED.value
            return outcome
        assert order.repository is not None
        repo = open_registered(order.repository, read_only=True)
        _check_is_ours(connector, order, order.repository.name, repo)
        rows = RowProgress(sessions, replica_id, Replica)  # its own connection
        try:
            report = replicate(repo, connector, order.vm_name, point=order.point, name=order.replica_name,
                               storage=order.storage, network=order.network, progress=throttled(rows, max_rate))
        finally:
            rows.close()
        outcome.update(status=JobStatus.SUCCEEDED.value, mode=report.mode, bytes_written=report.bytes_written,
                       point_id=report.point)
        log.info("replica %s: %s, %d bytes written", order.replica_name, report.mode, report.bytes_written,
                 extra=context)
    except Exception as exc:  # recorded for the user; the task itself ends cleanly
        outcome.update(status=JobStatus.FAILED.value, error=str(exc)[:4000] or type(exc).__name__)
        log.warning("%s of replica %s of %s failed: %s", order.action, order.replica_name, order.vm_name, exc,
                    exc_info=log.isEnabledFor(logging.DEBUG), extra=context)
    finally:
        if connector is not None:
            outcome.update(host_state(connector, order.replica_name, order.vm_name))
            connector.close()
        if repo is not None:
            repo.close()
    return outcome


def _record(session: Session, replica_id: int, task_id: int, outcome: dict[str, Any]) -> bool:
    """Write the outcome into the row if this task still is its current one and it has not ended."""
    done = session.execute(update(Replica).where(Replica.id == replica_id, Replica.task_id == task_id,
                                                 Replica.status.in_(ACTIVE))
                           .values(**outcome, updated=datetime.now(UTC)))
    session.commit()
    if not getattr(done, "rowcount", 0):
        log.warning("replica row %s no longer names task %s (given up and queued again?): its outcome %s is not "
                    "recorded", replica_id, task_id, outcome.get("status"))
        return False
    return True


def _check_is_ours(connector: Connector, order: ReplicaOrder, repository: str, repo: Repository) -> None:
    """Refuse, saying what to change through the server, a replica name the host holds for
    something else: a VM that is no replica, another VM's replica, or one kept from another
    repository (the engine refuses them too, with the command line's advice)."""
    where = f"{order.replica_name} on {order.hypervisor.name}"
    change = (f"give policy {order.policy}'s replica target a name pattern of its own (PUT /api/policies/"
              f"{order.policy}/replica, name)")
    try:
        info = replicas_of(connector).get(order.replica_name)
    except UsageError as exc:
        raise UsageError(f"{where} is a VM that is not a vmkeep replica, left alone: {change}") from exc
    if info is not None and info.source != order.vm_name:
        raise UsageError(f"{where} is the replica of {info.source}, not of {order.vm_name}: {change}")
    if info is not None and info.repository != repo.config.repo_id:
        raise UsageError(f"{where} is kept from another repository (id {info.repository}), not from policy "
                         f"{order.policy}'s repository {repository} (id {repo.config.repo_id}): {change}, or "
                         "remove that replica VM from the host")


def host_state(connector: Connector, name: str, vm: str) -> dict[str, Any]:
    """The row's ``state`` (and ``point_id``) as the replica's record on the host says: state
    "absent" and no point when the host holds no replica of ``vm`` by that name; nothing when the
    record cannot be read (the row keeps what it knew, the log says why)."""
    try:
        info: ReplicaInfo | None = replicas_of(connector).get(name)
    except Exception as exc:  # noqa: BLE001 - the row keeps its last known state, the log says why
        log.warning("cannot read the state of replica %s: %s", name, exc)
        return {}
    if info is None or info.source != vm:
        log.info("no replica of %s named %s on %s", vm, name, connector.uri)
        return {"state": ABSENT, "point_id": None}
    if info.state in HOLDS_POINT:
        return {"state": info.state, "point_id": info.point}
    return {"state": info.state}
