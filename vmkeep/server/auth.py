"""Who is calling: argon2 password hashes, bearer tokens kept only as SHA-256, and roles."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from vmkeep.catalog.models import ApiToken, User

ADMIN, OPERATOR, RESTORE_ONLY, AUDITOR, PROXY = "admin", "operator", "restore-only", "auditor", "proxy"
ROLES = (ADMIN, OPERATOR, RESTORE_ONLY, AUDITOR, PROXY)
EVERYONE = (ADMIN, OPERATOR, RESTORE_ONLY, AUDITOR)  # the people; a proxy account only registers and heartbeats
# registering hands out the catalog's database login (the task queue): admins and proxy accounts only
RUN_PROXY = (ADMIN, PROXY)
CHANGE_INVENTORY = (ADMIN, OPERATOR)  # hypervisors, repositories, discovery, policies, backups
READ_AUDIT = (ADMIN, AUDITOR)
RESTORE = (ADMIN, OPERATOR, RESTORE_ONLY)
OVERWRITE = (ADMIN, OPERATOR)  # putting a VM back over the original: not for restore-only
LOGIN_HOURS = 12
TOKEN_MAX_DAYS = 365  # the server's default longest token lifetime (`vmkeep server --token-max-days`)
TOKEN_PREFIX = "vk_"

_hasher = PasswordHasher()
_bearer = HTTPBearer(auto_error=False)
# checked against when the user does not exist, so that an unknown name costs what a known one does
_UNKNOWN_USER_HASH = _hasher.hash("vmkeep: no such user")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def password_matches(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def login_matches(user: User | None, password: str) -> bool:
    """Whether ``user`` may log in with ``password``; a missing or disabled user takes one argon2
    verification too, so the answer's time does not tell which names exist."""
    matches = password_matches(user.password_hash if user is not None else _UNKNOWN_USER_HASH, password)
    return matches and user is not None and not user.disabled


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(session: Session, user: User, name: str, lifetime: timedelta) -> tuple[str, datetime]:
    """A new bearer token for ``user`` and when it expires; the caller sees it once, the catalog
    keeps its digest. Every token expires."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires = datetime.now(UTC) + lifetime
    session.add(ApiToken(user_id=user.id, name=name, token_sha256=token_digest(token), expires=expires))
    return token, expires


def get_session(request: Request) -> Iterator[Session]:
    """One catalog session per request (closed by the dependency machinery)."""
    factory = request.app.state.sessions
    with factory() as session:
        yield session


def token_user(session: Session, raw: str | None) -> tuple[ApiToken, User] | None:
    """The token and its user when ``raw`` is a valid, unexpired token of an enabled user (its
    last use is recorded); None otherwise. The API's bearer tokens and the console's session
    cookie are both checked here."""
    if raw is None or not raw.startswith(TOKEN_PREFIX):
        return None
    row = session.execute(select(ApiToken, User).join(User).where(ApiToken.token_sha256 == token_digest(raw))).first()
    if row is None:
        return None
    token, user = row.tuple()
    now = datetime.now(UTC)
    if user.disabled or token.expires < now:
        return None
    token.last_used = now
    try:
        session.commit()
    except StaleDataError:  # revoked, or its user removed, since the row was read
        session.rollback()
        return None
    return token, user


def current_user(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer),
                 session: Session = Depends(get_session)) -> User:
    """The caller, from ``Authorization: Bearer``; 401 without a valid, unexpired token."""
    found = token_user(session, creds.credentials if creds is not None else None)
    if found is None:
        raise HTTPException(401, "a valid bearer token is needed: POST /api/auth/login",
                            headers={"WWW-Authenticate": "Bearer"})
    token, user = found
    request.state.user = user.name
    request.state.token_id = token.id
    return user


def require(*roles: str) -> Callable[..., User]:
    """A dependency admitting only these roles (403 for the others)."""
    def check(user: User = Depends(current_user)) -> User:
        if user.role not in roles:
            raise HTTPException(403, f"role {user.role} may not do this (needs {' or '.join(roles)})")
        return user
    return check
