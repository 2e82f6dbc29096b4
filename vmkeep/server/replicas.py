"""VM replicas through the server: a policy's replica target (a registered libvirt hypervisor) and
the syncs the master queues on a proxy after each of the policy's runs.

After a run of a policy with a replica target ends, each VM it backed up gets its replica on the
target brought to the run's new point: the master records (or reuses) the VM's ``replicas`` row,
gives it the point, and defers a sync on a live proxy that runs on one of the target hypervisor's
hosts (a libvirt replica's disks are written on the host, as a restore's; vmkeep.server.dispatch
chooses it the same way). The proxy (vmkeep.proxy.replica_task) runs vmkeep.engine.replica's
replicate, which writes only the slots that changed since the replica's point, and writes the
outcome into the row. Only the newest ended run counts: a replica follows the latest point, so a
run ended while an older one's sync is going is taken by the next.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

import procrastinate
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Hypervisor, Job, Policy, Proxy
from vmkeep.catalog.replica_models import NAME_PATTERN, Replica, ReplicaTarget
from vmkeep.jobs.queue import queue_name
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.server.dispatch import proxy_up, restore_proxy
from vmkeep.server.restore_locations import storage_allowed

log = logging.getLogger(__name__)

REPLICA_TASK = "vmkeep:replicate_vm"  # vmkeep.proxy.replica_task registers it
REPLICA_KIND = "libvirt"  # the hypervisors that hold replicas (vmkeep.hypervisors.base.ReplicaHost)
SYNC, FAILOVER = "sync", "failover"  # what a replica's row asks its proxy to do
PATTERN = re.compile(r"^[A-Za-z0-9._{}-]{1,200}$")


class ReplicaRefused(Exception):
    """A replica target that cannot be set; ``status`` is the HTTP answer, the message what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def replica_name(pattern: str, vm: str) -> str:
    return pattern.replace("{vm}", vm)


def set_target(session: Session, policy: Policy, hypervisor: str, *, storage: str | None, network: str | None,
               pattern: str = NAME_PATTERN) -> ReplicaTarget:
    """Set (or replace) the policy's replica target, unflushed; refused (422) before anything
    changes when the hypervisor is unknown or cannot hold replicas, the storage is outside its
    restore locations, or the name pattern does not name each VM's replica apart."""
    found = session.scalar(select(Hypervisor).where(Hypervisor.name == hypervisor))
    if found is None:
        raise ReplicaRefused(422, f"no hypervisor {hypervisor}: register the libvirt host the replicas go to first "
                                  "(POST /api/hypervisors)")
    if found.kind != REPLICA_KIND:
        raise ReplicaRefused(422, f"hypervisor {hypervisor} is {found.kind}: replicas are kept on libvirt hosts only; "
                                  "name a registered libvirt hypervisor")
    if storage is not None and not storage_allowed(storage, found.restore_locations):
        where = ", ".join(found.restore_locations) or "none registered yet"
        raise ReplicaRefused(422, f"replicas on {hypervisor} may write only inside its restore locations ({where}); "
                                  f"an administrator sets them with PUT /api/hypervisors/{hypervisor}/"
                                  "restore-locations")
    if "{vm}" not in pattern or not PATTERN.match(replica_name(pattern, "x")) or "{" in replica_name(pattern, "x"):
        raise ReplicaRefused(422, f"replica name {pattern!r}: give a VM name with '{{vm}}' where the VM's own name "
                                  "goes (letters, digits, '.', '_', '-'), e.g. {vm}-replica")
    target = session.scalar(select(ReplicaTarget).where(ReplicaTarget.policy_id == policy.id))
    if target is None:  # runs that ended before are not replicated: the next run's points are
        newest = session.scalar(select(func.max(Job.id)).where(Job.policy_id == policy.id))
        target = ReplicaTarget(policy=policy, last_job_id=newest)
        session.add(target)
    target.hypervisor, target.storage, target.network, target.name_pattern = found, storage, network, pattern
    return target


