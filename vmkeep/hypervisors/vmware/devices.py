"""A VM's virtual hardware as vmkeep sees it: which disks it backs up (and which it skips, and
why), their stable names, and the configuration a restore rebuilds the VM from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

CONTROLLER_PREFIX = (
    (vim.vm.device.VirtualSCSIController, "scsi"),
    (vim.vm.device.VirtualSATAController, "sata"),
    (vim.vm.device.VirtualNVMEController, "nvme"),
    (vim.vm.device.VirtualIDEController, "ide"),
)
INDEPENDENT = ("independent_persistent", "independent_nonpersistent")


@dataclass
class Disk:
    name: str  # scsi0-1: controller and unit, stable across snapshots and restores
    key: int  # the device key (QueryChangedDiskAreas asks for it)
    file: str  # "[datastore] dir/vm.vmdk"
    datastore: str
    capacity: int
    mode: str
    thin: bool
    backup: bool = True
    skip_reason: str = ""
    change_id: str | None = None

    @property
    def flat_path(self) -> str:
        """The data file of a flat disk, relative to its datastore: dir/vm-flat.vmdk."""
        return split_datastore_path(self.file)[1].removesuffix(".vmdk") + "-flat.vmdk"


def split_datastore_path(path: str) -> tuple[str, str]:
    """``[ds1] dir/vm.vmdk`` → ('ds1', 'dir/vm.vmdk')."""
    if not path.startswith("[") or "]" not in path:
        raise ValueError(f"not a datastore path: {path!r}")
    store, _, rest = path[1:].partition("]")
    return store, rest.strip()


def short_type(device: Any) -> str:
    """``VirtualLsiLogicController`` for a vim.vm.device.VirtualLsiLogicController."""
    return type(device).__name__.rsplit(".", 1)[-1]


def _controllers(devices: list[Any]) -> dict[int, str]:
    names = {}
    for d in devices:
        for kind, prefix in CONTROLLER_PREFIX:
            if isinstance(d, kind):
                names[d.key] = f"{prefix}{d.busNumber}"
    return names


def capacity_bytes(d: Any) -> int:
    return int(getattr(d, "capacityInBytes", None) or (d.capacityInKB or 0) * 1024)


def disks(devices: list[Any]) -> list[Disk]:
    """Every virtual disk; RDMs and independent disks are marked skipped with the reason."""
    controllers = _controllers(devices)
    found = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        name = f"{controllers.get(d.controllerKey or 0, 'disk')}-{d.unitNumber}"
        backing = d.backing
        file = getattr(backing, "fileName", "") or ""
        store = split_datastore_path(file)[0] if file.startswith("[") else ""
        mode = getattr(backing, "diskMode", "persistent") or "persistent"
        disk = Disk(name, d.key, file, store, capacity_bytes(d), mode, bool(getattr(backing, "thinProvisioned", False)),
                    change_id=getattr(backing, "changeId", None) or None)
        if isinstance(backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo):
            disk.backup, disk.skip_reason = False, (f"{name} is a raw device mapping ({backing.compatibilityMode}): "
                                                   "snapshots do not cover it; back up its LUN on the storage")
        elif mode in INDEPENDENT:
            disk.backup, disk.skip_reason = False, (f"{name} is an independent disk ({mode}): snapshots leave it "
                                                   "out; make it dependent to have it backed up")
        elif not isinstance(backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo):
            disk.backup, disk.skip_reason = False, f"{name} has a {type(backing).__name__} backing, not read here"
        found.append(disk)
    return found


def saved_config(config: Any, devices: list[Any], placement: dict[str, str | None],
                 portgroups: dict[str, str] | None = None) -> dict[str, Any]:
    """What a restore needs to build the VM again: hardware, disks, networks (by name;
    ``portgroups`` names distributed port groups by key), where it lived."""
    controllers = []
    for d in devices:
        for kind, _prefix in CONTROLLER_PREFIX:
            if isinstance(d, kind):
                controllers.append({"key": d.key, "type": short_type(d), "bus": d.busNumber,
                                    "shared": getattr(d, "sharedBus", None)})
    nics = []
    for d in devices:
        if isinstance(d, vim.vm.device.VirtualEthernetCard):
            backing = d.backing
            key = getattr(getattr(backing, "port", None), "portgroupKey", None)
            network = getattr(backing, "deviceName", None) or (portgroups or {}).get(key or "", key)
            nics.append({"type": short_type(d), "mac": getattr(d, "macAddress", None), "network": network})
    return {
        "kind": "vsphere",
        "name": config.name, "guest_id": config.guestId, "memory_mb": config.hardware.memoryMB,
        "cpus": config.hardware.numCPU, "firmware": getattr(config, "firmware", None) or "bios",
        "version": getattr(config, "version", None), "uuid": config.uuid,
        "controllers": controllers,
        "disks": [{"name": x.name, "controller": d.controllerKey, "unit": d.unitNumber, "capacity": x.capacity,
                   "mode": x.mode, "thin": x.thin, "backup": x.backup}
                  for x, d in zip(disks(devices), [v for v in devices if isinstance(v, vim.vm.device.VirtualDisk)],
                                  strict=True)],
        "nics": nics,
        "placement": placement,
    }
