"""Restore points per VM, the restore wizard (a whole VM as a new one or over the original) and
the restores with their live progress.

The wizard calls the API's own restore (routes_restore.begin_restore): the same checks, proxy
choice, audit entry and errors, each shown beside the control it concerns.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Hypervisor, RestoreJob, VirtualMachine
from vmkeep.jobs.status import ACTIVE, INSTANT
from vmkeep.server.auth import OVERWRITE, RESTORE, get_session
from vmkeep.server.console.paging import Paging, paging
from vmkeep.server.console.point_queries import find_point, names_with_points, restores, timeline
from vmkeep.server.console.render import page, roles, screen, span
from vmkeep.server.console.session import Refused, Visitor, changing, form_fields, person
from vmkeep.server.restore_choices import ChoicesOut, restore_choices
from vmkeep.server.routes_restore import RestoreIn, RestoreRefused, begin_restore, follow_up

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

NAME_RULE = "1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
FIELD_RULES = {"as_name": f"A VM name is {NAME_RULE}.",
               "storage": "Storage is an absolute directory (it starts with /), at most 1000 characters.",
               "file": f"A file name is {NAME_RULE}: no '/'.",
               "format": "The format is qcow2 or raw.",
               "network": "A network's name is at most 200 characters, without control characters.",
               "host": "A host's name is at most 200 characters, without control characters."}
FILE_FIELDS = {"storage": "directory"}  # the API's field → the wizard's control, for a disk to a file
INSTANT_FIELDS = {"as_name": "instant_name"}  # … and for an instant recovery


@router.get("/points")
def points_page(request: Request, q: str = Query("", max_length=200), where: Paging = Depends(paging),
                who: Visitor = Depends(person), session: Session = Depends(get_session)) -> Response:
    where.filters = {"q": q}
    names = names_with_points(session, q.strip(), where)
    return screen(request, who, "points.html", "points", {"names": names, "q": q, "paging": where})


@router.get("/points/vm/{name}")
def timeline_page(request: Request, name: str, where: Paging = Depends(paging), who: Visitor = Depends(person),
                  session: Session = Depends(get_session)) -> Response:
    points = timeline(session, name, where)
    status = 200 if where.total else 404
    return screen(request, who, "point_timeline.html", "points", {"name": name, "points": points, "paging": where},
                  status)


def _hypervisors(session: Session) -> list[Hypervisor]:
    return list(session.scalars(select(Hypervisor).order_by(Hypervisor.name)))


def _home(session: Session, vm: str) -> str | None:
    """The hypervisor where a VM of that name is now (the wizard's first choice)."""
    return session.scalar(select(Hypervisor.name).join(VirtualMachine).where(
        VirtualMachine.name == vm, VirtualMachine.present.is_(True)).order_by(Hypervisor.name).limit(1))


def _wizard(request: Request, who: Visitor, session: Session, name: str, point_id: str, form: dict[str, str],
            errors: dict[str, str], status: int = 200) -> Response:
    found = find_point(session, name, point_id)
    if found is None:
        return screen(request, who, "restore_wizard.html", "points",
                      {"name": name, "point": None, "point_id": point_id}, 404)
    hypervisors = _hypervisors(session)
    chosen = form.get("hypervisor") or _home(session, name) or (hypervisors[0].name if hypervisors else "")
    locations = next((h.restore_locations for h in hypervisors if h.name == chosen), [])
    return screen(request, who, "restore_wizard.html", "points", {
        "name": name, "point": found[0], "repository": found[1], "hypervisors": hypervisors, "chosen": chosen,
        "locations": locations, "form": form, "errors": errors}, status)


@router.get("/points/vm/{name}/restore")
def wizard_page(request: Request, name: str, point: str = Query(max_length=64), who: Visitor = Depends(person),
                session: Session = Depends(get_session)) -> Response:
    if who.user.role not in RESTORE:
        raise Refused(f"A {who.user.role} account may look at restore points but not restore them: "
                      "ask an administrator, an operator or a restore-only user.")
    return _wizard(request, who, session, name, point, {"mode": "as-new", "start": "on", "format": "qcow2"}, {})


@router.get("/points/restore-locations")
def locations_part(request: Request, hypervisor: str = Query("", max_length=200), _who: Visitor = Depends(person),
                   session: Session = Depends(get_session)) -> Response:
    """The storage choices of the hypervisor the wizard has selected (htmx swaps them in)."""
    found = session.scalar(select(Hypervisor).where(Hypervisor.name == hypervisor))
    return page(request, "restore_locations.html", {"locations": found.restore_locations if found else [],
                                                    "chosen": hypervisor})


@router.get("/points/restore-choices")
async def choices_part(request: Request, hypervisor: str = Query("", max_length=200),
                       network: str = Query("", max_length=200), host: str = Query("", max_length=200),
                       who: Visitor = Depends(person), session: Session = Depends(get_session)) -> Response:
    """The network (and host) selects of the hypervisor the wizard has selected, asked of the
    hypervisor (restore_choices: a few seconds at most; text fields when it cannot say)."""
    if who.user.role not in RESTORE:
        raise Refused(f"A {who.user.role} account cannot restore: ask an administrator, an operator or a "
                      "restore-only user.")
    found = session.scalar(select(Hypervisor).where(Hypervisor.name == hypervisor))
    choices = await restore_choices(found) if found is not None else ChoicesOut(
        hypervisor=hypervisor, networks=[], hosts=[], folders=[], error=f"There is no hypervisor {hypervisor}.")
    return page(request, "restore_place.html", {"choices": choices, "form": {"network": network, "host": host}})


def _restore_body(name: str, form: dict[str, str]) -> tuple[RestoreIn | None, dict[str, str]]:
    """The API's request from the wizard's fields, or the errors to show beside them."""
    mode = form.get("mode", "as-new")
    if mode == "disk-file":
        return _file_body(name, form)
    if mode == "instant":
        return _instant_body(name, form)
    overwrite = mode == "overwrite"
    as_name = None if overwrite else form.get("as_name", "").strip()
    if as_name == "":
        return None, {"as_name": "Enter the new VM's name (" + NAME_RULE + ")."}
    storage = form.get("storage", "").strip() or None
    return _validated(lambda: RestoreIn(
        vm=name, point=form.get("point") or None, hypervisor=form.get("hypervisor", ""), as_name=as_name,
        overwrite=overwrite, storage=None if overwrite else storage,
        start=not overwrite and form.get("start") == "on",
        network=None if overwrite else form.get("network", "").strip() or None,  # "": the original's
        host=None if overwrite else form.get("host", "").strip() or None))


def _instant_body(name: str, form: dict[str, str]) -> tuple[RestoreIn | None, dict[str, str]]:
    """An instant recovery: the VM's name is the API's as_name."""
    run_as = form.get("instant_name", "").strip()
    if not run_as:
        return None, {"instant_name": "Enter the name the VM runs under (" + NAME_RULE + ")."}
    body, errors = _validated(lambda: RestoreIn(vm=name, point=form.get("point") or None, mode="instant",
                                                hypervisor=form.get("hypervisor", ""), as_name=run_as))
    return body, {INSTANT_FIELDS.get(field, field): words for field, words in errors.items()}


def _file_body(name: str, form: dict[str, str]) -> tuple[RestoreIn | None, dict[str, str]]:
    """One disk to a file: the directory is the API's storage, the file name its file."""
    missing = {field: words for field, words in (("directory", "Enter the directory the file goes in."),
                                                 ("file", "Enter the file's name."))
               if not form.get(field, "").strip()}
    if missing:
        return None, missing
    body, errors = _validated(lambda: RestoreIn(
        vm=name, point=form.get("point") or None, hypervisor=form.get("hypervisor", ""), mode="disk-file",
        disk=form.get("disk") or None, file=form.get("file", "").strip(),
        format=form.get("format", "qcow2"),  # type: ignore[arg-type]  # checked by the model
        storage=form.get("directory", "").strip()))
    return body, {FILE_FIELDS.get(field, field): words for field, words in errors.items()}


def _validated(build: Callable[[], RestoreIn]) -> tuple[RestoreIn | None, dict[str, str]]:
    try:
        return build(), {}
    except ValidationError as exc:
        errors: dict[str, str] = {}
        for problem in exc.errors():
            field = str(problem["loc"][0]) if problem["loc"] else "mode"
            errors.setdefault(field, FIELD_RULES.get(field, f"{field}: {problem['msg']}"))
        return None, errors


@router.post("/points/vm/{name}/restore")
async def start_restore(request: Request, name: str, who: Visitor = Depends(changing),
                        session: Session = Depends(get_session)) -> Response:
    """Start the restore the wizard describes; on success to its page, else the wizard again with
    the error beside the control (nothing created)."""
    if who.user.role not in RESTORE:
        raise Refused(f"A {who.user.role} account cannot restore: ask an administrator, an operator or a "
                      "restore-only user.")
    form = await form_fields(request)
    point_id = form.get("point", "")
    body, errors = _restore_body(name, form)
    if body is not None and body.overwrite and who.user.role in OVERWRITE and form.get("confirm", "").strip() != name:
        errors = {"confirm": f"Type the VM's name, {name}, to confirm that it is to be overwritten."}
    if errors or body is None:
        return _wizard(request, who, session, name, point_id, form, errors, 400)
    try:
        job = await begin_restore(session, request, who.user, body)
    except RestoreRefused as refused:
        session.rollback()
        fields = {"disk-file": FILE_FIELDS, "instant": INSTANT_FIELDS}.get(body.mode or "", {})
        field = fields.get(refused.field, refused.field)
        return _wizard(request, who, session, name, point_id, form, {field: str(refused)}, refused.status)
    log.info("console restore %d started by %s: %s@%s %s", job.id, who.user.name, name, job.point_id, job.mode)
    return RedirectResponse(f"/restores/{job.id}", status_code=303)


@router.get("/restores")
def restores_page(request: Request, where: Paging = Depends(paging), who: Visitor = Depends(person),
                  session: Session = Depends(get_session)) -> Response:
    return screen(request, who, "restores.html", "points", {"restores": restores(session, where), "paging": where})


def _progress(job: RestoreJob, seen: int | None, seen_at: float | None, rate: float | None,
              errors: dict[str, str] | None = None) -> dict[str, Any]:
    """What the progress part shows: the rate over the last poll, smoothed with the one before
    (the poll carries its sample in its URL: nothing is kept on the server)."""
    now, done = time.time(), job.progress_bytes or 0
    if seen is not None and seen_at is not None and now > seen_at and done >= seen:
        sample = (done - seen) / (now - seen_at)
        rate = sample if rate is None else (rate + sample) / 2
    remaining = (job.total_bytes - done) if job.total_bytes else None
    eta = remaining / rate if rate and remaining is not None and job.status in ACTIVE else None
    percent = 100.0 * done / job.total_bytes if job.total_bytes else None
    locations = job.hypervisor.restore_locations if job.hypervisor is not None and job.status == INSTANT else []
    return {"job": job, "live": job.status in ACTIVE, "rate": rate, "eta": span(eta), "percent": percent,
            "done": done, "now": now, "locations": locations, "errors": errors or {}}


def _restore(session: Session, restore_id: int) -> RestoreJob | None:
    return session.get(RestoreJob, restore_id) if 0 < restore_id < 2**31 else None


@router.get("/restores/{restore_id}")
def restore_page(request: Request, restore_id: int, who: Visitor = Depends(person),
                 session: Session = Depends(get_session)) -> Response:
    job = _restore(session, restore_id)
    if job is None:
        return screen(request, who, "restore.html", "points", {"job": None, "restore_id": restore_id}, 404)
    return screen(request, who, "restore.html", "points", _progress(job, None, None, None))


@router.get("/restores/{restore_id}/progress")
def progress_part(request: Request, restore_id: int, seen: int | None = Query(None, ge=0),
                  at: float | None = Query(None), rate: float | None = Query(None, ge=0),
                  who: Visitor = Depends(person), session: Session = Depends(get_session)) -> Response:
    """The restore's status and progress alone, which its page polls while it runs."""
    job = _restore(session, restore_id)
    if job is None:  # swapped in place of the polled part (no trigger on it): the polling ends
        return page(request, "refused_part.html", {"message": f"Restore {restore_id} is gone."}, 404)
    return page(request, "restore_progress.html", {"who": who, **roles(who), **_progress(job, seen, at, rate)})


@router.post("/restores/{restore_id}/{step}")
async def instant_step(request: Request, restore_id: int, step: str, who: Visitor = Depends(changing),
                       session: Session = Depends(get_session)) -> Response:
    """Finish (to the storage given) or discard an instant recovery: the API's own follow-up (same
    checks, same proxy, same audit entry); refused beside the control otherwise."""
    if step not in ("finish", "discard"):
        return screen(request, who, "restore.html", "points", {"job": None, "restore_id": restore_id}, 404)
    if who.user.role not in RESTORE:
        raise Refused(f"A {who.user.role} account cannot finish or discard a recovery: ask an administrator, an "
                      "operator or a restore-only user.")
    form = await form_fields(request)
    job = _restore(session, restore_id)
    if job is None:
        return screen(request, who, "restore.html", "points", {"job": None, "restore_id": restore_id}, 404)
    storage = form.get("storage", "").strip() if step == "finish" else None
    errors: dict[str, str] = {}
    status = 400
    if step == "finish" and not re.fullmatch(r"/.{0,999}", storage or "", re.DOTALL):
        errors = {"storage": "Enter the directory the disks move to (an absolute path inside a restore location)."}
    else:
        try:
            await follow_up(session, request, who.user, restore_id, step, storage)
            log.info("console: %s of instant recovery %d asked by %s", step, restore_id, who.user.name)
            return RedirectResponse(f"/restores/{restore_id}", status_code=303)
        except RestoreRefused as refused:
            session.rollback()
            errors, status = {refused.field: str(refused)}, refused.status
    session.refresh(job)
    return screen(request, who, "restore.html", "points", _progress(job, None, None, None, errors), status)