def _proxy_alive(session: Session, name: str | None) -> bool:
    found = session.scalar(select(Proxy).where(Proxy.name == name)) if name else None
    return found is not None and proxy_up(found)


def target_of(session: Session, policy: Policy) -> ReplicaTarget | None:
    return session.scalar(select(ReplicaTarget).where(ReplicaTarget.policy_id == policy.id))


def target_out(policy: Policy, target: ReplicaTarget | None) -> dict[str, Any]:
    if target is None:
        return {"policy": policy.name, "hypervisor": None, "storage": None, "network": None, "name": None}
    return {"policy": policy.name, "hypervisor": target.hypervisor.name, "storage": target.storage,
            "network": target.network, "name": target.name_pattern}


def recent_replicas(session: Session, limit: int = 200) -> list[Replica]:
    """The replicas the console shows, the most recently synced first."""
    return list(session.scalars(select(Replica).order_by(Replica.updated.desc(), Replica.id).limit(limit)))


def replica_out(row: Replica) -> dict[str, Any]:
    return {"id": row.id, "vm": row.vm_name, "replica": row.replica_name, "policy": row.policy_name,
            "hypervisor": row.hypervisor_name, "repository": row.repository_name, "point": row.point_id,
            "pending_point": row.pending_point, "state": row.state, "status": row.status, "mode": row.mode,
            "bytes_written": row.bytes_written, "job": row.job_id, "action": row.action, "proxy": row.proxy,
            "attempts": row.attempts, "progress_bytes": row.progress_bytes, "total_bytes": row.total_bytes,
            "storage": row.storage, "network": row.network, "error": row.error, "updated": row.updated}


async def replicate_after_backups(session: Session, queue: procrastinate.App) -> int:
    """Queue the syncs of every replica target whose policy ended a run since the last look (its
    newest run: each VM's replica goes to that run's point); how many were queued."""
    queued = 0
    for target in list(session.scalars(select(ReplicaTarget).order_by(ReplicaTarget.id))):
        job = session.scalar(select(Job).where(Job.policy_id == target.policy_id, Job.finished.is_not(None),
                                               Job.id > (target.last_job_id or 0)).order_by(Job.id.desc()).limit(1))
        if job is None:
            continue
        target.last_job_id = job.id  # first: a sync that cannot start is not retried forever
        session.commit()
        for jv in job.vms:
            if jv.status == JobStatus.SUCCEEDED and jv.point_id:
                queued += await queue_sync(session, queue, target, job, jv.vm_name, jv.point_id)
    return queued


async def queue_sync(session: Session, queue: procrastinate.App, target: ReplicaTarget, job: Job, vm: str,
                     point: str) -> int:
    """Bring ``vm``'s replica on the target to ``point``: its row queued and its task deferred on
    a proxy on the target's hosts, or the row failed saying why (1 when queued, else 0)."""
    name = replica_name(target.name_pattern, vm)
    row = session.scalar(select(Replica).where(Replica.hypervisor_id == target.hypervisor_id,
                                               Replica.replica_name == name))
    if row is not None and row.status in ACTIVE:
        if _proxy_alive(session, row.proxy):
            log.info("replica %s of %s: a sync is under way; point %s waits for the next run", name, vm, point)
            return 0
        # its proxy stopped: the sync is given up (still waiting: taken off the queue) and queued again;
        # a write it left half-done is found by the replica's "updating" state and repaired (a compare pass)
        log.warning("replica %s of %s: proxy %s went down during its sync; queued again", name, vm, row.proxy)
        if row.task_id is not None:
            await queue.job_manager.cancel_job_by_id_async(row.task_id)
    policy = target.policy
    fields: dict[str, Any] = {
        "vm_name": vm, "policy_id": policy.id, "policy_name": policy.name, "repository_id": policy.repository_id,
        "repository_name": policy.repository.name, "storage": target.storage, "network": target.network,
        "pending_point": point, "job_id": job.id, "status": JobStatus.QUEUED.value, "error": None, "attempts": 0,
        "progress_bytes": None, "total_bytes": None, "action": SYNC, "failover_network": None}
    if row is None:  # every column set before it is added: a lazy load's autoflush would write it half-made
        row = Replica(hypervisor_id=target.hypervisor_id, hypervisor_name=target.hypervisor.name, replica_name=name,
                      **fields)
        session.add(row)
    else:
        for key, value in fields.items():
            setattr(row, key, value)
    row.updated = datetime.now(UTC)
    proxy = restore_proxy(session, target.hypervisor)
    if proxy is None:
        row.status = JobStatus.FAILED.value
        row.error = (f"no proxy is up on a host of hypervisor {target.hypervisor.name} to write the replica: start "
                     "`vmkeep proxy` there; the next run of the policy replicates again")
        log.warning("replica %s of %s not synced: %s", name, vm, row.error)
        session.commit()
        return 0
    await _defer(session, queue, row, proxy)
    log.info("replica %s of %s to point %s queued on proxy %s", name, vm, point, proxy.name,
             extra={"vm": vm, "proxy": proxy.name})
    return 1


