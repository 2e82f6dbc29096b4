"""Repository maintenance started through the server: verify, prune (dry run first), GC, and a
usage measurement, recorded as maintenance runs in the catalog (migration 0015).

Who does the work: a proxy, as for backups and restores. The master never opens repositories
for long work: proxies are the data movers, hold the master key that opens a repository's sealed
passphrase and reach the storage every backup writes; a verify reads every chunk and a GC lists
them all, which would tie up the master's threads for hours and put the repository's traffic on
the control host. So a run is a row (queued → running → succeeded/failed, forward-only like a
restore's), and a procrastinate task on the least-loaded live proxy's queue; the proxy reads the
repository through a view of runs in progress, writes progress and the report into the row, and
a prune deletes the catalog's rows of the points it removed. No proxy up: refused with a reason,
nothing queued. A proxy that cannot open the repository fails the run and the error says so.

Prune follows the policies that back up into the repository, and the copy targets copying into it
(each with its own retention): a name is under a policy's retention when the policy's runs backed
it up or its VM names or globs pick it; several retentions on one name keep what any of them keeps
(each count's largest, which keeps exactly the union). Names none covers are left alone and listed.
Backup copies (vmkeep.server.copies) are runs of kind "copy" with a target repository.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import procrastinate
from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import (
    CopyTarget,
    Job,
    JobVM,
    MaintenanceRun,
    Policy,
    Proxy,
    RepositoryRecord,
    RestorePointRecord,
)
from vmkeep.jobs.queue import MAINTENANCE_TASK, queue_name
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.repository.prune import PERIODS, RetentionPolicy
from vmkeep.server import audit
from vmkeep.server.dispatch import proxy_up

log = logging.getLogger(__name__)

KINDS = ("verify", "prune", "gc", "usage")
COUNTS = ("last", *PERIODS)


class MaintenanceRefused(Exception):
    """A run that cannot start; ``status`` is the HTTP answer (404, 409), the message what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def maintenance_proxy(session: Session, exclude: set[str] | None = None) -> Proxy | None:
    """The live proxy with the least maintenance queued or running on it."""
    loads = dict(session.execute(select(MaintenanceRun.proxy, func.count()).where(
        MaintenanceRun.status.in_(ACTIVE)).group_by(MaintenanceRun.proxy)).tuples().all())
    up = [p for p in session.scalars(select(Proxy)) if proxy_up(p) and p.name not in (exclude or set())]
    return min(up, key=lambda p: (loads.get(p.name, 0), p.name)) if up else None


