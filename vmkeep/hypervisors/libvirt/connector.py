"""The libvirt connector: the Connector protocol (vmkeep.hypervisors.base) over modules with one
job each: connection.py (libvirtd and its errors), inventory.py, point_in_time.py (a VM's point in
time: pull_backup.py's backup job, san.py's snapshot, offline.py's image files, with
checkpoints.py, jobs.py, quiesce.py and point_source.py) and the restore side.
"""

from __future__ import annotations

import base64
import logging
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import libvirt

from vmkeep.hypervisors.base import (
    DISCONNECTED,
    DiskExport,
    HypervisorError,
    NbdTls,
    PointInTimeInfo,
    Quiesce,
    VMInfo,
)
from vmkeep.hypervisors.libvirt import boot_check, instant, restore
from vmkeep.hypervisors.libvirt.connection import Connection
from vmkeep.hypervisors.libvirt.domain_xml import (
    disk_specs,
    host_paths_to_create,
    on_network,
    remove_own_host_files,
    renamed_copy,
    with_disk_paths,
    with_nvram_path,
    without_network,
)
from vmkeep.hypervisors.libvirt.inventory import list_vms
from vmkeep.hypervisors.libvirt.point_in_time import point_in_time
from vmkeep.hypervisors.libvirt.replica import LibvirtReplicas
from vmkeep.hypervisors.libvirt.restore import LibvirtRestore
from vmkeep.progress import Progress

log = logging.getLogger(__name__)


