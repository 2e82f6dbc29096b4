"""Hypervisors and their VMs, repositories, and the restore points the catalog knows."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import (
    CopyTarget,
    Hypervisor,
    Job,
    JobVM,
    MaintenanceRun,
    Policy,
    RepositoryRecord,
    RestoreJob,
    RestorePointRecord,
    User,
    VirtualMachine,
)
from vmkeep.catalog.queries import find_points, glob_to_like
from vmkeep.catalog.rebuild import rebuild
from vmkeep.errors import VmkeepError
from vmkeep.hypervisors.address import Allowance
from vmkeep.jobs.keys import seal_secret
from vmkeep.jobs.registered import open_registered, passphrase_context, secret_context
from vmkeep.jobs.status import ACTIVE
from vmkeep.repository.backends import open_backend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository
from vmkeep.server import audit
from vmkeep.server.auth import ADMIN, CHANGE_INVENTORY, EVERYONE, get_session, require
from vmkeep.server.endpoints import refuse_link_local_host, refuse_with_400
from vmkeep.server.inventory import DiscoveryReport, discover
from vmkeep.server.restore_locations import normalized_location
from vmkeep.server.schemas import (
    DiscoveryOut,
    HypervisorIn,
    HypervisorOut,
    PointOut,
    RebuildOut,
    RepositoryIn,
    RepositoryOut,
    RestoreLocations,
    VMOut,
)

router = APIRouter(prefix="/api")


def _hypervisor_out(h: Hypervisor) -> HypervisorOut:
    return HypervisorOut(name=h.name, kind=h.kind, uri=h.uri, username=h.username,
                         has_password=h.secret_sealed is not None, discovery_minutes=h.discovery_minutes,
                         allow_plain_tcp=h.allow_plain_tcp, allow_unsafe_options=h.allow_unsafe_options,
                         restore_locations=h.restore_locations,
                         discovered_at=h.discovered_at,
                         discovery_error=h.discovery_error)


def _hypervisor(session: Session, name: str) -> Hypervisor:
    h = session.scalar(select(Hypervisor).where(Hypervisor.name == name))
    if h is None:
        raise HTTPException(404, f"no hypervisor {name}")
    return h


@router.get("/hypervisors", response_model=list[HypervisorOut], tags=["inventory"])
def list_hypervisors(_: User = Depends(require(*EVERYONE)),
                     session: Session = Depends(get_session)) -> list[HypervisorOut]:
    return [_hypervisor_out(h) for h in session.scalars(select(Hypervisor).order_by(Hypervisor.name))]


@router.post("/hypervisors", response_model=HypervisorOut, status_code=201, tags=["inventory"])
def add_hypervisor(body: HypervisorIn, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                   session: Session = Depends(get_session)) -> HypervisorOut:
    """Register a hypervisor manager; its password is sealed with the server's master key."""
    return _hypervisor_out(add_hypervisor_as(session, request, user, body))


def add_hypervisor_as(session: Session, request: Request, user: User, body: HypervisorIn) -> Hypervisor:
    """The API's and the console's hypervisor registration (checks, sealing, audit)."""
    allowance = Allowance(plain_tcp=body.allow_plain_tcp, unsafe_options=body.allow_unsafe_options)
    if allowance != Allowance() and user.role != ADMIN:  # the address itself was checked with the body
        raise HTTPException(403, "only an administrator may allow plain TCP or unsafe address options")
    refuse_link_local_host(request.app.state.endpoints, body.uri, "hypervisor address")
    if session.scalar(select(Hypervisor).where(Hypervisor.name == body.name)) is not None:
        raise HTTPException(409, f"hypervisor {body.name} exists")
    sealed = seal_secret(body.password, secret_context(body.name)) if body.password else None
    h = Hypervisor(name=body.name, kind=body.kind, uri=body.uri, username=body.username, secret_sealed=sealed,
                   discovery_minutes=body.discovery_minutes, allow_plain_tcp=allowance.plain_tcp,
                   allow_unsafe_options=allowance.unsafe_options)
    session.add(h)
    audit.record(session, request, user.name, "hypervisor-add", body.name, uri=body.uri, kind=body.kind,
                 allow_plain_tcp=allowance.plain_tcp, allow_unsafe_options=allowance.unsafe_options)
    session.commit()
    return h


