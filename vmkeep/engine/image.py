"""Backup and restore of a disk image file (any format qemu opens) through qemu-nbd."""

from __future__ import annotations

import logging
from pathlib import Path

from vmkeep.engine.backup import DEFAULT_WORKERS, DiskJob, backup_point
from vmkeep.engine.restore import RestoreStats, restore_disk
from vmkeep.errors import UsageError
from vmkeep.progress import Progress
from vmkeep.repository.points import Manifest, check_name
from vmkeep.repository.repo import Repository
from vmkeep.transport.extents import Extent, parse_extent_file
from vmkeep.transport.nbd_client import open_export
from vmkeep.transport.qemu_nbd import probe_image, serve_image
from vmkeep.transport.targets import open_file_writer

log = logging.getLogger(__name__)

DEFAULT_DISK = "disk"


def backup_image(
    repo: Repository,
    image: Path,
    name: str,
    *,
    disk: str = DEFAULT_DISK,
    fmt: str | None = None,
    since: str | None = None,
    bitmap: str | None = None,
    changed_file: Path | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
) -> Manifest:
    """One restore point of ``image``. With ``since`` and a bitmap or extent file, an incremental."""
    check_name(name)
    check_name(disk, "disk name")
    if (bitmap or changed_file) and since is None:
        raise UsageError("--bitmap and --changed describe changes since a point: give --since POINT too")
    if since is not None and not (bitmap or changed_file):
        raise UsageError("--since needs the changed extents: --bitmap NAME or --changed FILE")
    if bitmap and changed_file:
        raise UsageError("give either --bitmap or --changed, not both")
    info = probe_image(image, fmt)
    parent = repo.find_point(name, since) if since is not None else _latest_or_none(repo, name)
    changed: list[Extent] | None = None
    if changed_file is not None:
        try:
            changed = parse_extent_file(changed_file.read_text(), str(changed_file))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot use the changed-extent file: {exc}") from None
    dirty_context = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
    _log_decision(name, image, parent, bitmap, changed_file)
    with serve_image(info, bitmap=bitmap, connections=workers + 2) as uri, open_export(uri, dirty_context) as src:
        if bitmap:
            changed = src.dirty_extents()
        job = DiskJob(disk, src, changed)
        meta = {"kind": "image", "source": str(image.resolve()), "format": info.format,
                "bitmap": bitmap, "since": parent.point_id if (parent and changed is not None) else None}
        return backup_point(repo, name, [job], parent=parent, meta=meta, workers=workers, progress=progress)


def _log_decision(name: str, image: Path, parent: Manifest | None, bitmap: str | None,
                  changed_file: Path | None) -> None:
    context = {"vm": name}
    if parent is None:
        log.info("full backup of %s: no earlier point of %s", image, name, extra=context)
    elif bitmap or changed_file:
        log.info("incremental backup of %s from point %s: changes from %s", image, parent.point_id,
                 f"bitmap {bitmap}" if bitmap else f"extent file {changed_file}", extra=context)
    else:
        log.info("full backup of %s: no changed extents given (--bitmap/--changed); chunks of point %s are "
                 "reused where identical", image, parent.point_id, extra=context)


def _latest_or_none(repo: Repository, name: str) -> Manifest | None:
    points = repo.list_points(name)
    return points[-1] if points else None


def restore_image(
    repo: Repository,
    name: str,
    point: str | None,
    output: Path,
    *,
    disk: str | None = None,
    fmt: str = "qcow2",
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
) -> tuple[Manifest, RestoreStats]:
    manifest = repo.find_point(name, point)
    if disk is None:
        if len(manifest.disks) != 1:
            raise UsageError(f"point {manifest.point_id} has several disks ({', '.join(manifest.disks)}): "
                             "choose one with --disk")
        disk = next(iter(manifest.disks))
    index = repo.load_index(manifest, disk)
    log.info("restoring %s@%s disk %s to %s (%s)", manifest.name, manifest.point_id, disk, output, fmt,
             extra={"vm": manifest.name, "disk": disk})
    with open_file_writer(output, fmt, index.size, workers) as writer:
        stats = restore_disk(repo, index, writer, workers=workers, progress=progress, label=f"restore {disk}")
    return manifest, stats


def split_point_spec(spec: str) -> tuple[str, str | None]:
    """``NAME[@POINT]`` → (name, point or None)."""
    name, _, point = spec.partition("@")
    return name, (point or None)
