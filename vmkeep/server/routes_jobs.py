"""Policies, policy runs (jobs) and their per-VM history."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as FastPath
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import AFTER_BACKUP, CopyTarget, Job, JobVM, JobVMLog, Policy, RepositoryRecord, User
from vmkeep.errors import VmkeepError
from vmkeep.hypervisors.base import parse_transports
from vmkeep.jobs.settle import settle_job
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.repository.prune import RetentionPolicy
from vmkeep.server import audit
from vmkeep.server.auth import CHANGE_INVENTORY, EVERYONE, get_session, require
from vmkeep.server.dispatch import run_policy
from vmkeep.server.endpoints import EndpointPolicy, refuse_with_400
from vmkeep.server.schedule import next_run
from vmkeep.server.schemas import NAME

router = APIRouter(prefix="/api")
JobId = Annotated[int, FastPath(ge=1, le=2**31 - 1)]
# what to keep of each VM: the last N points, and the newest of each of the last N hours, days …;
# a negative count would keep nothing, so every point would be deleted
Retention = dict[Literal["last", "hourly", "daily", "weekly", "monthly", "yearly"],
                 Annotated[int, Field(ge=0, strict=True)]]


class CopyTargetIn(BaseModel):
    repository: str = Field(max_length=200, description="a registered repository other than the policy's")
    when: str = Field(default=AFTER_BACKUP, min_length=1, max_length=100,
                      description="after-backup: right after each run's backups; or a cron schedule. Either "
                                  "sends the points of the policy's VMs the target lacks and its retention keeps")
    retention: Retention = Field(default_factory=dict, description="the target's own, as a policy's: counts 0 "
                                                                   "or more, e.g. {\"last\": 30, \"monthly\": 12}")


class CopyTargetOut(CopyTargetIn):
    retention: dict[str, int]  # type: ignore[assignment]
    next_run: datetime | None


class PolicyIn(BaseModel):
    name: str = Field(pattern=NAME)
    repository: str = Field(max_length=200)
    vms: list[str] = Field(default_factory=list, max_length=10000)
    globs: list[str] = Field(default_factory=list, max_length=100)
    hypervisor: str | None = Field(default=None, max_length=200)
    hosts: list[str] = Field(default_factory=list, max_length=1000)
    tags: list[str] = Field(default_factory=list, max_length=100)
    folders: list[str] = Field(default_factory=list, max_length=100, description="folder globs, e.g. prod/*")
    schedule: str | None = Field(default=None, max_length=100)
    retention: Retention = Field(default_factory=dict, description="counts 0 or more, e.g. {\"last\": 7}")
    full_every: int | None = Field(default=None, ge=1, le=1000)
    transports: str = Field(default="san:hotadd:nbd", max_length=50)
    quiesce: str = Field(default="try", pattern=r"^(required|try|off)$")
    nbd_tls: str = Field(default="require", pattern=r"^(require|auto|off)$",
                         description="disks read across the network (nbd): require TLS (default), use it when "
                                     "both ends can (auto), or never (off); san and hotadd stay on the host")
    max_per_host: int | None = Field(default=None, ge=1, le=1000, description="this run's backups at once per host")
    max_per_datastore: int | None = Field(default=None, ge=1, le=1000)
    max_per_proxy: int | None = Field(default=None, ge=1, le=1000)
    verify_after: bool = Field(default=False, description="re-read and check every chunk of each new point")
    verify_boot: bool = Field(default=False, description="boot each new point in a sandbox (libvirt, proxy on "
                                                         "the VM's host) and wait for its heartbeat")
    notify_webhook: str | None = Field(default=None, pattern=r"^https?://", max_length=2000)
    notify_email: list[str] = Field(default_factory=list, max_length=50)
    copy_targets: list[CopyTargetIn] | None = Field(
        default=None, max_length=20, description="other repositories the policy's points are copied to, each with "
                                                 "its schedule and retention; none: unchanged (a new policy: none)")


class PolicyOut(PolicyIn):
    retention: dict[str, int]  # type: ignore[assignment]  # as stored: one saved before the checks still lists
    copy_targets: list[CopyTargetOut]  # type: ignore[assignment]
    next_run: datetime | None
    created: datetime


class JobVMOut(BaseModel):
    vm: str
    proxy: str | None
    status: str
    attempts: int
    mode: str | None
    mode_reason: str | None = Field(None, description="why full or incremental")
    transport: str | None
    read_bytes: int | None
    stored_bytes: int | None
    progress_bytes: int | None
    total_bytes: int | None
    duration_seconds: float | None
    point_id: str | None
    verified: bool | None
    boot_check: dict[str, Any] | None
    disks: dict[str, Any] | None
    warnings: list[Any]
    error: str | None
    started: datetime | None
    finished: datetime | None


class JobOut(BaseModel):
    id: int
    policy: str
    requested_by: str
    status: str
    started: datetime
    finished: datetime | None
    vms: list[JobVMOut]


def _policy_out(p: Policy) -> PolicyOut:
    rules = p.selection
    return PolicyOut(name=p.name, repository=p.repository.name, vms=rules.get("vms", []),
                     globs=rules.get("globs", []), hypervisor=rules.get("hypervisor"), hosts=rules.get("hosts", []),
                     tags=rules.get("tags", []), folders=rules.get("folders", []), schedule=p.schedule,
                     retention=p.retention, full_every=p.full_every, transports=p.transports, quiesce=p.quiesce,
                     nbd_tls=p.nbd_tls, max_per_host=p.max_per_host, max_per_datastore=p.max_per_datastore,
                     max_per_proxy=p.max_per_proxy, verify_after=p.verify_after, verify_boot=p.verify_boot,
                     created=p.created,
                     notify_webhook=p.notify_webhook, notify_email=p.notify_email or [], next_run=p.next_run,
                     copy_targets=[CopyTargetOut(repository=t.repository.name, when=t.schedule, retention=t.retention,
                                                 next_run=t.next_run) for t in p.copy_targets])


def _job_out(job: Job) -> JobOut:
    return JobOut(id=job.id, policy=job.policy_name, requested_by=job.requested_by, status=job.status,
                  started=job.started, finished=job.finished,
                  vms=[JobVMOut(vm=v.vm_name, proxy=v.proxy, status=v.status, attempts=v.attempts, mode=v.mode,
                                mode_reason=v.mode_reason,
                                transport=v.transport, read_bytes=v.read_bytes, stored_bytes=v.stored_bytes,
                                progress_bytes=v.progress_bytes, total_bytes=v.total_bytes,
                                duration_seconds=v.duration_seconds, point_id=v.point_id, verified=v.verified,
                                boot_check=v.boot_check, disks=v.disks, warnings=v.warnings,
                                error=v.error, started=v.started, finished=v.finished) for v in job.vms])


class PolicyRefused(HTTPException):
    """A policy change the API refuses (400, 404, 409), with the field of ``PolicyIn`` that caused
    it when one did: the console shows the message beside that field."""

    def __init__(self, status_code: int, detail: str, field: str | None = None) -> None:
        super().__init__(status_code, detail)
        self.field = field


def _apply(session: Session, policy: Policy, body: PolicyIn, endpoints: EndpointPolicy) -> None:
    """Check ``body`` and write it into ``policy``; 400 with the reason when it does not hold."""
    retention = {str(key): count for key, count in body.retention.items()}
    repo = session.scalar(select(RepositoryRecord).where(RepositoryRecord.name == body.repository))
    if repo is None:
        raise PolicyRefused(400, f"no repository {body.repository}: register it first (POST /api/repositories)",
                            "repository")
    field = "transports"
    try:
        parse_transports(body.transports)
        field = "retention"
        RetentionPolicy.from_counts(retention)
        field = "schedule"
        first_run = next_run(body.schedule, datetime.now(UTC)) if body.schedule else None
    except VmkeepError as exc:
        raise PolicyRefused(400, f"bad transports, retention or schedule: {exc}", field) from None
    try:
        refuse_with_400(endpoints, body.notify_webhook, "notify_webhook")
    except HTTPException as exc:
        raise PolicyRefused(exc.status_code, str(exc.detail), "notify_webhook") from None
    if any("@" not in a for a in body.notify_email):
        raise PolicyRefused(400, "notify_email holds addresses like ops@example.com", "notify_email")
    targets = None if body.copy_targets is None else _copy_targets(session, body.copy_targets, repo)
    if targets is None and any(t.repository_id == repo.id for t in policy.copy_targets):
        raise PolicyRefused(422, f"{repo.name} is a copy target of the policy: a policy does not copy into its own "
                                 "repository; take it off the copy targets (copy_targets) in the same change",
                            "repository")
    if body.schedule != policy.schedule or policy.next_run is None:
        policy.next_run = first_run
    policy.name, policy.repository_id, policy.schedule, policy.retention = (body.name, repo.id, body.schedule,
                                                                             retention)
    policy.full_every, policy.transports, policy.quiesce = body.full_every, body.transports, body.quiesce
    policy.max_per_host, policy.max_per_datastore, policy.max_per_proxy = (body.max_per_host, body.max_per_datastore,
                                                                           body.max_per_proxy)
    policy.verify_after, policy.notify_webhook, policy.notify_email = (body.verify_after, body.notify_webhook,
                                                                       body.notify_email)
    policy.verify_boot, policy.nbd_tls = body.verify_boot, body.nbd_tls
    policy.selection = {"vms": body.vms, "globs": body.globs, "hypervisor": body.hypervisor, "hosts": body.hosts,
                        "tags": body.tags, "folders": body.folders}
    if targets is not None:
        _set_copy_targets(policy, targets)


def _copy_targets(session: Session, targets: list[CopyTargetIn],
                  own: RepositoryRecord) -> list[tuple[RepositoryRecord, CopyTargetIn]]:
    """Each copy target's repository, checked with its schedule and retention; 422 naming the
    target that does not hold (nothing is changed)."""
    found: list[tuple[RepositoryRecord, CopyTargetIn]] = []
    for t in targets:
        record = session.scalar(select(RepositoryRecord).where(RepositoryRecord.name == t.repository))
        if record is None:
            raise PolicyRefused(422, f"copy target {t.repository}: no repository {t.repository}; register it first "
                                     "(POST /api/repositories), then name it as a copy target", "copy_targets")
        if record.id == own.id:
            raise PolicyRefused(422, f"copy target {t.repository} is the policy's own repository: a copy goes to "
                                     "another repository", "copy_targets")
        if any(r.id == record.id for r, _ in found):
            raise PolicyRefused(422, f"copy target {t.repository} is named twice: give each repository once",
                                "copy_targets")
        try:
            RetentionPolicy.from_counts({str(k): v for k, v in t.retention.items()})
            if t.when != AFTER_BACKUP:
                next_run(t.when, datetime.now(UTC))
        except VmkeepError as exc:
            raise PolicyRefused(422, f"copy target {t.repository}: when is {AFTER_BACKUP!r} or a cron schedule, "
                                     f"and a retention of counts: {exc}", "copy_targets") from None
        found.append((record, t))
    return found


def _set_copy_targets(policy: Policy, targets: list[tuple[RepositoryRecord, CopyTargetIn]]) -> None:
    """The policy's copy targets as given: a target kept keeps its next run unless its schedule changed."""
    existing = {t.repository_id: t for t in policy.copy_targets}
    kept = []
    for record, t in targets:
        row = existing.get(record.id) or CopyTarget(repository_id=record.id, repository=record, next_run=None)
        if row.schedule != t.when or (row.next_run is None and t.when != AFTER_BACKUP):
            row.next_run = None if t.when == AFTER_BACKUP else next_run(t.when, datetime.now(UTC))
        row.schedule, row.retention = t.when, {str(k): v for k, v in t.retention.items()}
        kept.append(row)
    policy.copy_targets = kept


