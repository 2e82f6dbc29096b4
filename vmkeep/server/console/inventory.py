"""Inventory: hypervisors, hosts and VMs as a tree, with filters, search and the protect action.

Every change goes through the API's own functions (``add_hypervisor_as``, ``discover_as``,
``delete_hypervisor_as``, ``change_policy_as``): the same checks, errors and audit entries. The
forms are plain POSTs that work without JavaScript; an error comes back beside its control with
the API's status code.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Hypervisor, Policy, VirtualMachine
from vmkeep.server.auth import CHANGE_INVENTORY, get_session
from vmkeep.server.console.inventory_view import PROTECTION, Filters, inventory
from vmkeep.server.console.paging import MAX_PER_PAGE, PER_PAGE, Paging, paging
from vmkeep.server.console.people import removed
from vmkeep.server.console.render import screen
from vmkeep.server.console.session import Refused, Visitor, changing, form_fields, person
from vmkeep.server.dispatch import picks
from vmkeep.server.routes_inventory import add_hypervisor_as, delete_hypervisor_as, discover_as
from vmkeep.server.routes_jobs import PolicyIn, _policy_out, change_policy_as
from vmkeep.server.schemas import HypervisorIn

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

ADD_FIELDS = ("name", "kind", "uri", "username", "discovery_minutes")  # echoed back (never the password)
BLANK_FORM = {"name": "", "kind": "libvirt", "uri": "", "username": "", "discovery_minutes": "60"}
MAY_NOT = "Your role may look at the inventory but not change it: an administrator or operator does that."
# where an API refusal of a new hypervisor belongs: 403 allowances, 409 its name, 400 its address
STATUS_FIELD = {403: "allow", 409: "name", 400: "uri"}


def may_change(who: Visitor) -> None:
    """The API's rule for hypervisors, discovery and policies, checked before anything is read."""
    if who.user.role not in CHANGE_INVENTORY:
        raise Refused(MAY_NOT)


def filters_of(q: str = Query("", max_length=200), hypervisor: str = Query("", max_length=200),
               host: str = Query("", max_length=200), state: str = Query("", max_length=40),
               protection: str = Query("", max_length=20)) -> Filters:
    """The list's filters from the query string (a FastAPI dependency)."""
    return Filters(q.strip(), hypervisor, host, state, protection if protection in PROTECTION else "")


def back_to(back: str) -> tuple[Filters, Paging]:
    """The filters and page a form was posted from (its hidden ``back`` field: the page's query)."""
    fields = {k: v[0] for k, v in parse_qs(back[:2000]).items()}

    def number(key: str, default: int, top: int) -> int:
        text = fields.get(key, "")
        return min(max(int(text), 1), top) if text.isdigit() else default

    protection = fields.get("protection", "")
    filters = Filters(fields.get("q", "")[:200].strip(), fields.get("hypervisor", "")[:200],
                      fields.get("host", "")[:200], fields.get("state", "")[:40],
                      protection if protection in PROTECTION else "")
    return filters, Paging(number("page", 1, 1_000_000), number("per_page", PER_PAGE, MAX_PER_PAGE))


def show(request: Request, who: Visitor, session: Session, filters: Filters, page: Paging, status: int = 200,
         **context: Any) -> HTMLResponse:
    """The inventory page, with whatever a form's answer adds (notice, errors, discovery result)."""
    view = inventory(session, filters, page)
    back = page.link(page.number)[1:]
    return screen(request, who, "inventory.html", "inventory",
                  {"inv": view, "back": back, "form": BLANK_FORM, "errors": {}, "notice": None, "discovery": None,
                   "protect": None, **context}, status)