class LibvirtConnector:
    """The Connector for libvirt hosts, composed of the connection, the inventory and the point
    in time of a VM (each in a module of its own)."""

    kind = "libvirt"

    def __init__(self, uri: str = "qemu:///system", nbd_tls: NbdTls = "auto",
                 credentials: tuple[str, str] | None = None) -> None:
        """``nbd_tls``: ``auto`` encrypts the nbd transport when this proxy has client
        certificates and the host accepts TLS, ``require`` refuses to go without, ``off`` never.
        ``credentials``: user name and password for hosts that ask (SASL), else none."""
        self.connection = Connection(uri, credentials)
        self.uri = uri
        self.nbd_tls = nbd_tls
        self.credentials = credentials
        self.host = self.connection.host
        self.is_local = self.connection.is_local

    @property
    def conn(self) -> libvirt.virConnect:
        """The libvirt connection now (a new one after libvirtd restarted under a backup)."""
        return self.connection.conn

    # -- the InstantRecovery and SandboxBoot capabilities (instant.py, boot_check.py) ------------
    def instant_start(self, config: dict[str, Any], *, name: str, disks: dict[str, DiskExport],
                      sandbox: bool = False) -> dict[str, str]:
        return instant.start(self, config, name=name, disks=disks, sandbox=sandbox)

    def instant_finish(self, name: str, layers: dict[str, str], storage: Path,
                       progress: Progress | None = None) -> dict[str, str]:
        return instant.finish(self, name, layers, storage, progress)

    def instant_discard(self, name: str, layers: dict[str, str]) -> None:
        instant.discard(self, name, layers)

    def wait_heartbeat(self, name: str, *, timeout: float, marker: str | None = None) -> bool:
        return boot_check.wait_heartbeat(self, name, timeout=timeout, marker=marker)

    def replicas(self) -> LibvirtReplicas:
        """The ReplicaHost capability: powered-off replicas kept on this host (replica.py)."""
        return LibvirtReplicas(self)

    def close(self) -> None:
        self.connection.close()

    # -- inventory -------------------------------------------------------------------------------
    def domain(self, name: str) -> libvirt.virDomain:
        return self.connection.domain(name)

    def exists(self, name: str) -> bool:
        return self.connection.exists(name)

    def inventory(self) -> list[VMInfo]:
        """Every VM with its disks (vmkeep.hypervisors.libvirt.inventory)."""
        return list_vms(self.connection)

    # -- restore ---------------------------------------------------------------------------------
    def restore_choices(self) -> dict[str, list[str]]:
        """The RestoreChoices capability: the host's libvirt networks (one host, no folders)."""
        try:
            return {"networks": restore.network_names(self.conn)}
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot list the networks of {self.host}: {exc.get_error_message()}") from exc

    def restore_vm(self, config: dict[str, Any], *, name: str, disks: dict[str, int], as_new: bool,
                   storage: str | None = None, place: dict[str, str] | None = None,
                   retry: bool = False) -> AbstractContextManager[LibvirtRestore]:
        """Disks as new qcow2 images where the VM runs from, then the domain defined (restore.py)."""
        return restore.restore_vm(self, config, name=name, disks=disks, as_new=as_new, storage=storage, place=place,
                                  retry=retry)

    def define_restored(self, config: dict[str, Any], *, name: str, disk_paths: dict[str, str],
                        storage: str | None, as_new: bool, start: bool,
                        place: dict[str, str] | None = None) -> dict[str, str]:
        """Define the saved configuration with its restored disks (and UEFI variables), then start.

        As a new VM it gets the new name, a new UUID and fresh MACs, and its variables go beside
        its disks; over the original, the variables go back to the original's file. Files written
        here are removed again if libvirt refuses the result.
        """
        restore.check_config(config, place)
        xml = config["domain_xml"]
        xml = renamed_copy(xml, name, disk_paths) if as_new else with_disk_paths(xml, disk_paths)
        network = (place or {}).get("network")
        if as_new and network == DISCONNECTED:
            xml = without_network(xml)  # interfaces removed: nothing to plug in by mistake
        elif as_new and network:
            xml = on_network(xml, network)
        written: list[Path] = []
        try:
            nvram = config.get("nvram")
            if nvram:
                if not self.is_local:
                    raise HypervisorError(f"{name} has UEFI variables to restore onto {self.host}: run the restore "
                                          "on that host")
                beside = Path(next(iter(disk_paths.values()))).parent if disk_paths else Path(storage or ".")
                target = Path(nvram["path"]) if not as_new else beside / f"{name}_VARS.fd"
                target.parent.mkdir(parents=True, exist_ok=True)
                staged = target.with_name(target.name + ".vmkeep-restore")
                staged.write_bytes(base64.b64decode(nvram["data"]))
                os.replace(staged, target)
                if as_new:
                    written.append(target)
                xml = with_nvram_path(xml, str(target))
            if self.is_local:
                for d in host_paths_to_create(xml):
                    Path(d).mkdir(parents=True, exist_ok=True)
            self._define(xml, start=start)
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        return dict(disk_paths)

    def _define(self, xml: str, *, start: bool) -> None:
        try:
            dom = self.conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt refused the restored configuration: {exc.get_error_message()}") from exc
        if start:
            self.start_restored(dom.name())

    def start_restored(self, name: str) -> None:
        """Start a VM a restore defined; if it will not, it stays defined with its disks, to look into."""
        try:
            self.domain(name).create()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"the restored VM {name} is defined but does not start: "
                                  f"{exc.get_error_message()}; its disks stay: fix its definition (virsh edit "
                                  f"{name}) and start it, or remove it") from exc

    def require_shut_off(self, vm: str) -> None:
        if self.domain(vm).state()[0] != libvirt.VIR_DOMAIN_SHUTOFF:
            raise HypervisorError(f"VM {vm} is running: shut it off first (virsh -c {self.uri} shutdown {vm}), "
                                  "then restore over it")

    def remove_restored(self, name: str, disk_paths: list[str]) -> bool:
        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                log.warning("cannot look up VM %s (%s): nothing removed", name, exc.get_error_message())
            return False
        sources = sorted(spec.source for spec in disk_specs(dom.XMLDesc()) if spec.source)
        if sources != sorted(disk_paths):
            raise HypervisorError(f"a VM named {name!r} exists on {self.uri} that this restore did not make (its "
                                  f"disks are {', '.join(sources) or 'none'}); restore under another name")
        self.remove_domain(dom, "left by an earlier attempt of this restore")
        return True

    def remove_domain(self, dom: libvirt.virDomain, why: str) -> None:
        """Power off and undefine a VM vmkeep made (its UEFI variables and metadata with it), and
        the console log and socket directories made for it on this host."""
        try:
            xml = dom.XMLDesc(0)
            name = dom.name()
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot remove {dom.name()}, {why}: {exc.get_error_message()}") from exc
        log.info("removed VM %s (%s)", name, why)
        if self.is_local:
            remove_own_host_files(xml, name)

    def forget_checkpoints(self, vm: str) -> None:
        """Drop libvirt's checkpoint records of a VM whose disks are being replaced."""
        dom = self.domain(vm)
        for cp in dom.listAllCheckpoints():
            try:
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            except libvirt.libvirtError as exc:
                log.warning("cannot drop checkpoint %s of %s: %s", cp.getName(), vm, exc.get_error_message())

    # -- point in time ---------------------------------------------------------------------------
    def point_in_time(
        self,
        vm: str,
        *,
        since: dict[str, Any] | None,
        previous_disks: dict[str, int] | None,
        transports: list[str],
        quiesce: Quiesce,
    ) -> AbstractContextManager[PointInTimeInfo]:
        """The VM's disks at one instant (vmkeep.hypervisors.libvirt.point_in_time)."""
        return point_in_time(self.connection, vm, since=since, previous_disks=previous_disks, transports=transports,
                             quiesce=quiesce, nbd_tls=self.nbd_tls)
