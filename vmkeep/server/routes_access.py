"""Logging in, tokens, users and the audit log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi import Path as FastPath
from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session

from vmkeep.catalog.audit_chain import verify_chain
from vmkeep.catalog.models import ApiToken, AuditEntry, User
from vmkeep.server import audit
from vmkeep.server.accounts import removal_refused
from vmkeep.server.auth import (
    ADMIN,
    READ_AUDIT,
    ROLES,
    current_user,
    get_session,
    hash_password,
    issue_token,
    require,
)
from vmkeep.server.logins import LoginRefused, log_in, log_out
from vmkeep.server.schemas import AuditOut, AuditVerifyOut, Login, TokenInfo, TokenOut, TokenRequest, UserIn, UserOut

router = APIRouter(prefix="/api")


@router.post("/auth/login", response_model=TokenOut, tags=["access"],
             responses={429: {"description": "too many failed logins: wait Retry-After seconds"}})
def login(body: Login, request: Request, session: Session = Depends(get_session)) -> TokenOut:
    """A bearer token valid for a working day, for the user's name and password."""
    try:
        token, expires = log_in(session, request, body.name, body.password)
    except LoginRefused as refused:
        headers = ({"Retry-After": str(refused.retry_after)} if refused.retry_after is not None
                   else {"WWW-Authenticate": "Bearer"})
        raise HTTPException(refused.status, refused.message, headers=headers) from None
    return TokenOut(token=token, expires=expires)


@router.post("/auth/logout", status_code=204, tags=["access"])
def logout(request: Request, user: User = Depends(current_user), session: Session = Depends(get_session)) -> Response:
    """Revoke the token this request came with."""
    log_out(session, request, user, request.state.token_id)
    return Response(status_code=204)


@router.post("/tokens", response_model=TokenOut, status_code=201, tags=["access"])
def create_token(body: TokenRequest, request: Request, user: User = Depends(require(*ROLES)),
                 session: Session = Depends(get_session)) -> TokenOut:
    """A named API token for scripts, valid ``days`` (at most, and by default, the server's maximum)."""
    return new_token(session, request, user, body)


def new_token(session: Session, request: Request, user: User, body: TokenRequest) -> TokenOut:
    """Issue ``user`` a named token, audited (400: longer than the server allows); the API and the
    console both call this."""
    longest: int = request.app.state.token_max_days
    if body.days is not None and body.days > longest:
        raise HTTPException(400, f"a token lives at most {longest} days on this server: ask for fewer days")
    days = body.days or longest
    user = session.merge(user)
    token, expires = issue_token(session, user, body.name, timedelta(days=days))
    audit.record(session, request, user.name, "token-create", body.name, days=days)
    session.commit()
    return TokenOut(token=token, expires=expires)


@router.get("/tokens", response_model=list[TokenInfo], tags=["access"])
def list_tokens(request: Request, everyone: bool = Query(False, alias="all", description="admins: every user's"),
                user: User = Depends(require(*ROLES)), session: Session = Depends(get_session)) -> list[TokenInfo]:
    """The caller's unexpired tokens (an administrator's ``all=true``: everyone's); never the token itself."""
    if everyone and user.role != ADMIN:
        raise HTTPException(403, "only an administrator lists every user's tokens")
    return tokens_of(session, None if everyone else user, request.state.token_id)


def token_query(owner: User | None) -> Select[ApiToken, str]:
    """Unexpired tokens of ``owner`` (None: everyone's) with their user's name, oldest first."""
    query = (select(ApiToken, User.name).join(User).where(ApiToken.expires > datetime.now(UTC))
             .order_by(ApiToken.id))
    return query if owner is None else query.where(ApiToken.user_id == owner.id)


def tokens_of(session: Session, owner: User | None, current: int, query: Select[ApiToken, str] | None = None,
              ) -> list[TokenInfo]:
    """Unexpired tokens of ``owner`` (None: everyone's), or those ``query`` (a slice of
    :func:`token_query`) finds, ``current`` marked."""
    rows = session.execute(token_query(owner) if query is None else query)
    return [TokenInfo(id=t.id, name=t.name, user=name, created=t.created, expires=t.expires, last_used=t.last_used,
                      current=t.id == current) for t, name in rows]


@router.delete("/tokens/{token_id}", status_code=204, tags=["access"])
def revoke_token(token_id: Annotated[int, FastPath(ge=1, le=2**63 - 1)], request: Request,
                 user: User = Depends(require(*ROLES)), session: Session = Depends(get_session)) -> Response:
    """Revoke one of the caller's tokens (an administrator: anyone's); it stops working at once."""
    revoke(session, request, user, token_id)
    return Response(status_code=204)


