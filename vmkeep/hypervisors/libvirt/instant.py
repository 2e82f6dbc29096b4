"""Instant VM recovery on libvirt: boot a restore point at once, move it to real storage later.

Each disk of the point is served read-only from the repository by a detached nbdkit (see
vmkeep.engine.mount); the VM runs on a qcow2 overlay per disk whose backing file is that NBD
export, so it starts in seconds whatever the disk size, and its writes stay in the overlay.
``finish`` copies each disk (backing data and writes together) to real storage with a libvirt
block copy while the VM runs, pivots onto the copy, and detaches the repository; ``discard``
drops the VM and its overlays. What is running is recorded in ``STATE/<name>/state.json``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import libvirt

from vmkeep.engine.mount import PointSpec, start_daemon, stop_daemon
from vmkeep.engine.vm import vm_config
from vmkeep.errors import UsageError
from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.libvirt.connector import LibvirtConnector
from vmkeep.hypervisors.libvirt.domain_xml import with_disk_paths, without_network
from vmkeep.hypervisors.libvirt.job_xml import copy_destination_xml
from vmkeep.repository.points import check_name
from vmkeep.repository.repo import Repository

STATE = Path("/run/vmkeep/instant")
OVERLAYS = Path("/var/lib/libvirt/images/vmkeep-instant")
COPY_TIMEOUT = 24 * 3600.0


@dataclass
class InstantVM:
    """A VM running from a restore point."""

    name: str
    uri: str
    source: str  # VM@POINT it came from
    exports: dict[str, int] = field(default_factory=dict)  # disk → nbdkit pid
    sockets: dict[str, str] = field(default_factory=dict)
    overlays: dict[str, str] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return STATE / self.name

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "state.json").write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, name: str) -> InstantVM:
        path = STATE / name / "state.json"
        if not path.exists():
            running = sorted(p.parent.name for p in STATE.glob("*/state.json"))
            raise UsageError(f"no instant recovery named {name} (running: {', '.join(running) or 'none'})")
        return cls(**json.loads(path.read_text()))

    def release(self) -> None:
        """Stop the exports, remove the overlays and the record."""
        for pid in self.exports.values():
            stop_daemon(pid)
        for overlay in self.overlays.values():
            Path(overlay).unlink(missing_ok=True)
        if self.overlays:
            shutil.rmtree(Path(next(iter(self.overlays.values()))).parent, ignore_errors=True)
        shutil.rmtree(self.directory, ignore_errors=True)


def _overlay(path: Path, sock: str, size: int) -> None:
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", "-F", "raw", "-b",
                           f"nbd+unix:///?socket={sock}", str(path), str(size)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HypervisorError(f"cannot create the overlay {path}: {proc.stderr.strip()}")


def start(repo: Repository, spec_base: PointSpec, connector: LibvirtConnector, vm: str, point: str | None,
          name: str, *, sandbox: bool = False) -> InstantVM:
    """Boot ``vm@point`` as ``name`` from the repository; everything is undone if it fails.
    ``sandbox``: without network interfaces, so the copy cannot reach production."""
    check_name(name, "--as name")
    if connector.exists(name):
        raise UsageError(f"a VM named {name!r} already exists on {connector.uri}; choose another --as name")
    if (STATE / name / "state.json").exists():
        raise UsageError(f"an instant recovery named {name} is running: finish or discard it first")
    manifest = repo.find_point(vm, point)
    config = vm_config(repo, manifest)
    if sandbox and config.get("domain_xml"):
        config = {**config, "domain_xml": without_network(config["domain_xml"])}
    instant = InstantVM(name, connector.uri, f"{vm}@{manifest.point_id}")
    directory = OVERLAYS / name
    try:
        instant.directory.mkdir(parents=True, exist_ok=True)
        directory.mkdir(parents=True, exist_ok=True)
        for disk, entry in manifest.disks.items():
            spec = replace(spec_base, name=vm, point=manifest.point_id, disk=disk)
            sock = instant.directory / f"{disk}.sock"
            instant.exports[disk] = start_daemon(spec, sock, instant.directory / f"{disk}.pid")
            instant.sockets[disk] = str(sock)
            overlay = directory / f"{name}-{disk}.qcow2"
            _overlay(overlay, str(sock), entry.size)
            instant.overlays[disk] = str(overlay)
        instant.save()
        connector.define_restored(config, name=name, disk_paths=dict(instant.overlays), storage=str(directory),
                                  as_new=True, start=True)
    except BaseException:
        if connector.exists(name):
            connector.remove_domain(connector.domain(name), "an instant recovery that failed to start")
        instant.release()
        raise
    return instant


def discard(name: str) -> InstantVM:
    """Stop and remove the VM, its overlays and its exports."""
    instant = InstantVM.load(name)
    connector = LibvirtConnector(instant.uri)
    try:
        if connector.exists(name):
            connector.remove_domain(connector.domain(name), "an instant recovery being discarded")
    finally:
        connector.close()
    instant.release()
    return instant


def finish(name: str, storage: Path, progress: Any = None) -> dict[str, str]:
    """Copy every disk to ``storage`` while the VM runs, pivot onto the copies, detach the
    repository; the VM's new disk paths. A copy that fails leaves the VM running as it was."""
    instant = InstantVM.load(name)
    connector = LibvirtConnector(instant.uri)
    try:
        dom = connector.domain(name)
        if not dom.isActive():
            raise UsageError(f"{name} is not running: start it (virsh start {name}) or discard it")
        storage.mkdir(parents=True, exist_ok=True)
        targets = {disk: storage / f"{name}-{disk}.qcow2" for disk in instant.overlays}
        taken = [str(p) for p in targets.values() if p.exists()]
        if taken:
            raise UsageError(f"{', '.join(taken)} exist already; choose another --storage")
        done: dict[str, str] = {}
        try:
            for disk, target in targets.items():
                _copy_and_pivot(dom, disk, target, progress)
                done[disk] = str(target)
                _keep_definition(connector, dom, done)
        except BaseException:
            for disk, target in targets.items():
                if disk not in done:
                    target.unlink(missing_ok=True)
            raise
    finally:
        connector.close()
    instant.release()  # nothing reads the overlays or the repository any more
    return done


