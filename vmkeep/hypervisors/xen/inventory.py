"""What a XenServer / XCP-ng pool holds: its VMs with their disks (and which of them a backup
reads), hosts, SRs and networks, and the configuration a restore point keeps of a VM.

XAPI lists templates, snapshots and each host's control domain (dom0) among the VMs: none of
them is a VM to back up. A VM's disks are its VBDs of type Disk; CD drives and sharable disks
(XAPI cannot snapshot a disk another VM writes at the same time) are listed but not read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vmkeep.hypervisors.base import HypervisorError, VMDisk, VMInfo
from vmkeep.hypervisors.xen.session import XapiSession

log = logging.getLogger(__name__)

NULL = "OpaqueRef:NULL"
POWER_STATES = {"Running": "running", "Halted": "shut off", "Paused": "paused", "Suspended": "suspended"}
MARK_PREFIX = "vmkeep"  # other_config keys vmkeep sets (vmkeep-base, …): not part of a VM's configuration
VM_FIELDS = ("name_label", "name_description", "user_version", "memory_static_max", "memory_static_min",
             "memory_dynamic_max", "memory_dynamic_min", "VCPUs_max", "VCPUs_at_startup", "VCPUs_params",
             "domain_type", "HVM_boot_policy", "HVM_boot_params", "HVM_shadow_multiplier", "PV_bootloader",
             "PV_kernel", "PV_ramdisk", "PV_args", "PV_bootloader_args", "PV_legacy_args", "platform", "PCI_bus",
             "recommendations", "NVRAM", "has_vendor_device", "hardware_platform_version", "actions_after_shutdown",
             "actions_after_reboot", "actions_after_crash", "tags", "other_config")
# NVRAM holds a UEFI guest's variables (boot entries, Secure Boot keys): without it the copy boots
# as a machine whose firmware was reset; has_vendor_device and hardware_platform_version are
# hardware the guest has seen (Windows' update device; the virtual platform's version).


class Records:
    """XAPI records read once per use: one ``get_all_records`` per class when the whole pool is
    listed, single ``get_record`` calls when one VM is backed up."""

    def __init__(self, session: XapiSession) -> None:
        self.session = session
        self._cache: dict[str, dict[str, dict[str, Any]]] = {}
        self._complete: set[str] = set()

    def all(self, cls: str) -> dict[str, dict[str, Any]]:
        if cls not in self._complete:
            self._cache[cls] = dict(self.session.call(f"{cls}.get_all_records"))
            self._complete.add(cls)
        return self._cache[cls]

    def get(self, cls: str, ref: str) -> dict[str, Any]:
        cached = self._cache.setdefault(cls, {})
        if ref not in cached:
            cached[ref] = dict(self.session.call(f"{cls}.get_record", ref))
        return cached[ref]

    def forget(self, cls: str, ref: str) -> None:
        self._cache.get(cls, {}).pop(ref, None)

    def name(self, cls: str, ref: str | None) -> str | None:
        """The name_label of ``ref``, None for the null ref."""
        if not ref or ref == NULL:
            return None
        return str(self.get(cls, ref).get("name_label", ""))


def is_guest(vm: dict[str, Any]) -> bool:
    """A VM to back up: not a template, a snapshot or a host's control domain."""
    return not (vm.get("is_a_template") or vm.get("is_a_snapshot") or vm.get("is_control_domain"))


def disk_name(userdevice: str) -> str:
    """``xvd`` + the letter(s) of the VBD's position: "0" → xvda, "1" → xvdb, "26" → xvdaa."""
    try:
        index = int(userdevice)
    except ValueError:
        return f"xvd-{userdevice}"
    letters = ""
    index += 1
    while index > 0:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return f"xvd{letters}"


@dataclass
class Disk:
    """One VBD of a VM and what a backup does with it."""

    name: str  # xvda, …
    vbd: str  # ref
    vdi: str  # ref, NULL for an empty CD drive
    record: dict[str, Any]  # the VDI's ({} for an empty CD drive)
    sr: dict[str, Any]  # the VDI's SR ({} for an empty CD drive)
    vbd_record: dict[str, Any]
    backup: bool
    skip_reason: str = ""

    @property
    def size(self) -> int:
        return int(self.record.get("virtual_size") or 0)

    @property
    def uuid(self) -> str:
        return str(self.record.get("uuid", ""))


