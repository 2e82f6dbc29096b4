"""VM replicas through the API: a policy's replica target (set, replaced, removed) and the
replicas the master keeps, with their state, point and host (vmkeep.server.replicas).

A failover (start a standby replica) runs on a proxy on the replica's host, as a sync does.
Failback stays the command run where the hosts are (``vmkeep failback``): it overwrites the
original's disks, which must be shut off, reading both hosts.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import Policy, User
from vmkeep.catalog.replica_models import NAME_PATTERN, Replica
from vmkeep.server import audit
from vmkeep.server.auth import CHANGE_INVENTORY, EVERYONE, get_session, require
from vmkeep.server.replicas import (
    ReplicaRefused,
    failover_row,
    replica_out,
    set_target,
    start_failover,
    target_of,
    target_out,
)

router = APIRouter(prefix="/api")
PLAIN = r"^[^\x00-\x1f\x7f]+$"


class ReplicaTargetIn(BaseModel):
    hypervisor: str | None = Field(None, max_length=200, pattern=PLAIN,
                                   description="the registered libvirt hypervisor the replicas are kept on; null: "
                                               "stop keeping them (the replica VMs stay on their host)")
    storage: str | None = Field(None, max_length=1000, pattern=PLAIN,
                                description="where a new replica's disks go on the host: a directory inside the "
                                            "hypervisor's restore locations, or a pool (default: the host's)")
    network: str | None = Field(None, max_length=200, pattern=PLAIN,
                                description="the network of the replicas' interfaces; 'none': no interfaces "
                                            "(default: as the original's)")
    name: str = Field(NAME_PATTERN, max_length=200, description="each replica VM's name, {vm} the VM's")


class ReplicaTargetOut(BaseModel):
    policy: str
    hypervisor: str | None
    storage: str | None
    network: str | None
    name: str | None


class ReplicaOut(BaseModel):
    id: int
    vm: str
    replica: str
    policy: str
    hypervisor: str = Field(description="the registered hypervisor holding the replica")
    repository: str
    point: str | None = Field(description="the point the replica's disks hold")
    pending_point: str | None = Field(description="the point its last sync was to bring it to")
    state: str | None = Field(description="as the replica's record on its host says: seeding, updating, standby, "
                                          "failed-over or diverged")
    status: str = Field(description="its last sync: queued, running, succeeded or failed")
    mode: str | None
    action: str = Field(description="what the row's last task was: sync or failover")
    bytes_written: int | None
    job: int | None
    proxy: str | None
    attempts: int
    progress_bytes: int | None
    total_bytes: int | None
    storage: str | None
    network: str | None
    error: str | None
    updated: datetime


def _policy(session: Session, name: str) -> Policy:
    policy = session.scalar(select(Policy).where(Policy.name == name))
    if policy is None:
        raise HTTPException(404, f"no policy {name}")
    return policy


@router.get("/policies/{name}/replica", response_model=ReplicaTargetOut, tags=["replicas"])
def get_replica_target(name: str, _: User = Depends(require(*EVERYONE)),
                       session: Session = Depends(get_session)) -> ReplicaTargetOut:
    policy = _policy(session, name)
    return ReplicaTargetOut(**target_out(policy, target_of(session, policy)))


@router.put("/policies/{name}/replica", response_model=ReplicaTargetOut, tags=["replicas"])
def put_replica_target(name: str, body: ReplicaTargetIn, request: Request,
                       user: User = Depends(require(*CHANGE_INVENTORY)),
                       session: Session = Depends(get_session)) -> ReplicaTargetOut:
    """Keep a powered-off replica of each of the policy's VMs on a libvirt host, brought to each
    run's new point; ``hypervisor`` null stops it."""
    policy = _policy(session, name)
    target = target_of(session, policy)
    if body.hypervisor is None:
        if target is not None:
            session.delete(target)
            target = None
    else:
        try:
            target = set_target(session, policy, body.hypervisor, storage=body.storage, network=body.network,
                                pattern=body.name)
        except ReplicaRefused as refused:
            session.rollback()
            raise HTTPException(refused.status, str(refused)) from None
    out = target_out(policy, target)
    audit.record(session, request, user.name, "policy-replica", name, **{k: v for k, v in out.items() if k != "policy"})
    session.commit()
    return ReplicaTargetOut(**out)


@router.get("/replicas", response_model=list[ReplicaOut], tags=["replicas"])
def list_replicas(vm: str | None = Query(None, max_length=200), policy: str | None = Query(None, max_length=100),
                  _: User = Depends(require(*EVERYONE)), session: Session = Depends(get_session)) -> list[ReplicaOut]:
    query = select(Replica).order_by(Replica.vm_name, Replica.hypervisor_name)
    if vm is not None:
        query = query.where(Replica.vm_name == vm)
    if policy is not None:
        query = query.where(Replica.policy_name == policy)
    return [ReplicaOut(**replica_out(row)) for row in session.scalars(query)]


class FailoverIn(BaseModel):
    hypervisor: str | None = Field(None, max_length=200, pattern=PLAIN,
                                   description="whose replica to start, when the VM has replicas on several")
    network: str | None = Field(None, max_length=200, pattern=PLAIN,
                                description="the network the replica's interfaces go on; 'none': unplugged "
                                            "(default: as it was made)")


@router.post("/replicas/{vm}/failover", response_model=ReplicaOut, status_code=202, tags=["replicas"])
async def failover_replica(vm: str, request: Request, body: FailoverIn | None = None,
                           user: User = Depends(require(*CHANGE_INVENTORY)),
                           session: Session = Depends(get_session)) -> ReplicaOut:
    """Start the standby replica of ``vm`` on its host (the original should be off: both would be
    on the network); its row's state becomes failed-over, and syncs stop until a failback."""
    body = body or FailoverIn(hypervisor=None, network=None)
    try:
        row = failover_row(session, vm, body.hypervisor)
        audit.record(session, request, user.name, "replica-failover", vm, replica=row.replica_name,
                     hypervisor=row.hypervisor_name, point=row.point_id, network=body.network)
        return ReplicaOut(**replica_out(await start_failover(session, request.app.state.queue, row, body.network)))
    except ReplicaRefused as refused:
        session.rollback()
        raise HTTPException(refused.status, str(refused)) from None
