"""Catalog tables (SQLAlchemy 2 typed declarative); Alembic migrations create and evolve them."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, String, UniqueConstraint, false, func, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

AFTER_BACKUP = "after-backup"  # a copy target's schedule: right after each run's backups


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class RepositoryRecord(Base):
    """A repository (storage node) the master knows, by its location."""

    __tablename__ = "repositories"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    location: Mapped[str] = mapped_column(String(2000), unique=True)  # path or s3://bucket/prefix
    s3_endpoint: Mapped[str | None] = mapped_column(String(500))
    repo_id: Mapped[str] = mapped_column(String(64))  # the repository's own id, from its config
    encrypted: Mapped[bool]
    passphrase_sealed: Mapped[bytes | None]  # sealed with the server's master key; None: given per command
    capacity_bytes: Mapped[int | None] = mapped_column(BigInteger)
    used_bytes: Mapped[int | None] = mapped_column(BigInteger)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    scanned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    points: Mapped[list[RestorePointRecord]] = relationship(back_populates="repository", cascade="all, delete-orphan",
                                                            passive_deletes=True)


class RestorePointRecord(Base):
    """One restore point, as its manifest describes it."""

    __tablename__ = "restore_points"
    __table_args__ = (
        UniqueConstraint("repository_id", "name", "point_id"),
        Index("ix_restore_points_name_created", "name", "created"),
        Index("ix_restore_points_created", "created"),
        # a point by id or id prefix (LIKE 'x%': text_pattern_ops whatever the collation; 0018)
        Index("ix_restore_points_name_point", "name", "point_id"),  # a point's copies (0019)
        Index("ix_restore_points_point_id", "point_id", postgresql_ops={"point_id": "text_pattern_ops"}),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    repository_id: Mapped[int] = mapped_column(ForeignKey("repositories.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))  # the VM or image name
    point_id: Mapped[str] = mapped_column(String(64))
    parent: Mapped[str | None] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(20))  # vm or image
    mode: Mapped[str | None] = mapped_column(String(20))  # full or incremental
    transport: Mapped[str | None] = mapped_column(String(20))
    consistency: Mapped[str | None] = mapped_column(String(20))
    logical_bytes: Mapped[int] = mapped_column(BigInteger)
    read_bytes: Mapped[int | None] = mapped_column(BigInteger)
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    disks: Mapped[dict[str, Any]]  # disk name → size
    wire: Mapped[str | None] = mapped_column(String(10))  # local, tls or plain: how its data reached the proxy

    repository: Mapped[RepositoryRecord] = relationship(back_populates="points")


class User(Base):
    """Someone who uses the API: a role, an argon2 password hash, and API tokens."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))  # admin, operator, restore-only, auditor
    password_hash: Mapped[str] = mapped_column(String(200))
    disabled: Mapped[bool] = mapped_column(default=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", cascade="all, delete-orphan",
                                                  passive_deletes=True)


class ApiToken(Base):
    """A bearer token; only its SHA-256 is kept, so a leaked table gives no working token."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # every token expires
    last_used: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship(back_populates="tokens")


class AuditEntry(Base):
    """Who did what, when, from where: every change, login, backup start and restore."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_at", "at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    user: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(100))
    target: Mapped[str] = mapped_column(String(500))
    client: Mapped[str | None] = mapped_column(String(100))
    detail: Mapped[dict[str, Any]]
    prev_hash: Mapped[str | None] = mapped_column(String(64))  # the chain (vmkeep.catalog.audit_chain)
    hash: Mapped[str | None] = mapped_column(String(64))


class Hypervisor(Base):
    """A hypervisor manager (a libvirt host now; vCenter, XenServer, Hyper-V later) and its login,
    sealed with the server's master key."""

    __tablename__ = "hypervisors"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    uri: Mapped[str] = mapped_column(String(1000))
    username: Mapped[str | None] = mapped_column(String(200))
    secret_sealed: Mapped[bytes | None]
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    discovered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    discovery_minutes: Mapped[int] = mapped_column(default=60, server_default="60")  # the schedule
    discovery_error: Mapped[str | None] = mapped_column(String(2000))
    # what an administrator allowed for its address beyond the safe default (vmkeep.hypervisors.address)
    allow_plain_tcp: Mapped[bool] = mapped_column(default=False, server_default=false())
    allow_unsafe_options: Mapped[bool] = mapped_column(default=False, server_default=false())
    # where restores may write (directories, storage pools or datastores), as an administrator set it
    restore_locations: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")

    vms: Mapped[list[VirtualMachine]] = relationship(back_populates="hypervisor", cascade="all, delete-orphan",
                                                     passive_deletes=True)


