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


def _spec(config: dict[str, Any], name: str, datastore: str, networks: dict[Any, Any]) -> Any:
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
                                                backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                                                    deviceName=n["network"], network=network))
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=nic))
    return vim.vm.ConfigSpec(name=name, guestId=config["guest_id"], memoryMB=config["memory_mb"],
                             numCPUs=config["cpus"], firmware=config.get("firmware"),
                             annotation=f"{MARK} from {config['name']}",
                             files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"), deviceChange=changes)


def define(connector: VsphereConnector, config: dict[str, Any], *, name: str, disk_paths: dict[str, str],
           datastore: str | None, as_new: bool, start: bool) -> dict[str, str]:
    """Create the VM, upload its disks; where each disk lives now ("[datastore] path")."""
    if not as_new:
        raise HypervisorError("restoring over an existing vSphere VM is not in this version: restore --as NEW")
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
    spec = _spec(config, name, store, networks)
    vm = session.wait(dc_props["vmFolder"].CreateVM_Task(config=spec, pool=pool), f"creating VM {name}")
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


def destroy(connector: VsphereConnector, vm: Any, name: str) -> None:
    """Power off and delete a VM (with its files) that a restore made."""
    session = connector.session
    if str(session.one(vm, ["runtime.powerState"]).get("runtime.powerState")) != "poweredOff":
        session.wait(vm.PowerOffVM_Task(), f"stopping {name}")
    session.wait(vm.Destroy_Task(), f"removing {name}")
