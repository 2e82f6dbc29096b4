"""Repository maintenance through the API: start a verify, prune (dry run by default), GC, usage
measurement or backup copy on a proxy, and follow the runs (vmkeep.server.maintenance, copies)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import MaintenanceRun, User
from vmkeep.server.auth import CHANGE_INVENTORY, EVERYONE, get_session, require
from vmkeep.server.copies import start_copy
from vmkeep.server.maintenance import MaintenanceRefused, confirm_prune, run_out, start_maintenance

router = APIRouter(prefix="/api")


class MaintenanceOut(BaseModel):
    id: int
    repository: str
    target: str | None = Field(None, description="a copy's target repository (the source is repository)")
    kind: str
    requested_by: str
    proxy: str | None
    status: str
    attempts: int
    params: dict[str, Any]
    progress_bytes: int | None
    total_bytes: int | None
    result: dict[str, Any] | None
    error: str | None
    created: datetime
    started: datetime | None
    finished: datetime | None


class PruneIn(BaseModel):
    dry_run: bool = Field(True, description="only list what the policies' retention would remove, and what "
                                            "that frees")
    confirm: int | None = Field(None, ge=1, description="a finished dry run's id: remove exactly what it listed "
                                                        "(still removed by the retention now)")


class CopyIn(BaseModel):
    target: str = Field(max_length=200, description="the registered repository the points are copied into")
    names: str | None = Field(None, max_length=200, description="a glob over point names (all by default)")
    point: str | None = Field(None, max_length=64, description="one point: its id or a unique id prefix")
    latest: int | None = Field(None, ge=1, le=100_000, description="the newest N points per name")
    verify: bool = Field(False, description="re-read and decode every chunk the copy wrote or used in the target")


def _started(run: MaintenanceRun) -> MaintenanceOut:
    return MaintenanceOut(**run_out(run))


async def _start(request: Request, session: Session, user: User, name: str, kind: str,
                 params: dict[str, Any] | None = None) -> MaintenanceOut:
    try:
        return _started(await start_maintenance(session, request.app.state.queue, request, user.name, name, kind,
                                                params))
    except MaintenanceRefused as refused:
        raise HTTPException(refused.status, str(refused)) from None


@router.post("/repositories/{name}/verify", response_model=MaintenanceOut, status_code=202, tags=["repositories"])
async def verify_repository(name: str, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                            session: Session = Depends(get_session)) -> MaintenanceOut:
    """Re-read every chunk live points use, on a proxy; the run's result names bad chunks and broken points."""
    return await _start(request, session, user, name, "verify")


@router.post("/repositories/{name}/gc", response_model=MaintenanceOut, status_code=202, tags=["repositories"])
async def gc_repository(name: str, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                        session: Session = Depends(get_session)) -> MaintenanceOut:
    """Delete the chunks no point uses, on a proxy (safe while backups run)."""
    return await _start(request, session, user, name, "gc")


@router.post("/repositories/{name}/usage", response_model=MaintenanceOut, status_code=202, tags=["repositories"])
async def measure_repository(name: str, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                             session: Session = Depends(get_session)) -> MaintenanceOut:
    """Measure dedup, compression and each VM's unique and shared bytes from the repository's indexes."""
    return await _start(request, session, user, name, "usage")


@router.post("/repositories/{name}/prune", response_model=MaintenanceOut, status_code=202, tags=["repositories"])
async def prune_repository(name: str, request: Request, body: PruneIn | None = None,
                           user: User = Depends(require(*CHANGE_INVENTORY)),
                           session: Session = Depends(get_session)) -> MaintenanceOut:
    """Remove the points the retention of the policies backing up into it does not keep (a dry run
    by default: it lists them and what removing them frees once GC runs)."""
    body = body or PruneIn(dry_run=True, confirm=None)
    if body.confirm is not None:
        try:
            run = await confirm_prune(session, request.app.state.queue, request, user.name, body.confirm, name)
        except MaintenanceRefused as refused:
            raise HTTPException(refused.status, str(refused)) from None
        return _started(run)
    return await _start(request, session, user, name, "prune", {"dry_run": body.dry_run})


@router.post("/repositories/{name}/copy", response_model=MaintenanceOut, status_code=202, tags=["repositories"])
async def copy_repository(name: str, body: CopyIn, request: Request,
                          user: User = Depends(require(*CHANGE_INVENTORY)),
                          session: Session = Depends(get_session)) -> MaintenanceOut:
    """Copy restore points of this repository into another, on a proxy: only what the target lacks
    travels; the copies join the catalog (GET /api/points lists where each point exists). Follow
    it at GET /api/maintenance/{id}."""
    try:
        return _started(await start_copy(session, request.app.state.queue, request, user.name, name, body.target,
                                         names=body.names, point=body.point, latest=body.latest,
                                         verify=body.verify))
    except MaintenanceRefused as refused:
        raise HTTPException(refused.status, str(refused)) from None


@router.get("/maintenance", response_model=list[MaintenanceOut], tags=["repositories"])
def list_maintenance(repository: str | None = Query(None, max_length=200),
                     kind: str | None = Query(None, max_length=20),
                     limit: int = Query(100, ge=1, le=1000), _: User = Depends(require(*EVERYONE)),
                     session: Session = Depends(get_session)) -> list[MaintenanceOut]:
    """Maintenance runs, newest first."""
    query = select(MaintenanceRun).order_by(MaintenanceRun.id.desc()).limit(limit)
    if repository:
        query = query.where(MaintenanceRun.repository_name == repository)
    if kind:
        query = query.where(MaintenanceRun.kind == kind)
    return [_started(r) for r in session.scalars(query)]


@router.get("/maintenance/{run_id}", response_model=MaintenanceOut, tags=["repositories"])
def get_maintenance(run_id: int, _: User = Depends(require(*EVERYONE)),
                    session: Session = Depends(get_session)) -> MaintenanceOut:
    run = session.get(MaintenanceRun, run_id) if run_id < 2**31 else None
    if run is None:
        raise HTTPException(404, f"no maintenance run {run_id}")
    return _started(run)
