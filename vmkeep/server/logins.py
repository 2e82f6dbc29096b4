"""Logging in and out, shared by the API (bearer tokens) and the console (a session cookie), so both
go through the same throttle, the same checks and the same audit entries."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import ApiToken, User
from vmkeep.server import audit
from vmkeep.server.auth import LOGIN_HOURS, issue_token, login_matches
from vmkeep.server.client_address import client_address
from vmkeep.server.login_guard import LoginGuard

log = logging.getLogger(__name__)


class LoginRefused(Exception):
    """A login that did not happen: ``status`` 401 (wrong name or password) or 429 (throttled,
    ``retry_after`` seconds)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


def log_in(session: Session, request: Request, name: str, password: str, token_name: str = "login",
           ) -> tuple[str, datetime]:
    """A 12-hour token for ``name`` and when it expires, audited; raises :class:`LoginRefused`."""
    guard: LoginGuard = request.app.state.login_guard
    address = client_address(request)
    wait = guard.attempt(name, address)  # counted as failed from here until the password matches
    if wait:
        raise LoginRefused(429, f"too many failed logins for this user or from this address: retry in {wait} s",
                           retry_after=wait)
    user = session.scalar(select(User).where(User.name == name))
    if not login_matches(user, password) or user is None:  # an unknown name costs one argon2 check too
        audit.record(session, request, name, "login-failed", name)
        session.commit()
        raise LoginRefused(401, "wrong user name or password")
    guard.succeeded(user.name, address)
    token, expires = issue_token(session, user, token_name, timedelta(hours=LOGIN_HOURS))
    audit.record(session, request, user.name, "login", user.name)
    session.commit()
    return token, expires


def log_out(session: Session, request: Request, user: User, token_id: int) -> None:
    """Revoke one token (the one the request came with), audited."""
    token = session.get(ApiToken, token_id)
    if token is not None:
        session.delete(token)
        audit.record(session, request, user.name, "logout", token.name)
        session.commit()
