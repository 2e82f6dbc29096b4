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

from vmkeep.catalog.models import ApiToken, User

ADMIN, OPERATOR, RESTORE_ONLY, AUDITOR, PROXY = "admin", "operator", "restore-only", "auditor", "proxy"
ROLES = (ADMIN, OPERATOR, RESTORE_ONLY, AUDITOR, PROXY)
EVERYONE = (ADMIN, OPERATOR, RESTORE_ONLY, AUDITOR)  # the people; a proxy account only registers and heartbeats
# registering hands out the catalog's database login (the task queue): admins and proxy accounts only
RUN_PROXY = (ADMIN, PROXY)
CHANGE_INVENTORY = (ADMIN, OPERATOR)  # hypervisors, repositories, discovery, policies, backups
READ_AUDIT = (ADMIN, AUDITOR)
RESTORE = (ADMIN, OPERATOR, RESTORE_ONLY)
LOGIN_HOURS = 12
TOKEN_PREFIX = "vk_"

_hasher = PasswordHasher()
_bearer = HTTPBearer(auto_error=False)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def password_matches(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(session: Session, user: User, name: str, lifetime: timedelta | None) -> str:
    """A new bearer token for ``user``; the caller sees it once, the catalog keeps its digest."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires = datetime.now(UTC) + lifetime if lifetime else None
    session.add(ApiToken(user_id=user.id, name=name, token_sha256=token_digest(token), expires=expires))
    return token


def get_session(request: Request) -> Iterator[Session]:
    """One catalog session per request (closed by the dependency machinery)."""
    factory = request.app.state.sessions
    with factory() as session:
        yield session


def current_user(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer),
                 session: Session = Depends(get_session)) -> User:
    """The caller, from ``Authorization: Bearer``; 401 without a valid, unexpired token."""
    unauthorized = HTTPException(401, "a valid bearer token is needed: POST /api/auth/login",
                                 headers={"WWW-Authenticate": "Bearer"})
    if creds is None or not creds.credentials.startswith(TOKEN_PREFIX):
        raise unauthorized
    row = session.execute(select(ApiToken, User).join(User).where(
        ApiToken.token_sha256 == token_digest(creds.credentials))).first()
    if row is None:
        raise unauthorized
    token, user = row.tuple()
    now = datetime.now(UTC)
    if user.disabled or (token.expires is not None and token.expires < now):
        raise unauthorized
    token.last_used = now
    session.commit()
    request.state.user = user.name
    return user


def require(*roles: str) -> Callable[..., User]:
    """A dependency admitting only these roles (403 for the others)."""
    def check(user: User = Depends(current_user)) -> User:
        if user.role not in roles:
            raise HTTPException(403, f"role {user.role} may not do this (needs {' or '.join(roles)})")
        return user
    return check
