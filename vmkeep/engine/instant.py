"""Instant VM recovery: boot a restore point at once, move it to real storage later.

Each disk of the point is served read-only from the repository by a detached nbdkit
(vmkeep.engine.mount); a connector with the InstantRecovery capability runs the VM on
copy-on-write layers over those exports. What is running (exports, layers, the hypervisor's
address) is recorded in ``STATE/<name>/state.json``, so ``finish`` and ``discard`` work from
another process.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vmkeep.engine.mount import PointSpec, start_daemon, stop_daemon
from vmkeep.engine.vm import vm_config
from vmkeep.errors import UsageError
from vmkeep.hypervisors.base import Connector, DiskExport, InstantRecovery
from vmkeep.progress import Progress
from vmkeep.repository.points import check_name
from vmkeep.repository.repo import Repository
from vmkeep.transport.nbd_client import unix_uri

log = logging.getLogger(__name__)

STATE = Path("/run/vmkeep/instant")


@dataclass
class InstantVM:
    """A VM running from a restore point."""

    name: str
    uri: str  # of the hypervisor it runs on
    source: str  # VM@POINT it came from
    exports: dict[str, int] = field(default_factory=dict)  # disk → nbdkit pid
    sockets: dict[str, str] = field(default_factory=dict)
    overlays: dict[str, str] = field(default_factory=dict)  # disk → its layer, as the connector named it

    @property
    def directory(self) -> Path:
        return STATE / self.name

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "state.json").write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, name: str) -> InstantVM:
        """The running recovery ``name``; refused with the names of those running."""
        path = STATE / name / "state.json"
        if not path.exists():
            running = sorted(p.parent.name for p in STATE.glob("*/state.json"))
            raise UsageError(f"no instant recovery named {name} (running: {', '.join(running) or 'none'})")
        return cls(**json.loads(path.read_text()))

    def release(self) -> None:
        """Stop the exports and remove the record (the connector removed the VM's layers)."""
        for disk, pid in self.exports.items():
            log.info("stopping the export of %s disk %s (nbdkit pid %d)", self.source, disk, pid)
            stop_daemon(pid)
        shutil.rmtree(self.directory, ignore_errors=True)


def capable(connector: Connector) -> InstantRecovery:
    """``connector`` as an InstantRecovery, or a refusal that says so."""
    if not isinstance(connector, InstantRecovery):
        raise UsageError(f"{connector.uri}: this hypervisor's connector cannot run a VM straight from a restore "
                         "point (instant recovery); restore it with `vmkeep restore` instead")
    return connector


def start(repo: Repository, spec_base: PointSpec, connector: Connector, vm: str, point: str | None,
          name: str, *, sandbox: bool = False) -> InstantVM:
    """Boot ``vm@point`` as ``name`` from the repository; everything is undone if it fails.
    ``sandbox``: without network interfaces, so the copy cannot reach production."""
    hypervisor = capable(connector)
    check_name(name, "--as name")
    if connector.exists(name):
        raise UsageError(f"a VM named {name!r} already exists on {connector.uri}; choose another --as name")
    if (STATE / name / "state.json").exists():
        raise UsageError(f"an instant recovery named {name} is running: finish or discard it first")
    manifest = repo.find_point(vm, point)
    config = vm_config(repo, manifest)
    instant = InstantVM(name, connector.uri, f"{vm}@{manifest.point_id}")
    try:
        instant.directory.mkdir(parents=True, exist_ok=True)
        exports: dict[str, DiskExport] = {}
        for disk, entry in manifest.disks.items():
            sock = instant.directory / f"{disk}.sock"
            log.info("serving %s disk %s on %s", instant.source, disk, sock)
            spec = replace(spec_base, name=vm, point=manifest.point_id, disk=disk)
            instant.exports[disk] = start_daemon(spec, sock, instant.directory / f"{disk}.pid")
            instant.sockets[disk] = str(sock)
            exports[disk] = DiskExport(disk, unix_uri(sock), entry.size)
        instant.save()  # the exports outlive this process: recorded before anything else can fail
        instant.overlays = hypervisor.instant_start(config, name=name, disks=exports, sandbox=sandbox)
        instant.save()
    except BaseException:
        instant.release()
        raise
    return instant


def discard(connector: Connector, instant: InstantVM) -> None:
    """Stop and remove the VM, its layers and its exports (the exports even when removing the VM
    failed: nothing may keep serving the repository)."""
    try:
        capable(connector).instant_discard(instant.name, instant.overlays)
    finally:
        instant.release()


def finish(connector: Connector, instant: InstantVM, storage: Path,
           progress: Progress | None = None) -> dict[str, str]:
    """Move every disk to ``storage`` while the VM runs, then stop the exports; the VM's new disk
    paths. A copy that fails leaves the VM running from the repository, as it was."""
    disks = capable(connector).instant_finish(instant.name, instant.overlays, storage, progress)
    instant.release()  # nothing reads the repository any more
    return disks
