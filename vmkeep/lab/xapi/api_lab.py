"""lab.* methods: what a test does to the simulated pool that a real pool's guests or failures
would do (guest writes, transient errors, broken NBD reads) and what it inspects (image files,
attachments, bytes read). Not XAPI: they take the sim's password instead of a session.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any
from xmlrpc.client import Binary

from vmkeep.lab.xapi.api import Fault, api
from vmkeep.lab.xapi.api_vdi import _refresh, vdi_create
from vmkeep.lab.xapi.api_vm import _new_vbd, _new_vif, _start, vm_create
from vmkeep.lab.xapi.model import NULL, XapiError

if TYPE_CHECKING:
    from vmkeep.lab.xapi.api import Sim

LAB_SR = "Local storage"


def _vdi_uuid(sim: Sim, uuid: str) -> str:
    ref = sim.store.by_uuid("VDI", uuid)
    return ref


@api("lab.fault", session=False)
def fault(sim: Sim, secret: str, method: str, code: str, times: Any) -> str:
    """The next ``times`` calls of ``method`` (or HTTP handler export_raw_vdi / import_raw_vdi)
    fail with ``code``; times 0 disarms."""
    sim.lab_secret(secret)
    if int(times) <= 0:
        sim.faults.pop(method, None)
    else:
        sim.faults[method] = Fault(str(code), int(times))
    return ""


@api("lab.nbd_break", session=False)
def nbd_break(sim: Sim, secret: str, vdi_uuid: str, after_bytes: Any) -> str:
    sim.lab_secret(secret)
    _vdi_uuid(sim, vdi_uuid)
    sim.nbd.break_after(vdi_uuid, int(after_bytes))
    return ""


@api("lab.write", session=False)
def write(sim: Sim, secret: str, vdi_uuid: str, offset: Any, data: Any) -> str:
    """A guest write into the live image (qemu-io), so an enabled CBT bitmap records it."""
    sim.lab_secret(secret)
    ref = _vdi_uuid(sim, vdi_uuid)
    raw = data.data if isinstance(data, Binary) else base64.b64decode(data)
    sim.images.write(vdi_uuid, int(offset), raw)
    _refresh(sim, ref)
    return ""


@api("lab.image", session=False)
def image(sim: Sim, secret: str, vdi_uuid: str) -> str:
    sim.lab_secret(secret)
    _vdi_uuid(sim, vdi_uuid)
    return str(sim.images.path(vdi_uuid))


@api("lab.snapshot_name", session=False)
def snapshot_name(sim: Sim, secret: str, vdi_uuid: str) -> str:
    """The internal qcow2 snapshot of a snapshot VDI ("" for a live or metadata VDI)."""
    sim.lab_secret(secret)
    _vdi_uuid(sim, vdi_uuid)
    return sim.images.snapshot_name(vdi_uuid) or ""


@api("lab.attached", session=False)
def attached(sim: Sim, secret: str) -> list[str]:
    sim.lab_secret(secret)
    return sorted(sim.attached_uuids())


@api("lab.reads", session=False)
def reads(sim: Sim, secret: str, vdi_uuid: str) -> str:
    """Bytes sent over NBD for the VDI so far (a string: it may pass 2**31)."""
    sim.lab_secret(secret)
    return str(sim.nbd.bytes_sent(vdi_uuid))


@api("lab.create_vm", session=False)
def create_vm(sim: Sim, secret: str, name: str, disk_bytes: list[Any], power_state: str, networks: list[str],
              vss: bool, cd: bool) -> str:
    """A VM as a tools-installed guest would look: disks xvda… on Local storage, an empty CD
    after them (cd), a VIF per named network, quiesced snapshots with ``vss``."""
    sim.lab_secret(secret)
    st = sim.store
    if power_state not in ("Running", "Halted"):
        raise XapiError("INVALID_VALUE", "power_state", power_state)
    nets = []
    for label in networks:
        found = [r for r, n in st.objects["network"].items() if n["name_label"] == label]
        if not found:
            raise XapiError("INVALID_VALUE", "network", label)
        nets.append(found[0])
    vm = vm_create(sim, {
        "name_label": name, "name_description": "lab VM", "memory_static_max": "268435456",
        "memory_static_min": "134217728", "memory_dynamic_max": "268435456", "memory_dynamic_min": "268435456",
        "VCPUs_max": "1", "VCPUs_at_startup": "1", "domain_type": "hvm", "HVM_boot_policy": "BIOS order",
        "HVM_boot_params": {"order": "cd"}, "platform": {"device-model": "qemu-upstream-compat"},
        "other_config": {"base_template_name": "Debian Bookworm 12"}, "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart", "actions_after_crash": "restart"})
    rec = st.get("VM", vm)
    if vss:
        rec["allowed_operations"].append("snapshot_with_quiesce")
    sr = sim.refs[LAB_SR]
    for i, size in enumerate(disk_bytes):
        vdi = vdi_create(sim, {"name_label": f"{name} {i}", "name_description": "Created by the lab", "SR": sr,
                               "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
                               "other_config": {}})
        _new_vbd(sim, vm, vdi, {"userdevice": str(i), "bootable": i == 0, "mode": "RW", "type": "Disk",
                                "empty": False, "other_config": {}})
    if cd:
        _new_vbd(sim, vm, NULL, {"userdevice": str(max(3, len(disk_bytes))), "bootable": False, "mode": "RO",
                                 "type": "CD", "empty": True, "other_config": {}})
    for i, net in enumerate(nets):
        _new_vif(sim, vm, {"device": str(i), "network": net, "MAC": "", "MTU": "1500", "other_config": {}})
    if power_state == "Running":
        _start(sim, vm, sim.refs["xen1"])
    return str(rec["uuid"])
