"""Proxies: who registered, whether their heartbeat is fresh, what they can do and reach, the work
on them now and how fast it goes; deleting one that is gone for good (the API's rules)."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import JobVM, MaintenanceRun, Proxy, RestoreJob
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.server.auth import ADMIN, get_session
from vmkeep.server.console.people import removed
from vmkeep.server.console.render import page, roles, screen
from vmkeep.server.console.session import Refused, Visitor, changing, person
from vmkeep.server.dispatch import PROXY_TIMEOUT, proxy_up
from vmkeep.server.routes_proxies import remove_proxy
from vmkeep.server.schemas import NAME

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

RUNNING = JobStatus.RUNNING.value


@dataclass
class Work:
    """A backup (one VM of a run), a restore or a repository's maintenance assigned to a proxy."""

    label: str  # "run 12", "restore 3", "gc 5"
    href: str  # its page in the console
    what: str  # the VM, or the repository
    status: str
    progress_bytes: int
    total_bytes: int | None
    started: datetime | None  # a restore: when it was asked for (the catalog keeps no start)

    def rate(self, now: datetime) -> float:
        """Bytes per second since it started; 0 while queued."""
        if self.status != RUNNING or self.started is None:
            return 0.0
        seconds = (now - self.started).total_seconds()
        return self.progress_bytes / seconds if seconds > 0 else 0.0


@dataclass
class ProxyRow:
    name: str
    up: bool
    last_heartbeat: datetime
    heard_seconds: int
    registered: datetime
    transports: list[str]
    reaches: list[str]
    storage: list[str]
    concurrency: int
    work: list[Work] = field(default_factory=list)
    throughput: float = 0.0  # bytes per second over its running work

    @property
    def heard(self) -> str:
        return ago(self.heard_seconds)


def ago(seconds: int) -> str:
    """37 → '37 s ago', 150 → '2 min ago': a heartbeat's age at a glance."""
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 90 * 60:
        return f"{seconds // 60} min ago"
    if seconds < 48 * 3600:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def proxy_rows(session: Session, now: datetime | None = None) -> list[ProxyRow]:
    """Every registered proxy (a handful: they are machines) with its assigned work, four queries."""
    now = now or datetime.now(UTC)
    work: dict[str, list[Work]] = defaultdict(list)
    for v in session.scalars(select(JobVM).where(JobVM.proxy.is_not(None), JobVM.status.in_(ACTIVE))
                             .order_by(JobVM.job_id, JobVM.id)):
        work[str(v.proxy)].append(Work(f"run {v.job_id}", f"/jobs/{v.job_id}", v.vm_name, v.status,
                                       v.progress_bytes or 0, v.total_bytes, v.started))
    for r in session.scalars(select(RestoreJob).where(RestoreJob.proxy.is_not(None), RestoreJob.status.in_(ACTIVE))
                             .order_by(RestoreJob.id)):
        work[str(r.proxy)].append(Work(f"restore {r.id}", f"/restores/{r.id}", r.new_name or r.vm_name, r.status,
                                       r.progress_bytes or 0, r.total_bytes, r.created))
    for m in session.scalars(select(MaintenanceRun).where(MaintenanceRun.proxy.is_not(None),
                                                          MaintenanceRun.status.in_(ACTIVE)).order_by(MaintenanceRun.id)):
        work[str(m.proxy)].append(Work(f"{m.kind} {m.id}", f"/maintenance/{m.id}", m.repository_name, m.status,
                                       m.progress_bytes or 0, m.total_bytes, m.started))
    rows = []
    for p in session.scalars(select(Proxy).order_by(Proxy.name)):
        mine = work.get(p.name, [])
        rows.append(ProxyRow(p.name, proxy_up(p, now), p.last_heartbeat,
                             max(0, int((now - p.last_heartbeat).total_seconds())), p.registered,
                             list(p.transports), list(p.reaches), list(p.storage), p.concurrency, mine,
                             sum(w.rate(now) for w in mine)))
    return rows


def listing(request: Request, session: Session) -> dict[str, Any]:
    return {"proxies": proxy_rows(session), "timeout": int(PROXY_TIMEOUT.total_seconds()),
            "server_url": str(request.base_url).rstrip("/")}


@router.get("/proxies")
def proxies_page(request: Request, deleted: str = "", who: Visitor = Depends(person),
                 session: Session = Depends(get_session)) -> Response:
    context = listing(request, session)
    # the notice after a delete, only for a name that is really gone (a link cannot make it say more)
    shown = deleted if re.fullmatch(NAME, deleted) and all(p.name != deleted for p in context["proxies"]) else ""
    return screen(request, who, "proxies.html", "proxies", {**context, "deleted": shown})


@router.get("/proxies/table")
def proxies_table(request: Request, who: Visitor = Depends(person), session: Session = Depends(get_session),
                  ) -> Response:
    """The table alone, which the page polls (htmx) for fresh heartbeats and throughput."""
    return page(request, "proxies_table.html", {**listing(request, session), **roles(who)})


def one(session: Session, name: str) -> ProxyRow | None:
    return next((p for p in proxy_rows(session) if p.name == name), None)


@router.get("/proxies/{name}/delete")
def delete_page(name: str, request: Request, who: Visitor = Depends(person), session: Session = Depends(get_session),
                ) -> Response:
    """The confirmation: what is being removed, and the API's conditions for it."""
    if who.user.role != ADMIN:
        raise Refused("Only an administrator removes a proxy.")
    return confirm(request, who, session, name, None, 200)


def confirm(request: Request, who: Visitor, session: Session, name: str, error: str | None,
            status: int) -> Response:
    proxy = one(session, name)
    if proxy is None:
        return screen(request, who, "proxy_delete.html", "proxies", {"name": name, "proxy": None,
                                                                     "error": f"No proxy {name}: it is gone already."},
                      404)
    return screen(request, who, "proxy_delete.html", "proxies",
                  {"name": name, "proxy": proxy, "error": error, "timeout": int(PROXY_TIMEOUT.total_seconds())},
                  status)


@router.post("/proxies/{name}/delete")
def delete(name: str, request: Request, who: Visitor = Depends(changing), session: Session = Depends(get_session),
           ) -> Response:
    """DELETE /api/proxies/{name}'s rules and audit entry; refusals shown beside the button."""
    if who.user.role != ADMIN:
        raise Refused("Only an administrator removes a proxy.")
    return removed(who, session, f"proxy {name}", lambda: remove_proxy(session, request, who.user, name),
                   lambda error, status: confirm(request, who, session, name, error, status),
                   f"/proxies?deleted={name}")
