"""Backup copies through the server: a policy's points copied into its copy targets (other
repositories), right after each run's backups or on a cron, and copies started on demand.

A copy is a maintenance run of kind "copy" on the source repository with a target repository
(migration 0019): a proxy opens the source read-only and the target, copies with
vmkeep.engine.copy, and catalogs the copied points for the target in the transaction of the run's
outcome (vmkeep.proxy.copy_task). The master decides what travels from the catalog: after a run,
the points its backups made; on a cron, every point of the policy's VMs in its repository that
the catalog does not list in the target yet (the engine skips what the target has anyway). A
policy's copy also carries the target's retention plan (vmkeep.server.maintenance.retention_plan,
which counts copy targets' own retention), so the proxy prunes the target after copying: the
policy's own repository keeps its own retention.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import procrastinate
from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import AFTER_BACKUP, CopyTarget, Job, MaintenanceRun, RepositoryRecord, RestorePointRecord
from vmkeep.jobs.status import JobStatus
from vmkeep.server.maintenance import MaintenanceRefused, covered, queue_run, retention_plan
from vmkeep.server.schedule import next_run

log = logging.getLogger(__name__)

SCHEDULER = "schedule"  # who the audit log says started a policy's copies


def repository_named(session: Session, name: str, role: str) -> RepositoryRecord:
    record = session.scalar(select(RepositoryRecord).where(RepositoryRecord.name == name))
    if record is None:
        raise MaintenanceRefused(404, f"no {role} repository {name}: register it first (POST /api/repositories)")
    return record


async def start_copy(session: Session, queue: procrastinate.App, request: Request | None, user: str, source: str,
                     target: str, *, names: str | None = None, point: str | None = None, latest: int | None = None,
                     points: list[str] | None = None, verify: bool = False,
                     retention: dict[str, dict[str, int]] | None = None,
                     detail: dict[str, Any] | None = None) -> MaintenanceRun:
    """Queue a copy of ``source``'s points (a names glob with a point id or the newest ``latest``
    per name, or the ``points`` "name@point_id" listed) into ``target``; ``retention``: the
    target's plan, applied after the copy. :class:`MaintenanceRefused` before anything is queued."""
    src, dst = repository_named(session, source, "source"), repository_named(session, target, "target")
    if src.id == dst.id:
        raise MaintenanceRefused(400, f"{source} cannot be copied into itself: name another repository as the "
                                      "target")
    if point is not None and latest is not None:
        raise MaintenanceRefused(400, "point and latest choose points in two ways: give one of them")
    chosen = {"names": names, "point": point, "latest": latest, "points": points, "retention": retention or None}
    params: dict[str, Any] = {k: v for k, v in chosen.items() if v is not None}
    params["verify"] = verify
    what = {"points": len(points)} if points is not None else {"names": names, "point": point, "latest": latest}
    return await queue_run(session, queue, request, user, src, "copy", params, target=dst,
                           detail={**what, **(detail or {})})


async def copy_after_backups(session: Session, queue: procrastinate.App) -> int:
    """Queue the after-backup copies of every policy run that ended since the last look (each
    target gets that run's new points); how many copies were queued."""
    queued = 0
    ended = session.scalars(select(Job).where(Job.copies_queued.is_(None), Job.finished.is_not(None))
                            .order_by(Job.id))
    for job in list(ended):
        job.copies_queued = datetime.now(UTC)  # first: a copy that cannot start is not retried forever
        session.commit()
        policy = job.policy
        points = [f"{v.vm_name}@{v.point_id}" for v in job.vms if v.status == JobStatus.SUCCEEDED and v.point_id]
        if policy is None or not points:
            continue
        for target in policy.copy_targets:
            if target.schedule == AFTER_BACKUP:
                queued += await policy_copy(session, queue, target, points, job=job.id)
    return queued


async def run_due_copies(session: Session, queue: procrastinate.App, now: datetime) -> int:
    """Queue the copies of targets whose cron came due: every point of the policy's VMs the
    target lacks; how many were queued."""
    queued = 0
    due = session.scalars(select(CopyTarget).where(CopyTarget.next_run.is_not(None), CopyTarget.next_run <= now))
    for target in list(due):
        target.next_run = next_run(target.schedule, now)  # set first: a failing copy does not repeat
        session.commit()
        points = missing_points(session, target)
        if points:
            queued += await policy_copy(session, queue, target, points)
    return queued


def missing_points(session: Session, target: CopyTarget) -> list[str]:
    """The policy's points ("name@point_id", oldest first) in its repository that the catalog
    does not list in the target."""
    source = target.policy.repository_id
    names = covered(session, target.policy, list(session.scalars(
        select(RestorePointRecord.name).where(RestorePointRecord.repository_id == source).distinct())))
    have = set(session.execute(select(RestorePointRecord.name, RestorePointRecord.point_id).where(
        RestorePointRecord.repository_id == target.repository_id, RestorePointRecord.name.in_(names))).tuples())
    rows = session.execute(select(RestorePointRecord.name, RestorePointRecord.point_id).where(
        RestorePointRecord.repository_id == source, RestorePointRecord.name.in_(names))
        .order_by(RestorePointRecord.created)).tuples()
    return [f"{name}@{point_id}" for name, point_id in rows if (name, point_id) not in have]


async def policy_copy(session: Session, queue: procrastinate.App, target: CopyTarget, points: list[str],
                      job: int | None = None) -> int:
    """Queue one policy copy with the target's retention plan; a copy that cannot start is
    recorded as a failed run saying why (1 when queued, else 0)."""
    policy, dst = target.policy, target.repository
    plan, _ = retention_plan(session, dst, {p.partition("@")[0] for p in points})
    try:
        await start_copy(session, queue, None, SCHEDULER, policy.repository.name, dst.name, points=points,
                         retention=plan, detail={"policy": policy.name, "job": job})
        return 1
    except MaintenanceRefused as refused:
        log.warning("copy of policy %s's points to %s not started: %s", policy.name, dst.name, refused)
        session.rollback()
        if refused.status == 503:  # queue_run recorded it failed already
            return 0
        session.add(MaintenanceRun(repository_id=policy.repository_id, repository_name=policy.repository.name,
                                   kind="copy", params={"points": points, "policy": policy.name},
                                   requested_by=SCHEDULER, status=JobStatus.FAILED.value, error=str(refused),
                                   target_repository_id=dst.id, target_repository_name=dst.name,
                                   finished=datetime.now(UTC)))
        session.commit()
        return 0
