"""Request and response bodies of the REST API (they make the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class Login(BaseModel):
    name: str = Field(max_length=100)
    password: str = Field(max_length=1000)


class TokenOut(BaseModel):
    token: str
    expires: datetime | None


class TokenRequest(BaseModel):
    name: str = Field(pattern=NAME)
    days: int | None = Field(default=None, ge=1, le=3650)


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
    kind: str = Field(pattern=r"^(libvirt|vsphere)$")
    uri: str = Field(min_length=1, max_length=1000)
    username: str | None = Field(default=None, max_length=200)
    password: str | None = Field(default=None, max_length=1000)
    discovery_minutes: int = Field(default=60, ge=1, le=10080)


class HypervisorOut(BaseModel):
    name: str
    kind: str
    uri: str
    username: str | None
    has_password: bool
    discovery_minutes: int
    discovered_at: datetime | None
    discovery_error: str | None


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
    logical_bytes: int
    read_bytes: int | None
    stored_bytes: int | None
    duration_seconds: float | None
    disks: dict[str, Any]
    repository: str


class AuditOut(BaseModel):
    at: datetime
    user: str
    action: str
    target: str
    client: str | None
    detail: dict[str, Any]