@router.get("/inventory")
def inventory_page(request: Request, who: Visitor = Depends(person), filters: Filters = Depends(filters_of),
                   page: Paging = Depends(paging), added: str = Query("", max_length=200),
                   deleted: str = Query("", max_length=200), session: Session = Depends(get_session)) -> Response:
    notice = None
    if added and session.scalar(select(Hypervisor.id).where(Hypervisor.name == added)) is not None:
        notice = f"Hypervisor {added} added. Press “Discover now” beside it to read its VMs."
    elif deleted:
        notice = f"Hypervisor {deleted} deleted; its VMs left the catalog, their restore points stay."
    return show(request, who, session, filters, page, notice=notice)


def validation_errors(exc: ValidationError) -> dict[str, str]:
    """Pydantic's complaints about HypervisorIn as one message per form field; a check of the
    whole body (the address and its kind) belongs to the address."""
    errors: dict[str, str] = {}
    for error in exc.errors():
        where = str(error["loc"][0]) if error["loc"] else "uri"
        message = str(error["msg"]).removeprefix("Value error, ")
        if where == "name" and error["type"] == "string_pattern_mismatch":
            message = "Use up to 100 letters, digits, dots, dashes or underscores, starting with a letter or digit."
        errors.setdefault(where, message)
    return errors


@router.post("/inventory/hypervisors")
def add_hypervisor(request: Request, who: Visitor = Depends(changing), fields: dict[str, str] = Depends(form_fields),
                   session: Session = Depends(get_session)) -> Response:
    """Register a hypervisor from the form (its password sealed by the API's logic)."""
    may_change(who)
    form: dict[str, Any] = {k: fields.get(k, "").strip() for k in ADD_FIELDS}
    form.update(allow_plain_tcp="allow_plain_tcp" in fields, allow_unsafe_options="allow_unsafe_options" in fields)
    errors: dict[str, str] = {}
    minutes = form["discovery_minutes"] or "60"
    if not minutes.isdigit():
        errors["discovery_minutes"] = "Enter whole minutes between discoveries, e.g. 60."
    status = 422
    if not errors:
        try:
            body = HypervisorIn(name=form["name"], kind=form["kind"], uri=form["uri"],
                                username=form["username"] or None,
                                password=fields.get("password") or None, discovery_minutes=int(minutes),
                                allow_plain_tcp=form["allow_plain_tcp"],
                                allow_unsafe_options=form["allow_unsafe_options"])
            add_hypervisor_as(session, request, who.user, body)
        except ValidationError as exc:
            errors = validation_errors(exc)
        except HTTPException as exc:
            session.rollback()
            status, errors = exc.status_code, {STATUS_FIELD.get(exc.status_code, "uri"): str(exc.detail)}
    if errors:
        log.info("console: hypervisor %r not added: %s", form["name"], errors)
        filters, page = back_to(fields.get("back", ""))
        return show(request, who, session, filters, page, status, form=form, errors=errors)
    log.info("console: %s added hypervisor %s (%s)", who.user.name, form["name"], form["uri"])
    return RedirectResponse(f"/inventory?{urlencode({'added': form['name']})}", status_code=303)


@router.post("/inventory/hypervisors/{name}/discover")
async def discover(name: str, request: Request, who: Visitor = Depends(changing),
                   fields: dict[str, str] = Depends(form_fields), session: Session = Depends(get_session)) -> Response:
    """Discovery now, as the API runs it; the page shows what it found, or the hypervisor's error."""
    may_change(who)
    status = 200
    try:
        report = await discover_as(session, request, who.user.name, name)
        result = {"name": name, "error": False,
                  "text": f"Found {report.vms} VMs: {report.new} new, {report.gone} gone."}
    except HTTPException as exc:
        session.rollback()
        status, result = exc.status_code, {"name": name, "error": True, "text": str(exc.detail)}
    filters, page = back_to(fields.get("back", ""))
    return await run_in_threadpool(show, request, who, session, filters, page, status, discovery=result)


@router.get("/inventory/hypervisors/{name}/delete")
def confirm_delete(name: str, request: Request, who: Visitor = Depends(person),
                   session: Session = Depends(get_session)) -> Response:
    """The confirmation step: what goes with the hypervisor, and the button that deletes it."""
    may_change(who)
    return deletion(request, who, session, name)


