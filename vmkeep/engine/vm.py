"""Backup and restore of whole VMs through a hypervisor connector."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkeep.engine.backup import DEFAULT_WORKERS, DiskJob, backup_point
from vmkeep.engine.restore import RestoreStats, open_target, restore_disk
from vmkeep.errors import UsageError
from vmkeep.hypervisors.base import Connector, Quiesce
from vmkeep.progress import Progress
from vmkeep.repository.points import Manifest, check_name
from vmkeep.repository.repo import Repository
from vmkeep.transport.extents import KnownExtents
from vmkeep.transport.nbd_client import NbdExport


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
    """The VM configuration a point holds (domain XML, disk sources, firmware variables)."""
    meta = manifest.meta
    if "config_sealed" in meta:
        config = repo.open_record(meta["config_sealed"], config_context(manifest.name))
    else:
        config = dict(meta.get("config") or {})  # points written before configurations were sealed
    if not config.get("domain_xml") and config.get("kind") != "vsphere":
        raise UsageError(f"point {manifest.name}@{manifest.point_id} holds no VM configuration: restore its disks "
                         "with --disk")
    return config


@dataclass
class VMRestoreResult:
    manifest: Manifest
    name: str
    disks: dict[str, str]
    stats: dict[str, RestoreStats]


def restore_disks(repo: Repository, manifest: Manifest, paths: dict[str, Path], workers: int,
                  progress: Progress | None, fmt: str = "qcow2") -> dict[str, RestoreStats]:
    """Restore every disk of a point into new image files; on failure none of them is left."""
    done: list[Path] = []
    stats = {}
    try:
        for disk, path in paths.items():
            index = repo.load_index(manifest, disk)
            with open_target(path, fmt, index.size, workers) as target:
                done.append(path)
                stats[disk] = restore_disk(repo, index, target, workers=workers, progress=progress,
                                           label=f"restore {disk}")
    except BaseException:
        for p in done:
            p.unlink(missing_ok=True)
        raise
    return stats


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
    the VM it defined with these disks, partly written disks — is removed first.
    """
    manifest = repo.find_point(vm, point)
    config = vm_config(repo, manifest)
    directory, fmt = connector.restore_staging(new_name, storage)
    paths = {disk: directory / f"{new_name}-{disk}.{fmt}" for disk in manifest.disks}
    if retry:
        connector.remove_restored(new_name, [str(p) for p in paths.values()])
        for p in paths.values():
            p.unlink(missing_ok=True)
    if connector.exists(new_name):
        raise UsageError(f"a VM named {new_name!r} already exists on {connector.uri}; choose another --as name")
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken:
        raise UsageError(f"restored disks would overwrite {', '.join(taken)}; choose another --storage")
    placed, stats = _stage_and_define(repo, connector, manifest, config, new_name, directory, paths, fmt,
                                      storage=storage, as_new=True, start=start, workers=workers, progress=progress,
                                      place=place)
    return VMRestoreResult(manifest, new_name, placed, stats)


def _stage_and_define(repo: Repository, connector: Connector, manifest: Manifest, config: dict[str, Any], name: str,
                      directory: Path, paths: dict[str, Path], fmt: str, *, storage: str | None, as_new: bool,
                      start: bool, workers: int, progress: Progress | None,
                      place: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, RestoreStats]]:
    """Restore the disks into ``paths`` and have the connector define (or refill) the VM with
    them; staged files it moved elsewhere, and a directory made here for them, are removed."""
    made_directory = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        stats = restore_disks(repo, manifest, paths, workers, progress, fmt)
        try:
            placed = connector.define_restored(config, name=name, disk_paths={d: str(p) for d, p in paths.items()},
                                               storage=storage, as_new=as_new, start=start, place=place)
        except BaseException:
            for p in paths.values():
                p.unlink(missing_ok=True)
            raise
        for d, p in paths.items():  # staged files the connector uploaded elsewhere
            if placed.get(d) != str(p):
                p.unlink(missing_ok=True)
    finally:
        if made_directory and directory.exists() and not any(directory.iterdir()):
            directory.rmdir()
    return placed, stats


def restore_vm_overwrite(
    repo: Repository,
    connector: Connector,
    vm: str,
    point: str | None,
    *,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
) -> VMRestoreResult:
    """Put the original VM back as it was at the point; it must be shut off."""
    manifest = repo.find_point(vm, point)
    config = vm_config(repo, manifest)
    connector.require_shut_off(vm)
    if connector.kind != "libvirt":  # the disks go back through the hypervisor (upload)
        directory, fmt = connector.restore_staging(vm, None)
        paths = {disk: directory / f"{vm}-{disk}.{fmt}" for disk in manifest.disks}
        placed, stats = _stage_and_define(repo, connector, manifest, config, vm, directory, paths, fmt, storage=None,
                                          as_new=False, start=False, workers=workers, progress=progress)
        return VMRestoreResult(manifest, vm, placed, stats)
    disks_cfg = config.get("disks", {})
    originals = {d: Path(disks_cfg.get(d, {}).get("source") or f"/var/lib/libvirt/images/{vm}-{d}.qcow2")
                 for d in manifest.disks}
    staging = {d: p.with_name(p.name + ".vmkeep-restore") for d, p in originals.items()}
    for p in staging.values():
        p.unlink(missing_ok=True)
    stats = restore_disks(repo, manifest, staging, workers, progress)
    connector.forget_checkpoints(vm)  # their bitmaps lived in the images being replaced
    for d, tmp in staging.items():
        os.replace(tmp, originals[d])
    connector.define_restored(config, name=vm, disk_paths={d: str(p) for d, p in originals.items()},
                              storage=None, as_new=False, start=False)
    return VMRestoreResult(manifest, vm, {d: str(p) for d, p in originals.items()}, stats)
