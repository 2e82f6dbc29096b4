"""Restores started through the server: a whole VM as a new one or over the original, one disk to a
file, or an instant recovery (the VM run from the backup, then finished to storage or discarded)."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as FastPath
from pydantic import BaseModel, Field
from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import (
    Hypervisor,
    Proxy,
    RepositoryRecord,
    RestoreJob,
    RestorePointRecord,
    User,
    VirtualMachine,
)
from vmkeep.catalog.queries import held_earlier
from vmkeep.hypervisors.connect import restores_need_the_host
from vmkeep.jobs.status import ACTIVE, INSTANT, JobStatus
from vmkeep.server import audit
from vmkeep.server.auth import EVERYONE, OVERWRITE, RESTORE, get_session, require
from vmkeep.server.dispatch import defer_restore, proxy_up, restore_proxy
from vmkeep.server.restore_choices import ChoicesOut, restore_choices
from vmkeep.server.restore_locations import storage_allowed
from vmkeep.server.schemas import NAME

router = APIRouter(prefix="/api")
RestoreId = Annotated[int, FastPath(ge=1, le=2**31 - 1)]
PLACE_NAME = r"^[^\x00-\x1f\x7f]+$"  # a hypervisor's own names (vSphere's hold spaces, folders '/')


class RestoreIn(BaseModel):
    vm: str = Field(pattern=NAME)
    point: str | None = Field(default=None, max_length=64, description="a point id or unique prefix; latest if none")
    repository: str | None = Field(default=None, max_length=200,
                                   description="read the point from this repository only (one of its copies, say); "
                                               "none: from the repository that holds it first, else from a "
                                               "healthy copy (GET /api/points lists where each point exists)")
    hypervisor: str = Field(max_length=200, description="where the VM is defined, or the file written")
    mode: Literal["as-new", "overwrite", "disk-file", "instant"] | None = Field(
        default=None, description="as-new (as_name), overwrite, disk-file (disk, file, storage: one disk to a "
                                  "file) or instant (as_name: run the VM from the backup at once, then finish or "
                                  "discard it); none: as_name or overwrite says")
    as_name: str | None = Field(default=None, pattern=NAME,
                                description="restore (or, instant, run) as a new VM of this name")
    overwrite: bool = Field(default=False, description="put the original (shut off) back instead")
    storage: str | None = Field(default=None, pattern=r"^/", max_length=1000,
                                description="where the disks go; disk-file: the file's directory")
    start: bool = True
    disk: str | None = Field(default=None, pattern=NAME, description="disk-file: which disk of the point")
    file: str | None = Field(default=None, pattern=NAME, description="disk-file: the file's name (no slashes)")
    format: Literal["qcow2", "raw"] = Field(default="qcow2", description="disk-file: the file's format")
    network: str | None = Field(default=None, pattern=PLACE_NAME, max_length=200,
                                description="as-new: every network card on this network ('none': no network "
                                            "cards); the original's if none. GET /api/hypervisors/{name}/"
                                            "restore-choices lists them")
    host: str | None = Field(default=None, pattern=PLACE_NAME, max_length=200,
                             description="as-new, vSphere: the host the new VM runs on")
    folder: str | None = Field(default=None, pattern=PLACE_NAME, max_length=500,
                               description="as-new, vSphere: the VM folder, e.g. DC0/prod")

    def chosen_mode(self) -> str:
        return self.mode or ("overwrite" if self.overwrite else "as-new")


class RestoreOut(BaseModel):
    id: int
    requested_by: str
    vm: str
    point: str
    mode: str
    step: str | None
    new_name: str | None
    disk: str | None
    format: str | None
    storage: str | None
    network: str | None
    host: str | None
    folder: str | None
    hypervisor: str
    repository: str
    restored_from: str | None = Field(None, description="the repository the proxy read the point from: "
                                                        "repository's, or a copy's when that failed to open")
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
    return RestoreOut(id=r.id, requested_by=r.requested_by, vm=r.vm_name, point=r.point_id, mode=r.mode, step=r.step,
                      new_name=r.new_name, disk=r.disk, format=r.format, storage=r.storage,
                      network=r.network, host=r.host, folder=r.folder,
                      hypervisor=r.hypervisor_name, repository=r.repository_name,
                      restored_from=r.source_repository, proxy=r.proxy,
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
    mode = body.chosen_mode()
    if mode == "disk-file":
        _check_file_fields(body)
    elif mode == "instant":
        if not body.as_name:
            raise RestoreRefused(400, "give as_name: the name the VM runs under, from the backup", "as_name")
        if body.storage is not None:
            raise RestoreRefused(400, "an instant recovery runs from the repository: give storage when finishing "
                                      "it (POST /api/restores/{id}/finish)", "storage")
    elif bool(body.as_name) == (mode == "overwrite") or (body.mode == "as-new" and body.overwrite):
        raise RestoreRefused(400, "give as_name (a new VM) or overwrite: true (the original), one of them", "mode")
    placed = [f for f in ("network", "host", "folder") if getattr(body, f)]
    if placed and mode != "as-new":
        raise RestoreRefused(400, f"{', '.join(placed)}: only a restore as a new VM goes elsewhere than the original",
                             placed[0])
    if mode == "overwrite" and user.role not in OVERWRITE:
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
    point = _point(session, body, mode)
    if body.as_name and mode in ("as-new", "instant") and name_taken(session, hypervisor, body.as_name):
        raise RestoreRefused(409, f"{body.hypervisor} already has a VM {body.as_name} (or a restore creating it): "
                                  "choose another name", "as_name")
    if mode == "disk-file" and file_taken(session, hypervisor, body):
        raise RestoreRefused(409, f"a restore under way already writes {body.storage}/{body.file}: choose another "
                                  "file name", "file")
    disk_file_or_host = mode == "disk-file" or restores_need_the_host(hypervisor.uri)
    proxy = restore_proxy(session, hypervisor, file_on_host=mode == "disk-file")
    if proxy is None:
        extra = (" (a proxy that reaches the host only over the network, --reaches '*', cannot write a file on it)"
                 if mode == "disk-file" else "")
        anywhere = "" if disk_file_or_host else " (or anywhere with --reaches '*': it reaches it over the network)"
        raise RestoreRefused(409, f"no proxy is up on a host of {body.hypervisor}: start `vmkeep proxy` there"
                                  f"{anywhere}{extra}", "hypervisor")
    disk_file = mode == "disk-file"
    job = RestoreJob(requested_by=user.name, vm_name=body.vm, point_id=point.point_id,
                     repository_id=point.repository_id, repository_name=point.repository.name,
                     hypervisor_id=hypervisor.id,
                     hypervisor_name=hypervisor.name, mode=mode,
                     new_name=body.file if disk_file else body.as_name if mode in ("as-new", "instant") else None,
                     storage=body.storage if mode != "overwrite" else None,
                     disk=body.disk if disk_file else None, format=body.format if disk_file else None,
                     start_vm=mode == "instant" or (body.start and mode == "as-new"), proxy=proxy.name,
                     step="start" if mode == "instant" else None, status=JobStatus.QUEUED,
                     use_copies=body.repository is None)
    job.network, job.host, job.folder = body.network, body.host, body.folder
    session.add(job)
    details = ({"disk": body.disk, "file": f"{body.storage}/{body.file}", "format": body.format} if disk_file
               else {"as_name": body.as_name, "overwrite": mode == "overwrite",
                     **{f: getattr(body, f) for f in placed}})
    audit.record(session, request, user.name, "restore-start", body.vm, point=point.point_id, mode=mode,
                 repository=point.repository.name, **details)
    session.commit()
    job.task_id = await defer_restore(request.app.state.queue, proxy, job)
    session.commit()
    return job


def _check_file_fields(body: RestoreIn) -> None:
    """A disk-file restore names the disk, the directory (checked against the restore locations
    later) and a plain file name."""
    if not body.disk:
        raise RestoreRefused(400, "give disk: the point's disk to write to the file", "disk")
    if not body.storage:
        raise RestoreRefused(400, "give storage: the directory to write the file in, inside the hypervisor's "
                                  "restore locations", "storage")
    if not body.file or ".." in body.file:
        raise RestoreRefused(400, "give file: a plain file name (letters, digits, '.', '_' or '-'; no '/', no '..')",
                             "file")


def _point(session: Session, body: RestoreIn, mode: str) -> RestorePointRecord:
    """The catalog's point the restore asks for; a whole-VM restore needs a VM's point, a disk-file
    restore a disk that point has. Of a point with copies, the row of the repository asked for, else
    the one cataloged first (the proxy falls back on the copies when it cannot read that one)."""
    query = select(RestorePointRecord).where(RestorePointRecord.name == body.vm)
    if body.repository is not None:
        query = query.join(RepositoryRecord).where(RepositoryRecord.name == body.repository)
    else:
        query = query.where(~held_earlier())
    if body.point:
        query = query.where(RestorePointRecord.point_id.startswith(body.point, autoescape=True))
    points = list(session.scalars(query.order_by(RestorePointRecord.created.desc()).limit(2)))
    if not points and body.repository is not None:
        raise RestoreRefused(404, f"repository {body.repository} holds no restore point of {body.vm} matching "
                                  f"{body.point or 'latest'} (GET /api/points?vm={body.vm} lists where each is)",
                             "repository")
    if not points or (body.point and len(points) > 1 and points[0].point_id != body.point):
        raise RestoreRefused(404, f"no single restore point of {body.vm} matches {body.point or 'latest'}", "point")
    point = points[0]
    if mode == "disk-file":
        if body.disk not in (point.disks or {}):
            raise RestoreRefused(404, f"point {point.point_id} of {body.vm} has no disk {body.disk} (it has: "
                                      f"{', '.join(point.disks or {}) or 'none'})", "disk")
    elif point.kind != "vm":  # the proxy's engine would refuse it only once it ran (instant recovery too)
        raise RestoreRefused(422, f"point {point.point_id} of {body.vm} is a disk image, not a VM's backup: restore "
                                  "its disk to a file (mode disk-file) or with "
                                  f"`vmkeep disk restore {body.vm}@{point.point_id}`", "point")
    return point


def file_taken(session: Session, hypervisor: Hypervisor, body: RestoreIn) -> bool:
    """Whether a disk-file restore under way writes the same file on the hypervisor."""
    return session.scalar(select(exists(select(RestoreJob.id).where(
        RestoreJob.hypervisor_id == hypervisor.id, RestoreJob.mode == "disk-file", RestoreJob.status.in_(ACTIVE),
        RestoreJob.storage == body.storage, RestoreJob.new_name == body.file)))) or False


def name_taken(session: Session, hypervisor: Hypervisor, name: str) -> bool:
    """Whether the hypervisor has a VM of that name as last discovered, or a restore under way creates one."""
    present = select(VirtualMachine.id).where(VirtualMachine.hypervisor_id == hypervisor.id,
                                              VirtualMachine.name == name, VirtualMachine.present.is_(True))
    creating = select(RestoreJob.id).where(RestoreJob.hypervisor_id == hypervisor.id, RestoreJob.new_name == name,
                                           RestoreJob.mode != "disk-file", RestoreJob.status.in_((*ACTIVE, INSTANT)))
    return session.scalar(select(or_(exists(present), exists(creating)))) or False


async def _answer(work: Awaitable[RestoreJob]) -> RestoreOut:
    """The API's answer: the restore row, or the refusal as an HTTP error."""
    try:
        return _out(await work)
    except RestoreRefused as refused:
        raise HTTPException(refused.status, str(refused)) from None


