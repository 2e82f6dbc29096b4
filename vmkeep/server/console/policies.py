"""Policies: list, create, edit, delete and run now, with a live preview of the VMs the selection
rules pick and the schedule's next runs.

Every change goes through the API's own functions (``create_policy_as`` and friends in
routes_jobs): the same checks, errors and audit entries. Reading needs any person's role;
changing needs the API's CHANGE_INVENTORY roles, checked here whatever the page showed.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Job, Policy
from vmkeep.server.auth import CHANGE_INVENTORY, get_session
from vmkeep.server.console.paging import Paging, paging
from vmkeep.server.console.policy_form import (
    choices,
    fields_of,
    new_fields,
    next_runs,
    parse,
    policy_rows,
    preview,
    refusal,
    rules_of,
)
from vmkeep.server.console.render import page, screen
from vmkeep.server.console.session import Refused, Visitor, changing, form_fields, person
from vmkeep.server.replicas import recent_replicas
from vmkeep.server.routes_jobs import (
    PolicyRefused,
    change_policy_as,
    create_policy_as,
    delete_policy_as,
    run_policy_as,
)

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)
ACTIVE = "policies"


def may_change(who: Visitor) -> None:
    """The API's rule for policies, enforced here as there."""
    if who.user.role not in CHANGE_INVENTORY:
        raise Refused(f"A {who.user.role} account reads policies but does not change them: ask an administrator "
                      "or operator.")


def named(session: Session, name: str) -> Policy:
    policy = session.scalar(select(Policy).where(Policy.name == name))
    if policy is None:
        raise Refused(f"There is no policy {name} (deleted meanwhile?): go back to the list of policies.")
    return policy


def options(names: list[str], current: str, empty: str) -> list[tuple[str, str]]:
    """A select's (value, text) pairs: the empty choice, the registered names, and the current
    value even if it is gone (so the form shows what is stored, and the API says what is wrong)."""
    extra = [current] if current and current not in names else []
    return [("", empty), *((n, n) for n in [*names, *extra])]


def form_page(request: Request, who: Visitor, session: Session, fields: dict[str, str], *, editing: str | None,
              errors: dict[str, str] | None = None, status_code: int = 200) -> Response:
    """The create or edit form with what was typed, the errors beside their fields, the preview
    and the next runs as they stand."""
    known = choices(session)
    context: dict[str, Any] = {"fields": fields, "errors": errors or {}, "editing": editing,
                               "preview": preview(session, rules_of(fields)),
                               "runs": next_runs(fields["schedule"]) if fields.get("schedule", "").strip() else None,
                               "repository_options": options(known["repositories"], fields.get("repository", ""),
                                                             "— choose one —"),
                               "hypervisor_options": options(known["hypervisors"], fields.get("hypervisor", ""),
                                                             "any hypervisor"),
                               **known}
    return screen(request, who, "policy_form.html", ACTIVE, context, status_code)


@router.get("/policies")
def list_page(request: Request, who: Visitor = Depends(person), session: Session = Depends(get_session),
              p: Paging = Depends(paging), saved: str = "", deleted: str = "") -> Response:
    return screen(request, who, "policies.html", ACTIVE, {"rows": policy_rows(session, p), "paging": p,
                                                          "saved": saved, "deleted": deleted, **choices(session),
                                                          "replicas": recent_replicas(session)})


@router.get("/policies/preview")
def preview_part(request: Request, _who: Visitor = Depends(person), session: Session = Depends(get_session),
                 ) -> Response:
    """The VMs the rules typed so far select now (htmx, as the administrator types)."""
    return page(request, "policy_preview.html", {"preview": preview(session, rules_of(dict(request.query_params)))})


@router.get("/policies/next-runs")
def next_runs_part(request: Request, _who: Visitor = Depends(person), schedule: str = "") -> Response:
    """The schedule's next runs as typed so far (htmx); the browser shows them in its own zone."""
    return page(request, "policy_runs.html", {"runs": next_runs(schedule) if schedule.strip() else None})


@router.get("/policies/new")
def new_page(request: Request, who: Visitor = Depends(person), session: Session = Depends(get_session)) -> Response:
    may_change(who)
    return form_page(request, who, session, new_fields(), editing=None)


@router.post("/policies/new")
def create(request: Request, who: Visitor = Depends(changing), fields: dict[str, str] = Depends(form_fields),
           session: Session = Depends(get_session)) -> Response:
    may_change(who)
    body, errors = parse(fields)
    if body is None:
        return form_page(request, who, session, fields, editing=None, errors=errors, status_code=422)
    try:
        create_policy_as(session, request, who.user.name, body)
    except PolicyRefused as exc:
        session.rollback()
        return form_page(request, who, session, fields, editing=None, errors=refusal(exc),
                         status_code=exc.status_code)
    log.info("console: %s created policy %s", who.user.name, body.name)
    return RedirectResponse(f"/policies?saved={body.name}", status_code=303)


@router.get("/policies/{name}/edit")
def edit_page(name: str, request: Request, who: Visitor = Depends(person),
              session: Session = Depends(get_session)) -> Response:
    """The policy's settings: a form to change them, or read only for a role that may not."""
    return form_page(request, who, session, fields_of(named(session, name)), editing=name)


@router.post("/policies/{name}/edit")
def change(name: str, request: Request, who: Visitor = Depends(changing), fields: dict[str, str] = Depends(form_fields),
           session: Session = Depends(get_session)) -> Response:
    may_change(who)
    named(session, name)
    fields = {**fields, "name": name}  # a policy keeps its name
    body, errors = parse(fields)
    if body is None:
        return form_page(request, who, session, fields, editing=name, errors=errors, status_code=422)
    try:
        change_policy_as(session, request, who.user.name, name, body)
    except PolicyRefused as exc:
        session.rollback()
        return form_page(request, who, session, fields, editing=name, errors=refusal(exc),
                         status_code=exc.status_code)
    log.info("console: %s changed policy %s", who.user.name, name)
    return RedirectResponse(f"/policies?saved={name}", status_code=303)


@router.get("/policies/{name}/delete")
def delete_page(name: str, request: Request, who: Visitor = Depends(person),
                session: Session = Depends(get_session)) -> Response:
    """The confirmation step: what deleting does and does not remove."""
    may_change(who)
    return screen(request, who, "policy_delete.html", ACTIVE, {"policy": named(session, name), "error": None,
                                                               "going": None})


@router.post("/policies/{name}/delete")
def delete(name: str, request: Request, who: Visitor = Depends(changing),
           session: Session = Depends(get_session)) -> Response:
    may_change(who)
    try:
        delete_policy_as(session, request, who.user.name, name)
    except PolicyRefused as exc:
        session.rollback()
        policy = named(session, name)
        going = session.scalar(select(Job.id).where(Job.policy_id == policy.id, Job.finished.is_(None)).limit(1))
        return screen(request, who, "policy_delete.html", ACTIVE, {"policy": policy, "error": str(exc.detail),
                                                                   "going": going}, exc.status_code)
    log.info("console: %s deleted policy %s", who.user.name, name)
    return RedirectResponse(f"/policies?deleted={name}", status_code=303)


@router.post("/policies/{name}/run")
async def run_now(name: str, request: Request, who: Visitor = Depends(changing),
                  session: Session = Depends(get_session)) -> Response:
    """The API's run: one task per selected VM; then the new job's page."""
    may_change(who)
    named(session, name)
    job = await run_policy_as(session, request, who.user.name, name)
    log.info("console: %s ran policy %s: job %s", who.user.name, name, job.id)
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)
