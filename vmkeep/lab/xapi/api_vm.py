"""VM, VBD and VIF methods with XAPI's power-state and device rules.

VM.snapshot makes snapshot VDIs as internal qcow2 snapshots (``Images.snapshot``), so a backup
of the sim reads a real point-in-time image and CBT bitmaps rotate exactly at snapshot time.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import TYPE_CHECKING, Any

from vmkeep.lab.xapi.api import api
from vmkeep.lab.xapi.model import NULL, XapiError, now

if TYPE_CHECKING:
    from vmkeep.lab.xapi.api import Sim

# the fields of XAPI's VM record that have no default in its datamodel (ocaml/idl/datamodel_vm.ml):
# VM.create's record must carry each (the others default, e.g. NVRAM {}, has_vendor_device,
# hardware_platform_version 0, HVM_shadow_multiplier 1.0, domain_type from HVM_boot_policy)
VM_REQUIRED = ("user_version", "is_a_template", "affinity", "memory_static_max", "memory_dynamic_max",
               "memory_dynamic_min", "memory_static_min", "VCPUs_params", "VCPUs_max", "VCPUs_at_startup",
               "actions_after_shutdown", "actions_after_reboot", "actions_after_crash", "PV_bootloader",
               "PV_kernel", "PV_ramdisk", "PV_args", "PV_bootloader_args", "PV_legacy_args", "HVM_boot_policy",
               "HVM_boot_params", "platform", "PCI_bus", "other_config", "recommendations")
MAC_SEED = "mac_seed"  # other_config key: XAPI derives the MAC of each VIF made with MAC "" from it
INT_FIELDS = {"memory_static_max", "memory_static_min", "memory_dynamic_max", "memory_dynamic_min",
              "VCPUs_max", "VCPUs_at_startup", "user_version", "hardware_platform_version", "virtual_size", "MTU"}
VBD_FIELDS = ("VM", "VDI", "userdevice", "bootable", "mode", "type", "empty", "other_config",
              "qos_algorithm_type", "qos_algorithm_params")
VIF_FIELDS = ("device", "network", "VM", "MAC", "MTU", "other_config", "qos_algorithm_type", "qos_algorithm_params")


def wire_fields(record: dict[str, Any]) -> dict[str, Any]:
    """Client records: ints may come as ints or strings; store them as XAPI's strings."""
    return {k: str(v) if k in INT_FIELDS and isinstance(v, int | str) else v for k, v in record.items()}


def _vm(sim: Sim, vm: str) -> dict[str, Any]:
    return sim.store.get("VM", vm)


def _power(sim: Sim, vm: str, want: str) -> dict[str, Any]:
    rec = _vm(sim, vm)
    if rec["power_state"] != want:
        raise XapiError("VM_BAD_POWER_STATE", vm, want.lower(), rec["power_state"].lower())
    return rec


def _ordinary(rec: dict[str, Any]) -> None:
    for flag, reason in (("is_a_template", "VM is a template"), ("is_a_snapshot", "VM is a snapshot"),
                         ("is_control_domain", "VM is a control domain")):
        if rec[flag]:
            raise XapiError("OPERATION_NOT_ALLOWED", reason)


# --- VM ------------------------------------------------------------------------------------
@api("VM.create")
def vm_create_call(sim: Sim, record: dict[str, Any]) -> str:
    """XAPI's VM.create: a record without one of the fields that have no default is refused."""
    for name in VM_REQUIRED:
        if name not in record:
            raise XapiError("FIELD_TYPE_ERROR", name)
    return vm_create(sim, record)


def vm_create(sim: Sim, record: dict[str, Any]) -> str:
    """A new halted VM; the lab's own VMs come here directly (the store's defaults fill in what
    they leave out). As XAPI, other_config gets a new ``mac_seed`` unless it carries one."""
    fields = {k: v for k, v in wire_fields(record).items() if k not in (
        "uuid", "power_state", "is_a_snapshot", "snapshot_of", "snapshots", "VBDs", "VIFs", "resident_on",
        "is_control_domain", "allowed_operations")}
    if record.get("domain_type") in (None, "unspecified"):
        fields["domain_type"] = "hvm" if record.get("HVM_boot_policy", "BIOS order") else "pv"
    other = dict(record.get("other_config") or {})
    other.setdefault(MAC_SEED, str(uuid.uuid4()))
    fields["other_config"] = other
    for name, default in (("NVRAM", {}), ("PCI_bus", "")):  # in every XAPI record; the store's defaults lack them
        fields.setdefault(name, default)
    return sim.store.create("VM", **fields, allowed_operations=["snapshot", "start", "destroy"])