class FinishIn(BaseModel):
    storage: str = Field(pattern=r"^/", max_length=1000, description="the directory the disks move to, inside one "
                                                                     "of the hypervisor's restore locations")


async def follow_up(session: Session, request: Request, user: User, restore_id: int, step: str,
                    storage: str | None = None) -> RestoreJob:
    """Send an instant recovery's finish (to ``storage``) or discard to the proxy that runs it (its
    exports and state are on that proxy's machine); :class:`RestoreRefused` when it cannot go."""
    job = session.get(RestoreJob, restore_id)
    if job is None:
        raise RestoreRefused(404, f"no restore {restore_id}", "restore")
    if job.mode != "instant" or job.status != INSTANT:
        raise RestoreRefused(409, f"restore {restore_id} is not running instantly (it is {job.mode}, {job.status}): "
                                  "only a VM that runs from the backup can be finished or discarded", "restore")
    hypervisor = job.hypervisor
    if hypervisor is None:
        raise RestoreRefused(409, f"hypervisor {job.hypervisor_name} was removed: stop the VM {job.new_name} by "
                                  "hand", "restore")
    if step == "finish":
        assert storage is not None
        if not storage_allowed(storage, hypervisor.restore_locations):
            where = ", ".join(hypervisor.restore_locations) or "none registered yet"
            raise RestoreRefused(403, f"{job.new_name}'s disks may move only inside {hypervisor.name}'s restore "
                                      f"locations ({where})", "storage")
    proxy = session.scalar(select(Proxy).where(Proxy.name == job.proxy))
    if proxy is None or not proxy_up(proxy):
        raise RestoreRefused(409, f"proxy {job.proxy}, which runs {job.new_name}'s exports, is down: start it again "
                                  "(no other proxy can finish or discard it)", "restore")
    job.step, job.status, job.error, job.progress_bytes, job.total_bytes = step, JobStatus.QUEUED, None, None, None
    if storage is not None:
        job.storage = storage
    audit.record(session, request, user.name, f"restore-instant-{step}", job.vm_name, restore=job.id,
                 vm=job.new_name, storage=storage)
    session.commit()
    job.task_id = await defer_restore(request.app.state.queue, proxy, job)
    session.commit()
    return job