def deletion(request: Request, who: Visitor, session: Session, name: str, error: str | None = None,
             status: int = 200) -> Response:
    h = session.scalar(select(Hypervisor).where(Hypervisor.name == name))
    if h is None:
        return screen(request, who, "inventory_delete.html", "inventory",
                      {"name": name, "h": None, "vms": 0, "error": f"There is no hypervisor {name} (any more)."}, 404)
    vms = session.scalar(select(func.count()).select_from(VirtualMachine).where(
        VirtualMachine.hypervisor_id == h.id, VirtualMachine.present.is_(True))) or 0
    return screen(request, who, "inventory_delete.html", "inventory",
                  {"name": name, "h": h, "vms": vms, "error": error}, status)


@router.post("/inventory/hypervisors/{name}/delete")
def delete(name: str, request: Request, who: Visitor = Depends(changing),
           session: Session = Depends(get_session)) -> Response:
    may_change(who)
    return removed(who, session, f"hypervisor {name}",
                   lambda: delete_hypervisor_as(session, request, who.user.name, name),
                   lambda error, status: deletion(request, who, session, name, error, status),
                   f"/inventory?{urlencode({'deleted': name})}")


def protect_vm(session: Session, request: Request, who: Visitor, vm: VirtualMachine, policy_name: str) -> str:
    """Add ``vm`` to the names ``policy_name`` selects, through the API's policy change (same
    checks and audit); what happened, in words. HTTPException when it cannot be done."""
    policy = session.scalar(select(Policy).where(Policy.name == policy_name))
    if policy is None:
        raise HTTPException(400, "Choose one of the policies (or create one on the Policies page).")
    hypervisor = vm.hypervisor.name
    rules = policy.selection
    if picks(rules, vm, hypervisor):
        return f"{vm.name} is protected by policy {policy.name} already."
    wanted = {**rules, "vms": [*rules.get("vms", []), vm.name]}
    if not picks(wanted, vm, hypervisor):
        limits = "; ".join(f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}"
                           for k, v in rules.items() if k in ("hypervisor", "hosts", "tags", "folders") and v)
        raise HTTPException(409, f"Policy {policy.name} only selects VMs with {limits}, and {vm.name} is not one "
                                 "of them: change its rules on the Policies page, or choose another policy.")
    current = _policy_out(policy).model_dump(include=set(PolicyIn.model_fields))
    try:
        body = PolicyIn.model_validate({**current, "vms": wanted["vms"]})
    except ValidationError as exc:
        raise HTTPException(422, f"Policy {policy.name} does not pass the API's checks as it is stored: "
                                 f"{exc.errors()[0]['msg']}; fix it on the Policies page.") from None
    change_policy_as(session, request, who.user.name, policy.name, body)
    log.info("console: %s added VM %s to policy %s", who.user.name, vm.name, policy.name)
    return f"{vm.name} added to policy {policy.name}: its next run backs it up."


@router.post("/inventory/vms/{vm_id}/protect")
def protect(vm_id: int, request: Request, who: Visitor = Depends(changing),
            fields: dict[str, str] = Depends(form_fields), session: Session = Depends(get_session)) -> Response:
    """Add the VM to an existing policy's selection (PUT /api/policies/{name}'s logic and audit)."""
    may_change(who)
    filters, page = back_to(fields.get("back", ""))
    vm = session.get(VirtualMachine, vm_id) if 0 < vm_id < 2**31 else None
    if vm is None:
        return show(request, who, session, filters, page, 404,
                    notice="That VM is no longer in the catalog: discovery removed it.")
    try:
        message = protect_vm(session, request, who, vm, fields.get("policy", ""))
    except HTTPException as exc:
        session.rollback()
        return show(request, who, session, filters, page, exc.status_code,
                    protect={"vm": vm_id, "error": True, "text": str(exc.detail)})
    return show(request, who, session, filters, page, protect={"vm": vm_id, "error": False, "text": message})
