"""The dashboard's figures, each one a few SQL queries whatever the catalog's size (10,000 VMs and a
million points): what is protected, how backups went, which VMs miss their RPO, proxies, storage
with its ratios and growth, and the runs going on now with each VM's progress."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from cronsim import CronSim, CronSimError
from sqlalchemy import Select, and_, func, literal, or_, select, true, union_all
from sqlalchemy.orm import Session

from vmkeep.catalog.models import (
    BackupDay,
    Hypervisor,
    Job,
    JobVM,
    NewestPoint,
    PointDay,
    Policy,
    Proxy,
    RepositoryRecord,
)
from vmkeep.catalog.models import VirtualMachine as VM
from vmkeep.jobs.status import JobStatus
from vmkeep.server.console.render import span
from vmkeep.server.dispatch import proxy_up, selection_clause

OUTCOMES = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value)  # a cancelled backup says nothing either way
SHOWN_NAMES = 10
SHOWN_RUNNING = 20  # VMs with their progress per running job; the rest are counted
GROWTH_DAYS = 30


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
    logical_bytes: int  # every point's disks at full size
    read_bytes: int  # what the proxies read for them (changed, non-zero data)
    stored_bytes: int  # what they wrote: new chunks after dedup, compressed

    @property
    def reduction(self) -> float | None:
        """Full-size copies of every point ÷ space used: what incremental-forever, dedup and
        compression save together."""
        return self.logical_bytes / self.used_bytes if self.used_bytes and self.logical_bytes else None

    @property
    def dedup_compression(self) -> float | None:
        """Bytes read ÷ bytes stored: dedup and compression of the data the backups read."""
        return self.read_bytes / self.stored_bytes if self.stored_bytes and self.read_bytes else None


@dataclass
class Bar:
    day: date
    stored_bytes: int
    x: float
    y: float
    height: float


@dataclass
class Growth:
    """Stored bytes per UTC day over the last GROWTH_DAYS days, as bars of an SVG chart (drawn
    here: no script, no inline style)."""

    bars: list[Bar]
    peak: int
    width: int = 600
    height: int = 160
    bar_width: float = 0.0

    @property
    def total(self) -> int:
        return sum(b.stored_bytes for b in self.bars)


@dataclass
class Breach:
    vm: str
    policies: str
    newest: datetime | None  # its newest point in a late policy's repository (the oldest of those)


@dataclass
class Breaches:
    count: int  # VMs
    first: list[Breach]


@dataclass
class VMProgress:
    """A running backup: bytes read of those to read, throughput since it started, time left."""

    row: JobVM
    done: int | None
    total: int | None
    rate: float | None  # bytes per second
    eta: str | None

    @classmethod
    def of(cls, jv: JobVM, now: datetime) -> VMProgress:
        elapsed = (now - jv.started).total_seconds() if jv.started else 0.0
        done, total = jv.progress_bytes, jv.total_bytes
        rate = done / elapsed if done and elapsed > 0 else None
        left = (total - done) / rate if rate and total and done is not None and total >= done else None
        return cls(jv, done, total, rate, span(left))

    @property
    def percent(self) -> float | None:
        return 100.0 * min(self.done or 0, self.total) / self.total if self.total else None


@dataclass
class RunningJob:
    id: int
    policy: str
    requested_by: str
    started: datetime
    vms: int
    done: int  # succeeded
    failed: int  # failed or cancelled
    waiting: int  # queued or waiting for a slot
    running: list[VMProgress]  # the first SHOWN_RUNNING
    running_count: int

    @property
    def percent(self) -> float:
        """Ended VMs and the running ones' share of their bytes, over all the run's VMs."""
        share = sum(min(v.done or 0, v.total) / v.total for v in self.running if v.total)
        return 100.0 * (self.done + self.failed + share) / self.vms if self.vms else 0.0


@dataclass
class Dashboard:
    hypervisors: int
    policies: int
    vms: int
    protected: int
    unprotected: list[str]  # the first few names
    failed: int  # VMs whose newest backup failed
    failed_last: list[str]  # the first few names
    rate_7: Rate | None  # None: no backup ended in the period
    rate_30: Rate | None
    breaches: Breaches
    proxies: list[ProxyState]
    repositories: list[RepositoryUsage]
    growth: Growth
    running: list[RunningJob]

    @property
    def proxies_up(self) -> int:
        return sum(p.up for p in self.proxies)


def success_rates(session: Session, now: datetime) -> tuple[Rate | None, Rate | None]:
    """Succeeded ÷ ended backups over the last 7 and 30 UTC days, today included (backup_days: a
    row per day)."""
    today = now.astimezone(UTC).date()
    week, month = today - timedelta(days=6), today - timedelta(days=29)
    ended = BackupDay.succeeded + BackupDay.failed
    row = session.execute(select(
        func.coalesce(func.sum(BackupDay.succeeded).filter(BackupDay.day >= week), 0),
        func.coalesce(func.sum(ended).filter(BackupDay.day >= week), 0),
        func.coalesce(func.sum(BackupDay.succeeded), 0), func.coalesce(func.sum(ended), 0))
        .where(BackupDay.day >= month)).one()
    ok_7, all_7, ok_30, all_30 = (int(v) for v in row)
    return (Rate(ok_7, all_7) if all_7 else None), (Rate(ok_30, all_30) if all_30 else None)


def failed_last(session: Session) -> tuple[int, list[str]]:
    """How many present VMs' newest finished backup failed, and the first few names: each VM's
    newest outcome is one step down ix_job_vms_outcomes (which holds the status), so the cost
    follows the VMs, not the years of history."""
    last = (select(JobVM.status).where(JobVM.vm_id == VM.id, JobVM.status.in_(OUTCOMES))
            .order_by(JobVM.id.desc()).limit(1).lateral("last_outcome"))
    failed = (select(VM.name).select_from(VM).join(last, true()).where(
        VM.present.is_(True), last.c.status == JobStatus.FAILED.value)
        .cte("failed_last").prefix_with("MATERIALIZED"))  # found first, then sorted (not by walking names)
    rows = session.execute(select(failed.c.name, func.count().over())
                           .order_by(failed.c.name).limit(SHOWN_NAMES)).all()
    return (rows[0][1] if rows else 0), [name for name, _count in rows]


def _present(*columns: Any) -> Select[Any]:
    """``columns`` of present VMs, joined with their hypervisor (the selection rules may name it)."""
    return select(*columns).select_from(VM).join(Hypervisor).where(VM.present.is_(True))


def rpo_deadline(policy: Policy, now: datetime) -> datetime | None:
    """The time a VM's newest point must be newer than: the scheduled run before the last one.
    The last run may still be going, so a VM breaches once a whole scheduled run went by without
    a point. None: no schedule (nothing promised), or the policy or its schedule is newer."""
    if not policy.schedule:
        return None
    try:
        runs = CronSim(policy.schedule, now.astimezone(UTC).replace(tzinfo=None), reverse=True)
        next(runs)
        deadline = next(runs).replace(tzinfo=UTC)
    except (CronSimError, StopIteration):
        return None
    created = policy.created if policy.created.tzinfo else policy.created.replace(tzinfo=UTC)
    return deadline if created < deadline else None


@dataclass
class Coverage:
    protected: int  # present VMs at least one policy selects
    unprotected: list[str]  # the first few names of the others
    breaches: Breaches


def coverage(session: Session, policies: list[Policy], now: datetime) -> Coverage:
    """What the policies protect and which of their VMs miss the RPO, in one statement: every
    policy's rules (dispatch.selection_clause, not select_vms per policy) are evaluated once per
    present VM, then counted, and joined with each VM's newest point in the policy's repository
    (newest_points, kept by the database) for the scheduled ones (:func:`rpo_deadline`). A VM
    with no point is late too, unless it was discovered after the deadline."""
    flags = [selection_clause(p.selection).label(f"p{i}") for i, p in enumerate(policies)]
    vms = _present(VM.id, VM.name, VM.first_seen, *flags).cte("membership").prefix_with("MATERIALIZED")
    chosen = or_(*(vms.c[f"p{i}"] for i in range(len(policies)))) if policies else literal(False)
    first = select(vms.c.name).where(~chosen).order_by(vms.c.name).limit(SHOWN_NAMES).subquery()
    figures = [select(func.count()).select_from(vms).where(chosen).scalar_subquery(),
               select(func.array_agg(first.c.name)).scalar_subquery()]
    parts = []
    for i, p in enumerate(policies):
        deadline = rpo_deadline(p, now)
        if deadline is not None:
            newest = and_(NewestPoint.name == vms.c.name, NewestPoint.repository_id == p.repository_id)
            parts.append(select(vms.c.id, vms.c.name, literal(p.name).label("policy"), NewestPoint.created)
                         .select_from(vms).outerjoin(NewestPoint, newest)
                         .where(vms.c[f"p{i}"], vms.c.first_seen < deadline,
                                or_(NewestPoint.created.is_(None), NewestPoint.created < deadline)))
    if parts:
        late = union_all(*parts).cte("late").prefix_with("MATERIALIZED")
        shown = (select(late.c.name, func.string_agg(late.c.policy, ", ").label("policies"),
                        func.min(late.c.created).label("newest"))
                 .group_by(late.c.id, late.c.name).order_by(late.c.name).limit(SHOWN_NAMES).subquery())
        figures += [select(func.count(late.c.id.distinct())).scalar_subquery(),
                    select(func.json_agg(func.json_build_array(shown.c.name, shown.c.policies, shown.c.newest)))
                    .scalar_subquery()]
    row = session.execute(select(*figures)).one()
    late_count, late_rows = (row[2], row[3] or []) if parts else (0, [])
    first_late = sorted((Breach(name, names, datetime.fromisoformat(newest) if newest else None)
                         for name, names, newest in late_rows), key=lambda b: b.vm)
    return Coverage(row[0], sorted(row[1] or []), Breaches(late_count, first_late))


def repositories(session: Session) -> list[RepositoryUsage]:
    """Each repository's use and its points' sums (point_days: a few rows per repository and day)."""
    sums = {r[0]: r[1:] for r in session.execute(select(
        PointDay.repository_id, func.sum(PointDay.points), func.sum(PointDay.logical_bytes),
        func.sum(PointDay.read_bytes), func.sum(PointDay.stored_bytes)).group_by(PointDay.repository_id))}
    return [RepositoryUsage(r.name, r.used_bytes, r.capacity_bytes, *(int(v) for v in sums.get(r.id, (0, 0, 0, 0))))
            for r in session.scalars(select(RepositoryRecord).order_by(RepositoryRecord.name))]


def growth(session: Session, now: datetime) -> Growth:
    """Stored bytes per day (all repositories), the last GROWTH_DAYS days up to today, as bars."""
    today = now.astimezone(UTC).date()
    days = [today - timedelta(days=GROWTH_DAYS - 1 - k) for k in range(GROWTH_DAYS)]
    stored = {day: total for day, total in session.execute(select(PointDay.day, func.sum(PointDay.stored_bytes))
                                                           .where(PointDay.day >= days[0]).group_by(PointDay.day))}
    chart = Growth([], max([int(v) for v in stored.values()] + [0]))
    slot = chart.width / GROWTH_DAYS
    chart.bar_width = round(slot * 0.8, 1)
    for k, day in enumerate(days):
        value = int(stored.get(day, 0))
        height = round(chart.height * value / chart.peak, 1) if chart.peak else 0.0
        chart.bars.append(Bar(day, value, round(k * slot + slot * 0.1, 1), round(chart.height - height, 1), height))
    return chart


def running_jobs(session: Session, now: datetime | None = None) -> list[RunningJob]:
    """Runs not ended yet: their VMs counted by state in one query, the first running ones with
    bytes, throughput and time left."""
    now = now or datetime.now(UTC)
    jobs = session.scalars(select(Job).where(Job.finished.is_(None)).order_by(Job.id)).all()
    if not jobs:
        return []
    ids = [j.id for j in jobs]
    counts: dict[int, dict[str, int]] = {i: {} for i in ids}
    for job_id, status, n in session.execute(select(JobVM.job_id, JobVM.status, func.count())
                                             .where(JobVM.job_id.in_(ids)).group_by(JobVM.job_id, JobVM.status)):
        counts[job_id][status] = n
    moving: dict[int, list[VMProgress]] = {i: [] for i in ids}
    numbered = select(JobVM, func.row_number().over(partition_by=JobVM.job_id, order_by=JobVM.id).label("n")).where(
        JobVM.job_id.in_(ids), JobVM.status == JobStatus.RUNNING.value).subquery()
    for jv in session.scalars(select(JobVM).join(numbered, JobVM.id == numbered.c.id)
                              .where(numbered.c.n <= SHOWN_RUNNING).order_by(JobVM.id)):
        moving[jv.job_id].append(VMProgress.of(jv, now))
    running = []
    for job in jobs:
        c = counts[job.id]
        running.append(RunningJob(
            job.id, job.policy_name, job.requested_by, job.started, sum(c.values()),
            c.get(JobStatus.SUCCEEDED.value, 0), c.get(JobStatus.FAILED.value, 0) + c.get(JobStatus.CANCELLED.value, 0),
            c.get(JobStatus.QUEUED.value, 0) + c.get(JobStatus.WAITING.value, 0), moving[job.id],
            c.get(JobStatus.RUNNING.value, 0)))
    return running


def dashboard(session: Session, now: datetime | None = None) -> Dashboard:
    now = now or datetime.now(UTC)
    policies = list(session.scalars(select(Policy)))
    covered = coverage(session, policies, now)
    rate_7, rate_30 = success_rates(session, now)
    failed, failed_names = failed_last(session)
    return Dashboard(
        hypervisors=session.scalar(select(func.count()).select_from(Hypervisor)) or 0, policies=len(policies),
        vms=session.scalar(select(func.count()).select_from(VM).where(VM.present.is_(True))) or 0,
        protected=covered.protected, unprotected=covered.unprotected, failed=failed, failed_last=failed_names,
        rate_7=rate_7, rate_30=rate_30,
        breaches=covered.breaches,
        proxies=[ProxyState(p.name, proxy_up(p, now), p.last_heartbeat)
                 for p in session.scalars(select(Proxy).order_by(Proxy.name))],
        repositories=repositories(session), growth=growth(session, now), running=running_jobs(session, now))