def disks(records: Records, vm: dict[str, Any]) -> list[Disk]:
    """Every VBD of ``vm`` in userdevice order, marked with whether a backup reads it."""
    found = []
    for vbd_ref in vm.get("VBDs") or []:
        vbd = records.get("VBD", vbd_ref)
        name = disk_name(str(vbd.get("userdevice", "")))
        vdi_ref = str(vbd.get("VDI") or NULL)
        vdi = records.get("VDI", vdi_ref) if vdi_ref != NULL else {}
        sr = records.get("SR", vdi["SR"]) if vdi.get("SR") and vdi["SR"] != NULL else {}
        backup, reason = True, ""
        if vbd.get("type") != "Disk":
            backup, reason = False, f"disk {name}: a CD drive ({'empty' if vdi_ref == NULL else vdi.get('name_label')})"
        elif vdi_ref == NULL or not vdi:
            backup, reason = False, f"disk {name}: no VDI behind the VBD"
        elif vdi.get("sharable"):
            backup, reason = False, (f"disk {name}: a sharable disk (other VMs write it at the same time; XAPI does "
                                     "not snapshot it)")
        elif vdi.get("type") == "cbt_metadata":
            backup, reason = False, f"disk {name}: a CBT metadata VDI holds no data"
        found.append(Disk(name, vbd_ref, vdi_ref, vdi, sr, vbd, backup, reason))
    return sorted(found, key=lambda d: _order(d.vbd_record.get("userdevice", "")))


def _order(userdevice: Any) -> tuple[int, str]:
    text = str(userdevice)
    return (int(text), text) if text.isdigit() else (1 << 30, text)


def vm_disks(found: list[Disk]) -> list[VMDisk]:
    return [VMDisk(d.name, d.uuid, str((d.record.get("sm_config") or {}).get("image-format") or "vhd"), d.size,
                   int(d.record.get("physical_utilisation") or 0), d.backup, d.skip_reason,
                   str(d.sr.get("name_label", "")), change_tracking=bool(d.record.get("cbt_enabled")))
            for d in found]


def host_of(records: Records, vm: dict[str, Any]) -> str:
    """The host the VM runs on, else the one it prefers, else the pool master."""
    for key in ("resident_on", "affinity"):
        name = records.name("host", vm.get(key))
        if name:
            return name
    return master_name(records)


def master_name(records: Records) -> str:
    pools = records.all("pool")
    for pool in pools.values():
        name = records.name("host", pool.get("master"))
        if name:
            return name
    return ""


def vm_info(records: Records, vm: dict[str, Any]) -> VMInfo:
    folder = (vm.get("other_config") or {}).get("folder")  # XenCenter's folders live there
    return VMInfo(str(vm["name_label"]), str(vm["uuid"]), POWER_STATES.get(str(vm.get("power_state")), "unknown"),
                  host_of(records, vm), vm_disks(disks(records, vm)), folder=str(folder) if folder else None,
                  tags=sorted(str(t) for t in vm.get("tags") or []))


def list_vms(session: XapiSession) -> list[VMInfo]:
    """Every guest VM of the pool with its disks (templates, snapshots and dom0 left out)."""
    records = Records(session)
    for cls in ("VBD", "VDI", "SR", "host"):
        records.all(cls)  # one call each rather than one per object
    vms = [vm_info(records, vm) for vm in records.all("VM").values() if is_guest(vm)]
    log.debug("%s lists %d VMs", session.host, len(vms))
    return sorted(vms, key=lambda v: v.name)


def vms_named(session: XapiSession, name: str) -> list[tuple[str, dict[str, Any]]]:
    """The guest VMs (not templates, snapshots or control domains) called ``name``: (ref, record)."""
    found = []
    for ref in session.call("VM.get_by_name_label", name):
        record = dict(session.call("VM.get_record", ref))
        if is_guest(record):
            found.append((str(ref), record))
    return found