@router.post("/restores/{restore_id}/finish", response_model=RestoreOut, status_code=202, tags=["restores"])
async def finish_instant(restore_id: RestoreId, body: FinishIn, request: Request,
                         user: User = Depends(require(*RESTORE)),
                         session: Session = Depends(get_session)) -> RestoreOut:
    """Move an instantly recovered VM's disks to real storage while it runs; follow it at GET /api/restores/{id}."""
    return await _answer(follow_up(session, request, user, restore_id, "finish", body.storage))


@router.post("/restores/{restore_id}/discard", response_model=RestoreOut, status_code=202, tags=["restores"])
async def discard_instant(restore_id: RestoreId, request: Request, user: User = Depends(require(*RESTORE)),
                          session: Session = Depends(get_session)) -> RestoreOut:
    """Stop and remove an instantly recovered VM with everything written to it."""
    return await _answer(follow_up(session, request, user, restore_id, "discard"))


@router.post("/restores", response_model=RestoreOut, status_code=202, tags=["restores"])
async def start_restore(body: RestoreIn, request: Request, user: User = Depends(require(*RESTORE)),
                        session: Session = Depends(get_session)) -> RestoreOut:
    """Restore a VM from the catalog's point; follow it at GET /api/restores/{id}."""
    return await _answer(begin_restore(session, request, user, body))


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


@router.get("/hypervisors/{name}/restore-choices", response_model=ChoicesOut, tags=["restores"])
async def get_restore_choices(name: str, _: User = Depends(require(*RESTORE)),
                              session: Session = Depends(get_session)) -> ChoicesOut:
    """Where a restore as a new VM may go on this hypervisor (networks, hosts, folders), asked of the
    hypervisor now: empty lists with ``error`` when it does not answer within a few seconds."""
    hypervisor = session.scalar(select(Hypervisor).where(Hypervisor.name == name))
    if hypervisor is None:
        raise HTTPException(404, f"no hypervisor {name}")
    return await restore_choices(hypervisor)
