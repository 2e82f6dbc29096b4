"""Repositories: capacity, use, dedup and compression, each VM's unique and shared bytes, and
maintenance (verify, prune with its dry run first, GC, usage) run on proxies with live progress.

The actions are the API's (vmkeep.server.maintenance): same checks, audit entries and refusals."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import MaintenanceRun, PointDay, RepositoryRecord, RepositoryUsage
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.server.auth import CHANGE_INVENTORY, get_session
from vmkeep.server.console.paging import Paging, paging
from vmkeep.server.console.render import ibytes, page, screen
from vmkeep.server.console.session import Refused, Visitor, changing, form_fields, person
from vmkeep.server.maintenance import KINDS, Latest, MaintenanceRefused, confirm_prune, latest_runs, start_maintenance
from vmkeep.server.routes_inventory import remove_repository

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

RECENT_RUNS = 10
ACTIONS = {"verify": "Verify", "prune": "Prune (dry run)", "gc": "Collect garbage", "usage": "Measure usage"}


@dataclass
class RunView:
    """A maintenance run as the pages show it: a one-line outcome, its progress."""

    run: MaintenanceRun

    @property
    def active(self) -> bool:
        return self.run.status in ACTIVE

    @property
    def percent(self) -> float | None:
        r = self.run
        return 100.0 * (r.progress_bytes or 0) / r.total_bytes if r.total_bytes else None

    @property
    def dry_run(self) -> bool:
        return self.run.kind == "prune" and bool(self.run.params.get("dry_run", True))

    @property
    def title(self) -> str:
        return {"verify": "Verify", "gc": "Garbage collection", "usage": "Usage measurement",
                "prune": "Prune dry run" if self.dry_run else "Prune",
                "copy": f"Copy to {self.run.target_repository_name}"}.get(self.run.kind, self.run.kind)

    @property
    def damaged(self) -> bool:
        result = self.run.result or {}
        return self.run.kind == "verify" and self.run.status == JobStatus.SUCCEEDED and not result.get("ok", False)

    @property
    def summary(self) -> str:
        r, result = self.run, self.run.result or {}
        if r.status == JobStatus.QUEUED:
            return f"queued on proxy {r.proxy}"
        if r.status == JobStatus.RUNNING:
            return f"running on proxy {r.proxy}" + (f", {self.percent:.0f} %" if self.percent is not None else "")
        if r.status != JobStatus.SUCCEEDED:
            return f"{r.status}: {r.error}"
        if r.kind == "verify":
            if result.get("ok"):
                return f"intact ({result.get('chunks_checked', 0)} chunks, {ibytes(result.get('bytes_checked'))})"
            return (f"damaged: {len(result.get('bad_chunks', {}))} bad chunks, "
                    f"{len(result.get('broken_points', {}))} points broken")
        if r.kind == "gc":
            return f"freed {ibytes(result.get('bytes_freed'))} in {result.get('chunks_deleted', 0)} chunks"
        if r.kind == "prune":
            verb = "would remove" if self.dry_run else "removed"
            return (f"{verb} {result.get('points_removed', 0)} points, freeing "
                    f"{ibytes(result.get('frees_bytes'))} once garbage is collected")
        if r.kind == "usage":
            return f"dedup {result.get('dedup_ratio', 1):.2f}×, compression {result.get('compression_ratio', 1):.2f}×"
        if r.kind == "copy":
            pruned = (result.get("prune") or {}).get("points_removed")
            return (f"{len(result.get('points_copied', []))} points copied, {len(result.get('points_present', []))} "
                    f"there already, {ibytes(result.get('bytes_sent'))} sent ({result.get('mode')})"
                    + (f"; {pruned} pruned by the target's retention" if pruned else "")
                    + (f"; {result['prune_error']}" if result.get("prune_error") else ""))
        return r.status


@dataclass
class RepositoryRow:
    record: RepositoryRecord
    points: int
    latest: Latest

    @property
    def location(self) -> str:
        r = self.record
        return f"{r.location} (endpoint {r.s3_endpoint})" if r.s3_endpoint else r.location

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.latest.usage.result if self.latest.usage else None

    @property
    def last_verify(self) -> RunView | None:
        return RunView(self.latest.verify) if self.latest.verify else None

    @property
    def last_gc(self) -> RunView | None:
        return RunView(self.latest.gc) if self.latest.gc else None


def outdated_by(session: Session, row: RepositoryRow) -> MaintenanceRun | None:
    """The newest GC or prune (not a dry run) that changed the repository after its last usage run."""
    if row.latest.usage is None:
        return None
    return session.scalar(select(MaintenanceRun).where(
        MaintenanceRun.repository_id == row.record.id, MaintenanceRun.status == JobStatus.SUCCEEDED.value,
        MaintenanceRun.id > row.latest.usage.id,
        (MaintenanceRun.kind == "gc") | ((MaintenanceRun.kind == "prune")
                                         & (MaintenanceRun.params["dry_run"].as_boolean().is_(False))))
        .order_by(MaintenanceRun.id.desc()).limit(1))


def repository_rows(session: Session, records: list[RepositoryRecord]) -> list[RepositoryRow]:
    ids = [r.id for r in records]
    # the daily sums the catalog's triggers keep (migration 0016): a few rows, not a million points
    counts = {rid: int(n) for rid, n in session.execute(
        select(PointDay.repository_id, func.sum(PointDay.points)).where(PointDay.repository_id.in_(ids))
        .group_by(PointDay.repository_id)).all()}
    latest = latest_runs(session, ids)
    return [RepositoryRow(r, counts.get(r.id, 0), latest[r.id]) for r in records]


@router.get("/repositories")
def repositories_page(request: Request, who: Visitor = Depends(person), session: Session = Depends(get_session),
                      p: Paging = Depends(paging)) -> Response:
    p.total = session.scalar(select(func.count()).select_from(RepositoryRecord)) or 0
    records = list(session.scalars(select(RepositoryRecord).order_by(RepositoryRecord.name)
                                   .offset(p.offset).limit(p.per_page)))
    return screen(request, who, "repositories.html", "repositories",
                  {"rows": repository_rows(session, records), "p": p})


def _repository_screen(request: Request, who: Visitor, session: Session, name: str, p: Paging,
                       error: tuple[str, str] | None = None, status_code: int = 200) -> Response:
    record = session.scalar(select(RepositoryRecord).where(RepositoryRecord.name == name))
    if record is None:
        return screen(request, who, "repository_missing.html", "repositories", {"name": name}, 404)
    row = repository_rows(session, [record])[0]
    p.total = session.scalar(select(func.count()).select_from(RepositoryUsage)
                             .where(RepositoryUsage.repository_id == record.id)) or 0
    usage = list(session.scalars(select(RepositoryUsage).where(RepositoryUsage.repository_id == record.id)
                                 .order_by(RepositoryUsage.unique_bytes.desc(), RepositoryUsage.name)
                                 .offset(p.offset).limit(p.per_page)))
    runs = [RunView(r) for r in session.scalars(select(MaintenanceRun).where(MaintenanceRun.repository_id == record.id)
                                                .order_by(MaintenanceRun.id.desc()).limit(RECENT_RUNS))]
    return screen(request, who, "repository.html", "repositories",
                  {"row": row, "usage": usage, "p": p, "runs": runs, "actions": ACTIONS,
                   "outdated_by": outdated_by(session, row),
                   "error_kind": error[0] if error else None, "error": error[1] if error else None},
                  status_code)


@router.get("/repositories/{name}")
def repository_page(name: str, request: Request, who: Visitor = Depends(person),
                    session: Session = Depends(get_session), p: Paging = Depends(paging)) -> Response:
    return _repository_screen(request, who, session, name, p)


def _may_maintain(who: Visitor, what: str = "run repository maintenance") -> None:
    if who.user.role not in CHANGE_INVENTORY:
        raise Refused(f"A {who.user.role} account cannot {what}: an administrator or operator can.")


@router.post("/repositories/{name}/remove")
def remove(name: str, request: Request, who: Visitor = Depends(changing), session: Session = Depends(get_session),
           fields: dict[str, str] = Depends(form_fields)) -> Response:
    """Remove the registration, as the API's DELETE does (same refusals, same audit entry)."""
    _may_maintain(who, "remove a repository")
    if fields.get("understood") != "yes":
        return _repository_screen(request, who, session, name, Paging(),
                                  ("remove", "Tick the box to confirm: its points leave the catalog (the repository "
                                             "keeps them)."), 400)
    try:
        remove_repository(session, request, who.user.name, name)
    except HTTPException as refused:
        session.rollback()
        return _repository_screen(request, who, session, name, Paging(), ("remove", str(refused.detail)),
                                  refused.status_code)
    return RedirectResponse("/repositories", status_code=303)


