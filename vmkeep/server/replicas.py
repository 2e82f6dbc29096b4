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

One task per replica at a time: the row names its current task (``task_id``); a proxy's task whose
id is not the row's does nothing, and writes its outcome only while it still is. The master reads
and changes a row under its lock (SELECT ... FOR UPDATE), and names the new task in it right after
deferring it. A task that will never end the row (its proxy's worker stopped
heartbeating, it waited on the queue of a proxy that went down, or it ended without an outcome) is
taken over by vmkeep.server.replica_rescue every few seconds: queued again on a live proxy of the host,
or the row failed saying why, so no replica stays "under way" for good.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import procrastinate
from sqlalchemy import Select, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Hypervisor, Job, Policy, Proxy
from vmkeep.catalog.replica_models import NAME_PATTERN, Replica, ReplicaTarget
from vmkeep.errors import UsageError
from vmkeep.jobs.queue import queue_name
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.repository.points import check_name
from vmkeep.server.dispatch import proxy_up, restore_proxy, select_vms
from vmkeep.server.restore_locations import storage_allowed

log = logging.getLogger(__name__)

REPLICA_TASK = "vmkeep:replicate_vm"  # vmkeep.proxy.replica_task registers it
REPLICA_KIND = "libvirt"  # the hypervisors that hold replicas (vmkeep.hypervisors.base.ReplicaHost)
SYNC, FAILOVER = "sync", "failover"  # what a replica's row asks its proxy to do
SAMPLE_VM = "vm"  # a VM name a name pattern is tried on
QUEUEING = timedelta(seconds=60)  # a row queued naming no task yet is being put on the queue this long


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
    restore locations, the name pattern does not make a usable name for each VM, or one of the
    names is another VM's or policy's replica on that hypervisor."""
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
    vms = [vm.name for vm in select_vms(session, policy)]
    _check_pattern(pattern, vms)
    _check_names_free(session, policy, found, {replica_name(pattern, vm): vm for vm in vms})
    target = session.scalar(select(ReplicaTarget).where(ReplicaTarget.policy_id == policy.id))
    if target is None:  # runs that ended before are not replicated: the next run's points are
        newest = session.scalar(select(func.max(Job.id)).where(Job.policy_id == policy.id))
        target = ReplicaTarget(policy=policy, last_job_id=newest)
        session.add(target)
    target.hypervisor, target.storage, target.network, target.name_pattern = found, storage, network, pattern
    return target


def _check_pattern(pattern: str, vms: list[str]) -> None:
    """Refused (422) unless the pattern holds ``{vm}`` and makes a name the engine takes (its
    check_name) for a sample VM and for each VM the policy picks now: every sync would refuse it."""
    if "{vm}" not in pattern or _unusable(replica_name(pattern, SAMPLE_VM)):
        raise ReplicaRefused(422, f"replica name {pattern!r}: give a VM name with '{{vm}}' where the VM's own name "
                                  "goes (letters, digits, '.', '_', '-', starting with a letter or digit, at most 128 "
                                  "characters in all), e.g. {vm}-replica")
    for vm in vms:
        if problem := _unusable(replica_name(pattern, vm)):
            raise ReplicaRefused(422, f"replica name {pattern!r} for VM {vm}: {problem}; choose a shorter pattern")


def _unusable(name: str) -> str | None:
    try:
        check_name(name, "replica name")
    except UsageError as exc:
        return str(exc)
    return None


def _check_names_free(session: Session, policy: Policy, hypervisor: Hypervisor, names: dict[str, str]) -> None:
    """Refused (422) when one of ``names`` (replica name → VM) is, on ``hypervisor``, another VM's
    replica, or the same VM's replica kept by another policy's target there: one replica VM
    would be overwritten by both."""
    if not names:
        return
    taken = list(session.scalars(select(Replica).where(Replica.hypervisor_id == hypervisor.id,
                                                       Replica.replica_name.in_(list(names))).order_by(Replica.id)))
    for row in taken:
        other = _rival_policy(session, row, policy, hypervisor)
        if row.vm_name != names[row.replica_name] or other is not None:
            owner = f"policy {other}" if other else f"policy {row.policy_name}"
            raise _name_taken(row.replica_name, hypervisor, row.vm_name, owner)
    rivals = list(session.scalars(select(ReplicaTarget).where(ReplicaTarget.hypervisor_id == hypervisor.id,
                                                              ReplicaTarget.policy_id != policy.id)
                                  .order_by(ReplicaTarget.id)))
    for rival in rivals:
        for vm in select_vms(session, rival.policy):
            if replica_name(rival.name_pattern, vm.name) in names:
                raise _name_taken(replica_name(rival.name_pattern, vm.name), hypervisor, vm.name,
                                  f"policy {rival.policy.name}")


def _rival_policy(session: Session, row: Replica, policy: Policy, hypervisor: Hypervisor) -> str | None:
    """The other policy whose replica target on ``hypervisor`` keeps ``row``, if any (a policy
    deleted, or whose target moved, leaves its replicas to whoever takes them)."""
    if row.policy_id is None or row.policy_id == policy.id:
        return None
    return session.scalar(select(Policy.name).join(ReplicaTarget, ReplicaTarget.policy_id == Policy.id)
                          .where(Policy.id == row.policy_id, ReplicaTarget.hypervisor_id == hypervisor.id))


def _name_taken(name: str, hypervisor: Hypervisor, vm: str, owner: str) -> ReplicaRefused:
    return ReplicaRefused(422, f"the replica name {name} on {hypervisor.name} is taken by the replica of {vm} kept "
                               f"by {owner}: give this policy's target a name pattern of its own (name, e.g. "
                               "'{vm}-replica-2')")


def proxy_alive(session: Session, name: str | None) -> bool:
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
        for vm, point in [(jv.vm_name, jv.point_id) for jv in job.vms
                          if jv.status == JobStatus.SUCCEEDED and jv.point_id]:
            queued += await queue_sync(session, queue, target, job, vm, point)
    return queued


def locked_rows(session: Session, query: Select[Replica]) -> list[Replica] | None:
    """``query``'s rows locked until the caller commits (it checks a row, then writes it), read
    afresh; None when another transaction holds one (another master's request, a proxy taking its
    task): not waited for, which would stall the master's event loop."""
    try:
        return list(session.scalars(query.with_for_update(nowait=True).execution_options(populate_existing=True)))
    except OperationalError as exc:
        session.rollback()
        log.info("replica row busy (%s): left for now", type(exc.orig).__name__)
        return None


