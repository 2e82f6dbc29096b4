"""The dashboard's figures, read from the catalog in one go: what is protected, how backups went,
proxies, storage and the runs going on now."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Hypervisor, Job, JobVM, Policy, Proxy, RepositoryRecord, RestorePointRecord
from vmkeep.catalog.models import VirtualMachine as VM
from vmkeep.jobs.status import JobStatus
from vmkeep.server.dispatch import proxy_up, select_vms

OUTCOMES = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value)  # a cancelled backup says nothing either way
SHOWN_NAMES = 10


@dataclass
class Rate:
    succeeded: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.succeeded / self.total


@dataclass
class ProxyState:
    name: str
    up: bool
    last_heartbeat: datetime


@dataclass
class RepositoryUsage:
    name: str
    used_bytes: int | None
    capacity_bytes: int | None
    points: int


@dataclass
class RunningJob:
    id: int
    policy: str
    requested_by: str
    started: datetime
    vms_done: int
    vms: int
    progress_bytes: int
    total_bytes: int

    @property
    def percent(self) -> float | None:
        return 100.0 * self.progress_bytes / self.total_bytes if self.total_bytes else None


@dataclass
class Dashboard:
    hypervisors: int
    policies: int
    vms: int
    protected: int
    unprotected: list[str]  # the first few names
    failed_last: list[str]  # VMs whose newest backup failed
    rate_7: Rate | None  # None: no backup ended in the period
    rate_30: Rate | None
    proxies: list[ProxyState]
    repositories: list[RepositoryUsage]
    running: list[RunningJob]

    @property
    def proxies_up(self) -> int:
        return sum(p.up for p in self.proxies)


def success_rate(session: Session, since: datetime) -> Rate | None:
    rows = dict(session.execute(select(JobVM.status, func.count()).where(
        JobVM.finished >= since, JobVM.status.in_(OUTCOMES)).group_by(JobVM.status)).tuples().all())
    total = sum(rows.values())
    return Rate(rows.get(JobStatus.SUCCEEDED.value, 0), total) if total else None


def failed_last(session: Session) -> list[str]:
    """Present VMs whose newest finished backup failed."""
    newest = (select(func.max(JobVM.id)).where(JobVM.status.in_(OUTCOMES), JobVM.vm_id.is_not(None))
              .group_by(JobVM.vm_id))
    return list(session.scalars(select(JobVM.vm_name).join(VM, VM.id == JobVM.vm_id).where(
        JobVM.id.in_(newest), JobVM.status == JobStatus.FAILED.value, VM.present.is_(True)).order_by(JobVM.vm_name)))


def running_jobs(session: Session) -> list[RunningJob]:
    jobs = session.scalars(select(Job).where(Job.finished.is_(None)).order_by(Job.id)).all()
    running = []
    for job in jobs:
        vms = job.vms
        running.append(RunningJob(job.id, job.policy_name, job.requested_by, job.started,
                                  sum(v.finished is not None for v in vms), len(vms),
                                  sum(v.progress_bytes or 0 for v in vms), sum(v.total_bytes or 0 for v in vms)))
    return running


def repositories(session: Session) -> list[RepositoryUsage]:
    counts = dict(session.execute(select(RestorePointRecord.repository_id, func.count())
                                  .group_by(RestorePointRecord.repository_id)).tuples().all())
    return [RepositoryUsage(r.name, r.used_bytes, r.capacity_bytes, counts.get(r.id, 0))
            for r in session.scalars(select(RepositoryRecord).order_by(RepositoryRecord.name))]


def dashboard(session: Session, now: datetime | None = None) -> Dashboard:
    now = now or datetime.now(UTC)
    present = session.scalar(select(func.count()).select_from(VM).where(VM.present.is_(True))) or 0
    protected: set[int] = set()
    policies = session.scalars(select(Policy)).all()
    for policy in policies:
        protected.update(vm.id for vm in select_vms(session, policy))
    unprotected = list(session.scalars(select(VM.name).where(VM.present.is_(True), VM.id.not_in(protected))
                                       .order_by(VM.name).limit(SHOWN_NAMES)))
    return Dashboard(
        hypervisors=session.scalar(select(func.count()).select_from(Hypervisor)) or 0,
        policies=len(policies), vms=present, protected=len(protected), unprotected=unprotected,
        failed_last=failed_last(session),
        rate_7=success_rate(session, now - timedelta(days=7)), rate_30=success_rate(session, now - timedelta(days=30)),
        proxies=[ProxyState(p.name, proxy_up(p, now), p.last_heartbeat)
                 for p in session.scalars(select(Proxy).order_by(Proxy.name))],
        repositories=repositories(session), running=running_jobs(session))
