"""The console's routes: login, logout and the dashboard. None of them is in the OpenAPI schema:
the API is the documented interface, the console one of its faces."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session

from vmkeep.server.auth import EVERYONE, get_session, token_user
from vmkeep.server.console.dashboard import dashboard, running_jobs
from vmkeep.server.console.render import page, screen
from vmkeep.server.console.session import (
    COOKIE,
    Visitor,
    changing,
    clear_session_cookie,
    person,
    same_site_form,
    set_session_cookie,
)
from vmkeep.server.logins import LoginRefused, log_in, log_out

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)


@router.get("/login")
def login_page(request: Request, session: Session = Depends(get_session)) -> Response:
    found = token_user(session, request.cookies.get(COOKIE))
    if found is not None and found[1].role in EVERYONE:
        return RedirectResponse("/", status_code=303)
    return page(request, "login.html", {"name": "", "error": None})


@router.post("/login")
def login(request: Request, fields: dict[str, str] = Depends(same_site_form),
          session: Session = Depends(get_session)) -> Response:
    """The API's login (same throttle, same audit entries); the token goes into the session cookie.
    Not async: argon2 and the catalog run in the thread pool, as the API's login does."""
    name, password = fields.get("name", "").strip(), fields.get("password", "")
    if not name or not password:
        return page(request, "login.html", {"name": name, "error": "Enter your user name and password."}, 400)
    try:
        token, _expires = log_in(session, request, name, password, token_name="console")
    except LoginRefused as refused:
        headers = {"Retry-After": str(refused.retry_after)} if refused.retry_after is not None else None
        message = ("Wrong user name or password." if refused.status == 401
                   else f"Too many failed logins: try again in {refused.retry_after} seconds.")
        return page(request, "login.html", {"name": name, "error": message}, refused.status, headers)
    found = token_user(session, token)
    if found is None or found[1].role not in EVERYONE:  # a proxy account: its new token goes again at once
        if found is not None:
            log_out(session, request, found[1], found[0].id)
        message = "This account cannot use the console (proxy accounts only register and heartbeat)."
        return page(request, "login.html", {"name": name, "error": message}, 403)
    log.info("console login: %s", name)
    response = RedirectResponse("/", status_code=303)
    set_session_cookie(response, request, token)
    return response


@router.post("/logout")
def logout(request: Request, who: Visitor = Depends(changing), session: Session = Depends(get_session)) -> Response:
    log_out(session, request, who.user, who.token_id)
    response = RedirectResponse("/login", status_code=303)
    clear_session_cookie(response, request)
    return response


@router.get("/")
def dashboard_page(request: Request, who: Visitor = Depends(person), session: Session = Depends(get_session),
                   ) -> Response:
    return screen(request, who, "dashboard.html", "dashboard", {"board": dashboard(session)})


@router.get("/dashboard/running")
def running_part(request: Request, _who: Visitor = Depends(person), session: Session = Depends(get_session),
                 ) -> Response:
    """The running-jobs panel alone, which the dashboard polls (htmx) while it is open."""
    return page(request, "running.html", {"running": running_jobs(session)})
