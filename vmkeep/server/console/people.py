"""The audit log (admin, auditor) and users and tokens (admin).

Every change goes through the API's own functions (routes_access), so the checks, the errors and
the audit entries are the API's; the roles are checked here again, whatever the page offered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi import Path as FastPath
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import AuditEntry, User
from vmkeep.server.auth import ADMIN, READ_AUDIT, ROLES, get_session
from vmkeep.server.console.paging import Paging, paging
from vmkeep.server.console.render import page, screen
from vmkeep.server.console.session import Refused, Visitor, changing, form_fields, person
from vmkeep.server.routes_access import (
    add_user,
    audit_filter,
    chain_report,
    new_token,
    remove_user,
    revoke,
    token_query,
    tokens_of,
)
from vmkeep.server.schemas import AuditVerifyOut, TokenOut, TokenRequest, UserIn

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

RECENT = 5000  # the action filter suggests the actions among this many newest entries (not a scan of the log)

# what a form field's rule means, in words (the API's 422 speaks of patterns)
FIELD_RULES = {
    "name": "Use 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit.",
    "password": "A password has at least 8 characters (at most 1000).",
    "role": "Choose one of the roles.",
    "days": "A lifetime is a whole number of days from 1 on.",
}


def said(exc: HTTPException) -> str:
    """An API refusal as a sentence beside the control: 'user x exists' → 'User x exists.'"""
    text = str(exc.detail)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def field_errors(exc: ValidationError) -> dict[str, str]:
    """The API model's refusals by form field, in the words of FIELD_RULES."""
    return {str(e["loc"][0]): FIELD_RULES.get(str(e["loc"][0]), e["msg"]) for e in exc.errors() if e["loc"]}


def admin_only(who: Visitor) -> Visitor:
    if who.user.role != ADMIN:
        raise Refused("Only an administrator manages users and tokens.")
    return who


# --- the audit log ---------------------------------------------------------------------------

@dataclass
class AuditFilters:
    user: str = ""
    action: str = ""
    target: str = ""
    since: str = ""  # as the form sends them: datetime-local in the browser's zone
    until: str = ""
    zone: str = ""  # the browser's IANA zone (console.js fills it in; UTC without JavaScript)
    errors: dict[str, str] = field(default_factory=dict)

    def tz(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.zone) if self.zone else ZoneInfo("UTC")
        except (ZoneInfoNotFoundError, ValueError):
            return ZoneInfo("UTC")

    def instant(self, key: str) -> datetime | None:
        text = getattr(self, key)
        if not text:
            return None
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            self.errors[key] = "Enter a date and time, e.g. 2026-12-05T14:30."
            return None
        return (at if at.tzinfo else at.replace(tzinfo=self.tz())).astimezone(UTC)

    def as_dict(self) -> dict[str, str]:
        return {"user": self.user, "action": self.action, "target": self.target, "since": self.since,
                "until": self.until, "zone": self.zone}


def audit_filters(user: str = Query("", max_length=100), action: str = Query("", max_length=100),
                  target: str = Query("", max_length=500), since: str = Query("", max_length=40),
                  until: str = Query("", max_length=40), zone: str = Query("", max_length=60)) -> AuditFilters:
    return AuditFilters(user.strip(), action.strip(), target.strip(), since, until, zone)


def audit_page(session: Session, filters: AuditFilters, p: Paging) -> list[AuditEntry]:
    """One page of entries, newest first, counted and sliced in SQL (the log only grows)."""
    conditions = audit_filter(filters.user or None, filters.action or None, filters.instant("since"),
                              filters.instant("until"), filters.target or None)
    p.total = session.scalar(select(func.count()).select_from(AuditEntry).where(*conditions)) or 0
    p.filters = filters.as_dict()
    return list(session.scalars(select(AuditEntry).where(*conditions).order_by(AuditEntry.id.desc())
                                .offset(p.offset).limit(p.per_page)))


def auditor(who: Visitor) -> Visitor:
    if who.user.role not in READ_AUDIT:
        raise Refused("Only an administrator or an auditor reads the audit log.")
    return who


