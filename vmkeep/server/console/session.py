"""The console's session: the login token in a cookie, a CSRF token derived from it, and the
same-origin check of every POST.

The cookie holds an ordinary login token (vmkeep.server.auth), so expiry, revocation, disabling a
user and ``POST /api/auth/logout`` end a console session exactly as they end an API login. The CSRF
token is an HMAC of the session token: unguessable without the cookie, per session, nothing stored.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from fastapi import Depends, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session

from vmkeep.catalog.models import User
from vmkeep.server.auth import EVERYONE, LOGIN_HOURS, get_session, token_user

log = logging.getLogger(__name__)

COOKIE = "vmkeep_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


class LoginNeeded(Exception):
    """No valid session: the page answers with the login page instead."""


class Refused(Exception):
    """A console request refused with 403 before anything changed; the message says what to do."""


@dataclass
class Visitor:
    """The logged-in user of a console request, with what its forms must carry."""

    user: User
    token_id: int
    csrf: str


def csrf_for(session_token: str) -> str:
    return hmac.new(session_token.encode(), b"vmkeep console csrf", hashlib.sha256).hexdigest()


def set_session_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(COOKIE, token, max_age=LOGIN_HOURS * 3600, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")


def visitor(request: Request, session: Session = Depends(get_session)) -> Visitor:
    """The console's user from the session cookie; :class:`LoginNeeded` when it is missing, expired
    or revoked."""
    raw = request.cookies.get(COOKIE)
    found = token_user(session, raw)
    if found is None or raw is None:
        raise LoginNeeded
    token, user = found
    request.state.user = user.name
    request.state.token_id = token.id
    return Visitor(user, token.id, csrf_for(raw))


def person(who: Visitor = Depends(visitor)) -> Visitor:
    """A visitor whose role may read the catalog: a proxy account only registers and heartbeats,
    in the console as in the API."""
    if who.user.role not in EVERYONE:
        raise Refused(f"A {who.user.role} account cannot use the console: log in with a person's account.")
    return who


def same_origin(request: Request) -> bool:
    """Whether the request's Origin (or, without one, its Referer) names this server. Browsers send
    Origin with every POST; a request with neither is refused. The host is compared, not the scheme:
    behind a TLS-terminating reverse proxy the console sees http while the browser says https."""
    claimed = request.headers.get("origin") or request.headers.get("referer")
    if not claimed or claimed == "null":
        return False
    parts = urlsplit(claimed)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == request.headers.get("host", "").lower()


def refuse_cross_site(request: Request) -> None:
    """403 for a POST that does not come from the console's own pages."""
    if not same_origin(request):
        log.warning("refused a console %s %s from origin %r", request.method, request.url.path,
                    request.headers.get("origin") or request.headers.get("referer"))
        raise Refused("This request did not come from the console's own pages: open the console and try again there.")


async def form_fields(request: Request) -> dict[str, str]:
    """A URL-encoded form's fields (the body is small: RequestSizeLimit has bounded it)."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    parsed = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items()}


async def same_site_form(request: Request) -> dict[str, str]:
    """The fields of a POST from the console's own pages (403 for any other)."""
    refuse_cross_site(request)
    return await form_fields(request)


async def changing(request: Request, who: Visitor = Depends(visitor)) -> Visitor:
    """The user of a POST that changes something: same origin, and the session's CSRF token in the
    form field or the htmx header, or 403 before anything changes."""
    refuse_cross_site(request)
    sent = request.headers.get(CSRF_HEADER) or (await form_fields(request)).get(CSRF_FIELD, "")
    if not hmac.compare_digest(sent.encode(), who.csrf.encode()):
        log.warning("refused a console %s %s without a valid CSRF token (user %s)", request.method,
                    request.url.path, who.user.name)
        raise Refused("The form's security token is missing or stale: reload the page and try again.")
    return who


async def back_to_login(request: Request, _exc: LoginNeeded) -> Response:
    """To the login page; an htmx request is told to go there (it would swap the page into a part)."""
    if request.headers.get("hx-request"):
        response: Response = Response(status_code=204, headers={"HX-Redirect": "/login"})
    else:
        response = RedirectResponse("/login", status_code=303)
    if COOKIE in request.cookies:
        clear_session_cookie(response, request)
    return response