def _targets_detail(body: PolicyIn) -> dict[str, Any]:
    """The copy targets a change sets, for its audit entry."""
    if body.copy_targets is None:
        return {}
    return {"copy_targets": [{"repository": t.repository, "when": t.when} for t in body.copy_targets]}


def _policy_named(session: Session, name: str) -> Policy:
    policy = session.scalar(select(Policy).where(Policy.name == name))
    if policy is None:
        raise PolicyRefused(404, f"no policy {name}")
    return policy


# What the API's policy routes do, as functions the web console calls too: the same checks, the
# same errors (PolicyRefused), the same audit entries.

def create_policy_as(session: Session, request: Request, user: str, body: PolicyIn) -> Policy:
    if session.scalar(select(Policy).where(Policy.name == body.name)) is not None:
        raise PolicyRefused(409, f"policy {body.name} exists", "name")
    policy = Policy(next_run=None)
    _apply(session, policy, body, request.app.state.endpoints)
    session.add(policy)
    audit.record(session, request, user, "policy-create", body.name, **_targets_detail(body))
    session.commit()
    session.refresh(policy)
    return policy


def change_policy_as(session: Session, request: Request, user: str, name: str, body: PolicyIn) -> Policy:
    policy = _policy_named(session, name)
    if body.name != name:
        raise PolicyRefused(400, f"the body names policy {body.name}, the path {name}: a policy keeps its name",
                            "name")
    _apply(session, policy, body, request.app.state.endpoints)
    audit.record(session, request, user, "policy-change", name, **_targets_detail(body))
    session.commit()
    session.refresh(policy)
    return policy