@router.post("/repositories/{name}/{kind}")
async def start_run(name: str, kind: str, request: Request, who: Visitor = Depends(changing),
                    session: Session = Depends(get_session)) -> Response:
    """Verify, prune (always a dry run first here), GC or measure usage; to the run's page."""
    _may_maintain(who)
    if kind not in KINDS:
        return _repository_screen(request, who, session, name, Paging(), ("", f"unknown action {kind}"), 404)
    params = {"dry_run": True} if kind == "prune" else None
    try:
        run = await start_maintenance(session, request.app.state.queue, request, who.user.name, name, kind, params)
    except MaintenanceRefused as refused:
        session.rollback()
        return _repository_screen(request, who, session, name, Paging(), (kind, str(refused)), refused.status)
    return RedirectResponse(f"/maintenance/{run.id}", status_code=303)


def _run(session: Session, run_id: int) -> MaintenanceRun | None:
    return session.get(MaintenanceRun, run_id) if run_id < 2**31 else None


@router.get("/maintenance/{run_id}")
def run_page(run_id: int, request: Request, who: Visitor = Depends(person),
             session: Session = Depends(get_session)) -> Response:
    run = _run(session, run_id)
    if run is None:
        return screen(request, who, "maintenance_missing.html", "repositories", {"run_id": run_id}, 404)
    return screen(request, who, "maintenance_run.html", "repositories", {"v": RunView(run), "error": None})


