"""A VM rebuilt on vSphere from a restore point, its disks streamed as the restore reads them.

As a new VM: an NFC import (``ImportVApp``) of a VM made from the saved configuration (new name,
UUID and MACs; the chosen datastore), each disk sent as a streamOptimized VMDK: only the data
travels, compressed. Over the original: each disk PUT over its flat file through the datastore's
``/folder`` URL. Nothing is staged on the proxy; a VM this leaves half-made is removed again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from pyVmomi import vim, vmodl

from vmkeep.hypervisors.base import DISCONNECTED, HypervisorError
from vmkeep.hypervisors.vmware import devices
from vmkeep.hypervisors.vmware.datastore import FolderWriter, put_stream
from vmkeep.hypervisors.vmware.nfc import ImportLease
from vmkeep.transport.targets import DiskWriter

if TYPE_CHECKING:
    from vmkeep.hypervisors.vmware.connector import VsphereConnector

log = logging.getLogger(__name__)

MARK = "restored by vmkeep"
IDE_KEY = 200  # the device key vSphere gives IDE controller 0 (1: 201)


def _by_name(connector: VsphereConnector, kind: type, name: str | None) -> Any:
    for obj, p in connector.session.collect(kind, ["name"]):
        if name is None or p.get("name") == name:
            return obj
    return None


def _nic_backing(name: str, network: Any, switches: dict[Any, tuple[Any, Any]]) -> Any:
    """A standard network by name; a distributed port group by its key and its switch's UUID."""
    if isinstance(network, vim.dvs.DistributedVirtualPortgroup):
        key, switch = switches[network]
        return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(portgroupKey=key, switchUuid=switch))
    return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=name, network=network)