@router.delete("/hypervisors/{name}", status_code=204, tags=["inventory"])
def delete_hypervisor(name: str, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                      session: Session = Depends(get_session)) -> Response:
    delete_hypervisor_as(session, request, user.name, name)
    return Response(status_code=204)


def delete_hypervisor_as(session: Session, request: Request, user: str, name: str) -> None:
    """The API's and the console's hypervisor removal: refused (409) while its VMs are being
    backed up or restored."""
    h = _hypervisor(session, name)
    busy = session.scalar(select(func.count()).select_from(JobVM).join(VirtualMachine)
                          .where(VirtualMachine.hypervisor_id == h.id, JobVM.status.in_(ACTIVE)))
    busy = (busy or 0) + (session.scalar(select(func.count()).select_from(RestoreJob).where(
        RestoreJob.hypervisor_id == h.id, RestoreJob.status.in_(ACTIVE))) or 0)
    if busy:
        raise HTTPException(409, f"hypervisor {name} has {busy} backups or restores under way: cancel them or "
                                 "wait for them to end, then delete it")
    session.delete(h)  # its VMs go; their backup and restore history stays (by name)
    audit.record(session, request, user, "hypervisor-delete", name)
    session.commit()


@router.put("/hypervisors/{name}/restore-locations", response_model=HypervisorOut, tags=["inventory"])
def set_restore_locations(name: str, body: RestoreLocations, request: Request, admin: User = Depends(require(ADMIN)),
                          session: Session = Depends(get_session)) -> HypervisorOut:
    """Where restores to this hypervisor may write: an administrator's decision, since a restore
    runs as root on the host."""
    h = _hypervisor(session, name)
    try:
        h.restore_locations = [normalized_location(loc) for loc in body.locations]
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    audit.record(session, request, admin.name, "hypervisor-restore-locations", name, locations=h.restore_locations)
    session.commit()
    return _hypervisor_out(h)


@router.post("/hypervisors/{name}/discover", response_model=DiscoveryOut, tags=["inventory"])
async def discover_now(name: str, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                       session: Session = Depends(get_session)) -> DiscoveryOut:
    """Refresh the hypervisor's VMs now (the schedule does it too)."""
    report = await discover_as(session, request, user.name, name)
    return DiscoveryOut(hypervisor=report.hypervisor, vms=report.vms, new=report.new, gone=report.gone)


async def discover_as(session: Session, request: Request, user: str, name: str) -> DiscoveryReport:
    """The API's and the console's discovery now: 502 with the hypervisor's answer when it fails."""
    h = _hypervisor(session, name)
    try:
        report = await run_in_threadpool(discover, session, h)
    except VmkeepError as exc:
        raise HTTPException(502, f"discovery of {name} failed: {exc}") from None
    audit.record(session, request, user, "hypervisor-discover", name, vms=report.vms)
    session.commit()
    return report


@router.get("/vms", response_model=list[VMOut], tags=["inventory"])
def list_vms(name: str | None = Query(None, max_length=200, description="exact, or a glob with *"),
             hypervisor: str | None = Query(None, max_length=200), include_gone: bool = False,
             limit: int = Query(1000, ge=1, le=10000), _: User = Depends(require(*EVERYONE)),
             session: Session = Depends(get_session)) -> list[VMOut]:
    query = select(VirtualMachine, Hypervisor.name).join(Hypervisor)
    if name and "*" in name:
        query = query.where(VirtualMachine.name.like(glob_to_like(name), escape="\\"))
    elif name:
        query = query.where(VirtualMachine.name == name)
    if hypervisor:
        query = query.where(Hypervisor.name == hypervisor)
    if not include_gone:
        query = query.where(VirtualMachine.present.is_(True))
    rows = session.execute(query.order_by(VirtualMachine.name).limit(limit)).tuples()
    return [VMOut(name=v.name, uuid=v.uuid, hypervisor=hname, host=v.host, state=v.state, present=v.present,
                  disks=v.disks, tags=v.tags, last_seen=v.last_seen) for v, hname in rows]


