"""What the Jobs pages show, read from the catalog: one page of the run history (filtered, counted
and sliced in SQL), and one run's VMs with their live progress, disks and log lines."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Job, JobVM, JobVMLog
from vmkeep.jobs.status import JobStatus
from vmkeep.server.console.paging import Paging
from vmkeep.server.console.render import span

STATUSES = [s.value for s in JobStatus if s not in (JobStatus.WAITING, JobStatus.QUEUED)]
RUNNING_TAIL = 20  # log lines per VM while a run goes (the page polls); all of them once it ended


class FilterError(ValueError):
    """A filter's value cannot be used; ``field`` names the control."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class JobFilters:
    policy: str = ""
    status: str = ""
    requested_by: str = ""
    vm: str = ""
    since: str = ""  # YYYY-MM-DD (UTC)
    until: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"policy": self.policy, "status": self.status, "requested_by": self.requested_by, "vm": self.vm,
                "since": self.since, "until": self.until}

    def conditions(self) -> list[ColumnElement[bool]]:
        """The SQL conditions; :class:`FilterError` for a value that cannot be one."""
        found: list[ColumnElement[bool]] = []
        if self.policy:
            found.append(Job.policy_name == self.policy)
        if self.status:
            if self.status not in STATUSES:
                raise FilterError("status", f"no status {self.status!r}: pick one of the list")
            found.append(Job.status == self.status)
        if self.requested_by:
            found.append(Job.requested_by == self.requested_by)
        if self.vm and "*" not in self.vm:  # the index on job_vms.vm_name
            found.append(exists().where(JobVM.job_id == Job.id, JobVM.vm_name == self.vm))
        elif self.vm:
            pattern = self.vm.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")
            found.append(exists().where(JobVM.job_id == Job.id, JobVM.vm_name.like(pattern, escape="\\")))
        since, until = _day("since", self.since), _day("until", self.until)
        if since and until and until < since:
            raise FilterError("until", "“until” is before “since”: swap the two dates")
        if since:
            found.append(Job.started >= datetime.combine(since, time(), UTC))
        if until:  # the whole day
            found.append(Job.started < datetime.combine(until + timedelta(days=1), time(), UTC))
        return found


def _day(name: str, text: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise FilterError(name, f"“{text}” is not a date: use YYYY-MM-DD, e.g. 2026-12-01") from None


@dataclass
class HistoryRow:
    id: int
    policy: str
    requested_by: str
    status: str
    started: datetime
    duration: str
    running: bool
    vms: int = 0
    ok: int = 0
    failed: int = 0
    read_bytes: int = 0
    stored_bytes: int = 0


def history(session: Session, filters: JobFilters, paging: Paging, now: datetime | None = None) -> list[HistoryRow]:
    """One page of runs, newest first; fills in ``paging.total``."""
    now = now or datetime.now(UTC)
    where = filters.conditions()
    paging.total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    jobs = session.scalars(select(Job).where(*where).order_by(Job.id.desc())
                           .limit(paging.per_page).offset(paging.offset)).all()
    rows = {j.id: HistoryRow(j.id, j.policy_name, j.requested_by, j.status, j.started,
                             span(((j.finished or now) - j.started).total_seconds()) or "—", j.finished is None)
            for j in jobs}
    if rows:
        ok = func.count().filter(JobVM.status == JobStatus.SUCCEEDED.value)
        failed = func.count().filter(JobVM.status == JobStatus.FAILED.value)
        sums = select(JobVM.job_id, func.count(), ok, failed, func.coalesce(func.sum(JobVM.read_bytes), 0),
                      func.coalesce(func.sum(JobVM.stored_bytes), 0)).where(
            JobVM.job_id.in_(list(rows))).group_by(JobVM.job_id)
        for job_id, vms, n_ok, n_failed, read, stored in session.execute(sums).tuples():
            row = rows[job_id]
            row.vms, row.ok, row.failed = vms, n_ok, n_failed
            row.read_bytes, row.stored_bytes = int(read or 0), int(stored or 0)
    return list(rows.values())


def choices(session: Session) -> dict[str, list[str]]:
    """The policies and requesters the history knows, for the filters' lists."""
    return {"policies": list(session.scalars(select(Job.policy_name).distinct().order_by(Job.policy_name))),
            "requesters": list(session.scalars(select(Job.requested_by).distinct().order_by(Job.requested_by))),
            "statuses": STATUSES}


@dataclass
class DiskRow:
    name: str
    size: int | None
    mode: str | None
    read: int | None
    zero: int | None  # found zero (not stored)
    reused: int | None  # unchanged since the parent point (an incremental)
    stored: int | None
    seconds: float | None


@dataclass
class LogLine:
    at: datetime
    level: str
    logger: str
    message: str


@dataclass
class VMView:
    row: JobVM
    disks: list[DiskRow]
    done: int | None  # bytes read so far (running) or in all (ended)
    total: int | None
    rate: float | None  # bytes per second
    eta: str | None
    lines: list[LogLine] = field(default_factory=list)
    lines_total: int = 0

    @property
    def percent(self) -> float | None:
        if self.row.status == JobStatus.SUCCEEDED:
            return 100.0
        return 100.0 * min(self.done or 0, self.total) / self.total if self.total else None


def _disks(jv: JobVM) -> list[DiskRow]:
    """Per disk, as the proxy recorded it (vmkeep.engine.backup.DiskStats)."""
    return [DiskRow(name, d.get("size"), d.get("mode"), d.get("bytes_read"), d.get("bytes_zero"),
                    d.get("bytes_reused"), d.get("bytes_stored"), d.get("seconds"))
            for name, d in sorted((jv.disks or {}).items()) if isinstance(d, dict)]


def _vm_view(jv: JobVM, now: datetime) -> VMView:
    if jv.status == JobStatus.RUNNING:
        done, total = jv.progress_bytes, jv.total_bytes
        elapsed = (now - jv.started).total_seconds() if jv.started else None
        rate = done / elapsed if done and elapsed and elapsed > 0 else None
        eta = span((total - done) / rate) if rate and total and done is not None and total >= done else None
    else:
        done = jv.read_bytes if jv.read_bytes is not None else jv.progress_bytes
        total = jv.total_bytes
        rate = done / jv.duration_seconds if done and jv.duration_seconds else None
        eta = None
    return VMView(jv, _disks(jv), done, total, rate, eta)


VM_STATUSES = [s.value for s in JobStatus if s != JobStatus.PARTIAL]
VMS_PER_PAGE = 20  # a run of a few thousand VMs is shown a page at a time, the running ones first


@dataclass
class JobSummary:
    """A run's VMs counted by status, and what they read and stored, in SQL."""

    counts: dict[str, int]
    read_bytes: int
    stored_bytes: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def ended(self) -> int:
        return sum(n for s, n in self.counts.items() if s in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                               JobStatus.CANCELLED))


