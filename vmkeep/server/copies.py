"""Backup copies through the server: a policy's points copied into its copy targets (other
repositories), right after each run's backups or on a cron, and copies started on demand.

A copy is a maintenance run of kind "copy" on the source repository with a target repository
(migration 0019): a proxy opens the source read-only and the target, copies with
vmkeep.engine.copy, and catalogs the copied points for the target in the transaction of the run's
outcome (vmkeep.proxy.copy_task). The master decides what travels from the catalog: after a run
(an after-backup target) or on a cron, every point of the policy's VMs in its repository that the
catalog does not list in the target yet, so a target that missed a copy (down, full) catches up
with the next one; of those, only the points the target's retention keeps among what it holds
and what arrives (its prune would delete the others again at once, and the next run would send
them again: on an Object Lock target each would be one more locked version). A policy's copy
also carries the target's retention plan (vmkeep.server.maintenance.retention_plan, which counts
copy targets' own retention), so the proxy prunes the target after copying: the policy's own
repository keeps its own retention.

One copy at a time per source and target (each prunes the target): an on-demand copy while one is
going is refused (409); a policy's copy waits, its target marked due (``next_run``, also used by
after-backup targets for this), and is queued once the copy under way has ended.
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
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.repository.points import Manifest
from vmkeep.repository.prune import RetentionPolicy
from vmkeep.repository.prune import select as retained
from vmkeep.server.maintenance import MaintenanceRefused, covered, queue_run, retention_plan
from vmkeep.server.schedule import next_run

log = logging.getLogger(__name__)

SCHEDULER = "schedule"  # who the audit log says started a policy's copies


class CopyGoing(MaintenanceRefused):
    """A copy of the same source into the same target is queued or running."""


def copy_going(session: Session, source_id: int, target_id: int) -> int | None:
    """The copy run of ``source_id`` into ``target_id`` queued or running, if any."""
    return session.scalar(select(MaintenanceRun.id).where(
        MaintenanceRun.kind == "copy", MaintenanceRun.repository_id == source_id,
        MaintenanceRun.target_repository_id == target_id, MaintenanceRun.status.in_(ACTIVE)).limit(1))


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
    going = copy_going(session, src.id, dst.id)
    if going is not None:
        raise CopyGoing(409, f"a copy of {source} into {target} is already going (run {going}): wait for it to "
                             "end, then start this one (only what the target still lacks travels)")
    chosen = {"names": names, "point": point, "latest": latest, "points": points, "retention": retention or None}
    params: dict[str, Any] = {k: v for k, v in chosen.items() if v is not None}
    params["verify"] = verify
    what = {"points": len(points)} if points is not None else {"names": names, "point": point, "latest": latest}
    return await queue_run(session, queue, request, user, src, "copy", params, target=dst,
                           detail={**what, **(detail or {})})


async def copy_after_backups(session: Session, queue: procrastinate.App) -> int:
    """Queue the after-backup copies of every policy run that ended since the last look (each
    target gets what it lacks of the policy's points); how many copies were queued."""
    queued = 0
    ended = session.scalars(select(Job).where(Job.copies_queued.is_(None), Job.finished.is_not(None))
                            .order_by(Job.id))
    for job in list(ended):
        job.copies_queued = datetime.now(UTC)  # first: a copy that cannot start is not retried forever
        session.commit()
        policy = job.policy
        if policy is None or not any(v.status == JobStatus.SUCCEEDED and v.point_id for v in job.vms):
            continue
        for target in policy.copy_targets:
            if target.schedule == AFTER_BACKUP:
                queued += await policy_copy(session, queue, target, job=job.id)
    return queued


async def run_due_copies(session: Session, queue: procrastinate.App, now: datetime) -> int:
    """Queue the copies of targets that came due (a cron's time, or a copy that waited for the one
    under way): what the target lacks; how many were queued."""
    queued = 0
    due = session.scalars(select(CopyTarget).where(CopyTarget.next_run.is_not(None), CopyTarget.next_run <= now))
    for target in list(due):
        if copy_going(session, target.policy.repository_id, target.repository_id) is not None:
            continue  # stays due: queued on a later look, once the copy under way has ended
        # set first: a failing copy does not repeat
        target.next_run = None if target.schedule == AFTER_BACKUP else next_run(target.schedule, now)
        session.commit()
        queued += await policy_copy(session, queue, target)
    return queued


def missing_points(session: Session, target: CopyTarget) -> list[str]:
    """The policy's points ("name@point_id", oldest first) in its repository that the catalog
    does not list in the target, and that the target's retention keeps among those it holds and
    these (what it would prune at once is not sent)."""
    source = target.policy.repository_id
    names = covered(session, target.policy, list(session.scalars(
        select(RestorePointRecord.name).where(RestorePointRecord.repository_id == source).distinct())))

    def points_in(repository_id: int) -> list[tuple[str, str, datetime]]:
        return list(session.execute(select(RestorePointRecord.name, RestorePointRecord.point_id,
                                           RestorePointRecord.created).where(
            RestorePointRecord.repository_id == repository_id, RestorePointRecord.name.in_(names))
            .order_by(RestorePointRecord.created)).tuples())

    held = points_in(target.repository_id)
    have = {(name, point_id) for name, point_id, _ in held}
    lacking = [row for row in points_in(source) if (row[0], row[1]) not in have]
    plan, _ = retention_plan(session, target.repository, {name for name, _, _ in lacking})
    keeps = kept_by(plan, held + lacking)
    return [f"{name}@{point_id}" for name, point_id, _ in lacking if name not in plan or (name, point_id) in keeps]


def kept_by(plan: dict[str, dict[str, int]], rows: list[tuple[str, str, datetime]]) -> set[tuple[str, str]]:
    """Of ``rows`` (name, point_id, created), those the retention ``plan`` (counts per name) keeps:
    the selection a prune makes (vmkeep.repository.prune), Object Lock aside."""
    by_name: dict[str, list[Manifest]] = {}
    for name, point_id, created in rows:
        if name in plan:
            # in UTC, as the manifests the prune reads: days and weeks must begin where they begin there
            by_name.setdefault(name, []).append(Manifest(name, point_id, created.astimezone(UTC).isoformat(),
                                                         None, {}, 0))
    return {(name, point_id) for name, points in by_name.items()
            for point_id in retained(points, RetentionPolicy.from_counts(plan[name])).keep}


async def policy_copy(session: Session, queue: procrastinate.App, target: CopyTarget, job: int | None = None) -> int:
    """Queue one policy copy of what the target lacks, with the target's retention plan. While a
    copy into the target is going, it waits (the target marked due: a later look queues it); a
    copy that cannot start is recorded as a failed run saying why (1 when queued, else 0)."""
    policy, dst = target.policy, target.repository
    going = copy_going(session, policy.repository_id, dst.id)
    if going is not None:
        now = datetime.now(UTC)
        if target.next_run is None or target.next_run > now:
            target.next_run = now
        session.commit()
        log.info("copy of policy %s's points to %s waits for copy run %d to end", policy.name, dst.name, going)
        return 0
    points = missing_points(session, target)
    if not points:
        log.info("copy of policy %s's points to %s: nothing to send", policy.name, dst.name)
        return 0
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