def _keep_definition(connector: LibvirtConnector, dom: libvirt.virDomain, moved: dict[str, str]) -> None:
    """The persistent definition follows the disks already moved (a copy job of a persistent
    domain runs as a transient job: libvirt changes only the running configuration)."""
    xml = with_disk_paths(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE), moved)
    try:
        connector.conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"the disks moved, but libvirt refused the new definition: {exc.get_error_message()}") \
            from None


def _copy_and_pivot(dom: libvirt.virDomain, disk: str, target: Path, progress: Any) -> None:
    xml = copy_destination_xml(target)
    try:
        dom.blockCopy(disk, xml, None, libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot start copying {disk} to {target}: {exc.get_error_message()}") from None
    task = progress.task(f"move {disk}", 0) if progress is not None else None
    deadline = time.monotonic() + COPY_TIMEOUT
    reported = 0
    try:
        while True:
            info = dom.blockJobInfo(disk, 0)
            if not info:
                raise HypervisorError(f"the copy of {disk} to {target} stopped on its own; the VM still runs "
                                      "from the repository")
            if task is not None and info["cur"] > reported:
                task.advance(info["cur"] - reported)
                reported = info["cur"]
            if info["end"] and info["cur"] == info["end"]:
                try:
                    dom.blockJobAbort(disk, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                    return
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                        raise HypervisorError(f"cannot switch {disk} to {target}: {exc.get_error_message()}") \
                            from None
            if time.monotonic() > deadline:
                raise HypervisorError(f"copying {disk} did not finish within {COPY_TIMEOUT:.0f} s")
            time.sleep(0.2)
    except BaseException:
        try:
            dom.blockJobAbort(disk, 0)  # stay on the overlay
        except libvirt.libvirtError:
            pass
        raise
    finally:
        if task is not None:
            task.finish()
