"""Replica tasks that will never end their row, taken over by the master every few seconds
(vmkeep.server.dispatch's rescue calls it, with the worker heartbeat it judges stalled tasks by).

A replica's row stays queued or running until its task writes the outcome, and while it does no
new sync is queued for it and a failover is refused; so a task that cannot end it must not keep
it: one held by a proxy worker that stopped heartbeating (the proxy crashed or restarted) is
queued again on a live proxy of the replica's host, as is one waiting on the queue of a proxy
that is down; one that ended without writing an outcome is not run again (it might fail the same
way each time) and its row fails saying so. With no live proxy on the host, a stalled task's row
fails too; a waiting one stays (its proxy may come back). The new task gets a new id: the old
one, should its proxy still be writing, can no longer record anything (vmkeep.proxy.replica_task).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import procrastinate
from procrastinate.jobs import Status
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Hypervisor, Proxy
from vmkeep.catalog.replica_models import Replica
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.server.dispatch import restore_proxy
from vmkeep.server.replicas import QUEUEING, REPLICA_TASK, again, defer_task, locked_rows, proxy_alive

log = logging.getLogger(__name__)


async def rescue_replicas(session: Session, queue: procrastinate.App, heartbeat_seconds: float) -> int:
    """Take over the replica tasks that will never end their row (see the module); how many
    were queued again."""
    stalled = {job.id: job for job in await queue.job_manager.get_stalled_jobs(
        seconds_since_heartbeat=heartbeat_seconds, task_name=REPLICA_TASK)}
    moved = 0
    for replica_id in list(session.scalars(select(Replica.id).where(Replica.status.in_(ACTIVE)))):
        moved += await _rescue(session, queue, replica_id, stalled)
    for job in stalled.values():  # those no row names any more: ended, so that they stop being listed
        named = job.task_kwargs.get("replica_id")
        row = session.get(Replica, named, populate_existing=True) if isinstance(named, int) else None
        if job.id is not None and (row is None or row.status not in ACTIVE or row.task_id != job.id):
            await _end_job(queue, job.id)
    session.commit()
    return moved


async def _rescue(session: Session, queue: procrastinate.App, replica_id: int,
                  stalled: dict[int | None, procrastinate.jobs.Job]) -> int:
    """One active row's task looked at, under the row's lock; 1 when queued again. A stalled task
    it takes over leaves ``stalled``."""
    rows = locked_rows(session, select(Replica).where(Replica.id == replica_id))
    row: Replica | None = rows[0] if rows else None
    if row is None or row.status not in ACTIVE or (row.task_id is None and datetime.now(UTC) - row.updated < QUEUEING):
        session.commit()  # ended, or being put on the queue
        return 0
    jobs = list(await queue.job_manager.list_jobs_async(id=row.task_id)) if row.task_id is not None else []
    status = Status(jobs[0].status) if jobs else None
    if status == Status.TODO:
        proxy = None if proxy_alive(session, row.proxy) else _live_proxy(session, row)
        if proxy is None or row.task_id is None or not await queue.job_manager.cancel_job_by_id_async(row.task_id):
            session.commit()  # its proxy takes it; none other is up; or it started meanwhile
            return 0
        return await _requeue(session, queue, row, proxy, f"proxy {row.proxy} went down before starting it")
    if status == Status.DOING:
        if stalled.pop(row.task_id, None) is None:
            session.commit()  # going
            return 0
        assert row.task_id is not None
        await _end_job(queue, row.task_id)
        return await _requeue(session, queue, row, _live_proxy(session, row), f"proxy {row.proxy} stopped during it")
    ended = status.value if status else "gone from the queue"
    return _give_up(session, row, f"its task {row.task_id} ended ({ended}) without writing an outcome (proxy "
                                  f"{row.proxy})")


def _live_proxy(session: Session, row: Replica) -> Proxy | None:
    hypervisor = session.get(Hypervisor, row.hypervisor_id) if row.hypervisor_id is not None else None
    return restore_proxy(session, hypervisor) if hypervisor is not None else None


async def _requeue(session: Session, queue: procrastinate.App, row: Replica, proxy: Proxy | None, why: str) -> int:
    """The locked ``row``'s action on ``proxy``'s queue again as a new task; none up: the row failed."""
    if proxy is None:
        return _give_up(session, row, f"{why}, and no proxy is up on a host of hypervisor {row.hypervisor_name} to "
                                      "take it over")
    log.warning("replica %s of %s: %s; its %s is queued again on proxy %s", row.replica_name, row.vm_name, why,
                row.action, proxy.name, extra={"vm": row.vm_name, "proxy": proxy.name})
    row.status, row.error = JobStatus.QUEUED.value, None
    return int(await defer_task(session, queue, row, proxy))


def _give_up(session: Session, row: Replica, why: str) -> int:
    row.status, row.updated = JobStatus.FAILED.value, datetime.now(UTC)
    row.error = f"the {row.action} was given up: {why}; {again(row)}"
    log.warning("replica %s of %s: %s", row.replica_name, row.vm_name, row.error, extra={"vm": row.vm_name})
    session.commit()
    return 0


async def _end_job(queue: procrastinate.App, job_id: int) -> None:
    """A stalled task marked failed on the queue: its worker is gone and never ends it."""
    try:
        await queue.job_manager.finish_job_by_id_async(job_id, status=Status.FAILED, delete_job=False)
    except Exception as exc:  # noqa: BLE001 - it ended meanwhile: nothing to do
        log.info("replica task %s not ended by the master: %s", job_id, exc)
