"""The connector protocol: what the data mover needs from any hypervisor.

The data mover never knows which hypervisor it reads: a connector hands it, per disk, an NBD
URI, the size, and for an incremental the metadata context that marks what changed, plus the
VM's configuration. Entering ``point_in_time`` takes the snapshot or checkpoint; leaving it
releases everything, on success, on error and on Ctrl-C alike.

Restore runs the other way: ``restore_vm`` hands the data mover one writer per disk (a writable
NBD export, a local file, an upload stream: whatever the hypervisor takes best), which gets
only the data and is told where the zeros are; ``finish`` registers the VM. docs/architecture.md
describes both directions for a new connector.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from vmkeep.errors import VmkeepError
from vmkeep.progress import Progress
from vmkeep.transport.targets import DiskWriter

Quiesce = Literal["required", "try", "off"]
Consistency = Literal["application", "crash"]
NbdTls = Literal["auto", "require", "off"]
TRANSPORTS = ("san", "hotadd", "nbdssl", "nbd", "https")  # nbdssl: vSphere (VDDK); https: a datastore's HTTPS
# place["network"] of a restore as a new VM: every network card of the new VM left unconnected
DISCONNECTED = "none"


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
    change_tracking: bool | None = None  # the hypervisor tracks its changed blocks (None: it does not say)


@dataclass
class VMInfo:
    name: str
    uuid: str
    state: str
    host: str
    disks: list[VMDisk]
    folder: str | None = None  # where the manager files it (vSphere's VM folders), for selection rules
    tags: list[str] = field(default_factory=list)  # the hypervisor's own tags (XenServer's), for selection rules


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


class VMRestore(Protocol):
    """One VM being restored: its disks are written first, then ``finish`` registers the VM.
    Leaving the context without ``finish`` removes everything it made (disks, VM, leases)."""

    def disk(self, name: str, size: int) -> AbstractContextManager[DiskWriter]:
        """The writer of disk ``name`` (``size`` bytes); leaving the context flushes and closes it."""

    def finish(self, *, start: bool) -> dict[str, str]:
        """Register (and start) the VM with the restored disks; where each disk lives now. Once
        registered, the VM and its disks are handed over: one that does not start stays."""


class Connector(Protocol):
    kind: str  # libvirt, vsphere, …: recorded in each point, so a restore goes to the same kind
    uri: str
    is_local: bool  # the proxy runs on the hypervisor host (hotadd, offline reads, host paths)

    def inventory(self) -> list[VMInfo]: ...

    def close(self) -> None: ...

    def exists(self, name: str) -> bool: ...

    def restore_vm(self, config: dict[str, Any], *, name: str, disks: dict[str, int], as_new: bool,
                   storage: str | None = None, place: dict[str, str] | None = None,
                   retry: bool = False) -> AbstractContextManager[VMRestore]:
        """Begin restoring a VM from a point's configuration with ``disks`` (name → size in
        bytes): as a new VM (new name, UUID and MACs; ``storage`` as the user named it; ``place``:
        other choices such as vSphere's host, folder, network) or over the original (which must be
        shut off). ``retry``: an earlier attempt of this same restore died; what it left (a VM it
        made, disks it wrote) goes first. Refuses, before writing anything, a name or disk that is
        taken, or a point of another kind of hypervisor."""

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
class InstantRecovery(Protocol):
    """An optional capability: run a VM straight from read-only NBD exports of a restore point
    (the engine serves them from the repository) with its writes kept aside, then move it to
    real storage while it runs, or drop it. ``layers`` is where each disk's writes go, as
    ``instant_start`` returned them: the engine records it, so finish and discard can run in
    another process."""

    def instant_start(self, config: dict[str, Any], *, name: str, disks: dict[str, DiskExport],
                      sandbox: bool = False) -> dict[str, str]:
        """Define and start VM ``name`` from a point's configuration (a new identity, as a restore
        as a new VM does) on copy-on-write layers over ``disks``; the layers. ``sandbox``: without
        network interfaces, so the VM cannot reach production. Undoes what it made if it fails."""

    def instant_finish(self, name: str, layers: dict[str, str], storage: Path,
                       progress: Progress | None = None) -> dict[str, str]:
        """Copy each disk (exported data and writes together) into ``storage`` while the VM runs,
        switch the VM onto the copies and drop the layers: nothing reads the exports afterwards.
        The new disk paths. A copy that fails leaves the VM running as it was."""

    def instant_discard(self, name: str, layers: dict[str, str]) -> None:
        """Power off and remove the VM and its layers (whatever part of them exists)."""


@runtime_checkable
class SandboxBoot(InstantRecovery, Protocol):
    """An optional capability for boot checks: an instant recovery started with ``sandbox=True``
    whose guest can be seen coming up."""

    def wait_heartbeat(self, name: str, *, timeout: float, marker: str | None = None) -> bool:
        """Whether VM ``name`` shows a heartbeat within ``timeout`` s: its guest agent answers a
        ping or, given ``marker``, its serial console prints that text (False once the VM stops)."""


@runtime_checkable
class RestoreChoices(Protocol):
    """An optional capability: where a restore as a new VM may go on this hypervisor, so a user
    picks from lists rather than typing names (``restore_vm``'s ``place`` keys)."""

    def restore_choices(self) -> dict[str, list[str]]:
        """``networks`` (always), and ``hosts`` and ``folders`` where the hypervisor has them:
        each the names ``place`` takes, sorted."""


# what a replica is doing, as its own metadata records it
ReplicaState = Literal["seeding", "updating", "standby", "failed-over", "diverged"]


@dataclass
class ReplicaInfo:
    """A replica VM as its own metadata on its host describes it: that record travels with the
    VM (a catalog lost, a proxy reinstalled), so it is the truth about what the disks hold."""

    name: str
    source: str  # the VM it replicates
    repository: str  # id of the repository its points come from
    point: str  # the point its disks equal while ``standby``
    state: ReplicaState
    disks: dict[str, int]  # disk → size in bytes
    updated: str = ""  # when the record last changed (UTC, ISO 8601)
    running: bool = False
    paths: dict[str, str] = field(default_factory=dict)  # disk → where it lives on the host
    touched: bool = False  # standby, but its disks changed since (started outside vmkeep): not the point


class DiskPatch(Protocol):
    """An existing disk of a shut-off VM, written in place at offsets and read back: a replica's
    being brought up to date, or an original receiving a failback."""

    size: int
    sequential: bool  # writes must come in ascending offsets from one thread (an upload stream)

    def write(self, data: bytes, offset: int) -> None: ...

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros (it was data before)."""

    def scan(self, slot_size: int) -> Iterator[tuple[int, bytes | None]]:
        """Each ``slot_size`` slot in order: (offset, its bytes), or None where it is all hole."""


class Replicas(Protocol):
    """The replicas one host holds (see ``ReplicaHost``)."""

    def list(self) -> list[ReplicaInfo]: ...

    def get(self, name: str) -> ReplicaInfo | None:
        """None when no VM has that name; refuses a VM of that name that is not a replica."""

    def create(self, config: dict[str, Any], info: ReplicaInfo, *, storage: str | None,
               network: str | None) -> None:
        """Define the replica powered off from a point's configuration (a new identity, as a
        restore as new), with empty sparse disks of ``info.disks``' sizes and ``info`` as its
        metadata. Refuses a taken name or disk before making anything."""

    def remove(self, name: str) -> None:
        """Power off and remove a replica and its disks."""

    def mark(self, name: str, *, state: ReplicaState, point: str | None = None) -> ReplicaInfo:
        """Record a new state (and point) in the replica's metadata."""

    def start(self, name: str, *, network: str | None) -> None:
        """Start the replica, its interfaces first moved to ``network`` (DISCONNECTED: none)."""

    def disks(self, vm: str, names: Collection[str], *,
              writable_only: bool = False) -> AbstractContextManager[dict[str, DiskPatch]]:
        """Disks ``names`` of shut-off VM ``vm`` (a replica or any other) to write in place (with
        ``writable_only``, those the VM only reads are left out); refuses a running VM, a name it
        lacks, or disks it cannot write where they are."""


@runtime_checkable
class ReplicaHost(Protocol):
    """An optional capability: keep powered-off replicas of VMs on this hypervisor, updated in
    place from restore points (vmkeep.engine.replica)."""

    def replicas(self) -> Replicas: ...
