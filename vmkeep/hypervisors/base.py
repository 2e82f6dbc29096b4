"""The connector protocol: what the data mover needs from any hypervisor.

The data mover never knows which hypervisor it reads: a connector hands it, per disk, an NBD
URI, the size, and for an incremental the metadata context that marks what changed, plus the
VM's configuration. Entering ``point_in_time`` takes the snapshot or checkpoint; leaving it
releases everything, on success, on error and on Ctrl-C alike.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from vmkeep.errors import VmkeepError

Quiesce = Literal["required", "try", "off"]
Consistency = Literal["application", "crash"]
NbdTls = Literal["auto", "require", "off"]
TRANSPORTS = ("san", "hotadd", "nbdssl", "nbd", "https")  # nbdssl: vSphere (VDDK); https: a datastore's HTTPS


class HypervisorError(VmkeepError):
    """The hypervisor refused or failed an operation; the message says what to do."""


@dataclass
class VMDisk:
    name: str  # target name, e.g. vda
    path: str
    format: str
    size: int
    allocation: int
    backup: bool = True
    skip_reason: str = ""
    datastore: str = ""  # the storage it lives on (pool, datastore, SR): concurrency limits count per datastore


@dataclass
class VMInfo:
    name: str
    uuid: str
    state: str
    host: str
    disks: list[VMDisk]
    folder: str | None = None  # where the manager files it (vSphere's VM folders), for selection rules


@dataclass
class DiskExport:
    """One disk of a point in time, as the data mover reads it."""

    name: str
    uri: str
    size: int
    dirty_context: str | None = None  # set when only changed extents need reading (NBD metadata context)
    changed: list[Any] | None = None  # or the changed extents themselves, from the hypervisor's API
    allocated: list[Any] | None = None  # where data is, when the hypervisor knows better than the export


# how a point's data reached the proxy: not over a network, encrypted (TLS), or in the clear
Wire = Literal["local", "tls", "plain"]


def wire_of(disks: dict[str, DiskExport]) -> Wire:
    """The least protected way any of these NBD exports is reached: ``nbds://`` is TLS, ``nbd://``
    plain TCP, anything else (``nbd+unix://``) on this machine."""
    schemes = {d.uri.split("://", 1)[0] for d in disks.values()}
    if "nbd" in schemes:
        return "plain"
    return "tls" if "nbds" in schemes else "local"


@dataclass
class PointInTimeInfo:
    vm: str
    transport: str
    consistency: Consistency
    mode: Literal["full", "incremental"]
    reason: str  # why full, or what the incremental is relative to
    disks: dict[str, DiskExport]
    config: dict[str, Any]  # saved with the restore point (domain XML, …)
    chain: dict[str, Any]  # what the next incremental needs (checkpoint name, changeId, …)
    notes: list[str] = field(default_factory=list)  # skipped transports and disks, with reasons
    wire: Wire = "local"  # recorded in the point: did its data cross the network, and encrypted?
    # Called (from any thread, at most once, returning at once) when every read of the disks is
    # done: the connector starts letting go of its snapshot or backup job while the engine stores
    # the last chunks. Leaving the point in time waits for it either way.
    release: Callable[[], None] | None = None


class Connector(Protocol):
    kind: str  # libvirt, vsphere, …: recorded in each point, so a restore goes to the same kind
    uri: str
    is_local: bool  # the proxy runs on the hypervisor host (hotadd, offline reads, host paths)

    def inventory(self) -> list[VMInfo]: ...

    def close(self) -> None: ...

    def exists(self, name: str) -> bool: ...

    def restore_staging(self, name: str, storage: str | None) -> tuple[Path, str]:
        """Where a new VM's restored disks are written (a directory) and in which format."""

    def define_restored(self, config: dict[str, Any], *, name: str, disk_paths: dict[str, str],
                        storage: str | None, as_new: bool, start: bool,
                        place: dict[str, str] | None = None) -> dict[str, str]:
        """Register (and start) a VM from a point's configuration with its restored disks:
        as a new VM (new identity; ``storage`` as the user named it; ``place``: other choices of
        where it goes, such as vSphere's host, folder, network) or over the original.
        Returns where each disk lives now (the staged files, or where they were uploaded)."""

    def remove_restored(self, name: str, disk_paths: list[str]) -> bool:
        """Remove VM ``name`` if an earlier attempt of this restore defined it (its disks are
        exactly ``disk_paths``); whether one was there. Refuses to touch any other VM."""

    def require_shut_off(self, vm: str) -> None: ...

    def forget_checkpoints(self, vm: str) -> None:
        """Drop change-tracking state tied to disks that a restore replaces."""

    def point_in_time(
        self,
        vm: str,
        *,
        since: dict[str, Any] | None,
        previous_disks: dict[str, int] | None,
        transports: list[str],
        quiesce: Quiesce,
    ) -> AbstractContextManager[PointInTimeInfo]: ...


def parse_transports(order: str) -> list[str]:
    """``san:hotadd:nbd`` → ['san', 'hotadd', 'nbd'], refusing unknown names."""
    names = [t.strip() for t in order.split(":") if t.strip()]
    unknown = [t for t in names if t not in TRANSPORTS]
    if unknown or not names:
        raise VmkeepError(f"unknown transport {', '.join(unknown) or order!r}: use an order of san, hotadd, "
                          "nbdssl, nbd, https such as san:hotadd:nbd")
    return names


@runtime_checkable
class BootChecks(Protocol):
    """An optional capability: boot a restore point in a sandbox (no network) and wait for its
    heartbeat. ``repo`` is the open repository, ``spec`` how the point's export opens it."""

    def boot_check(self, repo: Any, spec: Any, vm: str, point: str | None, *, timeout: float = 300.0,
                   marker: str | None = None, script: Path | None = None) -> dict[str, Any]: ...
