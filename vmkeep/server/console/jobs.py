"""Jobs: the history with filters, and one job's VMs and disks with live progress and log lines."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Job
from vmkeep.server.auth import CHANGE_INVENTORY, get_session
from vmkeep.server.console.job_view import (
    VM_STATUSES,
    VMS_PER_PAGE,
    FilterError,
    JobFilters,
    choices,
    history,
    job_view,
    summary,
)
from vmkeep.server.console.paging import PER_PAGE, Paging, paging
from vmkeep.server.console.render import page, roles, screen
from vmkeep.server.console.session import Refused, Visitor, changing, person
from vmkeep.server.routes_jobs import JobId, cancel_run, job_of

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)
POLL = "every 1s"  # a running job's part refreshes itself this often


def _filters(policy: str = Query("", max_length=100), status: str = Query("", max_length=20),
             requested_by: str = Query("", max_length=100), vm: str = Query("", max_length=200),
             since: str = Query("", max_length=10), until: str = Query("", max_length=10)) -> JobFilters:
    return JobFilters(policy.strip(), status.strip(), requested_by.strip(), vm.strip(), since.strip(), until.strip())


@router.get("/jobs")
def jobs_page(request: Request, who: Visitor = Depends(person), session: Session = Depends(get_session),
              filters: JobFilters = Depends(_filters), p: Paging = Depends(paging)) -> Response:
    p.filters = filters.as_dict()
    context = {"filters": filters, "p": p, "rows": [], "errors": {}, **choices(session)}
    try:
        context["rows"] = history(session, filters, p)
    except FilterError as exc:
        context["errors"] = {exc.field: str(exc)}
        return screen(request, who, "jobs.html", "jobs", context, 400)
    return screen(request, who, "jobs.html", "jobs", context)


def _live(who: Visitor, session: Session, job_id: int, p: Paging, status: str) -> tuple[dict[str, object], int]:
    """A job's page or live part, and its status code (404: no such job, 400: a bad filter)."""
    job = session.get(Job, job_id)
    if job is None:
        return {"job": None, "job_id": job_id}, 404
    if p.per_page == PER_PAGE:  # not asked for: a job's VMs are bigger than a list's rows
        p.per_page = VMS_PER_PAGE
    p.filters = {"status": status}
    context: dict[str, object] = {"job": job, "summary": summary(session, job_id), "p": p, "status": status,
                                  "statuses": VM_STATUSES, "vms": [], "error": None,
                                  "poll": POLL if job.finished is None else None, "who": who, **roles(who)}
    try:
        context["vms"] = job_view(session, job, p, status)
    except FilterError as exc:
        context["error"] = str(exc)
        return context, 400
    return context, 200


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: JobId, who: Visitor = Depends(person), session: Session = Depends(get_session),
             p: Paging = Depends(paging), status: str = Query("", max_length=20)) -> Response:
    context, code = _live(who, session, job_id, p, status.strip())
    return screen(request, who, "job.html", "jobs", context, code)


@router.get("/jobs/{job_id}/live")
def job_live(request: Request, job_id: JobId, who: Visitor = Depends(person), session: Session = Depends(get_session),
             p: Paging = Depends(paging), status: str = Query("", max_length=20)) -> Response:
    """The part of a job's page htmx polls while it runs; once it ended, the part comes back
    without its trigger and the polling stops."""
    context, code = _live(who, session, job_id, p, status.strip())
    if context["job"] is None:  # removed meanwhile: say so where the part was, and stop
        return page(request, "refused_part.html", {"message": f"Job {job_id} no longer exists."})
    return page(request, "job_live.html", context, code)


@router.post("/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: JobId, who: Visitor = Depends(changing),
                 session: Session = Depends(get_session)) -> Response:
    """The API's cancel (same audit entry); back to the job's page."""
    if who.user.role not in CHANGE_INVENTORY:
        raise Refused("Only an administrator or an operator can cancel a job.")
    await cancel_run(session, request, who.user.name, job_of(session, job_id))
    log.info("console: %s cancelled job %s", who.user.name, job_id)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)