def audit_screen(request: Request, who: Visitor, session: Session, filters: AuditFilters, p: Paging,
                 verified: AuditVerifyOut | None = None) -> Response:
    entries = audit_page(session, filters, p)
    names = list(session.scalars(select(User.name).order_by(User.name)))  # a few: suggestions for the filter
    recent = select(AuditEntry.action).order_by(AuditEntry.id.desc()).limit(RECENT).subquery()
    actions = list(session.scalars(select(recent.c.action).distinct().order_by(recent.c.action)))
    return screen(request, who, "audit.html", "audit",
                  {"entries": entries, "p": p, "f": filters, "names": names, "actions": actions,
                   "verified": verified},
                  400 if filters.errors else 200)


@router.get("/audit")
def audit_log(request: Request, filters: AuditFilters = Depends(audit_filters), p: Paging = Depends(paging),
              who: Visitor = Depends(person), session: Session = Depends(get_session)) -> Response:
    return audit_screen(request, auditor(who), session, filters, p)


@router.get("/audit/verify")
def audit_verify(request: Request, filters: AuditFilters = Depends(audit_filters), p: Paging = Depends(paging),
                 who: Visitor = Depends(person), session: Session = Depends(get_session)) -> Response:
    """GET /api/audit/verify's check: the result alone for htmx, else the audit page with it."""
    auditor(who)
    verified = chain_report(session)
    log.info("console: %s verified the audit chain: %d entries, ok=%s", who.user.name, verified.entries, verified.ok)
    if request.headers.get("hx-request"):
        return page(request, "audit_verify.html", {"verified": verified})
    return audit_screen(request, who, session, filters, p, verified)


# --- users and tokens ------------------------------------------------------------------------

@dataclass
class UsersForm:
    """What the users page shows besides the lists: a form's values and errors, a new token."""

    new_user: dict[str, str] = field(default_factory=dict)
    user_errors: dict[str, str] = field(default_factory=dict)
    new_token: dict[str, str] = field(default_factory=dict)
    token_errors: dict[str, str] = field(default_factory=dict)
    issued: TokenOut | None = None  # shown once, right after it was made
    issued_name: str = ""
    notice: str = ""


def users_screen(request: Request, who: Visitor, session: Session, form: UsersForm, status: int = 200,
                 p: Paging | None = None) -> Response:
    """The users (a handful: people and proxies) and a page of everyone's tokens (scripts may hold many)."""
    users = list(session.scalars(select(User).order_by(User.name)))
    p = p or Paging()
    every = token_query(None)
    p.total = session.scalar(select(func.count()).select_from(every.subquery())) or 0
    tokens = tokens_of(session, None, who.token_id, every.offset(p.offset).limit(p.per_page))
    return screen(request, who, "users.html", "users",
                  {"users": users, "tokens": tokens, "p": p, "roles": ROLES, "form": form,
                   "longest": request.app.state.token_max_days}, status)


@router.get("/users")
def users_page(request: Request, added: str = "", deleted: str = "", revoked: str = "", p: Paging = Depends(paging),
               who: Visitor = Depends(person), session: Session = Depends(get_session)) -> Response:
    admin_only(who)
    # after a redirect: say what happened, but only what the catalog confirms (a link cannot make it say more)
    names = set(session.scalars(select(User.name)))
    notice = (f"User {added} added." if added in names
              else f"User {deleted} deleted." if deleted and deleted not in names
              else "Token revoked." if revoked else "")
    return users_screen(request, who, session, UsersForm(notice=notice), p=p)


@router.post("/users/add")
def user_add(request: Request, who: Visitor = Depends(changing), fields: dict[str, str] = Depends(form_fields),
             session: Session = Depends(get_session)) -> Response:
    """POST /api/users through the API's add_user; errors beside the fields, nothing created."""
    admin_only(who)
    values = {"name": fields.get("name", "").strip(), "role": fields.get("role", "")}
    errors: dict[str, str] = {}
    body = None
    try:
        body = UserIn(name=values["name"], role=values["role"], password=fields.get("password", ""))
    except ValidationError as exc:
        errors = field_errors(exc)
    if fields.get("password", "") != fields.get("password2", ""):
        errors["password2"] = "The two passwords differ: type the same one twice."
    if body is not None and not errors:
        try:
            add_user(session, request, who.user, body)
        except HTTPException as exc:
            session.rollback()
            errors["name"] = said(exc)
    if errors:
        log.info("console: user %s not added: %s", values["name"], errors)
        return users_screen(request, who, session, UsersForm(new_user=values, user_errors=errors),
                            409 if set(errors) == {"name"} and body is not None else 400)
    log.info("console: %s added user %s (%s)", who.user.name, values["name"], values["role"])
    return RedirectResponse(f"/users?added={values['name']}", status_code=303)