@router.get("/maintenance/{run_id}/status")
def run_status(run_id: int, request: Request, who: Visitor = Depends(person),
               session: Session = Depends(get_session)) -> Response:
    """The run's state alone, which its page polls (htmx) until the run ends."""
    run = _run(session, run_id)
    if run is None:
        return page(request, "refused_part.html", {"message": f"maintenance run {run_id} is gone"}, 404)
    return page(request, "maintenance_status.html", {"v": RunView(run), "who": who,
                                                     "may_change": who.user.role in CHANGE_INVENTORY,
                                                     "error": None})


@router.post("/maintenance/{run_id}/confirm")
async def confirm(run_id: int, request: Request, who: Visitor = Depends(changing),
                  session: Session = Depends(get_session)) -> Response:
    """The prune a dry run showed, for real (only the points it listed)."""
    _may_maintain(who)
    try:
        run = await confirm_prune(session, request.app.state.queue, request, who.user.name, run_id)
    except MaintenanceRefused as refused:
        session.rollback()
        shown = _run(session, run_id)
        if shown is None:
            return screen(request, who, "maintenance_missing.html", "repositories", {"run_id": run_id}, 404)
        return screen(request, who, "maintenance_run.html", "repositories",
                      {"v": RunView(shown), "error": str(refused)}, refused.status)
    return RedirectResponse(f"/maintenance/{run.id}", status_code=303)


@router.get("/maintenance")
def runs_page(request: Request, who: Visitor = Depends(person), session: Session = Depends(get_session),
              p: Paging = Depends(paging), repository: str = Query("", max_length=200),
              kind: str = Query("", max_length=20)) -> Response:
    query = select(MaintenanceRun)
    if repository:
        query = query.where(MaintenanceRun.repository_name == repository)
    if kind:
        query = query.where(MaintenanceRun.kind == kind)
    p.filters = {"repository": repository, "kind": kind}
    p.total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    runs = [RunView(r) for r in session.scalars(query.order_by(MaintenanceRun.id.desc())
                                                .offset(p.offset).limit(p.per_page))]
    names = list(session.scalars(select(RepositoryRecord.name).order_by(RepositoryRecord.name)))
    return screen(request, who, "maintenance.html", "repositories",
                  {"runs": runs, "p": p, "repository": repository, "kind": kind, "kinds": (*KINDS, "copy"),
                   "names": names})
