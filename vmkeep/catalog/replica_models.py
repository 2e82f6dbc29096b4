"""Catalog tables of VM replicas kept through the server (migration 0020): a policy's replica
target, and each replica's state and point as the last sync left it.

The replica's own record on its host (vmkeep.hypervisors.libvirt.replica_meta) stays the truth
about what its disks hold; these rows are what the master knows of it, so the API and console
list replicas without asking every host, and they are the work order of a sync a proxy runs.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, String, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from vmkeep.catalog.models import Base, Hypervisor, Policy

NAME_PATTERN = "{vm}-replica"  # the replica VM's name on the target host


class ReplicaTarget(Base):
    """Where a policy keeps replicas of its VMs: a registered libvirt hypervisor, the storage the
    first sync puts their disks in, their network, their name. One per policy."""

    __tablename__ = "policy_replica_targets"

    id: Mapped[int] = mapped_column(primary_key=True)
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"), unique=True)
    hypervisor_id: Mapped[int] = mapped_column(ForeignKey("hypervisors.id", ondelete="CASCADE"))
    storage: Mapped[str | None] = mapped_column(String(1000))  # a directory or pool; None: the host's default
    network: Mapped[str | None] = mapped_column(String(200))  # None: as the original's; "none": no NICs
    name_pattern: Mapped[str] = mapped_column(String(200), default=NAME_PATTERN, server_default=NAME_PATTERN)
    # the newest run of the policy whose replicas were queued: the next one ended is replicated
    last_job_id: Mapped[int | None]

    policy: Mapped[Policy] = relationship()
    hypervisor: Mapped[Hypervisor] = relationship()


class Replica(Base):
    """One VM's replica on one host: its state and point after the last sync (``state``, as the
    replica's record on the host said), and that sync's outcome (``status``, ``error``, bytes);
    ``action`` says what the proxy is to do: a sync, or a failover (start the replica)."""

    __tablename__ = "replicas"
    # a replica name is one VM's on its host; two VMs' rows naming one replica VM (set_target refuses
    # it, a policy's selection may grow into it) both show, the second's sync failing with why
    __table_args__ = (UniqueConstraint("hypervisor_id", "replica_name", "vm_name"),
                      Index("ix_replicas_vm_name", "vm_name"))

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_name: Mapped[str] = mapped_column(String(200))
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id", ondelete="SET NULL"))
    policy_name: Mapped[str] = mapped_column(String(100))  # kept when the policy is deleted
    hypervisor_id: Mapped[int | None] = mapped_column(ForeignKey("hypervisors.id", ondelete="SET NULL"))
    hypervisor_name: Mapped[str] = mapped_column(String(200))
    replica_name: Mapped[str] = mapped_column(String(200))
    repository_id: Mapped[int | None] = mapped_column(ForeignKey("repositories.id", ondelete="SET NULL"))
    repository_name: Mapped[str] = mapped_column(String(200))
    storage: Mapped[str | None] = mapped_column(String(1000))
    network: Mapped[str | None] = mapped_column(String(200))
    point_id: Mapped[str | None] = mapped_column(String(64))  # what its disks hold (standby)
    pending_point: Mapped[str | None] = mapped_column(String(64))  # what the queued sync brings it to
    # seeding, updating, standby, failed-over, diverged; absent: none of the VM's on the host
    state: Mapped[str | None] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))  # the last sync: queued, running, succeeded, failed
    action: Mapped[str] = mapped_column(String(20), default="sync", server_default="sync")  # or failover
    failover_network: Mapped[str | None] = mapped_column(String(200))  # a failover's: the replica's NICs on it
    mode: Mapped[str | None] = mapped_column(String(20))  # full, incremental, compare, unchanged
    bytes_written: Mapped[int | None] = mapped_column(BigInteger)  # by the last sync
    job_id: Mapped[int | None]  # the policy run whose point the last sync took
    proxy: Mapped[str | None] = mapped_column(String(100))
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    task_id: Mapped[int | None] = mapped_column(BigInteger)  # the current task: only it records an outcome
    progress_bytes: Mapped[int | None] = mapped_column(BigInteger)  # live, while it runs
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(String(4000))
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