class VirtualMachine(Base):
    """A VM as last discovered; ``present`` turns false when discovery no longer finds it."""

    __tablename__ = "vms"
    __table_args__ = (UniqueConstraint("hypervisor_id", "uuid"), Index("ix_vms_name", "name"))

    id: Mapped[int] = mapped_column(primary_key=True)
    hypervisor_id: Mapped[int] = mapped_column(ForeignKey("hypervisors.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    uuid: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(40))
    disks: Mapped[list[Any]]
    tags: Mapped[list[Any]] = mapped_column(default=list)
    folder: Mapped[str | None] = mapped_column(String(500))
    present: Mapped[bool] = mapped_column(default=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    hypervisor: Mapped[Hypervisor] = relationship(back_populates="vms")


class Proxy(Base):
    """A data mover that registered itself; up while its heartbeat is fresh."""

    __tablename__ = "proxies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    transports: Mapped[list[Any]]  # what it can do: san, hotadd, nbd
    reaches: Mapped[list[Any]]  # hypervisor hosts it sits on or reaches ("*": any, over nbd)
    storage: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")  # datastores it sees (san)
    concurrency: Mapped[int]
    registered: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Policy(Base):
    """What to protect and how: selection rules evaluated at each run, target, options."""

    __tablename__ = "policies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    selection: Mapped[dict[str, Any]]  # vms, globs, hypervisor, hosts, tags
    repository_id: Mapped[int] = mapped_column(ForeignKey("repositories.id"))
    schedule: Mapped[str | None] = mapped_column(String(100))  # cron
    retention: Mapped[dict[str, Any]]  # keep_last, keep_daily, …
    full_every: Mapped[int | None]
    transports: Mapped[str] = mapped_column(String(50), default="san:hotadd:nbd")
    quiesce: Mapped[str] = mapped_column(String(20), default="try")
    max_per_host: Mapped[int | None]  # limits on one run's backups running at once
    max_per_datastore: Mapped[int | None]
    max_per_proxy: Mapped[int | None]
    verify_after: Mapped[bool] = mapped_column(default=False, server_default=false())
    verify_boot: Mapped[bool] = mapped_column(default=False, server_default=false())  # sandboxed boot check
    nbd_tls: Mapped[str] = mapped_column(String(10), default="require", server_default="require")
    next_run: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # from the schedule
    notify_webhook: Mapped[str | None] = mapped_column(String(2000))
    notify_email: Mapped[list[Any] | None]
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    repository: Mapped[RepositoryRecord] = relationship()
    copy_targets: Mapped[list[CopyTarget]] = relationship(back_populates="policy", cascade="all, delete-orphan",
                                                          passive_deletes=True, order_by="CopyTarget.id")


class CopyTarget(Base):
    """Another repository a policy's points are copied to (migration 0019): right after each run's
    backups (``schedule`` "after-backup") or on a cron; either sends every point of the policy's VMs
    the target lacks and its own retention keeps, and that retention prunes the target."""

    __tablename__ = "policy_copy_targets"
    __table_args__ = (UniqueConstraint("policy_id", "repository_id"),
                      Index("ix_policy_copy_targets_next_run", "next_run"))

    id: Mapped[int] = mapped_column(primary_key=True)
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"))
    repository_id: Mapped[int] = mapped_column(ForeignKey("repositories.id"))
    schedule: Mapped[str] = mapped_column(String(100), default=AFTER_BACKUP, server_default=AFTER_BACKUP)
    retention: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")  # keep_last, …
    next_run: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # a cron's next time

    policy: Mapped[Policy] = relationship(back_populates="copy_targets")
    repository: Mapped[RepositoryRecord] = relationship()


class Job(Base):
    """One run of a policy."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_copies_pending", "id", postgresql_where=text("copies_queued IS NULL")),)

    id: Mapped[int] = mapped_column(primary_key=True)
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id", ondelete="SET NULL"))
    policy_name: Mapped[str] = mapped_column(String(100), server_default="")  # kept when the policy is deleted
    requested_by: Mapped[str] = mapped_column(String(100))  # a user, or "schedule"
    status: Mapped[str] = mapped_column(String(20))  # running, succeeded, partial, failed, cancelled
    notified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    notify_error: Mapped[str | None] = mapped_column(String(2000))
    started: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    copies_queued: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # its after-backup copies (0019)

    policy: Mapped[Policy | None] = relationship()
    vms: Mapped[list[JobVM]] = relationship(back_populates="job", order_by="JobVM.id")

    @property
    def running_policy(self) -> Policy:
        """The policy of a run still going (a policy is not deleted while one of its runs goes)."""
        if self.policy is None:
            raise LookupError(f"run {self.id}: its policy {self.policy_name} was deleted")
        return self.policy


class JobVM(Base):
    """One VM's backup within a policy run, with its outcome."""

    __tablename__ = "job_vms"
    __table_args__ = (Index("ix_job_vms_status", "status"), Index("ix_job_vms_job_id", "job_id"),
                      Index("ix_job_vms_vm_name", "vm_name"),
                      # each VM's newest outcome (the dashboard's "failed last backup", migration 0016)
                      Index("ix_job_vms_outcomes", "vm_id", "id", postgresql_include=["status"],
                            postgresql_where=text("status IN ('succeeded', 'failed')")))

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("vms.id", ondelete="SET NULL"))  # history outlives the VM
    vm_name: Mapped[str] = mapped_column(String(200))
    proxy: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20))  # waiting, queued, running, succeeded, failed, cancelled
    attempts: Mapped[int] = mapped_column(default=0)
    task_id: Mapped[int | None] = mapped_column(BigInteger)  # the procrastinate job
    mode: Mapped[str | None] = mapped_column(String(20))
    mode_reason: Mapped[str | None] = mapped_column(String(500))  # why full or incremental
    transport: Mapped[str | None] = mapped_column(String(20))
    read_bytes: Mapped[int | None] = mapped_column(BigInteger)
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    progress_bytes: Mapped[int | None] = mapped_column(BigInteger)  # live, while it runs
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)  # what this attempt has to read
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    point_id: Mapped[str | None] = mapped_column(String(64))
    verified: Mapped[bool | None]  # None: not asked for (or not reached)
    disks: Mapped[dict[str, Any] | None]  # per disk: mode, bytes read, reused, stored, seconds
    boot_check: Mapped[dict[str, Any] | None]  # the sandboxed boot of the new point, when the policy asks
    warnings: Mapped[list[Any]] = mapped_column(default=list)
    error: Mapped[str | None] = mapped_column(String(4000))
    started: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    job: Mapped[Job] = relationship(back_populates="vms")


