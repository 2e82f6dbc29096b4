"""Replicas on a libvirt host (the ``Replicas`` of ``ReplicaHost``): powered-off copies of VMs
whose disks are raw sparse images, written in place as restore points come.

Raw, because a raw file's offsets are the disk's: an update writes just the changed extents at
their offsets, on this machine with pwrite and on another host through libvirt's volume upload
(which writes a file's bytes, not a qcow2's guest view), and a failback or check reads them back
through a sparse download. Sparse, so the holes of the point take no space. What a replica holds
is recorded in its domain metadata (replica_meta.py).
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Collection, Mapping
from contextlib import AbstractContextManager
from pathlib import Path, PurePath, PurePosixPath
from typing import TYPE_CHECKING, Any

import libvirt

from vmkeep.errors import UsageError
from vmkeep.hypervisors.base import DISCONNECTED, DiskPatch, HypervisorError, ReplicaInfo, ReplicaState
from vmkeep.hypervisors.libvirt import pools, replica_meta
from vmkeep.hypervisors.libvirt.domain_xml import (
    disk_elements,
    host_paths_to_create,
    on_network,
    renamed_copy,
    without_network,
)
from vmkeep.hypervisors.libvirt.replica_disks import disk_stamps, open_disks
from vmkeep.hypervisors.libvirt.restore import check_config, check_network, placement
from vmkeep.hypervisors.libvirt.upload import _volume_xml as volume_xml
from vmkeep.hypervisors.libvirt.upload import pool_for

if TYPE_CHECKING:
    from vmkeep.hypervisors.libvirt.connector import LibvirtConnector

log = logging.getLogger(__name__)

FORMAT = "raw"
FILE_POOLS = ("dir", "fs", "netfs")  # pools of files: a new volume is a sparse file, all zeros


class LibvirtReplicas:
    """The replicas of one libvirt host, reached through ``connector``."""

    def __init__(self, connector: LibvirtConnector) -> None:
        self.connector = connector

    @property
    def conn(self) -> libvirt.virConnect:
        return self.connector.conn

    def _lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"cannot look up VM {name} on {self.connector.host}: "
                                  f"{exc.get_error_message()}") from exc

    def list(self) -> list[ReplicaInfo]:
        try:
            domains = self.conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot list the VMs of {self.connector.host}: {exc.get_error_message()}") from exc
        found = [info for info in map(replica_meta.read, domains) if info is not None]
        log.debug("replicas on %s: %s", self.connector.host, [i.name for i in found])
        return sorted(found, key=lambda i: i.name)

    def get(self, name: str) -> ReplicaInfo | None:
        dom = self._lookup(name)
        if dom is None:
            return None
        found = replica_meta.read_record(dom)
        if found is None:
            raise UsageError(f"a VM named {name!r} exists on {self.connector.host} and is not a vmkeep replica: it is "
                             "left alone; choose another --name")
        info, stamps = found
        if info.state == "standby" and not info.running:
            now = disk_stamps(self.conn, self.connector.is_local, info.paths)
            info.touched = now != stamps
            if info.touched:
                log.warning("the disks of replica %s changed since it was left standby (%s, now %s): started or "
                            "written outside vmkeep", name, stamps, now)
        return info

    def create(self, config: dict[str, Any], info: ReplicaInfo, *, storage: str | None,
               network: str | None) -> None:
        place = {"network": network} if network else None
        check_config(config, place)
        check_network(self.connector, place)
        if config.get("nvram"):
            raise HypervisorError(f"{info.source} boots with UEFI variables: replicas of UEFI VMs are not supported "
                                  "yet; restore it as a new VM instead (vmkeep restore --as)")
        if self._lookup(info.name) is not None:
            raise UsageError(f"a VM named {info.name!r} already exists on {self.connector.host}; choose another --name")
        directory, pool = placement(self.connector, config, info.name, storage)
        if pool is not None:
            check_pool(pool.name(), pool.XMLDesc(0), self.connector.host)
        paths = {disk: directory / f"{info.name}-{disk}.{FORMAT}" for disk in info.disks}
        xml = replica_meta.with_record(_replica_xml(config["domain_xml"], info.name, paths, network), info)
        if self.connector.is_local:
            made = _make_files(Path(directory), paths, info.disks)
            try:
                for d in host_paths_to_create(xml):
                    Path(d).mkdir(parents=True, exist_ok=True)
                self._define(xml)
            except BaseException:
                for path in made:
                    path.unlink(missing_ok=True)
                raise
        else:
            with pool_for(self.conn, PurePosixPath(directory), pool) as used:
                volumes = _make_volumes(used, paths, info.disks, self.connector.host)
                try:
                    self._define(xml)
                except BaseException:
                    for volume in volumes:
                        _delete(volume)
                    raise
        log.info("defined replica %s of %s on %s (disks %s)", info.name, info.source, self.connector.host,
                 ", ".join(str(p) for p in paths.values()))

    def _define(self, xml: str) -> None:
        try:
            self.conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt refused the replica's configuration: {exc.get_error_message()}") from exc

    def remove(self, name: str) -> None:
        dom = self._lookup(name)
        info = replica_meta.read(dom) if dom is not None else None
        if dom is None or info is None:
            return
        self.connector.remove_domain(dom, "a replica whose first copy failed")
        if self.connector.is_local:
            for file in info.paths.values():
                Path(file).unlink(missing_ok=True)
            return
        for source in info.paths.values():
            path = PurePosixPath(source)
            with pool_for(self.conn, path.parent, pools.covering(self.conn, path.parent)) as pool:
                try:
                    _delete(pool.storageVolLookupByName(path.name))
                except libvirt.libvirtError as exc:
                    log.warning("the replica disk %s stays: %s", path, exc.get_error_message())

    def mark(self, name: str, *, state: ReplicaState, point: str | None = None) -> ReplicaInfo:
        dom = self._lookup(name)
        info = replica_meta.read(dom) if dom is not None else None
        if dom is None or info is None:
            raise HypervisorError(f"the replica {name} is gone from {self.connector.host}")
        info.state = state
        info.point = point or info.point
        # standby: the disks as left now, to tell at the next run whether anything wrote them since
        stamps = disk_stamps(self.conn, self.connector.is_local, info.paths) if state == "standby" else None
        replica_meta.write(dom, info, stamps)
        log.info("replica %s on %s: %s at point %s", name, self.connector.host, state, info.point)
        return info

    def start(self, name: str, *, network: str | None) -> None:
        dom = self._lookup(name)
        if dom is None:
            raise HypervisorError(f"the replica {name} is gone from {self.connector.host}")
        network = check_network(self.connector, {"network": network} if network else None)
        try:
            if network is not None:
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
                dom = self.conn.defineXML(without_network(xml) if network == DISCONNECTED else on_network(xml, network))
            dom.create()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"the replica {name} does not start on {self.connector.host}: "
                                  f"{exc.get_error_message()}; fix it (virsh edit {name}) and start it") from exc
        log.info("started replica %s on %s%s", name, self.connector.host,
                 f" (network {network})" if network else "")

    def disks(self, vm: str, names: Collection[str], *,
              writable_only: bool = False) -> AbstractContextManager[dict[str, DiskPatch]]:
        return open_disks(self.conn, self.connector.host, self.connector.is_local, vm, names,
                          writable_only=writable_only)


def check_pool(name: str, xml: str, host: str) -> None:
    """Refuse a pool whose new volumes may not read as zeros (a logical volume, an iSCSI LUN, a
    disk partition hold what was there before): the first copy writes only the point's non-zero
    slots, and would leave that stale data in the replica."""
    kind = ET.fromstring(xml).get("type", "")
    if kind not in FILE_POOLS:
        raise UsageError(f"storage pool {name} on {host} is of type {kind!r}: a new volume there is not known to "
                         "read as zeros, and a replica's first copy writes only the point's data; give --storage a "
                         f"pool of type {', '.join(FILE_POOLS)} or a directory")


def _replica_xml(xml: str, name: str, paths: Mapping[str, PurePath], network: str | None) -> str:
    """The point's configuration as the replica: a new identity (as a restore as new), its disks
    the raw images, its interfaces on ``network`` (DISCONNECTED: none; None: as the original's).
    A disk the point does not hold (shareable, a passthrough LUN, an empty drive) is left out: it
    would name the original host's device or image (CD-ROM and floppy drives stay)."""
    root = ET.fromstring(renamed_copy(xml, name, {d: str(p) for d, p in paths.items()}))
    devices = root.find("devices")
    for target, disk in list(disk_elements(root)):
        driver = disk.find("driver")
        if target in paths:
            if driver is not None:
                driver.set("type", FORMAT)
        elif disk.get("device", "disk") not in ("cdrom", "floppy") and devices is not None:
            log.info("disk %s is not in the point: left out of replica %s", target, name)
            devices.remove(disk)
    xml = ET.tostring(root, encoding="unicode")
    if network == DISCONNECTED:
        return without_network(xml)
    return on_network(xml, network) if network else xml


def _make_files(directory: Path, paths: Mapping[str, PurePath], sizes: dict[str, int]) -> list[Path]:
    """Empty sparse raw images (refusing any that exists); the ones made."""
    taken = [str(p) for p in paths.values() if Path(p).exists()]
    if taken:
        raise UsageError(f"the replica's disks would overwrite {', '.join(taken)}; choose another --storage or --name")
    directory.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    try:
        for disk, path in paths.items():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            made.append(Path(path))
            try:
                os.ftruncate(fd, sizes[disk])
            finally:
                os.close(fd)
    except BaseException:
        for p in made:
            p.unlink(missing_ok=True)
        raise
    return made


def _make_volumes(pool: libvirt.virStoragePool, paths: Mapping[str, PurePath], sizes: dict[str, int],
                  host: str) -> list[libvirt.virStorageVol]:
    """Empty sparse raw volumes on the host (refusing any that exists); the ones made."""
    made: list[libvirt.virStorageVol] = []
    try:
        for disk, path in paths.items():
            try:
                pool.storageVolLookupByName(path.name)
                raise UsageError(f"the replica's disk would overwrite {path} on {host}; choose another --storage or "
                                 "--name")
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise
            made.append(pool.createXML(volume_xml(path.name, sizes[disk], FORMAT), 0))
    except libvirt.libvirtError as exc:
        for volume in made:
            _delete(volume)
        raise HypervisorError(f"cannot create the replica's disks on {host}: {exc.get_error_message()}") from exc
    except BaseException:
        for volume in made:
            _delete(volume)
        raise
    return made


def _delete(volume: libvirt.virStorageVol) -> None:
    try:
        volume.delete(0)
    except libvirt.libvirtError as exc:
        log.warning("cannot remove the volume %s: %s", volume.path(), exc.get_error_message())