def find_vm(session: XapiSession, name: str) -> str:
    """The ref of the guest VM called ``name`` (name_label), refusing a name several VMs share."""
    found = vms_named(session, name)
    if not found:
        raise HypervisorError(f"no VM named {name!r} in the pool of {session.host}; see `vmkeep inventory --host "
                              f"{session.uri}`")
    if len(found) > 1:
        uuids = ", ".join(str(record.get("uuid")) for _ref, record in found)
        raise HypervisorError(f"{len(found)} VMs are named {name!r} in the pool of {session.host} ({uuids}): give "
                              "each a name of its own (xe vm-param-set name-label=… uuid=…)")
    return found[0][0]


def topology(session: XapiSession) -> dict[str, Any]:
    """Pools (with their master and default SR), hosts, SRs with type and space, networks with
    their purpose (``nbd`` / ``insecure_nbd``: where backups read disks)."""
    records = Records(session)
    hosts = records.all("host")
    pools = [{"name": p.get("name_label", ""), "master": records.name("host", p.get("master")),
              "default_sr": records.name("SR", p.get("default_SR"))} for p in records.all("pool").values()]
    pool_name = pools[0]["name"] if pools else ""
    srs = []
    for sr in records.all("SR").values():
        size, used = int(sr.get("physical_size") or 0), int(sr.get("physical_utilisation") or 0)
        srs.append({"name": sr.get("name_label", ""), "type": sr.get("type", ""),
                    "content_type": sr.get("content_type", ""), "shared": bool(sr.get("shared")), "size": size,
                    "free": max(size - used, 0)})
    networks = [{"name": n.get("name_label", ""), "bridge": n.get("bridge", ""), "purpose": sorted(n.get("purpose")
                                                                                                   or [])}
                for n in records.all("network").values()]
    return {"pools": pools,
            "hosts": sorted(({"name": h.get("name_label", ""), "address": h.get("address", ""),
                              "enabled": bool(h.get("enabled")), "pool": pool_name} for h in hosts.values()),
                            key=lambda h: str(h["name"])),
            "srs": sorted(srs, key=lambda s: str(s["name"])),
            "networks": sorted(networks, key=lambda n: str(n["name"]))}


def saved_config(records: Records, vm: dict[str, Any], found: list[Disk]) -> dict[str, Any]:
    """What a restore needs to make the VM again: its settings (XAPI's own field names and string
    values, as VM.create takes them), VBDs, VIFs with their network's name, and per disk its size,
    SR and name; vmkeep's own other_config keys are left out."""
    settings = {k: vm[k] for k in VM_FIELDS if k in vm}
    settings["other_config"] = {k: v for k, v in (vm.get("other_config") or {}).items()
                                if not str(k).startswith(MARK_PREFIX)}
    backed = [d for d in found if d.backup]
    vbds = [{"disk": d.name if d.backup else None, "userdevice": d.vbd_record.get("userdevice"),
             "bootable": bool(d.vbd_record.get("bootable")), "mode": d.vbd_record.get("mode"),
             "type": d.vbd_record.get("type")}
            for d in found if d.backup or d.vbd_record.get("type") == "CD"]
    vifs = []
    for vif_ref in vm.get("VIFs") or []:
        vif = records.get("VIF", vif_ref)
        vifs.append({"device": vif.get("device"), "network": records.name("network", vif.get("network")),
                     "MAC": vif.get("MAC"), "MTU": vif.get("MTU")})
    pools = records.all("pool")
    return {"kind": "xen", "vm": settings, "vbds": vbds,
            "vifs": sorted(vifs, key=lambda v: _order(v.get("device"))),
            "disks": {d.name: {"size": d.size, "sr": d.sr.get("name_label", ""), "name_label": d.record.get(
                "name_label", "")} for d in backed},
            "host": host_of(records, vm), "pool": next((str(p.get("name_label", "")) for p in pools.values()), "")}
