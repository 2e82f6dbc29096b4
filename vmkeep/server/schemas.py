"""Request and response bodies of the REST API (they make the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, model_validator

from vmkeep.hypervisors.address import AddressRefused, Allowance, check_address
from vmkeep.hypervisors.connect import kind_of

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class Login(BaseModel):
    name: str = Field(max_length=100)
    password: str = Field(max_length=1000)


class TokenOut(BaseModel):
    token: str
    expires: datetime


class TokenRequest(BaseModel):
    name: str = Field(pattern=NAME)
    days: int | None = Field(default=None, ge=1, le=3650,
                             description="lifetime; the server's maximum (365 days by default) when not given")


class TokenInfo(BaseModel):
    id: int
    name: str
    user: str
    created: datetime
    expires: datetime
    last_used: datetime | None
    current: bool  # the token this request came with


class UserIn(BaseModel):
    name: str = Field(pattern=NAME)
    password: str = Field(min_length=8, max_length=1000)
    role: str = Field(pattern=r"^(admin|operator|restore-only|auditor|proxy)$")


class UserOut(BaseModel):
    name: str
    role: str
    disabled: bool
    created: datetime


class HypervisorIn(BaseModel):
    name: str = Field(pattern=NAME)
    kind: str = Field(pattern=r"^(libvirt|vsphere|xen)$")
    uri: str = Field(min_length=1, max_length=1000)
    username: str | None = Field(default=None, max_length=200)
    password: str | None = Field(default=None, max_length=1000)
    discovery_minutes: int = Field(default=60, ge=1, le=10080)
    allow_plain_tcp: bool = Field(default=False, description="admin only: accept qemu+tcp:// (unencrypted)")
    allow_unsafe_options: bool = Field(default=False, description="admin only: accept address options that name "
                                                                  "key files or turn checks off (keyfile, "
                                                                  "no_verify, vSphere insecure/http)")

    @model_validator(mode="after")
    def address_accepted(self) -> HypervisorIn:
        """The address is one vmkeep connects to on these terms (refusals are 422 with the reason)."""
        try:
            check_address(self.uri, Allowance(plain_tcp=self.allow_plain_tcp,
                                              unsafe_options=self.allow_unsafe_options))
        except AddressRefused as exc:
            raise ValueError(str(exc)) from exc
        if kind_of(self.uri) != self.kind:
            raise ValueError(f"kind {self.kind} does not match the address {self.uri!r}")
        return self


class HypervisorOut(BaseModel):
    name: str
    kind: str
    uri: str
    username: str | None
    has_password: bool
    discovery_minutes: int
    allow_plain_tcp: bool
    allow_unsafe_options: bool
    restore_locations: list[str]
    discovered_at: datetime | None
    discovery_error: str | None


class RestoreLocations(BaseModel):
    locations: list[str] = Field(max_length=100, description="absolute directories (or datastore names) restores "
                                                             "may write into, below which any path is allowed")


class DiscoveryOut(BaseModel):
    hypervisor: str
    vms: int
    new: int
    gone: int


class VMOut(BaseModel):
    name: str
    uuid: str
    hypervisor: str
    host: str
    state: str
    present: bool
    disks: list[dict[str, Any]]
    tags: list[Any]
    last_seen: datetime


class RepositoryIn(BaseModel):
    name: str = Field(pattern=NAME)
    location: str = Field(min_length=1, max_length=2000)
    s3_endpoint: str | None = Field(default=None, max_length=500)
    passphrase: str | None = Field(default=None, max_length=1000)


class RepositoryOut(BaseModel):
    name: str
    location: str
    repo_id: str
    encrypted: bool
    capacity_bytes: int | None
    used_bytes: int | None
    scanned_at: datetime | None
    points: int


class RebuildOut(BaseModel):
    repository: str
    points: int
    removed: int
    damaged: list[dict[str, str]]


class PointOut(BaseModel):
    name: str
    point_id: str
    parent: str | None
    created: datetime
    kind: str
    mode: str | None
    transport: str | None
    consistency: str | None
    wire: str | None  # local, tls or plain: whether its data crossed the network, and encrypted
    logical_bytes: int
    read_bytes: int | None
    stored_bytes: int | None
    duration_seconds: float | None
    disks: dict[str, Any]
    repository: str  # the one that held it first (its backup's)
    repositories: list[str]  # every repository holding it: the original and its copies


class AuditVerifyOut(BaseModel):
    entries: int
    ok: bool
    problems: list[str]
    head: str  # the newest entry's hash


class AuditOut(BaseModel):
    at: datetime
    user: str
    action: str
    target: str
    client: str | None
    detail: dict[str, Any]