async def _defer(session: Session, queue: procrastinate.App, row: Replica, proxy: Proxy) -> None:
    """Put the row's action on ``proxy``'s queue (one at a time per replica: its row's status)."""
    row.proxy = proxy.name
    session.commit()
    row.task_id = await queue.configure_task(REPLICA_TASK, queue=queue_name(proxy.name)).defer_async(
        replica_id=row.id)
    session.commit()


def failover_row(session: Session, vm: str, hypervisor: str | None) -> Replica:
    """The replica of ``vm`` a failover starts (on ``hypervisor`` when it has several); refused
    (404, 409) when there is none, or it is not a complete standby nobody is writing."""
    query = select(Replica).where(Replica.vm_name == vm)
    if hypervisor is not None:
        query = query.where(Replica.hypervisor_name == hypervisor)
    rows = list(session.scalars(query.order_by(Replica.id)))
    where = f" on {hypervisor}" if hypervisor else ""
    if not rows:
        raise ReplicaRefused(404, f"no replica of {vm}{where} in the catalog: see GET /api/replicas")
    if len(rows) > 1:
        raise ReplicaRefused(409, f"{vm} has replicas on {', '.join(r.hypervisor_name for r in rows)}: name the "
                                  "hypervisor whose replica to start")
    row = rows[0]
    if row.hypervisor_id is None:
        raise ReplicaRefused(409, f"the hypervisor {row.hypervisor_name} of {row.replica_name} was removed: register "
                                  f"it again, or start the replica there with vmkeep failover {vm} --to URI")
    if row.status in ACTIVE and _proxy_alive(session, row.proxy):
        raise ReplicaRefused(409, f"a {row.action} of {row.replica_name} is under way: wait for it to end")
    if row.state not in ("standby", "diverged"):
        raise ReplicaRefused(409, f"the replica {row.replica_name} is {row.state or 'not made yet'}: only a complete "
                                  "replica (standby) is started; run the policy again to complete it, or fail back "
                                  "first (vmkeep failback) when it was failed over")
    return row


async def start_failover(session: Session, queue: procrastinate.App, row: Replica, network: str | None) -> Replica:
    """Queue the start of the replica on a proxy on its host (:func:`failover_row` chose it);
    the caller has audited it. Refused (409) when no such proxy is up, nothing changed."""
    hypervisor = session.get(Hypervisor, row.hypervisor_id)
    assert hypervisor is not None
    proxy = restore_proxy(session, hypervisor)
    if proxy is None:
        raise ReplicaRefused(409, f"no proxy is up on a host of hypervisor {hypervisor.name} to start the replica: "
                                  "start `vmkeep proxy` there, or run vmkeep failover on the host")
    row.action, row.failover_network, row.status, row.error, row.attempts = FAILOVER, network, JobStatus.QUEUED, None, 0
    row.updated = datetime.now(UTC)
    await _defer(session, queue, row, proxy)
    log.info("failover of %s to its replica %s queued on proxy %s", row.vm_name, row.replica_name, proxy.name,
             extra={"vm": row.vm_name, "proxy": proxy.name})
    return row