def _spec(config: dict[str, Any], name: str, datastore: str, networks: dict[Any, Any], switches: dict[Any, Any]) -> Any:
    keys = {}
    changes = []
    used = {d["controller"] for d in config["disks"] if d.get("backup", True)}
    for i, c in enumerate(config["controllers"]):
        if c["key"] not in used:
            continue
        if c["type"] == "VirtualIDEController":  # every VM has its two IDE controllers already
            keys[c["key"]] = IDE_KEY + c["bus"]
            continue
        keys[c["key"]] = -100 - i
        kind = getattr(vim.vm.device, c["type"])
        controller = kind(key=keys[c["key"]], busNumber=c["bus"])
        if c.get("shared") is not None:
            controller.sharedBus = c["shared"]
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=controller))
    for i, d in enumerate(config["disks"]):
        if not d.get("backup", True):
            continue
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(diskMode=d["mode"], thinProvisioned=d["thin"],
                                                                 fileName=f"[{datastore}]")
        disk = vim.vm.device.VirtualDisk(key=-200 - i, controllerKey=keys.get(d["controller"], d["controller"]),
                                         unitNumber=d["unit"], capacityInKB=(d["capacity"] + 1023) // 1024,
                                         backing=backing)
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk))
    for i, n in enumerate(config["nics"]):
        network = networks.get(n.get("network"))
        if network is None:
            continue
        nic = getattr(vim.vm.device, n["type"])(key=-300 - i, addressType="generated",
                                                backing=_nic_backing(n["network"], network, switches))
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=nic))
    return vim.vm.ConfigSpec(name=name, guestId=config["guest_id"], memoryMB=config["memory_mb"],
                             numCPUs=config["cpus"], firmware=config.get("firmware"),
                             annotation=f"{MARK} from {config['name']}",
                             files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"), deviceChange=changes)


class NewVM:
    """A VM being restored as a new one through an NFC import lease (see nfc.py): each disk
    streams into its place on the datastore as the restore reads it."""

    def __init__(self, connector: VsphereConnector, name: str, lease: ImportLease) -> None:
        self.connector = connector
        self.name = name
        self.lease = lease
        self.finished = False
        devices_now = connector.session.one(lease.vm, ["config.hardware.device"]).get("config.hardware.device")
        self.made = devices.disks(devices_now or [])
        self.written: list[str] = []

    def disk(self, name: str, size: int) -> AbstractContextManager[DiskWriter]:
        target = next((d for d in self.made if d.name == name), None)
        if target is None:
            raise HypervisorError(f"the new VM {self.name} has no disk {name} to restore into (it has "
                                  f"{', '.join(d.name for d in self.made) or 'none'})")
        if size > target.capacity:
            raise HypervisorError(f"disk {name} of the point is {size} bytes, larger than the {target.capacity} "
                                  f"bytes the new VM {self.name} was given")
        self.written.append(name)
        return self.lease.upload(target, self.lease.url_of(target, self.made))

    def finish(self, *, start: bool) -> dict[str, str]:
        self.lease.complete()
        self.finished = True
        if start:
            self.connector.session.wait(self.lease.vm.PowerOnVM_Task(), f"starting {self.name}")
        return {d.name: d.file for d in self.made if d.name in self.written}


def _placement(connector: VsphereConnector, config: dict[str, Any], name: str, datastore: str | None,
               place: dict[str, str]) -> tuple[Any, Any, Any, Any]:
    """(ConfigSpec, resource pool, folder, host or None) of the new VM: where the point's VM
    lived unless the user said otherwise."""
    session = connector.session
    placement = config.get("placement", {})
    store = datastore or placement.get("datastore")
    if _by_name(connector, vim.Datastore, store) is None:
        raise HypervisorError(f"no datastore {store!r} on {connector.host}: give --storage DATASTORE")
    dc = _by_name(connector, vim.Datacenter, placement.get("datacenter")) or _by_name(connector, vim.Datacenter,
                                                                                         None)
    dc_props = session.one(dc, ["name", "vmFolder"])
    pool = _by_name(connector, vim.ResourcePool, placement.get("pool")) or _by_name(connector, vim.ResourcePool,
                                                                                     None)
    networks = {p.get("name"): n for n, p in session.collect(vim.Network, ["name"])}
    if place.get("network") == DISCONNECTED:  # no network cards at all: the copy reaches nothing
        config = {**config, "nics": []}
    elif place.get("network"):  # every NIC on the network asked for
        if place["network"] not in networks:
            raise HypervisorError(f"no network {place['network']!r} on {connector.host} (there are: "
                                  f"{', '.join(sorted(map(str, networks)))})")
        config = {**config, "nics": [{**n, "network": place["network"]} for n in config["nics"]]}
    switches = {}
    for group, p in session.collect(vim.dvs.DistributedVirtualPortgroup, ["key", "config.distributedVirtualSwitch"]):
        switch = p.get("config.distributedVirtualSwitch")
        switches[group] = (p.get("key"), session.one(switch, ["uuid"]).get("uuid") if switch is not None else None)
    spec = _spec(config, name, store, networks, switches)
    folders = {path: f for f, path in connector.folder_paths().items()}
    if place.get("folder") and place["folder"] not in folders:
        raise HypervisorError(f"no VM folder {place['folder']!r} on {connector.host} (folders are named from "
                              f"their datacenter, e.g. {next(iter(sorted(folders)), 'DC0')})")
    folder = folders.get(place.get("folder") or placement.get("folder") or "", dc_props["vmFolder"])
    host_name = place.get("host") or placement.get("host")
    host = _by_name(connector, vim.HostSystem, host_name) if host_name else None
    if place.get("host") and host is None:
        raise HypervisorError(f"no host {place['host']!r} on {connector.host}")
    return spec, pool, folder, host


@contextmanager
def new_vm(connector: VsphereConnector, config: dict[str, Any], *, name: str, disks: dict[str, int],
           datastore: str | None, place: dict[str, str], retry: bool) -> Iterator[NewVM]:
    """A new VM imported through an NFC lease; unless finished, the lease is aborted and the VM
    removed on every way out (errors and Ctrl-C alike)."""
    saved = {d["name"]: d for d in config.get("disks", []) if d.get("backup", True)}
    for disk, size in disks.items():
        if disk not in saved:
            raise HypervisorError(f"the point's configuration has no disk {disk}: restore it with --disk")
        if size > saved[disk]["capacity"]:
            raise HypervisorError(f"disk {disk} of the point is {size} bytes, its configuration says "
                                  f"{saved[disk]['capacity']}: restore it with --disk")
    if retry:
        connector.remove_restored(name)
    if connector.exists(name):
        raise HypervisorError(f"a VM named {name!r} already exists on {connector.host}; choose another --as name")
    spec, pool, folder, host = _placement(connector, config, name, datastore, place)
    lease = ImportLease.begin(connector.session, pool, spec, folder, host)
    restoring: NewVM | None = None
    try:
        lease.wait_ready()
        restoring = NewVM(connector, name, lease)
        yield restoring
    finally:
        if restoring is None or not restoring.finished:
            lease.abort(f"the restore of {name} did not finish")
            if lease.vm is not None:
                _remove_if_there(connector, lease.vm, name)


def _remove_if_there(connector: VsphereConnector, vm: Any, name: str) -> None:
    """Remove a VM a failed restore made, unless vSphere removed it already (an aborted import).
    Never raises: what made the restore fail is the error to report."""
    try:
        destroy(connector, vm, name)
    except vmodl.fault.ManagedObjectNotFound:
        log.info("VM %s is gone already", name)
    except Exception as exc:  # noqa: BLE001 - logged with what to do; the restore's own error goes on
        log.warning("could not remove the half-made VM %s (%s): remove it in vSphere, or retry the restore, "
                    "which removes a VM it made first", name, exc)


class OriginalVM:
    """The original (shut off) VM getting its disks back: each one streams over its flat file
    with one datastore PUT, zeros included (a PUT replaces the whole file); nothing is staged."""

    def __init__(self, connector: VsphereConnector, name: str, current: dict[str, devices.Disk],
                 datacenter: str) -> None:
        self.connector = connector
        self.name = name
        self.current = current
        self.datacenter = datacenter
        self.written: list[str] = []

    @contextmanager
    def disk(self, name: str, size: int) -> Iterator[DiskWriter]:
        target = _check_disk(self.current, self.name, name, size)
        if not self.written:  # before the first byte: CBT will not see these writes, so the next backup
            self.connector.forget_checkpoints(self.name)  # is full even if this restore fails half-way
        upload = put_stream(self.connector.session, self.datacenter, target.datastore, target.flat_path, size)
        writer = FolderWriter(upload)
        self.written.append(name)
        try:
            yield writer
            if writer.at < size:
                writer.zero(writer.at, size - writer.at)
            upload.finish()
        except BaseException as exc:
            upload.abort()
            if isinstance(exc, Exception):
                raise HypervisorError(f"disk {name} of {self.name} is incomplete now ({exc}): run the restore "
                                      "again before starting the VM") from exc
            raise

    def finish(self, *, start: bool) -> dict[str, str]:
        if start:
            self.connector.session.wait(self.connector.vm(self.name).PowerOnVM_Task(), f"starting {self.name}")
        return {d: self.current[d].file for d in self.written}


def _check_disk(current: dict[str, devices.Disk], vm: str, name: str, size: int) -> devices.Disk:
    target = current.get(name)
    if target is None:
        raise HypervisorError(f"VM {vm} has no disk {name} any more: restore --as NEW")
    if target.capacity != size:
        raise HypervisorError(f"disk {name} of {vm} is {target.capacity} bytes now, the point's is {size}: "
                              "restore --as NEW")
    return target


@contextmanager
def original_vm(connector: VsphereConnector, name: str, disks: dict[str, int]) -> Iterator[OriginalVM]:
    """The original VM, checked before anything is written: shut off, no snapshots (the disks
    under them cannot be replaced), every disk of the point still there with its size."""
    connector.require_shut_off(name)
    session = connector.session
    vm = connector.vm(name)
    props = session.one(vm, ["snapshot", "config.hardware.device"])
    if getattr(props.get("snapshot"), "rootSnapshotList", None):
        raise HypervisorError(f"VM {name} has snapshots: the disks under them cannot be replaced; delete its "
                              "snapshots first, or restore --as NEW")
    current = {d.name: d for d in devices.disks(props.get("config.hardware.device") or [])}
    for disk, size in disks.items():
        _check_disk(current, name, disk, size)
    yield OriginalVM(connector, name, current, connector.datacenter_of(vm))


def destroy(connector: VsphereConnector, vm: Any, name: str) -> None:
    """Power off and delete a VM (with its files) that a restore made."""
    session = connector.session
    state = session.one(vm, ["runtime.powerState"]).get("runtime.powerState")
    if state is None:
        raise vmodl.fault.ManagedObjectNotFound(obj=vm)
    if str(state) != "poweredOff":
        session.wait(vm.PowerOffVM_Task(), f"stopping {name}")
    log.info("Destroy_Task of VM %s (%s)", name, vm._moId)
    session.wait(vm.Destroy_Task(), f"removing {name}")
