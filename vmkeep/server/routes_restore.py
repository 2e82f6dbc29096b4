"""Restores started through the server: a whole VM as a new one, or over the original."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as FastPath
from pydantic import BaseModel, Field
from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import (
    Hypervisor,
    RestoreJob,
    RestorePointRecord,
    User,
    VirtualMachine,
)
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.server import audit
from vmkeep.server.auth import EVERYONE, OVERWRITE, RESTORE, get_session, require
from vmkeep.server.dispatch import defer_restore, restore_proxy
from vmkeep.server.restore_locations import storage_allowed
from vmkeep.server.schemas import NAME

router = APIRouter(prefix="/api")
RestoreId = Annotated[int, FastPath(ge=1, le=2**31 - 1)]


class RestoreIn(BaseModel):
    vm: str = Field(pattern=NAME)
    point: str | None = Field(default=None, max_length=64, description="a point id or unique prefix; latest if none")
    hypervisor: str = Field(max_length=200, description="where the VM is defined")
    as_name: str | None = Field(default=None, pattern=NAME, description="restore as a new VM of this name")
    overwrite: bool = Field(default=False, description="put the original (shut off) back instead")
    storage: str | None = Field(default=None, pattern=r"^/", max_length=1000)
    start: bool = True


class RestoreOut(BaseModel):
    id: int
    requested_by: str
    vm: str
    point: str
    mode: str
    new_name: str | None
    hypervisor: str
    repository: str
    proxy: str | None
    status: str
    attempts: int
    progress_bytes: int | None
    total_bytes: int | None
    warnings: list[str]
    error: str | None
    disks: dict[str, str] | None
    created: datetime
    finished: datetime | None


def _out(r: RestoreJob) -> RestoreOut:
    return RestoreOut(id=r.id, requested_by=r.requested_by, vm=r.vm_name, point=r.point_id, mode=r.mode,
                      new_name=r.new_name,
                      hypervisor=r.hypervisor_name, repository=r.repository_name, proxy=r.proxy,
                      status=r.status, attempts=r.attempts, progress_bytes=r.progress_bytes,
                      total_bytes=r.total_bytes, warnings=r.warnings, error=r.error, disks=r.disks,
                      created=r.created, finished=r.finished)


class RestoreRefused(Exception):
    """A restore the checks refused before anything was created: the HTTP status, the message, and
    which of the request's fields caused it (the console shows the message beside that control)."""

    def __init__(self, status: int, message: str, field: str) -> None:
        super().__init__(message)
        self.status, self.field = status, field


async def begin_restore(session: Session, request: Request, user: User, body: RestoreIn) -> RestoreJob:
    """Check, audit and queue a restore (the API's POST /api/restores and the console's wizard):
    :class:`RestoreRefused` before anything is written when a check fails."""
    if bool(body.as_name) == body.overwrite:
        raise RestoreRefused(400, "give as_name (a new VM) or overwrite: true (the original), one of them", "mode")
    if body.overwrite and user.role not in OVERWRITE:
        raise RestoreRefused(403, f"role {user.role} restores as a new VM only: overwriting a VM needs an operator "
                                  "or an administrator", "mode")
    hypervisor = session.scalar(select(Hypervisor).where(Hypervisor.name == body.hypervisor))
    if hypervisor is None:
        raise RestoreRefused(404, f"no hypervisor {body.hypervisor}", "hypervisor")
    if body.storage is not None and not storage_allowed(body.storage, hypervisor.restore_locations):
        where = ", ".join(hypervisor.restore_locations) or "none registered yet"
        raise RestoreRefused(403, f"restores to {body.hypervisor} may write only inside its restore locations "
                                  f"({where}); an administrator sets them with PUT /api/hypervisors/"
                                  f"{body.hypervisor}/restore-locations", "storage")
    query = select(RestorePointRecord).where(RestorePointRecord.name == body.vm)
    if body.point:
        query = query.where(RestorePointRecord.point_id.startswith(body.point, autoescape=True))
    points = list(session.scalars(query.order_by(RestorePointRecord.created.desc()).limit(2)))
    if not points or (body.point and len(points) > 1 and points[0].point_id != body.point):
        raise RestoreRefused(404, f"no single restore point of {body.vm} matches {body.point or 'latest'}", "point")
    point = points[0]
    if point.kind != "vm":  # the proxy's engine would refuse it only once it ran
        raise RestoreRefused(422, f"point {point.point_id} of {body.vm} is a disk image, not a VM's backup: restore "
                                  f"its disk with `vmkeep disk restore {body.vm}@{point.point_id}`", "point")
    if body.as_name and name_taken(session, hypervisor, body.as_name):
        raise RestoreRefused(409, f"{body.hypervisor} already has a VM {body.as_name} (or a restore creating it): "
                                  "choose another name", "as_name")
    proxy = restore_proxy(session, hypervisor)
    if proxy is None:
        raise RestoreRefused(409, f"no proxy is up on a host of {body.hypervisor}: start `vmkeep proxy` there",
                             "hypervisor")
    job = RestoreJob(requested_by=user.name, vm_name=body.vm, point_id=point.point_id,
                     repository_id=point.repository_id, repository_name=point.repository.name,
                     hypervisor_id=hypervisor.id,
                     hypervisor_name=hypervisor.name,
                     mode="overwrite" if body.overwrite else "as-new", new_name=body.as_name, storage=body.storage,
                     start_vm=body.start, proxy=proxy.name, status=JobStatus.QUEUED)
    session.add(job)
    audit.record(session, request, user.name, "restore-start", body.vm, point=point.point_id,
                 as_name=body.as_name, overwrite=body.overwrite)
    session.commit()
    job.task_id = await defer_restore(request.app.state.queue, proxy, job)
    session.commit()
    return job


def name_taken(session: Session, hypervisor: Hypervisor, name: str) -> bool:
    """Whether the hypervisor has a VM of that name as last discovered, or a restore under way creates one."""
    present = select(VirtualMachine.id).where(VirtualMachine.hypervisor_id == hypervisor.id,
                                              VirtualMachine.name == name, VirtualMachine.present.is_(True))
    creating = select(RestoreJob.id).where(RestoreJob.hypervisor_id == hypervisor.id, RestoreJob.new_name == name,
                                           RestoreJob.status.in_(ACTIVE))
    return session.scalar(select(or_(exists(present), exists(creating)))) or False


@router.post("/restores", response_model=RestoreOut, status_code=202, tags=["restores"])
async def start_restore(body: RestoreIn, request: Request, user: User = Depends(require(*RESTORE)),
                        session: Session = Depends(get_session)) -> RestoreOut:
    """Restore a VM from the catalog's point; follow it at GET /api/restores/{id}."""
    try:
        return _out(await begin_restore(session, request, user, body))
    except RestoreRefused as refused:
        raise HTTPException(refused.status, str(refused)) from None


@router.get("/restores/{restore_id}", response_model=RestoreOut, tags=["restores"])
def get_restore(restore_id: RestoreId, _: User = Depends(require(*EVERYONE)),
                session: Session = Depends(get_session)) -> RestoreOut:
    job = session.get(RestoreJob, restore_id)
    if job is None:
        raise HTTPException(404, f"no restore {restore_id}")
    return _out(job)


@router.get("/restores", response_model=list[RestoreOut], tags=["restores"])
def list_restores(_: User = Depends(require(*EVERYONE)), session: Session = Depends(get_session)) -> list[RestoreOut]:
    return [_out(r) for r in session.scalars(select(RestoreJob).order_by(RestoreJob.id.desc()).limit(100))]
