"""What a libvirt host holds: its VMs, their state and disks, and where each disk is stored."""

from __future__ import annotations

import logging
import os

import libvirt

from vmkeep.hypervisors.base import HypervisorError, VMDisk, VMInfo
from vmkeep.hypervisors.libvirt.connection import Connection
from vmkeep.hypervisors.libvirt.domain_xml import disk_specs

log = logging.getLogger(__name__)

STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


def list_vms(connection: Connection) -> list[VMInfo]:
    """Every VM with its disks; a VM undefined while the list is read is left out."""
    vms = []
    try:
        domains = connection.conn.listAllDomains()
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot list the VMs of {connection.uri}: {exc.get_error_message()}") from exc
    log.debug("%s lists %d VMs", connection.uri, len(domains))
    for dom in domains:
        try:
            vms.append(vm_info(connection, dom))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise HypervisorError(f"cannot describe a VM of {connection.uri}: {exc.get_error_message()}") from exc
            log.debug("a VM of %s was undefined while listed: %s", connection.uri, exc.get_error_message())
    return vms


def vm_info(connection: Connection, dom: libvirt.virDomain) -> VMInfo:
    """The VM's state and disks; a disk libvirt cannot size (no medium, image gone) shows size 0."""
    disks = []
    for spec in disk_specs(dom.XMLDesc()):
        try:
            capacity, allocation, _physical = dom.blockInfo(spec.target) if spec.source else (0, 0, 0)
        except libvirt.libvirtError as exc:
            log.debug("blockInfo of %s on %s: %s", spec.target, dom.name(), exc.get_error_message())
            capacity = allocation = 0
        disks.append(VMDisk(spec.target, spec.source, spec.format, capacity, allocation, spec.eligible,
                            spec.reason, datastore(connection, spec.source)))
    return VMInfo(dom.name(), dom.UUIDString(), STATE_NAMES.get(dom.state()[0], "unknown"), connection.host, disks)


def datastore(connection: Connection, path: str) -> str:
    """The storage pool holding ``path``, or its directory when no pool manages it (named per
    host: libvirt knows nothing of storage shared between hosts)."""
    if not path:
        return ""
    try:
        pool = connection.conn.storageVolLookupByPath(path).storagePoolLookupByVolume()
        return f"{connection.host}:pool/{pool.name()}"
    except libvirt.libvirtError as exc:
        log.debug("no storage pool holds %s: %s", path, exc.get_error_message())
        return f"{connection.host}:{os.path.dirname(path) if path.startswith('/') else path}"
