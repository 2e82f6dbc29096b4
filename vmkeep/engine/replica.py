"""VM replicas: a powered-off copy of a VM on another host, kept at its latest restore point by
writing only what changed; started there when the original is lost (failover), and the changes
it made copied back to the original afterwards (failback).

The replica's own metadata on its host (``Replicas``) records which point its disks hold and its
state, so every step knows what the disks are without any other record:

- ``seeding``/``updating``: a write was interrupted; the next replicate reads the disks back
  and writes what differs from the point (a compare pass).
- ``standby``: the disks are the point; the next replicate writes the slots whose chunk ids
  differ between that point's index and the new one's. Unless the host says the disks changed
  since (``touched``: the replica was started or written outside vmkeep): then a compare pass.
- ``failed-over``: it was started; it has changes of its own, which failback copies back.
- ``diverged``: failed back; its disks are the point plus its own changes, so the next
  replicate makes a compare pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from vmkeep.engine.backup import DEFAULT_WORKERS
from vmkeep.engine.replica_sync import SyncStats, changed_slots, differing_slots, disk_index, extents, write_slots
from vmkeep.engine.vm import disk_sizes, vm_config
from vmkeep.errors import UsageError
from vmkeep.hypervisors.base import Connector, DiskPatch, ReplicaHost, ReplicaInfo, Replicas
from vmkeep.progress import Progress
from vmkeep.repository.points import Manifest, check_name
from vmkeep.repository.repo import Repository

log = logging.getLogger(__name__)

SUFFIX = "-replica"


@dataclass
class ReplicaReport:
    vm: str
    replica: str
    host: str
    mode: str  # full, incremental, compare, unchanged, failback
    point: str
    previous_point: str | None = None
    bytes_written: int = 0
    bytes_zeroed: int = 0
    extents: int = 0
    slots: int = 0
    bytes_read_back: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def take(self, stats: SyncStats) -> None:
        for name, value in vars(stats).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def replicas_of(connector: Connector) -> Replicas:
    """The replica capability of a hypervisor, or the reason it has none."""
    if not isinstance(connector, ReplicaHost):
        raise UsageError(f"{connector.uri} ({connector.kind}) cannot hold VM replicas: replicate to a libvirt host")
    return connector.replicas()


def replica_name(vm: str, name: str | None) -> str:
    return check_name(name or vm + SUFFIX, "replica name")


def replicate(repo: Repository, connector: Connector, vm: str, *, point: str | None = None, name: str | None = None,
              storage: str | None = None, network: str | None = None, workers: int = DEFAULT_WORKERS,
              progress: Progress | None = None) -> ReplicaReport:
    """Bring (or make) the replica of ``vm`` on ``connector``'s host to ``point`` (default: the
    latest): the whole point the first time, afterwards only what differs."""
    started = time.monotonic()
    manifest = repo.find_point(vm, point)
    replicas = replicas_of(connector)
    name = replica_name(vm, name)
    info = replicas.get(name)
    if info is None:
        report = _first_copy(repo, replicas, manifest, name, storage, network, workers, progress)
    else:
        _check_replica_of(info, vm, repo, connector)
        report = _update(repo, replicas, manifest, info, workers, progress)
    report.host = connector.uri
    report.seconds = round(time.monotonic() - started, 3)
    log.info("replica %s of %s at point %s: %s, %d bytes written in %d extents (%.1f s)", name, vm,
             manifest.point_id, report.mode, report.bytes_written, report.extents, report.seconds, extra={"vm": vm})
    return report


def _check_replica_of(info: ReplicaInfo, vm: str, repo: Repository, connector: Connector) -> None:
    if info.source != vm:
        raise UsageError(f"{info.name} on {connector.uri} is the replica of {info.source}, not of {vm}; choose "
                         "another --name")
    if info.repository != repo.config.repo_id:
        raise UsageError(f"{info.name} on {connector.uri} is kept from repository {info.repository}, not this one "
                         f"({repo.config.repo_id}): name that repository, or another --name")


def _first_copy(repo: Repository, replicas: Replicas, manifest: Manifest, name: str, storage: str | None,
                network: str | None, workers: int, progress: Progress | None) -> ReplicaReport:
    """A new replica: defined powered off with empty sparse disks, then every non-zero slot of the
    point written (the holes stay holes). A failure removes it again."""
    info = ReplicaInfo(name=name, source=manifest.name, repository=repo.config.repo_id, point=manifest.point_id,
                       state="seeding", disks=disk_sizes(manifest))
    replicas.create(vm_config(repo, manifest), info, storage=storage, network=network)
    report = ReplicaReport(manifest.name, name, "", "full", manifest.point_id)
    try:
        with replicas.disks(name, manifest.disks) as disks:
            for disk in manifest.disks:
                index = repo.load_index(manifest, disk)
                slots = [slot for slot, _cid in index.nonzero()]
                report.take(write_slots(repo, index, disks[disk], slots, workers=workers, progress=progress,
                                        label=f"replica {disk}"))
        replicas.mark(name, state="standby", point=manifest.point_id)
    except BaseException:
        log.info("the first copy of replica %s failed: removing it", name)
        replicas.remove(name)
        raise
    return report


def _update(repo: Repository, replicas: Replicas, manifest: Manifest, info: ReplicaInfo, workers: int,
            progress: Progress | None) -> ReplicaReport:
    """An existing replica brought to ``manifest``: by index difference from its point while it is
    a faithful copy of it, by a compare pass otherwise."""
    name = info.name
    if info.running:
        raise UsageError(f"the replica {name} is running (failed over?): it is not updated while it runs; shut it "
                         f"down and fail back first (vmkeep failback {manifest.name})")
    if info.state == "failed-over":
        raise UsageError(f"the replica {name} was failed over and holds changes of its own: copy them back first "
                         f"(vmkeep failback {manifest.name}), then replicate")
    if info.disks != disk_sizes(manifest):
        raise UsageError(f"the disks of {manifest.name} changed since the replica was made ({_sizes(info.disks)} → "
                         f"{_sizes(disk_sizes(manifest))}): remove the replica (virsh undefine {name} "
                         "--remove-all-storage) and replicate again")
    report = ReplicaReport(manifest.name, name, "", "incremental", manifest.point_id, previous_point=info.point)
    faithful = info.state == "standby" and not info.touched
    if faithful and info.point == manifest.point_id:
        report.mode = "unchanged"
        return report
    previous = repo.load_point(manifest.name, info.point) if faithful else None
    if previous is None:
        report.mode = "compare"
        report.notes.append(_why_compare(info))
    replicas.mark(name, state="updating")  # a write that dies half-way is found out by the next run
    with replicas.disks(name, manifest.disks) as disks:
        for disk in manifest.disks:
            index = repo.load_index(manifest, disk)
            label = f"replica {disk}"
            if previous is not None:
                slots, read = changed_slots(repo.load_index(previous, disk), index), 0
            else:
                slots, read = differing_slots(repo, index, disks[disk], workers=workers, progress=progress,
                                              label=f"compare {disk}")
            stats = write_slots(repo, index, disks[disk], slots, workers=workers, progress=progress, label=label)
            stats.bytes_read_back = read
            report.take(stats)
    replicas.mark(name, state="standby", point=manifest.point_id)
    return report


def _why_compare(info: ReplicaInfo) -> str:
    if info.state != "standby":
        return f"replica state {info.state}: its disks were read back and compared with the point"
    if info.touched:
        return ("the replica's disks changed since it was left standby (started or written outside vmkeep): they "
                "were read back and compared with the point")
    return (f"point {info.point} the replica held is gone from the repository: its disks were read back and "
            "compared with the new point")


def _sizes(disks: dict[str, int]) -> str:
    return ", ".join(f"{d} {size}" for d, size in disks.items()) or "none"


def failover(connector: Connector, vm: str, *, name: str | None = None, network: str | None = None) -> ReplicaInfo:
    """Start the replica of ``vm`` (its interfaces on ``network``; 'none': unplugged)."""
    replicas = replicas_of(connector)
    info = _existing(replicas, vm, name, connector)
    if info.running:
        raise UsageError(f"the replica {info.name} runs already on {connector.uri}")
    if info.state in ("seeding", "updating"):
        raise UsageError(f"the replica {info.name} is incomplete (an update of it was interrupted): run vmkeep "
                         "replicate again first")
    previous = info.state
    marked = replicas.mark(info.name, state="failed-over")  # first: a replica that ran is never taken as standby
    try:
        replicas.start(info.name, network=network)
    except BaseException:
        replicas.mark(info.name, state=previous)
        raise
    log.info("failed over %s to its replica %s on %s (point %s)", vm, info.name, connector.uri, info.point,
             extra={"vm": vm})
    marked.running = True
    return marked


def _existing(replicas: Replicas, vm: str, name: str | None, connector: Connector) -> ReplicaInfo:
    name = replica_name(vm, name)
    info = replicas.get(name)
    if info is None:
        raise UsageError(f"no replica {name} on {connector.uri}: see `vmkeep replicas --to {connector.uri}`")
    if info.source != vm:
        raise UsageError(f"{name} on {connector.uri} is the replica of {info.source}, not of {vm}")
    return info


def failback(repo: Repository, connector: Connector, original: Connector, vm: str, *, name: str | None = None,
             workers: int = DEFAULT_WORKERS, progress: Progress | None = None) -> ReplicaReport:
    """Make the original VM's disks what the failed-over replica's disks hold.

    Both must be shut off: the replica, so that what is copied is what its guest last wrote (a
    running guest keeps writing, and a forced power-off loses what it has not flushed); the
    original, whose disks are written in place. Neither is assumed to be at the replica's point
    (the original may have run after its last backup, or after a newer one): both are read and
    each slot hashed with the repository's chunk-id key, and every slot where the replica differs
    from the original is written, so the original ends equal to the replica whatever it held.
    Disks the replica only reads (read-only) are left alone: its guest cannot have changed them.
    """
    started = time.monotonic()
    replicas = replicas_of(connector)
    info = _existing(replicas, vm, name, connector)
    _check_replica_of(info, vm, repo, connector)
    if info.state != "failed-over":
        raise UsageError(f"the replica {info.name} is {info.state}, not failed over: it has no changes of its own to "
                         "copy back")
    if info.running:
        raise UsageError(f"the replica {info.name} is running: shut it down from inside its guest (or virsh -c "
                         f"{connector.uri} shutdown {info.name}) and run failback again; it copies what is on its "
                         "disks, and a running guest still writes")
    report = ReplicaReport(vm, info.name, connector.uri, "failback", info.point)
    latest = repo.latest_point(vm)
    if latest is not None and latest.point_id != info.point:
        report.notes.append(f"{vm} has a newer point ({latest.point_id}) than the replica's ({info.point}): what the "
                            f"original held since is replaced by the replica's (point {latest.point_id} keeps it)")
    with replicas.disks(info.name, info.disks, writable_only=True) as source, \
            replicas_of(original).disks(vm, list(source)) as target:
        for disk in source:
            if target[disk].size != source[disk].size:
                raise UsageError(f"disk {disk} of {vm} is {target[disk].size} bytes, the replica's "
                                 f"{source[disk].size}: it is not the VM the replica came from")
            stats = SyncStats()
            held, read = disk_index(repo, target[disk], repo.chunk_size, workers=workers, progress=progress,
                                    label=f"read {vm} {disk}")
            slots, stats.bytes_read_back = differing_slots(
                repo, held, source[disk], workers=workers, progress=progress, label=f"failback {disk}",
                found=_copier(target[disk], held.chunk_size, held.slot_length, stats))
            stats.bytes_read_back += read
            stats.slots, stats.extents = len(slots), extents(slots)
            report.take(stats)
    replicas.mark(info.name, state="diverged")
    report.seconds = round(time.monotonic() - started, 3)
    log.info("failed back %s from %s: %d bytes in %d extents", vm, info.name, report.bytes_written, report.extents,
             extra={"vm": vm})
    return report


def _copier(target: DiskPatch, chunk_size: int, slot_length: Callable[[int], int],
            stats: SyncStats) -> Callable[[int, bytes | None], None]:
    """Writes each slot where the replica differs from the original into it (in offset order)."""
    def copy(slot: int, data: bytes | None) -> None:
        length = slot_length(slot)
        if data is None:
            target.zero(slot * chunk_size, length)
            stats.bytes_zeroed += length
        else:
            target.write(data, slot * chunk_size)
        stats.bytes_written += length
    return copy


def list_replicas(connector: Connector) -> list[ReplicaInfo]:
    return replicas_of(connector).list()