@api("VM.destroy")
def vm_destroy(sim: Sim, vm: str) -> str:
    """The VM with its VBDs and VIFs; its VDIs stay (XAPI's VM.destroy)."""
    rec = _vm(sim, vm)
    if rec["power_state"] != "Halted":
        raise XapiError("VM_BAD_POWER_STATE", vm, "halted", rec["power_state"].lower())
    if rec["is_control_domain"]:
        raise XapiError("OPERATION_NOT_ALLOWED", "VM is a control domain")
    for vbd in list(rec["VBDs"]):
        vbd_destroy(sim, vbd)
    for vif in list(rec["VIFs"]):
        vif_destroy(sim, vif)
    sim.store.unlink("VM", rec["snapshot_of"], "snapshots", vm)
    for snap in rec["snapshots"]:
        if sim.store.exists("VM", snap):
            sim.store.get("VM", snap)["snapshot_of"] = NULL
    sim.store.delete("VM", vm)
    return ""


def _snapshot(sim: Sim, vm: str, new_name: str) -> str:
    st = sim.store
    rec = _vm(sim, vm)
    _ordinary(rec)
    vbds = [st.get("VBD", b) for b in rec["VBDs"]]
    for b in vbds:
        if b["type"] == "Disk" and b["VDI"] != NULL and st.get("VDI", b["VDI"])["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", b["VDI"], "cbt_metadata")
    when = now()
    keep = {k: v for k, v in rec.items() if k not in ("uuid", "VBDs", "VIFs", "snapshots", "resident_on", "domid")}
    keep.update(name_label=new_name, is_a_snapshot=True, snapshot_of=vm, power_state="Halted", snapshot_time=when,
                allowed_operations=["destroy", "revert", "copy"])
    snap = st.create("VM", **keep)
    st.link("VM", vm, "snapshots", snap)
    for b in vbds:
        vdi = b["VDI"]
        if b["type"] == "Disk" and vdi != NULL:
            from vmkeep.lab.xapi.api_vdi import snapshot_vdi

            vdi = snapshot_vdi(sim, vdi, when)
        _new_vbd(sim, snap, vdi, {k: b[k] for k in VBD_FIELDS if k not in ("VM", "VDI")})
    for v in rec["VIFs"]:
        f = st.get("VIF", v)
        _new_vif(sim, snap, {k: f[k] for k in VIF_FIELDS if k != "VM"})
    return snap


@api("VM.snapshot")
def vm_snapshot(sim: Sim, vm: str, new_name: str) -> str:
    return _snapshot(sim, vm, new_name)


@api("VM.snapshot_with_quiesce")
def vm_snapshot_with_quiesce(sim: Sim, vm: str, new_name: str) -> str:
    rec = _vm(sim, vm)
    if "snapshot_with_quiesce" not in rec["allowed_operations"]:
        raise XapiError("VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED", vm)
    _power(sim, vm, "Running")
    return _snapshot(sim, vm, new_name)