def retention_plan(session: Session, record: RepositoryRecord,
                   arriving: Iterable[str] = ()) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Per name the catalog holds in ``record`` (and the names of points ``arriving``: a copy's),
    the retention its policies give it (merged): the retention of the policies backing up into it
    and of the copy targets copying into it (each target's own), and the names no such retention
    covers (left alone)."""
    rules = [(p, p.retention) for p in session.scalars(select(Policy).where(Policy.repository_id == record.id)
                                                       .order_by(Policy.name))]
    rules += [(t.policy, t.retention) for t in session.scalars(
        select(CopyTarget).where(CopyTarget.repository_id == record.id).order_by(CopyTarget.id))]
    rules = [(p, counts) for p, counts in rules if counts and not RetentionPolicy.from_counts(counts).is_empty()]
    names = sorted(set(session.scalars(select(RestorePointRecord.name).where(
        RestorePointRecord.repository_id == record.id).distinct())) | set(arriving))
    plan: dict[str, dict[str, int]] = {}
    for policy, counts in rules:
        for name in covered(session, policy, names):
            merged = plan.setdefault(name, {})
            for count in COUNTS:
                merged[count] = max(merged.get(count, 0), int(counts.get(count, 0)))
    plan = {n: {k: v for k, v in merged.items() if v} for n, merged in plan.items()}
    return plan, [n for n in names if n not in plan]


def covered(session: Session, policy: Policy, names: list[str]) -> list[str]:
    """Those of ``names`` that are the policy's: its runs backed them up, or its VM names or globs pick them."""
    ran = set(session.scalars(select(JobVM.vm_name).join(Job).where(Job.policy_id == policy.id).distinct()))
    rules = policy.selection
    return [name for name in names if name in ran or name in rules.get("vms", [])
            or any(fnmatch.fnmatchcase(name, g) for g in rules.get("globs", []))]


async def start_maintenance(session: Session, queue: procrastinate.App, request: Request | None, user: str,
                            repository: str, kind: str, params: dict[str, Any] | None = None) -> MaintenanceRun:
    """Check, audit and queue one maintenance run (the API's and the console's); refused with
    :class:`MaintenanceRefused` before anything is queued."""
    if kind not in KINDS:
        raise MaintenanceRefused(400, f"unknown maintenance {kind!r}: use {', '.join(KINDS)}")
    record = session.scalar(select(RepositoryRecord).where(RepositoryRecord.name == repository))
    if record is None:
        raise MaintenanceRefused(404, f"no repository {repository}")
    params = dict(params or {})
    if kind == "prune":
        plan, unmanaged = retention_plan(session, record)
        if not plan:
            raise MaintenanceRefused(409, f"no policy that backs up or copies into {repository} has a retention "
                                          "covering its points: set a retention on the policy or its copy target "
                                          "(it decides what prune removes)")
        params.update(retention=plan, unmanaged=unmanaged)
    going = session.scalar(select(MaintenanceRun.id).where(
        MaintenanceRun.repository_id == record.id, MaintenanceRun.kind == kind,
        MaintenanceRun.status.in_(ACTIVE)).limit(1))
    if going is not None:
        raise MaintenanceRefused(409, f"a {kind} of {repository} is under way (run {going}): wait for it to end")
    detail: dict[str, Any] = {}
    if kind == "prune":
        detail.update(dry_run=bool(params.get("dry_run", True)), confirms=params.get("confirms"))
    return await queue_run(session, queue, request, user, record, kind, params, detail=detail)


async def queue_run(session: Session, queue: procrastinate.App, request: Request | None, user: str,
                    record: RepositoryRecord, kind: str, params: dict[str, Any], *,
                    target: RepositoryRecord | None = None, detail: dict[str, Any] | None = None) -> MaintenanceRun:
    """Record, audit and put on the least-loaded live proxy's queue one run of ``kind`` on
    ``record`` (a copy's source, ``target`` its target); refused (409) when no proxy is up."""
    proxy = maintenance_proxy(session)
    if proxy is None:
        raise MaintenanceRefused(409, "no proxy is up to run it: repository maintenance and copies run on a proxy "
                                      "(proxies reach the repositories); start one with `vmkeep proxy`")
    run = MaintenanceRun(repository_id=record.id, repository_name=record.name, kind=kind, params=params,
                         requested_by=user, proxy=proxy.name, status=JobStatus.QUEUED.value,
                         target_repository_id=target.id if target else None,
                         target_repository_name=target.name if target else None)
    session.add(run)
    session.flush()
    audit.record(session, request, user, f"repository-{kind}", record.name, run=run.id, proxy=proxy.name,
                 **({"to": target.name} if target else {}), **(detail or {}))
    session.commit()  # before the task exists: a proxy that takes it at once must find its row
    try:
        run.task_id = await queue.configure_task(MAINTENANCE_TASK, queue=queue_name(proxy.name)).defer_async(
            run_id=run.id)
    except Exception as exc:
        run.status, run.finished = JobStatus.FAILED.value, datetime.now(UTC)
        run.error = f"could not put it on proxy {proxy.name}'s queue: {exc}"
        session.commit()
        raise MaintenanceRefused(503, f"{run.error}; try again") from exc
    session.commit()
    log.info("%s of repository %s queued on proxy %s (run %d, by %s)", kind, record.name, proxy.name, run.id, user)
    return run


async def confirm_prune(session: Session, queue: procrastinate.App, request: Request | None, user: str,
                        dry_run_id: int, repository: str | None = None) -> MaintenanceRun:
    """The prune a finished dry run showed, for real: only the points it listed."""
    dry = session.get(MaintenanceRun, dry_run_id) if dry_run_id < 2**31 else None
    if dry is None or dry.kind != "prune" or not dry.params.get("dry_run", True):
        raise MaintenanceRefused(404, f"no prune dry run {dry_run_id}")
    if repository is not None and dry.repository_name != repository:
        raise MaintenanceRefused(409, f"dry run {dry_run_id} was of repository {dry.repository_name}")
    if dry.status != JobStatus.SUCCEEDED or dry.result is None:
        raise MaintenanceRefused(409, f"dry run {dry_run_id} has not succeeded ({dry.status}): run a new one")
    confirm = {n: r["remove"] for n, r in dry.result.get("names", {}).items() if r.get("remove")}
    if not confirm:
        raise MaintenanceRefused(409, f"dry run {dry_run_id} found nothing to remove")
    return await start_maintenance(session, queue, request, user, dry.repository_name, "prune",
                                   {"dry_run": False, "confirm": confirm, "confirms": dry_run_id})


@dataclass
class Latest:
    """A repository's most recent verify, GC and usage runs that ended (None: never)."""

    verify: MaintenanceRun | None = None
    gc: MaintenanceRun | None = None
    usage: MaintenanceRun | None = None


def latest_runs(session: Session, repository_ids: list[int]) -> dict[int, Latest]:
    """One query for a page of repositories: the newest ended run of each kind (a usage run only if
    it succeeded: its figures are what the pages show)."""
    rows = session.scalars(
        select(MaintenanceRun).where(MaintenanceRun.repository_id.in_(repository_ids),
                                     MaintenanceRun.kind.in_(("verify", "gc", "usage")),
                                     MaintenanceRun.finished.is_not(None),
                                     (MaintenanceRun.kind != "usage") | (MaintenanceRun.status == JobStatus.SUCCEEDED))
        .distinct(MaintenanceRun.repository_id, MaintenanceRun.kind)
        .order_by(MaintenanceRun.repository_id, MaintenanceRun.kind, MaintenanceRun.id.desc()))
    latest: dict[int, Latest] = {i: Latest() for i in repository_ids}
    for run in rows:
        assert run.repository_id is not None
        setattr(latest[run.repository_id], run.kind, run)
    return latest


def run_out(run: MaintenanceRun) -> dict[str, Any]:
    """A run as the API shows it."""
    return {"id": run.id, "repository": run.repository_name, "target": run.target_repository_name,
            "kind": run.kind, "requested_by": run.requested_by,
            "proxy": run.proxy, "status": run.status, "attempts": run.attempts, "params": run.params,
            "progress_bytes": run.progress_bytes, "total_bytes": run.total_bytes, "result": run.result,
            "error": run.error, "created": _at(run.created), "started": _at(run.started),
            "finished": _at(run.finished)}


def _at(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


async def rescue_maintenance(session: Session, queue: procrastinate.App, heartbeat_seconds: float) -> int:
    """Maintenance a dead proxy held, or that waits on the queue of a proxy that is down, goes to a
    live proxy (as dispatch's rescues do for backups and restores); how many moved. Every kind can
    start again from scratch: verify and usage only read, GC is safe to repeat, a prune recomputes
    its retention (a confirmed one still removes only what its dry run listed)."""
    moved = 0
    for task in await queue.job_manager.get_stalled_jobs(seconds_since_heartbeat=heartbeat_seconds,
                                                         task_name=MAINTENANCE_TASK):
        run_id = task.task_kwargs.get("run_id")
        run = session.get(MaintenanceRun, run_id) if isinstance(run_id, int) else None
        if run is None or run.status not in ACTIVE:
            continue
        proxy = maintenance_proxy(session, exclude={run.proxy} if run.proxy else None)
        if proxy is None:
            continue  # retried once a proxy is up
        log.warning("proxy %s stopped during %s run %d of %s: retried on %s", run.proxy, run.kind, run.id,
                    run.repository_name, proxy.name)
        run.status, run.proxy = JobStatus.QUEUED.value, proxy.name
        session.commit()
        await queue.job_manager.retry_job(task, queue=queue_name(proxy.name))
        moved += 1
    down = {p.name for p in session.scalars(select(Proxy)) if not proxy_up(p)}
    waiting = session.scalars(select(MaintenanceRun).where(MaintenanceRun.status == JobStatus.QUEUED.value,
                                                           MaintenanceRun.proxy.in_(down),
                                                           MaintenanceRun.task_id.is_not(None)))
    for run in list(waiting) if down else []:
        assert run.task_id is not None
        proxy = maintenance_proxy(session, exclude=down)
        if proxy is None or not await queue.job_manager.cancel_job_by_id_async(run.task_id):
            continue  # none up, or it started meanwhile (the stalled rescue handles it if its proxy died)
        log.warning("proxy %s went down before starting %s run %d of %s: moved to %s", run.proxy, run.kind, run.id,
                    run.repository_name, proxy.name)
        run.proxy = proxy.name
        run.task_id = await queue.configure_task(MAINTENANCE_TASK, queue=queue_name(proxy.name)).defer_async(
            run_id=run.id)
        session.commit()
        moved += 1
    return moved