def summary(session: Session, job_id: int) -> JobSummary:
    rows = session.execute(select(JobVM.status, func.count(), func.coalesce(func.sum(JobVM.read_bytes), 0),
                                  func.coalesce(func.sum(JobVM.stored_bytes), 0))
                           .where(JobVM.job_id == job_id).group_by(JobVM.status)).tuples().all()
    found = JobSummary({}, 0, 0)
    for status, n, read, stored in rows:
        found.counts[status] = n
        found.read_bytes += int(read or 0)
        found.stored_bytes += int(stored or 0)
    return found


def job_view(session: Session, job: Job, paging: Paging, status: str = "",
             now: datetime | None = None) -> list[VMView]:
    """One page of the run's VMs (running ones first) with progress, disks and log lines (the last
    few while the run goes); fills in ``paging.total``. :class:`FilterError` for an unknown status."""
    now = now or datetime.now(UTC)
    where = [JobVM.job_id == job.id]
    if status:
        if status not in VM_STATUSES:
            raise FilterError("vm-status", f"no status {status!r}: pick one of the list")
        where.append(JobVM.status == status)
    paging.total = session.scalar(select(func.count()).select_from(JobVM).where(*where)) or 0
    rows = session.scalars(select(JobVM).where(*where)
                           .order_by((JobVM.status == JobStatus.RUNNING.value).desc(), JobVM.id)
                           .limit(paging.per_page).offset(paging.offset)).all()
    views = {jv.id: _vm_view(jv, now) for jv in rows}
    if not views:
        return []
    counts = dict(session.execute(select(JobVMLog.job_vm_id, func.count()).where(
        JobVMLog.job_vm_id.in_(list(views))).group_by(JobVMLog.job_vm_id)).tuples().all())
    numbered = select(JobVMLog, func.row_number().over(partition_by=JobVMLog.job_vm_id,
                                                       order_by=JobVMLog.id.desc()).label("back")).where(
        JobVMLog.job_vm_id.in_(list(views))).subquery()
    query = select(numbered).order_by(numbered.c.id)
    if job.finished is None:
        query = query.where(numbered.c.back <= RUNNING_TAIL)
    for line in session.execute(query):
        views[line.job_vm_id].lines.append(LogLine(line.at, line.level, line.logger, line.message))
    for job_vm_id, view in views.items():
        view.lines_total = counts.get(job_vm_id, 0)
    return list(views.values())
