"""Proxies: registering and heartbeats (the proxy's own), the list, and removing one that is gone."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import JobVM, MaintenanceRun, Proxy, RestoreJob, User
from vmkeep.catalog.proxy_role import proxy_database_url, proxy_role_name
from vmkeep.errors import VmkeepError
from vmkeep.hypervisors.base import parse_transports
from vmkeep.jobs.keys import proxy_role_password
from vmkeep.jobs.status import ACTIVE, INSTANT, JobStatus
from vmkeep.server import audit
from vmkeep.server.auth import ADMIN, EVERYONE, RUN_PROXY, get_session, require
from vmkeep.server.dispatch import PROXY_TIMEOUT, proxy_up
from vmkeep.server.schemas import NAME

router = APIRouter(prefix="/api")


class ProxyIn(BaseModel):
    name: str = Field(pattern=NAME)
    transports: list[str] = Field(min_length=1, max_length=3)
    reaches: list[str] = Field(min_length=1, max_length=1000)
    storage: list[str] = Field(default_factory=list, max_length=1000,
                               description="datastores it reads directly (san), as discovery names them")
    concurrency: int = Field(ge=1, le=64)


class ProxyOut(BaseModel):
    name: str
    transports: list[str]
    reaches: list[str]
    storage: list[str]
    concurrency: int
    up: bool
    last_heartbeat: datetime


class Registered(BaseModel):
    proxy: ProxyOut
    database_url: str  # the queue the proxy works from


def _proxy_out(p: Proxy) -> ProxyOut:
    return ProxyOut(name=p.name, transports=p.transports, reaches=p.reaches, storage=p.storage,
                    concurrency=p.concurrency,
                    up=proxy_up(p), last_heartbeat=p.last_heartbeat)


@router.post("/proxies/register", response_model=Registered, tags=["proxies"])
def register_proxy(body: ProxyIn, request: Request, user: User = Depends(require(*RUN_PROXY)),
                   session: Session = Depends(get_session)) -> Registered:
    """A proxy announces itself (again after a restart) and learns where its queue is: the
    catalog's database login, so only admins and proxy accounts may ask."""
    try:
        parse_transports(":".join(body.transports))
    except VmkeepError as exc:
        raise HTTPException(400, str(exc)) from None
    p = session.scalar(select(Proxy).where(Proxy.name == body.name))
    if p is None:
        p = Proxy(name=body.name, transports=body.transports, reaches=body.reaches, storage=body.storage,
                  concurrency=body.concurrency)
        session.add(p)
    else:
        p.transports, p.reaches, p.storage, p.concurrency = (body.transports, body.reaches, body.storage,
                                                             body.concurrency)
    p.last_heartbeat = datetime.now(UTC)
    audit.record(session, request, user.name, "proxy-register", body.name, reaches=body.reaches)
    session.commit()
    role = proxy_role_name(request.app.state.database_url)
    url = proxy_database_url(request.app.state.proxy_database_url, role, proxy_role_password(role))
    return Registered(proxy=_proxy_out(p), database_url=url)


@router.post("/proxies/{name}/heartbeat", status_code=204, tags=["proxies"])
def heartbeat(name: str, _: User = Depends(require(*RUN_PROXY)),
              session: Session = Depends(get_session)) -> None:
    p = session.scalar(select(Proxy).where(Proxy.name == name))
    if p is None:
        raise HTTPException(404, f"no proxy {name}: register first")
    p.last_heartbeat = datetime.now(UTC)
    session.commit()


@router.get("/proxies", response_model=list[ProxyOut], tags=["proxies"])
def list_proxies(_: User = Depends(require(*EVERYONE)), session: Session = Depends(get_session)) -> list[ProxyOut]:
    return [_proxy_out(p) for p in session.scalars(select(Proxy).order_by(Proxy.name))]


@router.delete("/proxies/{name}", status_code=204, tags=["proxies"])
def delete_proxy(name: str, request: Request, admin: User = Depends(require(ADMIN)),
                 session: Session = Depends(get_session)) -> Response:
    """Remove a proxy that is gone for good. Refused while it is up (it would register again at
    its next restart, and its heartbeat would fail) and while work is assigned to it (the master
    moves that to another proxy once its heartbeat stops)."""
    remove_proxy(session, request, admin, name)
    return Response(status_code=204)


def remove_proxy(session: Session, request: Request, admin: User, name: str) -> None:
    """Remove a proxy, audited (404: none; 409: up, or work assigned); the API and the console call this."""
    p = session.scalar(select(Proxy).where(Proxy.name == name).with_for_update())
    if p is None:
        raise HTTPException(404, f"no proxy {name}")
    if proxy_up(p):
        raise HTTPException(409, f"proxy {name} is up (heartbeat at {p.last_heartbeat:%Y-%m-%d %H:%M:%S} UTC): "
                                 f"stop `vmkeep proxy --name {name}` on its machine, wait "
                                 f"{PROXY_TIMEOUT.seconds} s, then delete it")
    backups = list(session.scalars(select(JobVM.job_id).where(
        JobVM.proxy == name, JobVM.status.in_((*ACTIVE, JobStatus.WAITING.value))).distinct().order_by(JobVM.job_id)))
    # an instant recovery runs on the proxy's machine until it is finished or discarded there
    restores = list(session.scalars(select(RestoreJob.id).where(
        RestoreJob.proxy == name, RestoreJob.status.in_((*ACTIVE, INSTANT))).order_by(RestoreJob.id)))
    upkeep = list(session.scalars(select(MaintenanceRun.id).where(
        MaintenanceRun.proxy == name, MaintenanceRun.status.in_(ACTIVE)).order_by(MaintenanceRun.id)))
    if backups or restores or upkeep:
        work = [f"{what} {', '.join(map(str, ids))}" for what, ids in
                (("runs", backups), ("restores", restores), ("maintenance runs", upkeep)) if ids]
        raise HTTPException(409, f"proxy {name} still has work assigned ({' and '.join(work)}): the master moves "
                                 "it to another proxy shortly, or cancel it; then delete the proxy")
    session.delete(p)
    audit.record(session, request, admin.name, "proxy-delete", name)
    session.commit()