def delete_policy_as(session: Session, request: Request, user: str, name: str) -> None:
    policy = _policy_named(session, name)
    going = session.scalar(select(Job.id).where(Job.policy_id == policy.id, Job.finished.is_(None)).limit(1))
    if going is not None:
        raise PolicyRefused(409, f"run {going} of policy {name} is going: wait for it or cancel it "
                                 f"(POST /api/jobs/{going}/cancel), then delete")
    session.delete(policy)
    audit.record(session, request, user, "policy-delete", name)
    session.commit()


async def run_policy_as(session: Session, request: Request, user: str, name: str) -> Job:
    policy = _policy_named(session, name)
    job = await run_policy(session, request.app.state.queue, policy, user)
    audit.record(session, request, user, "backup-start", name, job=job.id)
    session.commit()
    return job


@router.post("/policies", response_model=PolicyOut, status_code=201, tags=["policies"])
def create_policy(body: PolicyIn, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                  session: Session = Depends(get_session)) -> PolicyOut:
    return _policy_out(create_policy_as(session, request, user.name, body))


@router.put("/policies/{name}", response_model=PolicyOut, tags=["policies"])
def change_policy(name: str, body: PolicyIn, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                  session: Session = Depends(get_session)) -> PolicyOut:
    """Replace a policy's settings; runs under way keep their VMs, the next run uses the new ones."""
    return _policy_out(change_policy_as(session, request, user.name, name, body))