class JobVMLog(Base):
    """A log line of one VM's backup, as the proxy running it logged it (INFO and above, secrets
    masked); at most 500 per backup row (migration 0014's trigger)."""

    __tablename__ = "job_vm_logs"
    __table_args__ = (Index("ix_job_vm_logs_job_vm_id", "job_vm_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_vm_id: Mapped[int] = mapped_column(ForeignKey("job_vms.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    level: Mapped[str] = mapped_column(String(10))
    logger: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(String(4000))


class RestoreJob(Base):
    """A restore started through the server, run by a proxy that reaches the target host."""

    __tablename__ = "restore_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    requested_by: Mapped[str] = mapped_column(String(100))
    vm_name: Mapped[str] = mapped_column(String(200))
    point_id: Mapped[str] = mapped_column(String(64))
    # history outlives the repository's registration (migration 0013)
    repository_id: Mapped[int | None] = mapped_column(ForeignKey("repositories.id", ondelete="SET NULL"))
    repository_name: Mapped[str] = mapped_column(String(200), server_default="")  # kept when it is removed
    hypervisor_id: Mapped[int | None] = mapped_column(ForeignKey("hypervisors.id", ondelete="SET NULL"))
    hypervisor_name: Mapped[str] = mapped_column(String(200), server_default="")  # kept when it is deleted
    mode: Mapped[str] = mapped_column(String(20))  # as-new, overwrite, disk-file or instant
    new_name: Mapped[str | None] = mapped_column(String(200))  # the new VM's, or disk-file's file name
    storage: Mapped[str | None] = mapped_column(String(1000))  # disk-file: the file's directory
    disk: Mapped[str | None] = mapped_column(String(200))  # disk-file: which disk of the point (0017)
    format: Mapped[str | None] = mapped_column(String(10))  # disk-file: qcow2 or raw
    step: Mapped[str | None] = mapped_column(String(10))  # instant: start, finish or discard
    # as-new: where the new VM goes besides its storage (restore_vm's place; 0018): every NIC on
    # this network ("none": no NICs), on this host, in this VM folder; None: as the original
    network: Mapped[str | None] = mapped_column(String(200))
    host: Mapped[str | None] = mapped_column(String(200))
    folder: Mapped[str | None] = mapped_column(String(500))
    start_vm: Mapped[bool] = mapped_column(default=True)
    # 0019: the restore may read the point from a copy in another repository when its own fails to
    # open; the repository it was read from (the proxy writes it)
    use_copies: Mapped[bool] = mapped_column(default=False, server_default=false())
    source_repository: Mapped[str | None] = mapped_column(String(200))
    proxy: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20))  # queued, running, succeeded, failed
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    warnings: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")
    progress_bytes: Mapped[int | None] = mapped_column(BigInteger)  # live, while it runs
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    task_id: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(String(4000))
    disks: Mapped[dict[str, Any] | None]  # disk → restored path
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    repository: Mapped[RepositoryRecord | None] = relationship()
    hypervisor: Mapped[Hypervisor | None] = relationship()


