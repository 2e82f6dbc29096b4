"""Backup and restore of whole VMs through a hypervisor connector."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from vmkeep.engine.backup import DEFAULT_WORKERS, DiskJob, backup_point
from vmkeep.engine.restore import RestoreStats, restore_disk
from vmkeep.errors import UsageError
from vmkeep.hypervisors.base import Connector, Quiesce, VMRestore
from vmkeep.progress import Progress
from vmkeep.repository.points import Manifest, check_name
from vmkeep.repository.repo import Repository
from vmkeep.transport.extents import KnownExtents
from vmkeep.transport.nbd_client import NbdExport

log = logging.getLogger(__name__)


def backup_vm(
    repo: Repository,
    connector: Connector,
    vm: str,
    *,
    transports: list[str],
    quiesce: Quiesce = "try",
    full: bool = False,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Manifest:
    """One restore point of ``vm``: incremental from its latest point when the chain allows."""
    check_name(vm, "VM name")
    parent = repo.latest_point(vm)
    since = None if (full or parent is None) else parent.meta.get("chain")
    context = {"vm": vm}
    if full:
        log.info("full backup asked for (--full)", extra=context)
    elif parent is None:
        log.info("no earlier point: full backup", extra=context)
    else:
        log.debug("previous point %s; asking %s for the changes since it", parent.point_id, connector.kind,
                  extra=context)
    previous_disks = {d: e.size for d, e in parent.disks.items()} if parent else None
    with connector.point_in_time(vm, since=since, previous_disks=previous_disks, transports=transports,
                                 quiesce=quiesce) as pit, ExitStack() as stack:
        jobs, exports = [], []
        for d in pit.disks.values():
            export = NbdExport(d.uri, d.dirty_context, on_reconnect=_noting_reconnects(pit.notes, d.name))
            stack.callback(export.close)
            exports.append(export)
            source = export if d.allocated is None else KnownExtents(export, d.allocated)
            changed = export.dirty_extents() if d.dirty_context else d.changed
            jobs.append(DiskJob(d.name, source, changed))
        reason = pit.reason if not full else "a full backup was asked for (--full)"
        log.info("%s backup (%s) over %s, %s-consistent, %d disks", pit.mode, reason, pit.transport,
                 pit.consistency, len(pit.disks), extra=context)
        for note in pit.notes:  # fallbacks and what the hypervisor changed or skipped
            log.info("note: %s", note, extra=context)
        meta: dict[str, Any] = {
            "kind": "vm", "hypervisor": connector.kind, "transport": pit.transport, "consistency": pit.consistency,
            "mode": pit.mode, "reason": reason, "config_sealed": repo.seal_record(pit.config, config_context(vm)),
            "chain": pit.chain, "notes": pit.notes, "wire": pit.wire,
        }
        return backup_point(repo, vm, jobs, parent=parent, meta=meta, workers=workers, progress=progress,
                            cancel=cancel, reads_done=_letting_go(exports, pit.release))


def _letting_go(exports: list[NbdExport], release: Callable[[], None] | None) -> Callable[[], None] | None:
    """Once the last read is done: close the connections and let the hypervisor release the
    snapshot or backup job while the engine stores the last chunks."""
    if release is None:
        return None

    def let_go() -> None:
        for export in exports:
            export.close()
        release()
    return let_go


def _noting_reconnects(notes: list[str], disk: str) -> Callable[[], None]:
    """A note in the point (once per disk) that reads of ``disk`` survived a dropped connection."""
    note = f"disk {disk}: an NBD connection dropped during the backup; it was opened again and the read retried"

    def noted() -> None:
        if note not in notes:
            notes.append(note)
    return noted


def config_context(vm: str) -> str:
    return f"vm configuration of {vm}"


def vm_config(repo: Repository, manifest: Manifest) -> dict[str, Any]:
    """The VM configuration a point holds (domain XML, disk sources, firmware variables, …); the
    connector that restores it checks that it is of its kind."""
    meta = manifest.meta
    if "config_sealed" in meta:
        config = repo.open_record(meta["config_sealed"], config_context(manifest.name))
    else:
        config = dict(meta.get("config") or {})  # points written before configurations were sealed
    if meta.get("kind", "vm") != "vm" or not config:
        raise UsageError(f"point {manifest.name}@{manifest.point_id} holds no VM configuration: restore its disks "
                         "with --disk")
    return config


@dataclass
class VMRestoreResult:
    manifest: Manifest
    name: str
    disks: dict[str, str]
    stats: dict[str, RestoreStats]


def restore_vm_as(
    repo: Repository,
    connector: Connector,
    vm: str,
    point: str | None,
    new_name: str,
    *,
    storage: str | None = None,
    start: bool = True,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
    retry: bool = False,
    place: dict[str, str] | None = None,
) -> VMRestoreResult:
    """A new VM from a restore point: new name, UUID and MACs, disks on ``storage`` (a directory
    for libvirt, a datastore for vSphere).

    ``retry``: an earlier attempt of this same restore died (its proxy stopped); what it left —
    the VM it defined, partly written disks — is removed first.
    """
    manifest = repo.find_point(vm, point)
    config = vm_config(repo, manifest)
    log.info("restoring point %s as new VM %s on %s%s", manifest.point_id, new_name, connector.kind,
             " (retry: removing what the last attempt left)" if retry else "", extra={"vm": vm})
    with connector.restore_vm(config, name=new_name, disks=disk_sizes(manifest), as_new=True, storage=storage,
                              place=place, retry=retry) as restore:
        stats = _write_disks(repo, manifest, restore, workers, progress)
        placed = restore.finish(start=start)
    return VMRestoreResult(manifest, new_name, placed, stats)


def restore_vm_overwrite(
    repo: Repository,
    connector: Connector,
    vm: str,
    point: str | None,
    *,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
) -> VMRestoreResult:
    """Put the original VM back as it was at the point; the connector refuses unless it is shut off."""
    manifest = repo.find_point(vm, point)
    config = vm_config(repo, manifest)
    log.info("restoring point %s over the original VM on %s", manifest.point_id, connector.kind, extra={"vm": vm})
    with connector.restore_vm(config, name=vm, disks=disk_sizes(manifest), as_new=False) as restore:
        stats = _write_disks(repo, manifest, restore, workers, progress)
        placed = restore.finish(start=False)
    return VMRestoreResult(manifest, vm, placed, stats)


def disk_sizes(manifest: Manifest) -> dict[str, int]:
    return {disk: entry.size for disk, entry in manifest.disks.items()}


def _write_disks(repo: Repository, manifest: Manifest, restore: VMRestore, workers: int,
                 progress: Progress | None) -> dict[str, RestoreStats]:
    """Every disk of the point through the writer the connector opens for it."""
    stats = {}
    for disk in manifest.disks:
        index = repo.load_index(manifest, disk)
        with restore.disk(disk, index.size) as writer:
            stats[disk] = restore_disk(repo, index, writer, workers=workers, progress=progress,
                                       label=f"restore {disk}")
    return stats