@router.get("/users/{name}/delete")
def user_delete_page(name: str, request: Request, who: Visitor = Depends(person),
                     session: Session = Depends(get_session)) -> Response:
    """The confirmation: whose account goes, with its tokens."""
    admin_only(who)
    return delete_screen(request, who, session, name, None, 200)


def delete_screen(request: Request, who: Visitor, session: Session, name: str, error: str | None,
                  status: int) -> Response:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        error, status = f"No user {name}: it is gone already.", 404
    tokens = tokens_of(session, user, who.token_id) if user is not None else []
    return screen(request, who, "user_delete.html", "users",
                  {"name": name, "user": user, "tokens": tokens, "error": error}, status)


@router.post("/users/{name}/delete")
def user_delete(name: str, request: Request, who: Visitor = Depends(changing),
                session: Session = Depends(get_session)) -> Response:
    """DELETE /api/users/{name}'s rules (not yourself, not the last administrator) and audit entry."""
    admin_only(who)
    return removed(who, session, f"user {name}", lambda: remove_user(session, request, who.user, name),
                   lambda error, status: delete_screen(request, who, session, name, error, status),
                   f"/users?deleted={name}")


def removed(who: Visitor, session: Session, what: str, remove: Callable[[], None],
            again: Callable[[str, int], Response], then: str) -> Response:
    """Run one of the API's removals: on to ``then``, or on its refusal the confirmation ``again``
    with the API's reason beside the button (and the transaction rolled back: nothing changed)."""
    try:
        remove()
    except HTTPException as exc:
        session.rollback()
        log.info("console: %s not deleted: %s", what, exc.detail)
        return again(said(exc), exc.status_code)
    log.info("console: %s deleted %s", who.user.name, what)
    return RedirectResponse(then, status_code=303)


@router.post("/tokens/create")
def token_create(request: Request, who: Visitor = Depends(changing), fields: dict[str, str] = Depends(form_fields),
                 session: Session = Depends(get_session)) -> Response:
    """POST /api/tokens for yourself; the token is in this answer only (the catalog keeps its digest)."""
    admin_only(who)
    values = {"token_name": fields.get("token_name", "").strip(), "days": fields.get("days", "").strip()}
    errors: dict[str, str] = {}
    body = None
    try:
        body = TokenRequest(name=values["token_name"], days=values["days"] or None)  # type: ignore[arg-type]
    except ValidationError as exc:
        errors = {("token_name" if k == "name" else k): v for k, v in field_errors(exc).items()}
    if body is None:
        return users_screen(request, who, session, UsersForm(new_token=values, token_errors=errors), 400)
    try:
        issued = new_token(session, request, who.user, body)
    except HTTPException as exc:  # longer than the server allows
        session.rollback()
        return users_screen(request, who, session, UsersForm(new_token=values, token_errors={"days": said(exc)}),
                            exc.status_code)
    log.info("console: %s created token %s", who.user.name, body.name)
    return users_screen(request, who, session, UsersForm(issued=issued, issued_name=body.name), 201)


@router.post("/tokens/{token_id}/revoke")
def token_revoke(token_id: Annotated[int, FastPath(ge=1, le=2**63 - 1)], request: Request,
                 who: Visitor = Depends(changing), session: Session = Depends(get_session)) -> Response:
    """DELETE /api/tokens/{id}: it stops working at once (your own session's too: back to the login)."""
    admin_only(who)
    mine = token_id == who.token_id
    try:
        revoke(session, request, who.user, token_id)
    except HTTPException as exc:
        session.rollback()
        return users_screen(request, who, session, UsersForm(token_errors={"revoke": said(exc)}), exc.status_code)
    log.info("console: %s revoked token %d", who.user.name, token_id)
    return RedirectResponse("/login" if mine else "/users?revoked=1", status_code=303)