class MaintenanceRun(Base):
    """A verify, prune, GC or usage measurement of a repository, run by a proxy (migration 0015)."""

    __tablename__ = "maintenance_runs"
    __table_args__ = (Index("ix_maintenance_runs_repository", "repository_id", "kind", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # history outlives the repository's registration
    repository_id: Mapped[int | None] = mapped_column(ForeignKey("repositories.id", ondelete="SET NULL"))
    repository_name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))  # verify, prune, gc, usage, copy
    # a copy's target (0019): repository_id is the source it reads
    target_repository_id: Mapped[int | None] = mapped_column(ForeignKey("repositories.id", ondelete="SET NULL"))
    target_repository_name: Mapped[str | None] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")  # what the task is to do
    requested_by: Mapped[str] = mapped_column(String(100))
    proxy: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20))  # queued, running, succeeded, failed
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    task_id: Mapped[int | None] = mapped_column(BigInteger)
    progress_bytes: Mapped[int | None] = mapped_column(BigInteger)  # live, while it runs
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(String(4000))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RepositoryUsage(Base):
    """What one name's points take of a repository, as its last usage run measured it: bytes of
    chunks only its points use (unique) and of chunks shared with other names (stored sizes)."""

    __tablename__ = "repository_usage"

    repository_id: Mapped[int] = mapped_column(ForeignKey("repositories.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    points: Mapped[int]
    logical_bytes: Mapped[int] = mapped_column(BigInteger)
    referenced_bytes: Mapped[int] = mapped_column(BigInteger)
    unique_bytes: Mapped[int] = mapped_column(BigInteger)
    shared_bytes: Mapped[int] = mapped_column(BigInteger)
    run_id: Mapped[int] = mapped_column(ForeignKey("maintenance_runs.id", ondelete="CASCADE"))


class PointDay(Base):
    """What one repository's points of one UTC day add up to: kept by the database's triggers on
    ``restore_points`` (migration 0016), so storage ratios and growth read a few rows, not a million."""

    __tablename__ = "point_days"

    repository_id: Mapped[int] = mapped_column(ForeignKey("repositories.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(primary_key=True)
    points: Mapped[int] = mapped_column(BigInteger)
    logical_bytes: Mapped[int] = mapped_column(BigInteger)
    read_bytes: Mapped[int] = mapped_column(BigInteger)
    stored_bytes: Mapped[int] = mapped_column(BigInteger)


class BackupDay(Base):
    """How many backups ended on one UTC day, by outcome: kept by the database's triggers on
    ``job_vms`` (migration 0016), so success rates read 30 rows, not a month of backups."""

    __tablename__ = "backup_days"

    day: Mapped[date] = mapped_column(primary_key=True)
    succeeded: Mapped[int] = mapped_column(BigInteger)
    failed: Mapped[int] = mapped_column(BigInteger)


class NewestPoint(Base):
    """A name's newest restore point in one repository: kept by the database's triggers on
    ``restore_points`` (migration 0016), so 10,000 VMs' newest points are one join, not 10,000 look-ups."""

    __tablename__ = "newest_points"
    __table_args__ = (Index("ix_newest_points_name", "name"),)

    repository_id: Mapped[int] = mapped_column(ForeignKey("repositories.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))

# the replica tables (migration 0020) live in their own module, on this Base: imported here so
# that whoever reads Base.metadata (Alembic, the schema test) sees them
from vmkeep.catalog import replica_models as _replica_models  # noqa: E402,F401