def _start(sim: Sim, vm: str, host: str) -> str:
    rec = _vm(sim, vm)
    _ordinary(rec)
    sim.store.get("host", host)
    _power(sim, vm, "Halted")
    for b in rec["VBDs"]:
        vdi = sim.store.get("VBD", b)["VDI"]
        if vdi != NULL and sim.store.get("VDI", vdi)["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
    rec.update(power_state="Running", resident_on=host, domid=str(len(sim.store.objects["VM"])))
    sim.store.link("host", host, "resident_VMs", vm)
    for b in rec["VBDs"]:
        vbd = sim.store.get("VBD", b)
        vbd.update(currently_attached=not vbd["empty"], device=f"xvd{chr(97 + int(vbd['userdevice']))}")
    for v in rec["VIFs"]:
        sim.store.get("VIF", v)["currently_attached"] = True
    rec["allowed_operations"] = [op for op in rec["allowed_operations"] if op != "start"] + ["clean_shutdown"]
    return ""


@api("VM.start")
def vm_start(sim: Sim, vm: str, start_paused: bool, force: bool) -> str:
    return _start(sim, vm, sim.refs["xen1"])


@api("VM.start_on")
def vm_start_on(sim: Sim, vm: str, host: str, start_paused: bool, force: bool) -> str:
    return _start(sim, vm, host)


def _shutdown(sim: Sim, vm: str) -> str:
    rec = _vm(sim, vm)
    _ordinary(rec)
    _power(sim, vm, "Running")
    sim.store.unlink("host", rec["resident_on"], "resident_VMs", vm)
    rec.update(power_state="Halted", resident_on=NULL, domid="-1")
    for b in rec["VBDs"]:
        sim.store.get("VBD", b).update(currently_attached=False, device="")
    for v in rec["VIFs"]:
        sim.store.get("VIF", v)["currently_attached"] = False
    rec["allowed_operations"] = [op for op in rec["allowed_operations"] if op != "clean_shutdown"] + ["start"]
    return ""


@api("VM.clean_shutdown")
def vm_clean_shutdown(sim: Sim, vm: str) -> str:
    return _shutdown(sim, vm)


@api("VM.hard_shutdown")
def vm_hard_shutdown(sim: Sim, vm: str) -> str:
    return _shutdown(sim, vm)


@api("VM.set_affinity")
def vm_set_affinity(sim: Sim, vm: str, host: str) -> str:
    if host != NULL:
        sim.store.get("host", host)
    _vm(sim, vm)["affinity"] = host
    return ""


@api("VM.set_NVRAM")
def vm_set_nvram(sim: Sim, vm: str, value: dict[str, str]) -> str:
    """UEFI variables and the like; XAPI refuses the change while the VM runs."""
    _power(sim, vm, "Halted")["NVRAM"] = {str(k): str(v) for k, v in value.items()}
    return ""


@api("VM.set_has_vendor_device")
def vm_set_has_vendor_device(sim: Sim, vm: str, value: bool) -> str:
    _power(sim, vm, "Halted")["has_vendor_device"] = bool(value)
    return ""


# --- VBD / VIF -------------------------------------------------------------------------------
def _new_vbd(sim: Sim, vm: str, vdi: str, fields: dict[str, Any]) -> str:
    st = sim.store
    rec = _vm(sim, vm)
    if any(st.get("VBD", b)["userdevice"] == str(fields["userdevice"]) for b in rec["VBDs"]):
        raise XapiError("DEVICE_ALREADY_EXISTS", fields["userdevice"])
    vbd = st.create("VBD", **{**fields, "VM": vm, "VDI": vdi})
    st.get("VBD", vbd)["userdevice"] = str(fields["userdevice"])
    st.link("VM", vm, "VBDs", vbd)
    if vdi != NULL:
        st.link("VDI", vdi, "VBDs", vbd)
    return vbd


@api("VBD.create")
def vbd_create(sim: Sim, record: dict[str, Any]) -> str:
    for name in ("VM", "VDI", "userdevice", "mode", "type"):
        if name not in record:
            raise XapiError("FIELD_TYPE_ERROR", name)
    vdi = record["VDI"]
    if vdi != NULL:
        sim.store.get("VDI", vdi)
    elif record["type"] != "CD":
        raise XapiError("VDI_IS_NOT_ISO", NULL, "Disk")  # XAPI: only a CD may be empty
    fields = {k: record[k] for k in VBD_FIELDS if k in record and k not in ("VM", "VDI")}
    fields["empty"] = vdi == NULL or bool(record.get("empty", False))
    return _new_vbd(sim, record["VM"], vdi, fields)


@api("VBD.destroy")
def vbd_destroy(sim: Sim, vbd: str) -> str:
    rec = sim.store.get("VBD", vbd)
    if rec["currently_attached"] and _vm(sim, rec["VM"])["power_state"] == "Running":
        raise XapiError("OPERATION_NOT_ALLOWED", "VBD is currently attached")
    sim.store.delete("VBD", vbd)
    sim.store.unlink("VM", rec["VM"], "VBDs", vbd)
    sim.store.unlink("VDI", rec["VDI"], "VBDs", vbd)
    return ""


def seeded_mac(seed: str, device: int) -> str:
    """The MAC XAPI gives VIF ``device`` of a VM with mac_seed ``seed`` (xapi_vif_helpers.gen_mac:
    MD5 chained 2 * device + 1 times over the seed, locally administered unicast), so the same seed
    and device always give the same MAC."""
    hashed = seed.encode()
    for _ in range(2 * device + 1):
        hashed = hashlib.md5(hashed).digest()  # noqa: S324 - XAPI's derivation, not a security hash
    again = hashlib.md5(hashed).digest()  # noqa: S324
    octets = [(hashed[0] | 0x02) & ~0x01 & 0xFF, hashed[1], hashed[2], hashed[3], again[1], again[2]]
    return ":".join(f"{b:02x}" for b in octets)


def _new_vif(sim: Sim, vm: str, fields: dict[str, Any]) -> str:
    st = sim.store
    rec = _vm(sim, vm)
    st.get("network", fields["network"])
    device = str(fields["device"])
    if not device.isdigit():
        raise XapiError("INVALID_DEVICE", device)
    if any(st.get("VIF", v)["device"] == device for v in rec["VIFs"]):
        raise XapiError("DEVICE_ALREADY_EXISTS", fields["device"])
    mac = fields.get("MAC") or ""
    seed = (rec.get("other_config") or {}).get(MAC_SEED)
    if not mac and seed:
        mac = seeded_mac(str(seed), int(device))
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", mac):
        raise XapiError("MAC_INVALID", mac)  # XAPI: MAC "" on a VM without mac_seed is refused too
    vif = st.create("VIF", **{**wire_fields(fields), "VM": vm, "MAC": mac, "MAC_autogenerated": not fields.get("MAC")})
    st.get("VIF", vif)["device"] = str(fields["device"])
    st.link("VM", vm, "VIFs", vif)
    st.link("network", fields["network"], "VIFs", vif)
    return vif


@api("VIF.create")
def vif_create(sim: Sim, record: dict[str, Any]) -> str:
    for name in ("device", "network", "VM", "MAC"):
        if name not in record:
            raise XapiError("FIELD_TYPE_ERROR", name)
    return _new_vif(sim, record["VM"], {k: record[k] for k in VIF_FIELDS if k in record and k != "VM"})


@api("VIF.destroy")
def vif_destroy(sim: Sim, vif: str) -> str:
    rec = sim.store.delete("VIF", vif)
    sim.store.unlink("VM", rec["VM"], "VIFs", vif)
    sim.store.unlink("network", rec["network"], "VIFs", vif)
    return ""
