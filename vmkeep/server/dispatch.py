"""Turning a policy run into per-VM tasks on proxies, and rescuing tasks whose proxy died.

Selection rules are evaluated at every run, so VMs that appeared since are protected. Each VM
goes to a proxy that is up, reaches the VM's host, can use one of the policy's transports, and
has the least work per slot; its task carries the VM's lock.
"""

from __future__ import annotations

import fnmatch
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import procrastinate
from sqlalchemy import ColumnElement, and_, cast, func, or_, select, true
from sqlalchemy.dialects.postgresql import JSONB, array
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Hypervisor, Job, JobVM, Policy, Proxy, RestoreJob, VirtualMachine
from vmkeep.hypervisors.connect import restores_need_the_host
from vmkeep.jobs.queue import BACKUP_TASK, RESTORE_TASK, queue_name, vm_lock
from vmkeep.jobs.settle import settle_job
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.server.limits import RunSlots, datastores

PROXY_TIMEOUT = timedelta(seconds=10)  # a proxy whose heartbeat is older is down


log = logging.getLogger(__name__)


def proxy_up(p: Proxy, now: datetime | None = None) -> bool:
    return (now or datetime.now(UTC)) - p.last_heartbeat < PROXY_TIMEOUT


def picks(rules: dict[str, Any], vm: VirtualMachine, hypervisor: str) -> bool:
    """Whether selection ``rules`` pick ``vm`` (of ``hypervisor``): its name among the names or
    globs (any VM when there are none), and its hypervisor, host, tags and folder as the rules ask."""
    if rules.get("hypervisor") and hypervisor != rules["hypervisor"]:
        return False
    if rules.get("hosts") and vm.host not in rules["hosts"]:
        return False
    if rules.get("tags") and not set(rules["tags"]) & set(vm.tags):
        return False
    if rules.get("folders") and not any(fnmatch.fnmatchcase(vm.folder or "", g) for g in rules["folders"]):
        return False
    if not (rules.get("vms") or rules.get("globs")):
        return True
    return vm.name in rules.get("vms", []) or any(fnmatch.fnmatchcase(vm.name, g) for g in rules.get("globs", []))


def _literal(c: str) -> str:
    """``c`` as itself in a PostgreSQL regular expression, inside brackets or out."""
    return c if c.isalnum() else "\\" + c


def _glob_set(glob: str, i: int, j: int) -> str | None:
    """The set ``glob[i:j]`` (between ``[`` and ``]``) as fnmatch reads it, every member literal
    (``^``, ``[``, ``\\`` too) and ranges cleaned up as ``fnmatch.translate`` does; None: empty."""
    chunks = [glob[i:j]]
    if "-" in chunks[0]:
        chunks, k = [], i + 2 if glob[i] == "!" else i + 1
        while (k := glob.find("-", k, j)) >= 0:
            chunks.append(glob[i:k])
            i, k = k + 1, k + 3
        if glob[i:j]:
            chunks.append(glob[i:j])
        else:
            chunks[-1] += "-"
        for k in range(len(chunks) - 1, 0, -1):  # an empty range (z-a) goes
            if chunks[k - 1][-1] > chunks[k][0]:
                chunks[k - 1] = chunks[k - 1][:-1] + chunks[k][1:]
                del chunks[k]
    negated = chunks[0].startswith("!")
    if negated:
        chunks[0] = chunks[0][1:]
    members = "-".join("".join(map(_literal, chunk)) for chunk in chunks)
    if not members:
        return "." if negated else None
    return "[" + ("^" if negated else "") + members + "]"


