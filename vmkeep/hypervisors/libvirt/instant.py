"""Instant VM recovery on libvirt: a VM running on NBD exports of a restore point, moved to real
storage later (the InstantRecovery capability; the engine serves the exports, vmkeep.engine.instant).

The VM runs on a qcow2 overlay per disk whose backing file is that disk's NBD export, so it
starts in seconds whatever the disk size, and its writes stay in the overlay. ``finish`` copies
each disk (backing data and writes together) to real storage with a libvirt block copy while the
VM runs, pivots onto the copy and removes the overlays; ``discard`` drops the VM and its overlays.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from vmkeep.errors import UsageError
from vmkeep.hypervisors.base import DiskExport, HypervisorError
from vmkeep.hypervisors.libvirt.domain_xml import disk_specs, with_disk_paths, without_network
from vmkeep.hypervisors.libvirt.job_xml import copy_destination_xml
from vmkeep.progress import Progress

if TYPE_CHECKING:
    from vmkeep.hypervisors.libvirt.connector import LibvirtConnector

log = logging.getLogger(__name__)

OVERLAYS = Path("/var/lib/libvirt/images/vmkeep-instant")
COPY_TIMEOUT = 24 * 3600.0


def _overlay(path: Path, backing: str, size: int) -> None:
    log.info("qemu-img: overlay %s over %s", path, backing)
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", "-F", "raw", "-b",
                           backing, str(path), str(size)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HypervisorError(f"cannot create the overlay {path}: {proc.stderr.strip()}")


def start(connector: LibvirtConnector, config: dict[str, Any], *, name: str, disks: dict[str, DiskExport],
          sandbox: bool = False) -> dict[str, str]:
    """Define and start ``name`` on an overlay per disk over its export; the overlays. Everything
    is undone if it fails. ``sandbox``: without network interfaces."""
    if connector.exists(name):  # checked again here: what the cleanup below removes must be ours
        raise UsageError(f"a VM named {name!r} already exists on {connector.uri}; choose another --as name")
    if sandbox and config.get("domain_xml"):
        config = {**config, "domain_xml": without_network(config["domain_xml"])}
    directory = OVERLAYS / name
    overlays: dict[str, str] = {}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for disk, export in disks.items():
            overlay = directory / f"{name}-{disk}.qcow2"
            _overlay(overlay, export.uri, export.size)
            overlays[disk] = str(overlay)
        log.info("libvirt: define and start %s on %s from overlays in %s", name, connector.uri, directory)
        connector.define_restored(config, name=name, disk_paths=dict(overlays), storage=str(directory),
                                  as_new=True, start=True)
    except BaseException:
        discard(connector, name, overlays, "an instant recovery that failed to start")
        raise
    return overlays


def discard(connector: LibvirtConnector, name: str, overlays: dict[str, str],
            why: str = "an instant recovery being discarded") -> None:
    """Stop and remove the VM and its overlays."""
    if connector.exists(name):
        log.info("libvirt: remove %s on %s (%s)", name, connector.uri, why)
        connector.remove_domain(connector.domain(name), why)
    _remove_overlays(name, overlays)


def _remove_overlays(name: str, overlays: dict[str, str]) -> None:
    for overlay in overlays.values():
        Path(overlay).unlink(missing_ok=True)
    shutil.rmtree(OVERLAYS / name, ignore_errors=True)


def finish(connector: LibvirtConnector, name: str, overlays: dict[str, str], storage: Path,
           progress: Progress | None = None) -> dict[str, str]:
    """Copy every disk to ``storage`` while the VM runs, pivot onto the copies, remove the
    overlays; the VM's new disk paths. A copy that fails leaves the disks not yet moved running
    from the repository; finishing again with the same ``storage`` goes on from there."""
    dom = connector.domain(name)
    if not dom.isActive():
        raise UsageError(f"{name} is not running: start it (virsh start {name}) or discard it")
    storage.mkdir(parents=True, exist_ok=True)
    targets = {disk: storage / f"{name}-{disk}.qcow2" for disk in overlays}
    running_from = {spec.target: spec.source for spec in disk_specs(dom.XMLDesc(0))}
    done = {disk: str(t) for disk, t in targets.items() if running_from.get(disk) == str(t)}  # an earlier finish
    taken = [str(p) for disk, p in targets.items() if p.exists() and disk not in done]
    if taken:
        raise UsageError(f"{', '.join(taken)} exist already; choose another --storage")
    try:
        for disk, target in targets.items():
            if disk in done:
                continue
            _copy_and_pivot(dom, disk, target, progress)
            done[disk] = str(target)
            _keep_definition(connector, dom, done)
    except BaseException:
        for disk, target in targets.items():
            if disk not in done:
                target.unlink(missing_ok=True)
        raise
    _remove_overlays(name, overlays)  # nothing reads them any more
    return done


def _keep_definition(connector: LibvirtConnector, dom: libvirt.virDomain, moved: dict[str, str]) -> None:
    """The persistent definition follows the disks already moved (a copy job of a persistent
    domain runs as a transient job: libvirt changes only the running configuration)."""
    xml = with_disk_paths(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE), moved)
    try:
        connector.conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"the disks moved, but libvirt refused the new definition: "
                              f"{exc.get_error_message()}") from exc


def _copy_and_pivot(dom: libvirt.virDomain, disk: str, target: Path, progress: Progress | None) -> None:
    log.info("libvirt: block copy of %s disk %s to %s", dom.name(), disk, target)
    try:
        dom.blockCopy(disk, copy_destination_xml(target), None, libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot start copying {disk} to {target}: {exc.get_error_message()}") from exc
    task = None  # made once the job says how much it copies (a bar of "…/0 bytes" said nothing)
    deadline = time.monotonic() + COPY_TIMEOUT
    reported = 0
    try:
        while True:
            info = dom.blockJobInfo(disk, 0)
            if not info:
                raise HypervisorError(f"the copy of {disk} to {target} stopped on its own; the VM still runs "
                                      "from the repository")
            # the job's end is 1 until it has looked at the disk: the bar's size waits for it to copy
            if task is None and progress is not None and info["cur"] and info["end"] > 1:
                task = progress.task(f"move {disk}", int(info["end"]))
            if task is not None and info["cur"] > reported:
                task.advance(info["cur"] - reported)
                reported = info["cur"]
            if info["end"] and info["cur"] == info["end"] and _pivoted(dom, disk, target):
                return
            if time.monotonic() > deadline:
                raise HypervisorError(f"copying {disk} did not finish within {COPY_TIMEOUT:.0f} s")
            time.sleep(0.2)
    except BaseException:
        try:
            dom.blockJobAbort(disk, 0)  # stay on the overlay
        except libvirt.libvirtError as exc:
            log.warning("aborting the copy of %s disk %s: %s", dom.name(), disk, exc.get_error_message())
        raise
    finally:
        if task is not None:
            task.finish()


def _pivoted(dom: libvirt.virDomain, disk: str, target: Path) -> bool:
    """Switch ``disk`` onto its copy; False while the copy is not yet in sync (try again)."""
    try:
        dom.blockJobAbort(disk, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
            return False
        raise HypervisorError(f"cannot switch {disk} to {target}: {exc.get_error_message()}") from exc
    log.info("libvirt: %s disk %s now runs from %s", dom.name(), disk, target)
    return True