async def queue_sync(session: Session, queue: procrastinate.App, target: ReplicaTarget, job: Job, vm: str,
                     point: str) -> int:
    """Bring ``vm``'s replica on the target to ``point``: its row queued and its task deferred on
    a proxy on the target's hosts, or the row failed saying why (1 when queued, else 0)."""
    name, policy, hypervisor = replica_name(target.name_pattern, vm), target.policy, target.hypervisor
    rows = locked_rows(session, select(Replica).where(Replica.hypervisor_id == hypervisor.id,
                                                      Replica.replica_name == name, Replica.vm_name == vm))
    if rows is None:
        log.info("replica %s of %s is being queued by another request; point %s waits for the next run", name, vm,
                 point)
        return 0
    row = rows[0] if rows else None
    if row is not None and row.status in ACTIVE:
        session.commit()  # its task is going (vmkeep.server.replica_rescue took over those that were not)
        log.info("replica %s of %s: a %s is under way; point %s waits for the next run", name, vm, row.action, point)
        return 0
    if row is not None and (rival := _rival_policy(session, row, policy, hypervisor)) is not None:
        session.commit()
        log.warning("replica %s of %s on %s is kept by policy %s: policy %s does not sync it (give its target a "
                    "name pattern of its own)", name, vm, hypervisor.name, rival, policy.name)
        return 0
    fields: dict[str, Any] = {
        "vm_name": vm, "policy_id": policy.id, "policy_name": policy.name, "repository_id": policy.repository_id,
        "repository_name": policy.repository.name, "storage": target.storage, "network": target.network,
        "pending_point": point, "job_id": job.id, "status": JobStatus.QUEUED.value, "error": None, "attempts": 0,
        "progress_bytes": None, "total_bytes": None, "action": SYNC, "failover_network": None,
        "updated": datetime.now(UTC)}
    if row is None:  # every column set before it is added: a lazy load's autoflush would write it half-made
        row = Replica(hypervisor_id=hypervisor.id, hypervisor_name=hypervisor.name, replica_name=name, **fields)
        session.add(row)
    else:
        for key, value in fields.items():
            setattr(row, key, value)
    refusal = _cannot_write(target)
    proxy = restore_proxy(session, hypervisor) if refusal is None else None
    if refusal is None and proxy is None:
        refusal = (f"no proxy is up on a host of hypervisor {hypervisor.name} to write the replica: start "
                   "`vmkeep proxy` there; the next run of the policy replicates again")
    if refusal is not None or proxy is None:
        row.status, row.error = JobStatus.FAILED.value, refusal
        log.warning("replica %s of %s not synced: %s", name, vm, row.error)
        session.commit()
        return 0
    if not await defer_task(session, queue, row, proxy):
        return 0
    log.info("replica %s of %s to point %s queued on proxy %s (task %s)", name, vm, point, proxy.name, row.task_id,
             extra={"vm": vm, "proxy": proxy.name})
    return 1