def glob_regex(glob: str) -> str:
    """A shell glob as fnmatch reads it (``*``, ``?``, ``[...]``, ``[!...]``) written as an anchored
    PostgreSQL regular expression."""
    out, i = ["^"], 0
    while i < len(glob):
        c = glob[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + 1 if i < len(glob) and glob[i] == "!" else i
            j = j + 1 if j < len(glob) and glob[j] == "]" else j
            while j < len(glob) and glob[j] != "]":
                j += 1
            if j >= len(glob):
                out.append("\\[")
                continue
            inner = _glob_set(glob, i, j)
            if inner is None:
                return "^(?!)"  # a set that holds nothing (z-a): the glob matches nothing
            out.append(inner)
            i = j + 1
        else:
            out.append(_literal(c))
    return "".join(out) + "$"


def selection_clause(rules: dict[str, Any]) -> ColumnElement[bool]:
    """:func:`picks` as one SQL condition on ``VirtualMachine`` joined with ``Hypervisor``."""
    conditions: list[ColumnElement[bool]] = []
    if rules.get("hypervisor"):
        conditions.append(Hypervisor.name == rules["hypervisor"])
    if rules.get("hosts"):
        conditions.append(VirtualMachine.host.in_(rules["hosts"]))
    if rules.get("tags"):
        conditions.append(cast(VirtualMachine.tags, JSONB).op("?|")(array([str(t) for t in rules["tags"]])))
    if rules.get("folders"):
        conditions.append(or_(*[func.coalesce(VirtualMachine.folder, "").regexp_match(glob_regex(g))
                                for g in rules["folders"]]))
    if rules.get("vms") or rules.get("globs"):
        conditions.append(or_(VirtualMachine.name.in_(rules.get("vms", [])),
                              *[VirtualMachine.name.regexp_match(glob_regex(g)) for g in rules.get("globs", [])]))
    return and_(true(), *conditions)


def select_vms(session: Session, policy: Policy) -> list[VirtualMachine]:
    """The present VMs the policy's rules pick: names, globs, hypervisor, hosts, tags, folders."""
    rules = policy.selection
    query = select(VirtualMachine, Hypervisor.name).join(Hypervisor).where(VirtualMachine.present.is_(True))
    if rules.get("hypervisor"):
        query = query.where(Hypervisor.name == rules["hypervisor"])
    return [vm for vm, hypervisor in session.execute(query.order_by(VirtualMachine.name))
            if picks(rules, vm, hypervisor)]


def proxy_loads(session: Session) -> dict[str, int]:
    """Backups queued or running per proxy."""
    rows = session.execute(select(JobVM.proxy, func.count()).where(JobVM.status.in_(ACTIVE), JobVM.proxy.is_not(None))
                           .group_by(JobVM.proxy)).tuples()
    return {name: n for name, n in rows if name}


def choose_proxy(proxies: list[Proxy], loads: dict[str, int], vm: VirtualMachine, policy: Policy,
                 exclude: set[str] | frozenset[str] = frozenset()) -> Proxy | None:
    wanted = set(policy.transports.split(":"))
    fits = []
    for p in proxies:
        if p.name in exclude or not proxy_up(p):
            continue
        on_host = vm.host in p.reaches
        sees_storage = bool(datastores(vm)) and datastores(vm) <= set(p.storage)
        usable = set(p.transports) & wanted
        if not on_host:
            usable -= {"hotadd"} if sees_storage else {"san", "hotadd"}  # on the VM's host, or its storage
            if "*" not in p.reaches and not sees_storage:
                usable = set()
        if usable:
            fits.append(p)
    if not fits:
        return None
    return min(fits, key=lambda p: (loads.get(p.name, 0) / max(p.concurrency, 1), p.name))


async def _defer(queue: procrastinate.App, proxy: Proxy, vm: VirtualMachine, jv: JobVM) -> int:
    task = queue.configure_task(BACKUP_TASK, queue=queue_name(proxy.name), lock=vm_lock(vm.hypervisor.name, vm.uuid))
    return await task.defer_async(job_vm_id=jv.id)


def _place(jv: JobVM, vm: VirtualMachine, slots: RunSlots, proxies: list[Proxy], loads: dict[str, int]) -> Proxy | None:
    """Give ``jv`` a proxy and take its slots, leave it waiting behind a limit, or fail it when no
    proxy can ever take it; the proxy, if it goes now."""
    policy = slots.policy
    if slots.waits_for(vm):
        jv.status = JobStatus.WAITING
        return None
    proxy = choose_proxy(proxies, loads, vm, policy, exclude=slots.full_proxies())
    if proxy is None:
        if slots.full_proxies() and choose_proxy(proxies, loads, vm, policy) is not None:
            jv.status = JobStatus.WAITING  # its proxies are at the run's per-proxy limit
            return None
        jv.status, jv.finished = JobStatus.FAILED, datetime.now(UTC)
        jv.error = _no_proxy(vm, policy)
        return None
    jv.status, jv.proxy = JobStatus.QUEUED, proxy.name
    loads[proxy.name] = loads.get(proxy.name, 0) + 1
    slots.take(vm, proxy.name)
    return proxy


def plan_run(session: Session, policy: Policy,
             requested_by: str) -> tuple[Job, list[tuple[Proxy, VirtualMachine, JobVM]]]:
    """The run's rows: a JobVM per selected VM with its proxy, waiting for a slot (the policy's
    limits per host, datastore and proxy), or failed with the reason."""
    job = Job(policy_id=policy.id, policy_name=policy.name, requested_by=requested_by, status=JobStatus.RUNNING)
    session.add(job)
    session.flush()
    proxies = list(session.scalars(select(Proxy)))
    loads = proxy_loads(session)
    slots = RunSlots(policy)
    assignments = []
    for vm in select_vms(session, policy):
        jv = JobVM(job_id=job.id, vm_id=vm.id, vm_name=vm.name, status=JobStatus.QUEUED, warnings=[])
        session.add(jv)
        proxy = _place(jv, vm, slots, proxies, loads)
        if proxy is not None:
            assignments.append((proxy, vm, jv))
    session.commit()
    return job, assignments


def _other_than(proxy: str | None) -> set[str]:
    return {proxy} if proxy else set()


def _no_proxy(vm: VirtualMachine, policy: Policy) -> str:
    return (f"no proxy is up that reaches host {vm.host} with a transport of {policy.transports}; start one with "
            "`vmkeep proxy`")


async def dispatch_waiting(session: Session, queue: procrastinate.App) -> int:
    """Send on the waiting VMs of running jobs whose limits have a free slot; how many went."""
    sent = 0
    waiting = list(session.scalars(select(JobVM).where(JobVM.status == JobStatus.WAITING).order_by(JobVM.id)))
    if not waiting:
        return 0
    proxies, loads = list(session.scalars(select(Proxy))), proxy_loads(session)
    runs: dict[int, RunSlots] = {}
    for jv in waiting:
        vm = session.get(VirtualMachine, jv.vm_id)
        assert vm is not None
        slots = runs.get(jv.job_id) or runs.setdefault(jv.job_id, RunSlots.of_job(session, jv.job))
        proxy = _place(jv, vm, slots, proxies, loads)
        session.commit()
        if jv.status == JobStatus.FAILED:
            settle_job(session, jv.job)
        if proxy is None:
            continue
        jv.task_id = await _defer(queue, proxy, vm, jv)
        session.commit()
        sent += 1
    return sent


async def run_policy(session: Session, queue: procrastinate.App, policy: Policy, requested_by: str) -> Job:
    """One run: a JobVM per selected VM, each deferred to its proxy's queue under the VM's lock."""
    job, assignments = plan_run(session, policy, requested_by)
    for proxy, vm, jv in assignments:
        jv.task_id = await _defer(queue, proxy, vm, jv)
    session.commit()
    settle_job(session, job)
    return job


async def rescue_stalled(session: Session, queue: procrastinate.App, heartbeat_seconds: float) -> int:
    """Tasks held by a proxy that stopped heartbeating go to another proxy; how many moved.

    The backup on the dead proxy left its hypervisor job, checkpoint or overlays behind: the
    new attempt's connector clears those before it starts (see the libvirt connector). A restore's
    new attempt removes the VM and disks the dead one made (see ``restore_vm_as``).
    """
    moved = 0
    stalled = await queue.job_manager.get_stalled_jobs(seconds_since_heartbeat=heartbeat_seconds)
    for task in stalled:
        if "restore_id" in task.task_kwargs:
            moved += await _rescue_restore(session, queue, task)
            continue
        job_vm_id = task.task_kwargs.get("job_vm_id")
        jv = session.get(JobVM, job_vm_id) if isinstance(job_vm_id, int) else None
        if jv is None or jv.status not in ACTIVE:
            continue
        vm = session.get(VirtualMachine, jv.vm_id)
        assert vm is not None
        proxy = choose_proxy(list(session.scalars(select(Proxy))), proxy_loads(session), vm, jv.job.running_policy,
                             exclude=_other_than(jv.proxy))
        if proxy is None:
            continue  # retried once a proxy is up
        jv.warnings = [*jv.warnings, f"proxy {jv.proxy} stopped during attempt {jv.attempts}; retried on "
                                     f"{proxy.name}"]
        log.warning("%s", jv.warnings[-1], extra={"job": jv.job_id, "vm": jv.vm_name, "proxy": proxy.name})
        jv.status, jv.proxy = JobStatus.QUEUED, proxy.name
        session.commit()
        await queue.job_manager.retry_job(task, queue=queue_name(proxy.name))
        moved += 1
    # replica tasks (their module builds on this one, hence imported here)
    from vmkeep.server.replica_rescue import rescue_replicas
    return moved + await rescue_replicas(session, queue, heartbeat_seconds)


def restore_proxy(session: Session, hypervisor: Hypervisor, exclude: set[str] | None = None, *,
                  file_on_host: bool = False) -> Proxy | None:
    """A live proxy that can write this hypervisor's restores, least loaded: one on one of its hosts
    where restores write the host's storage (libvirt) or a file on the host (``file_on_host``),
    else also one that reaches it over the network (``--reaches '*'``: vSphere, XenServer)."""
    hosts = set(session.scalars(select(VirtualMachine.host).where(VirtualMachine.hypervisor_id == hypervisor.id)))
    if not file_on_host and not restores_need_the_host(hypervisor.uri):
        hosts.add("*")
    loads = proxy_loads(session)
    fits = [p for p in session.scalars(select(Proxy))
            if proxy_up(p) and hosts & set(p.reaches) and p.name not in (exclude or set())]
    return min(fits, key=lambda p: (loads.get(p.name, 0) / max(p.concurrency, 1), p.name)) if fits else None


async def _rescue_restore(session: Session, queue: procrastinate.App, task: procrastinate.jobs.Job) -> int:
    restore = session.get(RestoreJob, task.task_kwargs["restore_id"])
    if restore is None or restore.status not in ACTIVE or restore.hypervisor is None:
        return 0
    if restore.mode == "instant":  # its exports and state are on the dead proxy's machine: it waits for it
        return 0
    proxy = restore_proxy(session, restore.hypervisor, exclude=_other_than(restore.proxy),
                          file_on_host=restore.mode == "disk-file")
    if proxy is None:
        return 0  # retried once a proxy is up
    restore.warnings = [*restore.warnings, f"proxy {restore.proxy} stopped during attempt {restore.attempts}; "
                                           f"retried on {proxy.name}"]
    log.warning("%s", restore.warnings[-1], extra={"restore": restore.id, "vm": restore.vm_name, "proxy": proxy.name})
    restore.status, restore.proxy = JobStatus.QUEUED, proxy.name
    session.commit()
    await queue.job_manager.retry_job(task, queue=queue_name(proxy.name))
    return 1


async def rescue_queued(session: Session, queue: procrastinate.App) -> int:
    """Backups and restores waiting on the queue of a proxy that is down go to a live proxy; how many moved."""
    moved = 0
    proxies = list(session.scalars(select(Proxy)))
    down = {p.name for p in proxies if not proxy_up(p)}
    if not down:
        return 0
    waiting = session.scalars(select(JobVM).where(JobVM.status == JobStatus.QUEUED, JobVM.proxy.in_(down),
                                                  JobVM.task_id.is_not(None)))
    for jv in list(waiting):
        vm = session.get(VirtualMachine, jv.vm_id)
        assert vm is not None and jv.task_id is not None
        proxy = choose_proxy(proxies, proxy_loads(session), vm, jv.job.running_policy, exclude=_other_than(jv.proxy))
        if proxy is None:
            continue
        if not await queue.job_manager.cancel_job_by_id_async(jv.task_id):
            continue  # it started meanwhile: the stalled-task rescue handles it if its proxy died
        jv.warnings = [*jv.warnings, f"proxy {jv.proxy} went down before starting it; moved to {proxy.name}"]
        log.warning("%s", jv.warnings[-1], extra={"job": jv.job_id, "vm": jv.vm_name, "proxy": proxy.name})
        jv.proxy = proxy.name
        jv.task_id = await _defer(queue, proxy, vm, jv)
        session.commit()
        moved += 1
    restores = session.scalars(select(RestoreJob).where(RestoreJob.status == JobStatus.QUEUED,
                                                        RestoreJob.proxy.in_(down), RestoreJob.task_id.is_not(None)))
    for restore in list(restores):
        assert restore.task_id is not None
        if restore.hypervisor is None or restore.mode == "instant":
            continue  # its hypervisor is being deleted (the restore fails there), or only its proxy can do it
        proxy = restore_proxy(session, restore.hypervisor, exclude=_other_than(restore.proxy),
                          file_on_host=restore.mode == "disk-file")
        if proxy is None or not await queue.job_manager.cancel_job_by_id_async(restore.task_id):
            continue
        restore.warnings = [*restore.warnings, f"proxy {restore.proxy} went down before starting it; moved to "
                                               f"{proxy.name}"]
        log.warning("%s", restore.warnings[-1], extra={"restore": restore.id, "vm": restore.vm_name,
                                                        "proxy": proxy.name})
        restore.proxy = proxy.name
        restore.task_id = await defer_restore(queue, proxy, restore)
        session.commit()
        moved += 1
    return moved


async def defer_restore(queue: procrastinate.App, proxy: Proxy, restore: RestoreJob) -> int:
    return await queue.configure_task(RESTORE_TASK, queue=queue_name(proxy.name)).defer_async(restore_id=restore.id)