def _repository_out(session: Session, r: RepositoryRecord) -> RepositoryOut:
    points = session.scalar(select(func.count()).select_from(RestorePointRecord)
                            .where(RestorePointRecord.repository_id == r.id)) or 0
    return RepositoryOut(name=r.name, location=r.location, repo_id=r.repo_id, encrypted=r.encrypted,
                         capacity_bytes=r.capacity_bytes, used_bytes=r.used_bytes, scanned_at=r.scanned_at,
                         points=points)


@router.get("/repositories", response_model=list[RepositoryOut], tags=["repositories"])
def list_repositories(_: User = Depends(require(*EVERYONE)),
                      session: Session = Depends(get_session)) -> list[RepositoryOut]:
    return [_repository_out(session, r)
            for r in session.scalars(select(RepositoryRecord).order_by(RepositoryRecord.name))]


@router.post("/repositories", response_model=RebuildOut, status_code=201, tags=["repositories"])
async def add_repository(body: RepositoryIn, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                         session: Session = Depends(get_session)) -> RebuildOut:
    """Register an existing repository (its passphrase sealed) and import its restore points."""
    await run_in_threadpool(refuse_with_400, request.app.state.endpoints, body.s3_endpoint, "s3_endpoint")
    try:
        backend = open_backend(body.location, s3_endpoint=body.s3_endpoint)
    except VmkeepError as exc:
        raise HTTPException(400, f"cannot open the repository at {body.location}: {exc}") from None
    taken = session.scalar(select(RepositoryRecord).where(
        (RepositoryRecord.name == body.name) | (RepositoryRecord.location == backend.url)))
    if taken is not None:
        raise HTTPException(409, f"repository {taken.name} ({taken.location}) is registered already")
    try:
        repo = await run_in_threadpool(
            Repository.open, backend, Credentials(body.passphrase.encode() if body.passphrase else None))
    except VmkeepError as exc:
        raise HTTPException(400, f"cannot open the repository at {body.location}: {exc}") from None
    report = await run_in_threadpool(rebuild, session, repo, body.name, body.s3_endpoint)
    record = session.scalars(select(RepositoryRecord).where(RepositoryRecord.name == body.name)).one()
    if body.passphrase:
        record.passphrase_sealed = seal_secret(body.passphrase, passphrase_context(body.name))
    audit.record(session, request, user.name, "repository-add", body.name, location=body.location)
    session.commit()
    return RebuildOut(repository=report.repository, points=report.points, removed=report.removed,
                      damaged=[{"key": k, "reason": why} for k, why in report.damaged])


@router.post("/repositories/{name}/rebuild", response_model=RebuildOut, tags=["repositories"])
async def rebuild_repository(name: str, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                             session: Session = Depends(get_session)) -> RebuildOut:
    """Re-import the repository's restore points (it stays the source of truth)."""
    record = session.scalar(select(RepositoryRecord).where(RepositoryRecord.name == name))
    if record is None:
        raise HTTPException(404, f"no repository {name}")
    # checked again before each use: the name may resolve elsewhere now
    await run_in_threadpool(refuse_with_400, request.app.state.endpoints, record.s3_endpoint, "s3_endpoint")
    try:
        repo = await run_in_threadpool(open_registered, record)
        report = await run_in_threadpool(rebuild, session, repo, name, record.s3_endpoint)
    except VmkeepError as exc:
        raise HTTPException(502, f"cannot read repository {name}: {exc}") from None
    audit.record(session, request, user.name, "repository-rebuild", name, points=report.points)
    session.commit()
    return RebuildOut(repository=report.repository, points=report.points, removed=report.removed,
                      damaged=[{"key": k, "reason": why} for k, why in report.damaged])


