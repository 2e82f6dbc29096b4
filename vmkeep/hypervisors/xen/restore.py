"""A VM rebuilt on a XenServer / XCP-ng pool from a restore point, its disks streamed into VDIs.

As a new VM: ``VM.create`` from the saved record (the new name; XAPI gives the UUID), an empty
VDI per disk on the chosen SR, each filled through ``PUT /import_raw_vdi`` in XAPI's chunked
format (only the data travels: a new VDI reads as zeros), VBDs as the point had them (CD drives
empty) and VIFs with new MACs. Everything it makes carries ``other_config`` ``vmkeep-restored``,
so a retry or :func:`remove_restored` touches only what a restore made; leaving without
``finish`` removes it again. The saved record goes to ``VM.create`` without the keys that make
the original's identity (``mac_seed``: XAPI derives each new VIF's MAC from it).

Over the original (halted) VM: :mod:`vmkeep.hypervisors.xen.overwrite`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmkeep.hypervisors.base import DISCONNECTED, HypervisorError
from vmkeep.hypervisors.xen.inventory import NULL, Records, vms_named
from vmkeep.hypervisors.xen.overwrite import Original, original_vm
from vmkeep.hypervisors.xen.session import XapiError
from vmkeep.hypervisors.xen.upload import ChunkedImport, import_vdi

if TYPE_CHECKING:
    from vmkeep.hypervisors.xen.connector import XenConnector
    from vmkeep.hypervisors.xen.session import XapiSession

log = logging.getLogger(__name__)

MARK = "vmkeep-restored"  # other_config key of a VM (value: where it came from) and its VDIs (value: the VM's name)
KIND = "xen"
KIND_HOSTS = {"libvirt": "a libvirt (KVM) host: --host qemu:///system or qemu+tls://HOST/system",
              "vsphere": "vSphere: --host vsphere://USER@VCENTER"}
# what VM.create gets where the point has nothing: XAPI's datamodel gives these fields no default
# (a record without one is refused), points made before they were saved lack them; NVRAM etc.
# as XAPI defaults them, has_vendor_device off (no device the guest has not seen)
VM_DEFAULTS: dict[str, Any] = {"user_version": "1", "is_a_template": False, "affinity": NULL, "VCPUs_params": {},
                               "PV_bootloader": "", "PV_kernel": "", "PV_ramdisk": "", "PV_args": "",
                               "PV_bootloader_args": "", "PV_legacy_args": "", "HVM_boot_params": {},
                               "HVM_shadow_multiplier": 1.0, "platform": {}, "PCI_bus": "", "recommendations": "",
                               "NVRAM": {}, "has_vendor_device": False, "hardware_platform_version": "0",
                               "name_description": "", "other_config": {}, "tags": [], "blocked_operations": {},
                               "xenstore_data": {}}
# other_config keys of the original that a new VM must not get: mac_seed (XAPI derives each VIF's
# MAC from it and the device: the copy would get the original's MACs), and what XAPI's own
# VM.clone / import drop (default_template, xensource_internal; grant_api_access)
IDENTITY_KEYS = frozenset({"mac_seed", "default_template", "xensource_internal", "grant_api_access"})


def _where(kind: str) -> str:
    return KIND_HOSTS.get(kind, f"a {kind} hypervisor")


def restore_vm(connector: XenConnector, config: dict[str, Any], *, name: str, disks: dict[str, int], as_new: bool,
               storage: str | None = None, place: dict[str, str] | None = None,
               retry: bool = False) -> AbstractContextManager[Restoring | Original]:
    """As a new VM (new name, UUID and MACs; ``storage``: an SR by name or UUID; ``place``:
    ``network`` and ``host`` by name) or over the original, which must be halted. Everything is
    checked before anything is made or written."""
    kind = str(config.get("kind") or "libvirt")  # libvirt's points name no kind
    if kind != KIND:
        raise HypervisorError(f"this point is of a {kind} VM: restore it onto {_where(kind)}, or its disks with "
                              "--disk DISK --output FILE")
    if as_new:
        return new_vm(connector, config, name=name, disks=disks, storage=storage, place=place or {}, retry=retry)
    return original_vm(connector, name, disks)


# -- the pool's objects by name --------------------------------------------------------------------
def _find(records: dict[str, dict[str, Any]], wanted: str) -> str | None:
    """The ref of the object whose name_label or uuid is ``wanted``."""
    for ref, record in records.items():
        if wanted in (record.get("name_label"), record.get("uuid")):
            return ref
    return None


def _names(records: dict[str, dict[str, Any]]) -> str:
    return ", ".join(sorted(str(r.get("name_label")) for r in records.values())) or "none"


def _user_srs(records: Records) -> dict[str, dict[str, Any]]:
    return {ref: sr for ref, sr in records.all("SR").items() if sr.get("content_type") != "iso"}


def _networks(records: Records) -> dict[str, dict[str, Any]]:
    """The networks a VIF may go on (not XAPI's host-internal management network)."""
    return {ref: n for ref, n in records.all("network").items()
            if (n.get("other_config") or {}).get("is_host_internal_management_network") != "true"}


def choices(connector: XenConnector) -> dict[str, list[str]]:
    """The RestoreChoices capability: the pool's networks and hosts, as ``place`` names them."""
    records = Records(connector.session)
    return {"networks": sorted(str(n.get("name_label")) for n in _networks(records).values()),
            "hosts": sorted(str(h.get("name_label")) for h in records.all("host").values())}


# -- as a new VM -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Where each part of the new VM goes, all resolved before anything is made."""

    srs: dict[str, tuple[str, str]]  # disk -> (SR ref, SR name)
    vifs: list[dict[str, Any]]  # the point's VIFs with "network_ref" set
    host: str | None  # ref of the host to start on


def _plan(session: XapiSession, config: dict[str, Any], disks: dict[str, int], storage: str | None,
          place: dict[str, str]) -> Plan:
    saved = config.get("disks") or {}
    for disk, size in disks.items():
        if disk not in saved:
            raise HypervisorError(f"the point's configuration has no disk {disk}: restore it with --disk {disk} "
                                  "--output FILE")
        if size > int(saved[disk].get("size") or 0):
            raise HypervisorError(f"disk {disk} of the point is {size} bytes, its configuration says "
                                  f"{saved[disk].get('size')}: restore it with --disk {disk} --output FILE")
    records = Records(session)
    srs = _user_srs(records)
    chosen: dict[str, tuple[str, str]] = {}
    if storage:
        ref = _find(srs, storage)
        if ref is None:
            raise HypervisorError(f"no storage repository {storage!r} in the pool (there are: {_names(srs)}): "
                                  "give --storage an SR's name or UUID")
        chosen = {d: (ref, str(srs[ref]["name_label"])) for d in disks}
    else:
        default = next((str(p.get("default_SR") or NULL) for p in records.all("pool").values()), NULL)
        for disk in disks:
            ref = _find(srs, str(saved[disk].get("sr") or "")) or (default if default in srs else None)
            if ref is None:
                raise HypervisorError(f"disk {disk} was on SR {saved[disk].get('sr')!r}, which the pool does not have, "
                                      f"and the pool has no default SR: give --storage (SRs: {_names(srs)})")
            chosen[disk] = (ref, str(srs[ref]["name_label"]))
    networks = _networks(records)
    asked = place.get("network")
    vifs: list[dict[str, Any]] = []
    if asked != DISCONNECTED:
        for vif in config.get("vifs") or []:
            wanted = asked or str(vif.get("network") or "")
            ref = _find(networks, wanted)
            if ref is None:
                raise HypervisorError(f"no network {wanted!r} in the pool (there are: {_names(networks)}): give "
                                      f"--network NETWORK, or --network {DISCONNECTED} for no network cards")
            vifs.append({**vif, "network_ref": ref})
    host = None
    if place.get("host"):
        hosts = records.all("host")
        host = _find(hosts, place["host"])
        if host is None:
            raise HypervisorError(f"no host {place['host']!r} in the pool (there are: {_names(hosts)})")
        _check_reach(session, chosen, srs, host, place["host"])
    unknown = set(place) - {"network", "host"}
    if unknown:
        raise HypervisorError(f"a XenServer/XCP-ng pool has no {', '.join(sorted(unknown))} to place a VM in: leave "
                              "it out")
    return Plan(chosen, vifs, host)


def _check_reach(session: XapiSession, chosen: dict[str, tuple[str, str]], srs: dict[str, dict[str, Any]],
                 host: str, host_name: str) -> None:
    """A disk on a host's local SR keeps the VM on that host: refuse another host before the upload
    (XAPI would refuse VM.start_on with VM_REQUIRES_SR only after it)."""
    for disk, (ref, sr_name) in chosen.items():
        sr = srs[ref]
        if sr.get("shared") or not sr.get("PBDs"):
            continue
        hosts = {str(session.call("PBD.get_host", pbd)) for pbd in sr["PBDs"]}
        if host not in hosts:
            raise HypervisorError(f"disk {disk} would go to SR {sr_name!r}, local to another host than {host_name}: "
                                  "give --storage a shared SR, or restore onto that SR's host")


def _vm_record(config: dict[str, Any], name: str, origin: str, host: str | None) -> dict[str, Any]:
    """The record for VM.create: the saved one, XAPI's required fields filled in for older points,
    the original's identity left out (XAPI gives the new VM its own mac_seed)."""
    saved = dict(config.get("vm") or {})
    other = {k: v for k, v in (saved.get("other_config") or {}).items()
             if not str(k).startswith("vmkeep") and k not in IDENTITY_KEYS}
    record = {**VM_DEFAULTS, **{k: v for k, v in saved.items() if v is not None}}
    if "HVM_boot_policy" not in record:  # a point without it: what XAPI's templates set per domain type
        record["HVM_boot_policy"] = "BIOS order" if record.get("domain_type") == "hvm" else ""
    record.update(name_label=name, other_config={**other, MARK: origin}, affinity=host or NULL)
    return record


@dataclass
class Made:
    """What a new-VM restore made so far (refs), so it can be removed again."""

    vm: str = ""
    vdis: dict[str, str] = field(default_factory=dict)  # disk -> VDI ref


class Restoring:
    """A new VM whose disks are being written; ``finish`` starts it (or leaves it halted)."""

    def __init__(self, connector: XenConnector, name: str, made: Made, sizes: dict[str, int],
                 srs: dict[str, tuple[str, str]], host: str | None) -> None:
        self.connector = connector
        self.session = connector.session
        self.name = name
        self.made = made
        self.sizes = sizes
        self.srs = srs
        self.host = host
        self.finished = False
        self.written: list[str] = []

    @contextmanager
    def disk(self, name: str, size: int) -> Iterator[ChunkedImport]:
        ref = self.made.vdis.get(name)
        if ref is None:
            raise HypervisorError(f"the new VM {self.name} has no disk {name} to restore into (it has "
                                  f"{', '.join(sorted(self.made.vdis)) or 'none'})")
        if size > self.sizes[name]:
            raise HypervisorError(f"disk {name} of the point is {size} bytes, larger than the {self.sizes[name]} bytes "
                                  f"VDI made for {self.name}")
        uuid = str(self.session.call("VDI.get_uuid", ref))
        with import_vdi(self.session, uuid, self.sizes[name], zeros=False, label=f"disk {name} of {self.name}") as w:
            yield w
        self.written.append(name)

    def finish(self, *, start: bool) -> dict[str, str]:
        """Hands the VM over (from here on it stays, started or not); where each disk lives."""
        self.finished = True
        placed = {}
        for disk, ref in self.made.vdis.items():
            placed[disk] = f"{self.srs[disk][1]}/{self.session.call('VDI.get_uuid', ref)}"
        if start:
            try:
                if self.host:
                    self.session.call("VM.start_on", self.made.vm, self.host, False, False)
                else:
                    self.session.call("VM.start", self.made.vm, False, False)
            except XapiError as exc:
                raise HypervisorError(f"the restored VM {self.name} is there with its disks but does not start: "
                                      f"{' '.join(exc.details)}; look into it in XenCenter / Xen Orchestra, start "
                                      "it, or remove it") from exc
            log.info("started the restored VM %s", self.name)
        return placed


def _create(session: XapiSession, config: dict[str, Any], name: str, disks: dict[str, int], plan: Plan,
            made: Made) -> None:
    """The VM, its VDIs, VBDs and VIFs (``made`` records each as it comes)."""
    source = (config.get("vm") or {}).get("name_label", "?")
    origin = f"{source} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
    made.vm = str(session.call("VM.create", _vm_record(config, name, origin, plan.host)))
    log.info("created VM %s (%s) for the restore", name, made.vm)
    saved = config.get("disks") or {}
    for disk, size in disks.items():
        made.vdis[disk] = str(session.call("VDI.create", {
            "name_label": str(saved[disk].get("name_label") or f"{name} {disk}"),
            "name_description": f"restored by vmkeep for {name}", "SR": plan.srs[disk][0],
            "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
            "other_config": {MARK: name}, "sm_config": {}, "xenstore_data": {}, "tags": []}))
    for vbd in config.get("vbds") or []:
        disk = vbd.get("disk")
        cd = vbd.get("type") == "CD" or disk is None
        if not cd and disk not in made.vdis:
            continue  # a disk the point does not hold (skipped by the backup)
        session.call("VBD.create", {
            "VM": made.vm, "VDI": NULL if cd else made.vdis[disk], "userdevice": str(vbd.get("userdevice")),
            "bootable": bool(vbd.get("bootable")), "mode": "RO" if cd else str(vbd.get("mode") or "RW"),
            "type": "CD" if cd else "Disk", "empty": cd, "unpluggable": True, "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {}})
    for vif in plan.vifs:
        session.call("VIF.create", {
            "device": str(vif.get("device")), "network": vif["network_ref"], "VM": made.vm, "MAC": "",
            "MTU": str(vif.get("MTU") or "1500"), "other_config": {}, "qos_algorithm_type": "",
            "qos_algorithm_params": {}, "locking_mode": "network_default"})


@contextmanager
def new_vm(connector: XenConnector, config: dict[str, Any], *, name: str, disks: dict[str, int],
           storage: str | None, place: dict[str, str], retry: bool) -> Iterator[Restoring]:
    """A new VM made from the point's record; unless finished, removed again (VM, VBDs, VIFs,
    VDIs) on every way out, errors and Ctrl-C alike."""
    session = connector.session
    if retry:
        remove_restored(connector, name)
    taken = vms_named(session, name)
    if taken:
        raise HypervisorError(f"a VM named {name!r} already exists in the pool ({taken[0][1].get('uuid')}); choose "
                              "another --as name")
    plan = _plan(session, config, disks, storage, place)
    made = Made()
    restoring: Restoring | None = None
    try:
        _create(session, config, name, disks, plan, made)
        restoring = Restoring(connector, name, made, dict(disks), plan.srs, plan.host)
        yield restoring
    finally:
        if restoring is None or not restoring.finished:
            _undo(session, name, made)


def _undo(session: XapiSession, name: str, made: Made) -> None:
    """Remove what a restore that did not finish made. Never raises: what made the restore fail
    is the error to report."""
    steps: list[tuple[str, str, str]] = [("VM", made.vm, name)] if made.vm else []
    steps += [("VDI", ref, f"disk {disk}") for disk, ref in made.vdis.items()]
    for cls, ref, what in steps:
        try:
            log.info("removing %s (%s) of the unfinished restore of %s", what, ref, name)
            if cls == "VM":
                _destroy_vm(session, ref, name)
            else:
                session.call("VDI.destroy", ref)
        except Exception as exc:  # noqa: BLE001 - logged with what to do; the restore's own error goes on
            log.warning("could not remove %s of the half-made VM %s (%s): retry the restore, which removes what it "
                        "made first, or remove what carries other_config %s", what, name, exc, MARK)


def _destroy_vm(session: XapiSession, ref: str, name: str) -> None:
    try:
        state = str(session.call("VM.get_power_state", ref))
    except XapiError as exc:
        if exc.code == "HANDLE_INVALID":
            log.info("VM %s is gone already", name)
            return
        raise
    if state != "Halted":
        session.call("VM.hard_shutdown", ref)
    log.info("VM.destroy of %s (%s)", name, ref)
    session.call("VM.destroy", ref)


def remove_restored(connector: XenConnector, name: str) -> bool:
    """Remove VM ``name`` if a restore made it (``other_config`` carries MARK), with its VBDs,
    VIFs and the VDIs the restore made for it, and VDIs an attempt left without a VM; whether a
    VM was there. Refuses to touch any other VM."""
    session = connector.session
    found = vms_named(session, name)
    for _ref, record in found:
        if MARK not in (record.get("other_config") or {}):
            raise HypervisorError(f"a VM named {name!r} exists in the pool that no restore made; restore under "
                                  "another name")
    for ref, record in found:
        vdis = []
        for vbd in record.get("VBDs") or []:
            vdi = str(session.call("VBD.get_VDI", vbd))
            if vdi != NULL and (session.call("VDI.get_other_config", vdi) or {}).get(MARK) == name:
                vdis.append(vdi)
        _destroy_vm(session, ref, name)
        for vdi in vdis:
            session.call("VDI.destroy", vdi)
        log.info("removed VM %s (%s) and %d of its disks, made by an earlier restore", name, record.get("uuid"),
                 len(vdis))
    for ref, left in Records(session).all("VDI").items():  # an attempt that died between VDI.create and VBD.create
        if (left.get("other_config") or {}).get(MARK) == name and not left.get("VBDs"):
            log.info("removing VDI %s, left by an earlier restore of %s", left.get("uuid"), name)
            session.call("VDI.destroy", ref)
    return bool(found)