@router.delete("/policies/{name}", status_code=204, tags=["policies"])
def delete_policy(name: str, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                  session: Session = Depends(get_session)) -> None:
    """Delete a policy; its run history stays. Restore points are untouched (prune removes those)."""
    delete_policy_as(session, request, user.name, name)


@router.get("/policies", response_model=list[PolicyOut], tags=["policies"])
def list_policies(_: User = Depends(require(*EVERYONE)), session: Session = Depends(get_session)) -> list[PolicyOut]:
    return [_policy_out(p) for p in session.scalars(select(Policy).order_by(Policy.name))]


@router.post("/policies/{name}/run", response_model=JobOut, status_code=202, tags=["policies"])
async def run_policy_now(name: str, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                         session: Session = Depends(get_session)) -> JobOut:
    """Start a run: one task per selected VM on the best proxy; follow it at GET /api/jobs/{id}."""
    return _job_out(await run_policy_as(session, request, user.name, name))


@router.get("/jobs", response_model=list[JobOut], tags=["jobs"])
def list_jobs(limit: int = Query(50, ge=1, le=1000), _: User = Depends(require(*EVERYONE)),
              session: Session = Depends(get_session)) -> list[JobOut]:
    return [_job_out(j) for j in session.scalars(select(Job).order_by(Job.id.desc()).limit(limit))]


class LogLineOut(BaseModel):
    vm: str
    at: datetime
    level: str
    logger: str
    message: str


def job_of(session: Session, job_id: int) -> Job:
    """The run, or 404."""
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


def job_log(session: Session, job_id: int, vm: str | None = None, limit: int = 500) -> list[LogLineOut]:
    """The log lines the proxies wrote for a run's VMs (one VM's with ``vm``), oldest first."""
    query = (select(JobVM.vm_name, JobVMLog).join(JobVMLog, JobVMLog.job_vm_id == JobVM.id)
             .where(JobVM.job_id == job_id).order_by(JobVMLog.id).limit(limit))
    if vm is not None:
        query = query.where(JobVM.vm_name == vm)
    return [LogLineOut(vm=name, at=line.at, level=line.level, logger=line.logger, message=line.message)
            for name, line in session.execute(query).tuples()]


@router.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
def get_job(job_id: JobId, _: User = Depends(require(*EVERYONE)), session: Session = Depends(get_session)) -> JobOut:
    return _job_out(job_of(session, job_id))


@router.get("/jobs/{job_id}/log", response_model=list[LogLineOut], tags=["jobs"])
def get_job_log(job_id: JobId, vm: str | None = Query(None, max_length=200, description="one VM's lines"),
                limit: int = Query(500, ge=1, le=100_000), _: User = Depends(require(*EVERYONE)),
                session: Session = Depends(get_session)) -> list[LogLineOut]:
    """What the proxies logged while backing up the run's VMs (INFO and above, secrets masked; at
    most 500 lines per VM), oldest first."""
    job_of(session, job_id)
    return job_log(session, job_id, vm, limit)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
async def cancel_job(job_id: JobId, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                     session: Session = Depends(get_session)) -> JobOut:
    """Queued VMs are dropped; running ones stop at their next chunk and release everything."""
    job = job_of(session, job_id)
    await cancel_run(session, request, user.name, job)
    return _job_out(job)


async def cancel_run(session: Session, request: Request, user: str, job: Job) -> None:
    """Cancel a run (the API's and the console's): waiting and queued VMs are dropped, running ones
    asked to abort; audited."""
    manager = request.app.state.queue.job_manager
    for v in job.vms:
        if v.status == JobStatus.WAITING:
            v.status, v.finished = JobStatus.CANCELLED, datetime.now(UTC)
            continue
        if v.status not in ACTIVE or v.task_id is None:
            continue
        stopped = await manager.cancel_job_by_id_async(v.task_id, abort=v.status == JobStatus.RUNNING)
        if stopped and v.status == JobStatus.QUEUED:
            v.status, v.finished = JobStatus.CANCELLED, datetime.now(UTC)
    audit.record(session, request, user, "job-cancel", str(job.id))
    session.commit()
    settle_job(session, job)