def revoke(session: Session, request: Request, user: User, token_id: int) -> None:
    """Revoke a token of ``user``'s (an administrator: anyone's), audited (404: no such token of theirs)."""
    token = session.get(ApiToken, token_id)
    if token is None or (token.user_id != user.id and user.role != ADMIN):
        raise HTTPException(404, f"no token {token_id} of yours")
    session.delete(token)
    audit.record(session, request, user.name, "token-revoke", token.name, id=token_id)
    session.commit()


@router.get("/users", response_model=list[UserOut], tags=["access"])
def list_users(_: User = Depends(require(ADMIN)), session: Session = Depends(get_session)) -> list[UserOut]:
    return [UserOut(name=u.name, role=u.role, disabled=u.disabled, created=u.created)
            for u in session.scalars(select(User).order_by(User.name))]


@router.post("/users", response_model=UserOut, status_code=201, tags=["access"])
def create_user(body: UserIn, request: Request, admin: User = Depends(require(ADMIN)),
                session: Session = Depends(get_session)) -> UserOut:
    user = add_user(session, request, admin, body)
    return UserOut(name=user.name, role=user.role, disabled=user.disabled, created=user.created)


def add_user(session: Session, request: Request, admin: User, body: UserIn) -> User:
    """Create an account, audited (409: the name is taken); the API and the console both call this."""
    if session.scalar(select(User).where(User.name == body.name)) is not None:
        raise HTTPException(409, f"user {body.name} exists")
    user = User(name=body.name, role=body.role, password_hash=hash_password(body.password))
    session.add(user)
    audit.record(session, request, admin.name, "user-create", body.name, role=body.role)
    session.commit()
    return user


@router.delete("/users/{name}", status_code=204, tags=["access"])
def delete_user(name: str, request: Request, admin: User = Depends(require(ADMIN)),
                session: Session = Depends(get_session)) -> Response:
    """Remove an account and its tokens (an administrator too, by another one; never the last)."""
    remove_user(session, request, admin, name)
    return Response(status_code=204)


def remove_user(session: Session, request: Request, admin: User, name: str) -> None:
    """Remove an account, audited (404: none; 409: oneself or the last administrator)."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise HTTPException(404, f"no user {name}")
    refused = removal_refused(session, user, admin.name)
    if refused:
        raise HTTPException(409, f"user {name} stays: {refused}")
    session.delete(user)
    audit.record(session, request, admin.name, "user-delete", name)
    session.commit()


@router.get("/me", response_model=UserOut, tags=["access"])
def me(user: User = Depends(current_user)) -> UserOut:
    return UserOut(name=user.name, role=user.role, disabled=user.disabled, created=user.created)


@router.get("/audit/verify", response_model=AuditVerifyOut, tags=["access"])
def audit_verify(_: User = Depends(require(*READ_AUDIT)), session: Session = Depends(get_session)) -> AuditVerifyOut:
    """Check the audit log's hash chain: every entry altered, and where entries were removed."""
    return chain_report(session)


def chain_report(session: Session) -> AuditVerifyOut:
    """The audit chain's check, as the API and the console show it."""
    report = verify_chain(audit.chain_rows(session))
    return AuditVerifyOut(entries=report.entries, ok=report.ok, problems=report.problems, head=report.head)


@router.get("/audit", response_model=list[AuditOut], tags=["access"])
def audit_log(limit: int = Query(100, ge=1, le=10000),
              who: str | None = Query(None, alias="user", max_length=100, description="only this user's"),
              action: str | None = Query(None, max_length=100, description="e.g. user-delete, restore-start"),
              since: datetime | None = Query(None, description="only entries from then on"),
              _: User = Depends(require(*READ_AUDIT)), session: Session = Depends(get_session)) -> list[AuditOut]:
    """The newest entries first."""
    query = select(AuditEntry).where(*audit_filter(who, action, since))
    rows = session.scalars(query.order_by(AuditEntry.id.desc()).limit(limit))
    return [AuditOut(at=e.at, user=e.user, action=e.action, target=e.target, client=e.client, detail=e.detail)
            for e in rows]


def audit_filter(who: str | None = None, action: str | None = None, since: datetime | None = None,
                 until: datetime | None = None, target: str | None = None) -> list[ColumnElement[bool]]:
    """The conditions of an audit log query (the API's and the console's): exact user and action,
    a time range (until: before then), the target containing some text (any case)."""
    conditions: list[ColumnElement[bool]] = []
    if who is not None:
        conditions.append(AuditEntry.user == who)
    if action is not None:
        conditions.append(AuditEntry.action == action)
    if since is not None:
        conditions.append(AuditEntry.at >= since)
    if until is not None:
        conditions.append(AuditEntry.at < until)
    if target:
        escaped = target.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(AuditEntry.target.ilike(f"%{escaped}%", escape="\\"))
    return conditions
