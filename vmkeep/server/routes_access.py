"""Logging in, tokens, users and the audit log."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import AuditEntry, User
from vmkeep.server import audit
from vmkeep.server.auth import (
    ADMIN,
    LOGIN_HOURS,
    READ_AUDIT,
    ROLES,
    current_user,
    get_session,
    hash_password,
    issue_token,
    password_matches,
    require,
)
from vmkeep.server.schemas import AuditOut, Login, TokenOut, TokenRequest, UserIn, UserOut

router = APIRouter(prefix="/api")


@router.post("/auth/login", response_model=TokenOut, tags=["access"])
def login(body: Login, request: Request, session: Session = Depends(get_session)) -> TokenOut:
    """A bearer token valid for a working day, for the user's name and password."""
    user = session.scalar(select(User).where(User.name == body.name))
    if user is None or user.disabled or not password_matches(user.password_hash, body.password):
        audit.record(session, request, body.name, "login-failed", body.name)
        session.commit()
        raise HTTPException(401, "wrong user name or password", headers={"WWW-Authenticate": "Bearer"})
    token = issue_token(session, user, "login", timedelta(hours=LOGIN_HOURS))
    audit.record(session, request, user.name, "login", user.name)
    session.commit()
    return TokenOut(token=token, expires=None)


@router.post("/tokens", response_model=TokenOut, status_code=201, tags=["access"])
def create_token(body: TokenRequest, request: Request, user: User = Depends(require(*ROLES)),
                 session: Session = Depends(get_session)) -> TokenOut:
    """A named API token for scripts, valid ``days`` (or until its user is removed)."""
    user = session.merge(user)
    token = issue_token(session, user, body.name, timedelta(days=body.days) if body.days else None)
    audit.record(session, request, user.name, "token-create", body.name, days=body.days)
    session.commit()
    return TokenOut(token=token, expires=None)


@router.get("/users", response_model=list[UserOut], tags=["access"])
def list_users(_: User = Depends(require(ADMIN)), session: Session = Depends(get_session)) -> list[UserOut]:
    return [UserOut(name=u.name, role=u.role, disabled=u.disabled, created=u.created)
            for u in session.scalars(select(User).order_by(User.name))]


@router.post("/users", response_model=UserOut, status_code=201, tags=["access"])
def create_user(body: UserIn, request: Request, admin: User = Depends(require(ADMIN)),
                session: Session = Depends(get_session)) -> UserOut:
    if session.scalar(select(User).where(User.name == body.name)) is not None:
        raise HTTPException(409, f"user {body.name} exists")
    user = User(name=body.name, role=body.role, password_hash=hash_password(body.password))
    session.add(user)
    audit.record(session, request, admin.name, "user-create", body.name, role=body.role)
    session.commit()
    return UserOut(name=user.name, role=user.role, disabled=user.disabled, created=user.created)


@router.delete("/users/{name}", status_code=204, tags=["access"])
def delete_user(name: str, request: Request, admin: User = Depends(require(ADMIN)),
                session: Session = Depends(get_session)) -> Response:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise HTTPException(404, f"no user {name}")
    if user.name == admin.name:
        raise HTTPException(409, "an administrator cannot remove their own account")
    session.delete(user)
    audit.record(session, request, admin.name, "user-delete", name)
    session.commit()
    return Response(status_code=204)


@router.get("/me", response_model=UserOut, tags=["access"])
def me(user: User = Depends(current_user)) -> UserOut:
    return UserOut(name=user.name, role=user.role, disabled=user.disabled, created=user.created)


@router.get("/audit", response_model=list[AuditOut], tags=["access"])
def audit_log(limit: int = Query(100, ge=1, le=10000), _: User = Depends(require(*READ_AUDIT)),
              session: Session = Depends(get_session)) -> list[AuditOut]:
    """The newest entries first."""
    rows = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))
    return [AuditOut(at=e.at, user=e.user, action=e.action, target=e.target, client=e.client, detail=e.detail)
            for e in rows]