def _repository_users(session: Session, r: RepositoryRecord) -> list[str]:
    """What keeps ``r`` in the catalog: the policies that back up or copy into it, their runs still
    going, the restores from it and its maintenance runs (copies into it too) under way."""
    policies = list(session.scalars(select(Policy.name).where(Policy.repository_id == r.id).order_by(Policy.name)))
    runs = list(session.scalars(select(Job.id).join(Policy).where(Policy.repository_id == r.id,
                                                                  Job.finished.is_(None)).order_by(Job.id)))
    restores = list(session.scalars(select(RestoreJob.id).where(RestoreJob.repository_id == r.id,
                                                                RestoreJob.status.in_(ACTIVE)).order_by(RestoreJob.id)))
    upkeep = list(session.scalars(select(MaintenanceRun.id).where(MaintenanceRun.repository_id == r.id,
                                                                  MaintenanceRun.status.in_(ACTIVE))
                                  .order_by(MaintenanceRun.id)))
    copying = list(session.scalars(select(Policy.name).join(CopyTarget, CopyTarget.policy_id == Policy.id)
                                   .where(CopyTarget.repository_id == r.id).order_by(Policy.name)))
    upkeep += list(session.scalars(select(MaintenanceRun.id).where(MaintenanceRun.target_repository_id == r.id,
                                                                   MaintenanceRun.status.in_(ACTIVE))
                                   .order_by(MaintenanceRun.id)))
    reasons = []
    if copying:
        reasons.append(f"policies {', '.join(copying)} copy into it (remove it from their copy targets)")
    if upkeep:
        reasons.append(f"maintenance runs {', '.join(map(str, upkeep))} are under way (wait for them to end)")
    if runs:
        reasons.append(f"runs {', '.join(map(str, runs))} are going (wait for them or cancel them)")
    if restores:
        reasons.append(f"restores {', '.join(map(str, restores))} are under way (wait for them to end)")
    if policies:
        reasons.append(f"policies {', '.join(policies)} back up into it (delete them or point them at "
                       "another repository)")
    return reasons


@router.delete("/repositories/{name}", status_code=204, tags=["repositories"])
def delete_repository(name: str, request: Request, user: User = Depends(require(*CHANGE_INVENTORY)),
                      session: Session = Depends(get_session)) -> Response:
    """Remove a repository from the catalog: its points leave the catalog, not the repository
    (registering it again imports them); its restores' history stays, by name. Refused while a
    policy, a run, a restore or a maintenance run uses it."""
    remove_repository(session, request, user.name, name)
    return Response(status_code=204)


def remove_repository(session: Session, request: Request, user: str, name: str) -> None:
    """The API's DELETE and the console's remove: HTTPException 404, or 409 with what uses it."""
    record = session.scalar(select(RepositoryRecord).where(RepositoryRecord.name == name).with_for_update())
    if record is None:
        raise HTTPException(404, f"no repository {name}")
    reasons = _repository_users(session, record)
    if reasons:
        raise HTTPException(409, f"repository {name} is in use: {'; '.join(reasons)}")
    points = _repository_out(session, record).points
    session.delete(record)
    audit.record(session, request, user, "repository-delete", name, location=record.location, points=points)
    session.commit()


@router.get("/points", response_model=list[PointOut], tags=["repositories"])
def list_points(vm: str | None = Query(None, max_length=200, description="exact, or a glob with *"),
                limit: int = Query(100, ge=1, le=10000), _: User = Depends(require(*EVERYONE)),
                session: Session = Depends(get_session)) -> list[PointOut]:
    """Restore points across every registered repository, newest first."""
    return [PointOut(**p) for p in find_points(session, vm, limit)]