def _cannot_write(target: ReplicaTarget) -> str | None:
    """Why the target's replicas cannot be written now (its storage left the hypervisor's restore
    locations since it was set), or None."""
    hypervisor, policy = target.hypervisor, target.policy.name
    if target.storage is None or storage_allowed(target.storage, hypervisor.restore_locations):
        return None
    where = ", ".join(hypervisor.restore_locations) or "none registered"
    return (f"the replica target's storage {target.storage} is no longer inside the restore locations of hypervisor "
            f"{hypervisor.name} ({where}): an administrator adds it (PUT /api/hypervisors/{hypervisor.name}/"
            f"restore-locations), or give the target another storage (PUT /api/policies/{policy}/replica); the "
            "next run of the policy replicates again")


async def defer_task(session: Session, queue: procrastinate.App, row: Replica, proxy: Proxy) -> bool:
    """Put the row's action on ``proxy``'s queue. The row is committed first, naming no task (no
    lock is held across the wait for the queue: the master's event loop runs its other requests
    meanwhile), then naming the new one: a proxy that takes the task sooner waits for its name
    (vmkeep.proxy.replica_task), the rescue leaves the row alone meanwhile (QUEUEING). False (the
    row failed, committed) when the queue refused it."""
    row.proxy, row.task_id, row.updated = proxy.name, None, datetime.now(UTC)
    session.commit()
    try:
        task_id = await queue.configure_task(REPLICA_TASK, queue=queue_name(proxy.name)).defer_async(
            replica_id=row.id)
    except Exception as exc:  # recorded in the row; the caller goes on with the other replicas
        row.status = JobStatus.FAILED.value
        row.error = f"could not put the {row.action} on proxy {proxy.name}'s queue: {exc}; {again(row)}"
        log.warning("replica %s of %s: %s", row.replica_name, row.vm_name, row.error)
        session.commit()
        return False
    row.task_id = task_id
    session.commit()
    return True


def again(row: Replica) -> str:
    return "the next run of the policy syncs it again" if row.action == SYNC else "ask for the failover again"


def failover_row(session: Session, vm: str, hypervisor: str | None) -> Replica:
    """The replica of ``vm`` a failover starts (on ``hypervisor`` when it has several), locked
    until the caller commits; refused (404, 409) when there is none, or it is not a complete
    standby nobody is writing."""
    query = select(Replica).where(Replica.vm_name == vm)
    if hypervisor is not None:
        query = query.where(Replica.hypervisor_name == hypervisor)
    rows = locked_rows(session, query.order_by(Replica.id))
    if rows is None:
        raise ReplicaRefused(409, f"a sync of the replica of {vm} is being queued right now: try again in a moment")
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
    if row.status in ACTIVE:
        waits = "" if proxy_alive(session, row.proxy) else f" (proxy {row.proxy} is down: start it)"
        raise ReplicaRefused(409, f"a {row.action} of {row.replica_name} is under way on proxy {row.proxy}{waits}: "
                                  "wait for it to end")
    if row.state not in ("standby", "diverged"):
        raise ReplicaRefused(409, f"the replica {row.replica_name} is {row.state or 'not made yet'}: only a complete "
                                  "replica (standby) is started; run the policy again to complete it, or fail back "
                                  "first (vmkeep failback) when it was failed over")
    return row


async def start_failover(session: Session, queue: procrastinate.App, row: Replica, network: str | None) -> Replica:
    """Queue the start of the replica on a proxy on its host (:func:`failover_row` chose and
    locked it); the caller has audited it. Refused (409) when no such proxy is up, nothing changed;
    (503) when the queue refused it (the row failed, saying so)."""
    hypervisor = session.get(Hypervisor, row.hypervisor_id)
    assert hypervisor is not None
    proxy = restore_proxy(session, hypervisor)
    if proxy is None:
        raise ReplicaRefused(409, f"no proxy is up on a host of hypervisor {hypervisor.name} to start the replica: "
                                  "start `vmkeep proxy` there, or run vmkeep failover on the host")
    row.action, row.failover_network, row.status, row.error, row.attempts = FAILOVER, network, JobStatus.QUEUED, None, 0
    if not await defer_task(session, queue, row, proxy):
        raise ReplicaRefused(503, f"{row.error}")
    log.info("failover of %s to its replica %s queued on proxy %s (task %s)", row.vm_name, row.replica_name,
             proxy.name, row.task_id, extra={"vm": row.vm_name, "proxy": proxy.name})
    return row
