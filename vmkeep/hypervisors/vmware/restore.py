"""A VM rebuilt on vSphere from a restore point: CreateVM_Task from the saved configuration (new
name, UUID and MACs; the chosen datastore), then each restored disk uploaded over its new flat
file. A VM this leaves half-made is destroyed again."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyVmomi import vim

from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.vmware import devices
from vmkeep.hypervisors.vmware.datastore import upload

if TYPE_CHECKING:
    from vmkeep.hypervisors.vmware.connector import VsphereConnector

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


def define(connector: VsphereConnector, config: dict[str, Any], *, name: str, disk_paths: dict[str, str],
           datastore: str | None, as_new: bool, start: bool, place: dict[str, str]) -> dict[str, str]:
    """Create the VM (or refill the original's disks), upload the disks; where each disk lives
    now ("[datastore] path")."""
    if not as_new:
        return overwrite(connector, name, disk_paths)
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
    if place.get("network"):  # every NIC on the network asked for
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
    vm = session.wait(folder.CreateVM_Task(config=spec, pool=pool, host=host), f"creating VM {name}")
    try:
        made = {d.name: d for d in devices.disks(session.one(vm, ["config.hardware.device"]).get(
            "config.hardware.device") or [])}
        for disk, staged in disk_paths.items():
            if disk not in made:
                raise HypervisorError(f"the new VM {name} has no disk {disk} to restore into")
            target = made[disk]
            upload(session, dc_props["name"], target.datastore, target.flat_path, Path(staged))
        if start:
            session.wait(vm.PowerOnVM_Task(), f"starting {name}")
    except BaseException:
        destroy(connector, vm, name)
        raise
    return {disk: made[disk].file for disk in disk_paths}


def overwrite(connector: VsphereConnector, name: str, disk_paths: dict[str, str]) -> dict[str, str]:
    """Upload the restored disks over the (shut off) original's; tracking is reset after."""
    session = connector.session
    vm = connector.vm(name)
    props = session.one(vm, ["snapshot", "config.hardware.device", "datastore"])
    if getattr(props.get("snapshot"), "rootSnapshotList", None):
        raise HypervisorError(f"VM {name} has snapshots: the disks under them cannot be replaced; delete its "
                              "snapshots first, or restore --as NEW")
    current = {d.name: d for d in devices.disks(props.get("config.hardware.device") or [])}
    for disk, staged in disk_paths.items():
        target = current.get(disk)
        if target is None:
            raise HypervisorError(f"VM {name} has no disk {disk} any more: restore --as NEW")
        if target.capacity != Path(staged).stat().st_size:
            raise HypervisorError(f"disk {disk} of {name} is {target.capacity} bytes now, the point's is "
                                  f"{Path(staged).stat().st_size}: restore --as NEW")
    datacenter = connector.datacenter_of(vm)
    for disk, staged in disk_paths.items():
        target = current[disk]
        upload(session, datacenter, target.datastore, target.flat_path, Path(staged))
    connector.forget_checkpoints(name)  # CBT did not see these writes: the next backup must be full
    return {disk: current[disk].file for disk in disk_paths}


def destroy(connector: VsphereConnector, vm: Any, name: str) -> None:
    """Power off and delete a VM (with its files) that a restore made."""
    session = connector.session
    if str(session.one(vm, ["runtime.powerState"]).get("runtime.powerState")) != "poweredOff":
        session.wait(vm.PowerOffVM_Task(), f"stopping {name}")
    session.wait(vm.Destroy_Task(), f"removing {name}")
