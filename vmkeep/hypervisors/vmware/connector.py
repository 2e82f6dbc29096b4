"""The vSphere connector: VMs of a vCenter or ESXi host as points in time the data mover reads.

A point in time is a vSphere snapshot (quiesced through VMware Tools when asked and possible).
Its disks are read through VMware's VDDK (nbdkit's vddk plugin) when the proxy has it, or else
over HTTPS from the datastore (``/folder`` URL, byte ranges, nbdkit's curl plugin). Changed
block tracking gives, per disk, the areas changed since the ``changeId`` the previous point
recorded; the snapshot is removed (and its delta consolidated) on every path out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, Literal

from pyVmomi import vim

from vmkeep.hypervisors.base import (
    Consistency,
    DiskExport,
    HypervisorError,
    NbdTls,
    PointInTimeInfo,
    Quiesce,
    VMDisk,
    VMInfo,
    VMRestore,
    Wire,
)
from vmkeep.hypervisors.vmware import cbt, devices, restore
from vmkeep.hypervisors.vmware.datastore import folder_url
from vmkeep.hypervisors.vmware.session import Session, Target
from vmkeep.transport.nbdkit import Vddk, serve_url, serve_vddk

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "vmkeep-"
VDDK_TRANSPORTS = ("san", "hotadd", "nbdssl", "nbd")
POWER_STATES = {"poweredOn": "running", "poweredOff": "shut off", "suspended": "paused"}


class VsphereConnector:
    kind = "vsphere"
    is_local = False  # the proxy reads over the network (or through VDDK's own transports)

    def __init__(self, uri: str, *, password: str | None = None, insecure: bool = False,
                 credentials: tuple[str, str] | None = None, nbd_tls: NbdTls = "auto") -> None:
        """``nbd_tls``: ``require`` refuses to read disks in the clear (plain HTTP, VDDK's nbd);
        ``auto`` and ``off`` read them the way the address and the transports allow."""
        self.uri = uri
        self.nbd_tls = nbd_tls
        self.target = Target.parse(uri)
        self.host = self.target.host
        self.session = Session(self.target, credentials[1] if credentials else password, insecure)

    def close(self) -> None:
        self.session.close()

    # -- inventory -------------------------------------------------------------------------------
    def _vms(self, paths: list[str]) -> list[tuple[Any, dict[str, Any]]]:
        return [(vm, p) for vm, p in self.session.collect(vim.VirtualMachine, ["name", "config.template", *paths])
                if not p.get("config.template")]

    def vm(self, name: str) -> Any:
        for vm, p in self._vms([]):
            if p.get("name") == name:
                return vm
        raise HypervisorError(f"no VM named {name!r} on {self.host}; see `vmkeep inventory --host {self.uri}`")

    def exists(self, name: str) -> bool:
        return any(p.get("name") == name for _vm, p in self._vms([]))

    def inventory(self) -> list[VMInfo]:
        hosts = {h: p.get("name", "") for h, p in self.session.collect(vim.HostSystem, ["name"])}
        folders = self.folder_paths()
        found = []
        for vm, p in self._vms(["config.instanceUuid", "config.uuid", "runtime.powerState", "runtime.host",
                                "config.hardware.device", "parent"]):
            disks = [VMDisk(d.name, d.file, "vmdk", d.capacity, 0, d.backup, d.skip_reason, d.datastore)
                     for d in devices.disks(p.get("config.hardware.device") or [])]
            found.append(VMInfo(p["name"], p.get("config.instanceUuid") or p.get("config.uuid") or vm._moId,
                                POWER_STATES.get(str(p.get("runtime.powerState")), "unknown"),
                                hosts.get(p.get("runtime.host"), self.host), disks,
                                folder=folders.get(p.get("parent"))))
        return found

    def topology(self) -> dict[str, Any]:
        """Datacenters, clusters with their hosts, standalone hosts, and datastores with space."""
        names = {o: p.get("name") for o, p in self.session.collect(vim.ManagedEntity, ["name"])}
        clusters = [{"name": p.get("name"), "hosts": sorted(str(names.get(h, "")) for h in p.get("host") or [])}
                    for _c, p in self.session.collect(vim.ClusterComputeResource, ["name", "host"])]
        hosts = [{"name": p.get("name"), "state": str(p.get("runtime.connectionState")),
                  "cluster": names.get(p.get("parent")) if isinstance(p.get("parent"),
                                                                      vim.ClusterComputeResource) else None}
                 for _h, p in self.session.collect(vim.HostSystem, ["name", "runtime.connectionState", "parent"])]
        stores = [{"name": p.get("name"), "type": p.get("summary.type"), "capacity": p.get("summary.capacity"),
                   "free": p.get("summary.freeSpace")}
                  for _d, p in self.session.collect(vim.Datastore, ["name", "summary.type", "summary.capacity",
                                                                     "summary.freeSpace"])]
        datacenters = sorted(str(p.get("name")) for _d, p in self.session.collect(vim.Datacenter, ["name"]))
        return {"datacenters": datacenters, "clusters": clusters, "hosts": hosts, "datastores": stores}

    def restore_choices(self) -> dict[str, list[str]]:
        """The RestoreChoices capability: networks (standard and distributed port groups), hosts
        and VM folders, as a restore's ``place`` names them."""
        networks = sorted(str(p.get("name")) for _n, p in self.session.collect(vim.Network, ["name"]))
        hosts = sorted(str(p.get("name")) for _h, p in self.session.collect(vim.HostSystem, ["name"]))
        return {"networks": networks, "hosts": hosts, "folders": sorted(set(self.folder_paths().values()) - {""})}

    def folder_paths(self) -> dict[Any, str]:
        """Every folder's path under its datacenter's VM folder ("" for that folder itself)."""
        props = {f: p for f, p in self.session.collect(vim.Folder, ["name", "parent"])}
        datacenters = {p.get("vmFolder"): p.get("name") for _d, p in self.session.collect(vim.Datacenter,
                                                                                           ["name", "vmFolder"])}
        paths: dict[Any, str] = {}
        for folder in props:
            parts, node = [], folder
            while node in props and node not in datacenters:
                parts.append(str(props[node].get("name", "")))
                node = props[node].get("parent")
            if node in datacenters:
                paths[folder] = "/".join([str(datacenters[node]), *reversed(parts)])
        return paths

    def datacenter_of(self, obj: Any) -> str:
        node = obj
        for _ in range(64):
            if isinstance(node, vim.Datacenter):
                return str(self.session.one(node, ["name"])["name"])
            node = self.session.one(node, ["parent"]).get("parent")
            if node is None:
                break
        raise HypervisorError(f"cannot find the datacenter of {obj} on {self.host}")

    # -- state checks ----------------------------------------------------------------------------
    def require_shut_off(self, vm: str) -> None:
        state = self.session.one(self.vm(vm), ["runtime.powerState"]).get("runtime.powerState")
        if str(state) != "poweredOff":
            raise HypervisorError(f"VM {vm} is {state}: shut it down first, then restore over it")

    def forget_checkpoints(self, vm: str) -> None:
        """Disks replaced under CBT's feet: turn tracking off and on, so the next backup is full."""
        ref = self.vm(vm)
        if self.session.one(ref, ["config.changeTrackingEnabled"]).get("config.changeTrackingEnabled"):
            log.info("resetting changed block tracking of %s: its disks were replaced", vm, extra={"vm": vm})
            for on in (False, True):
                self.session.wait(ref.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=on)),
                                  f"resetting changed block tracking of {vm}")

    # -- point in time ---------------------------------------------------------------------------
    @contextmanager
    def point_in_time(self, vm: str, *, since: dict[str, Any] | None, previous_disks: dict[str, int] | None,
                      transports: list[str], quiesce: Quiesce) -> Iterator[PointInTimeInfo]:
        ref = self.vm(vm)
        notes: list[str] = []
        props = self.session.one(ref, ["config", "config.hardware.device", "config.changeTrackingEnabled",
                                       "runtime.powerState", "guest.toolsRunningStatus", "snapshot",
                                       "runtime.host", "resourcePool", "parent", "datastore"])
        self._remove_leftover_snapshots(ref, props.get("snapshot"), notes)
        all_disks = devices.disks(props.get("config.hardware.device") or [])
        notes += [d.skip_reason for d in all_disks if not d.backup]
        eligible = [d for d in all_disks if d.backup]
        if not eligible:
            raise HypervisorError(f"VM {vm} has no disk that can be backed up ({'; '.join(notes) or 'no disks'})")
        cbt_was_on = bool(props.get("config.changeTrackingEnabled"))
        if not cbt_was_on:
            log.info("changed block tracking is off: turning it on (this backup is full)", extra={"vm": vm})
            self.session.wait(ref.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)),
                              f"turning on changed block tracking of {vm}")
            notes.append("changed block tracking was off: turned on now; this backup is full, the next ones are "
                         "incremental")
        transport, vddk = self._choose_transport(transports, notes)
        log.debug("transport %s (%s)", transport, "VDDK" if vddk else "the datastore's HTTPS", extra={"vm": vm})
        datacenter = self.datacenter_of(ref)
        with ExitStack() as stack:
            snapshot, consistency = self._snapshot(ref, vm, quiesce, props, notes)
            log.info("snapshot %s taken (%s-consistent)", snapshot._moId, consistency, extra={"vm": vm})
            stack.callback(self._remove_snapshot, snapshot, vm)
            frozen = devices.disks(self.session.one(snapshot, ["config.hardware.device"]).get(
                "config.hardware.device") or [])
            frozen = [d for d in frozen if d.backup and d.name in {e.name for e in eligible}]
            mode, reason = self._incremental_base(frozen, since, cbt_was_on)
            changed: dict[str, list[Any]] = {}
            if mode == "incremental":
                assert since is not None
                try:
                    changed = {d.name: cbt.changed_areas(ref, snapshot, d, since["disks"][d.name]["change_id"])
                               for d in frozen}
                except HypervisorError as exc:
                    mode, reason = "full", f"{exc}"
                    log.info("full backup instead: %s", exc, extra={"vm": vm})
            exports: dict[str, DiskExport] = {}
            for disk in frozen:
                allocated = None
                if mode == "full" and disk.change_id:
                    allocated = cbt.changed_areas(ref, snapshot, disk, "*")  # where data is
                uri = stack.enter_context(self._export(disk, ref, snapshot, datacenter, transport, vddk, vm))
                exports[disk.name] = DiskExport(disk.name, uri, disk.capacity, changed=changed.get(disk.name),
                                                allocated=allocated)
            placement = {"datacenter": datacenter, "datastore": eligible[0].datastore,
                         "folder": self.folder_paths().get(props.get("parent"), ""),
                         "pool": self._name(props.get("resourcePool")), "host": self._name(props.get("runtime.host"))}
            portgroups = {str(p.get("key")): str(p.get("name")) for _g, p in self.session.collect(
                vim.dvs.DistributedVirtualPortgroup, ["key", "name"])}
            config = devices.saved_config(props["config"], props.get("config.hardware.device") or [], placement,
                                          portgroups)
            chain = {"disks": {d.name: {"change_id": d.change_id, "size": d.capacity} for d in frozen}}
            yield PointInTimeInfo(vm, transport, consistency, mode, reason, exports, config, chain, notes,
                                  wire=self._wire(transport))

    def _wire(self, transport: str) -> Wire:
        """How the chosen transport carries the disks: VDDK's san and hotadd stay local, its nbdssl
        and the datastore's HTTPS are TLS, VDDK's nbd and plain HTTP are not."""
        if transport == "https":
            return "plain" if self.target.http else "tls"
        chosen = set(transport.split(":"))
        if "nbd" in chosen:
            return "plain"
        return "tls" if "nbdssl" in chosen else "local"

    def _name(self, obj: Any) -> str | None:
        return str(self.session.one(obj, ["name"]).get("name")) if obj is not None else None

    def _choose_transport(self, transports: list[str], notes: list[str]) -> tuple[str, Vddk | None]:
        """VDDK with the wanted transports when the proxy has it; else the datastore's HTTPS,
        which stands in for the network transports (nbd, nbdssl)."""
        found = Vddk.find()
        if self.nbd_tls == "require" and self.target.http:
            raise HypervisorError(f"{self.uri} is read over plain HTTP, but encrypted reads are required "
                                  "(nbd_tls: require): use the vCenter's HTTPS address, or set nbd_tls to auto")
        wanted = [t for t in transports if t in VDDK_TRANSPORTS]
        if self.nbd_tls == "require" and "nbd" in wanted and isinstance(found, Vddk):
            wanted.remove("nbd")
            notes.append("VDDK's nbd transport skipped: it reads in the clear and encrypted reads are required "
                         "(nbd_tls: require)")
        if wanted and isinstance(found, Vddk):
            return ":".join(wanted), found
        if wanted:
            notes.append(f"transports {':'.join(wanted)} need VMware's VDDK: {found}; reading through the "
                         "datastore's HTTPS instead")
        if not ({"nbd", "nbdssl", "https"} & set(transports)):
            raise HypervisorError(f"none of the transports {':'.join(transports)} works without VDDK here: allow "
                                  "nbd or https (the datastore's HTTPS), or install VDDK on this proxy")
        return "https", None

    def _export(self, disk: devices.Disk, ref: Any, snapshot: Any, datacenter: str, transport: str,
                vddk: Vddk | None, vm: str) -> AbstractContextManager[str]:
        """The NBD export of one snapshot disk: VDDK's plugin, or HTTPS range reads."""
        if vddk is not None:
            return serve_vddk(vddk, password=self.session.password, what=f"nbdkit (VDDK) reading {disk.file} of {vm}",
                              server=self.host, user=self.target.user, thumbprint=self.session.thumbprint(),
                              vm_moref=ref._moId, snapshot_moref=snapshot._moId, file=disk.file,
                              transports=transport.split(":"))
        store, _path = devices.split_datastore_path(disk.file)
        url = folder_url(self.target, datacenter, store, disk.flat_path)
        return serve_url(url, cookie=self.session.cookie, ca_file=self.session.ca_file, verify=self.session.verifies,
                         what=f"nbdkit reading {disk.file} of {vm}")

    def _snapshot(self, ref: Any, vm: str, quiesce: Quiesce, props: dict[str, Any],
                  notes: list[str]) -> tuple[Any, Consistency]:
        name = f"{SNAPSHOT_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        running = str(props.get("runtime.powerState")) == "poweredOn"
        tools = str(props.get("guest.toolsRunningStatus")) == "guestToolsRunning"
        if quiesce != "off" and running:
            if tools:
                try:
                    snap = self.session.wait(ref.CreateSnapshot_Task(name=name, description="vmkeep backup",
                                                                     memory=False, quiesce=True),
                                             f"quiesced snapshot of {vm}")
                    return snap, "application"
                except HypervisorError as exc:
                    if quiesce == "required":
                        raise
                    log.warning("quiescing failed (%s); crash-consistent snapshot instead", exc, extra={"vm": vm})
                    notes.append(f"quiescing failed ({exc}); crash-consistent snapshot instead")
            elif quiesce == "required":
                raise HypervisorError(f"VM {vm}: VMware Tools are not running, so the snapshot cannot be quiesced "
                                      "(--quiesce required); start the Tools in the guest or use --quiesce try")
            else:
                notes.append("VMware Tools are not running: crash-consistent snapshot")
        snap = self.session.wait(ref.CreateSnapshot_Task(name=name, description="vmkeep backup", memory=False,
                                                         quiesce=False), f"snapshot of {vm}")
        return snap, "application" if not running else "crash"

    def _remove_snapshot(self, snapshot: Any, vm: str) -> None:
        self.session.wait(snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True),
                          f"removing vmkeep's snapshot of {vm}")
        log.info("snapshot %s removed", snapshot._moId, extra={"vm": vm})

    def _remove_leftover_snapshots(self, ref: Any, info: Any, notes: list[str]) -> None:
        """Snapshots a crashed earlier run left are removed (and consolidated) before a new one."""
        stack = list(getattr(info, "rootSnapshotList", None) or [])
        while stack:
            node = stack.pop()
            stack.extend(node.childSnapshotList or [])
            if node.name.startswith(SNAPSHOT_PREFIX):
                log.info("removing the snapshot %s an interrupted backup left", node.name)
                self.session.wait(node.snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True),
                                  f"removing the leftover snapshot {node.name}")
                notes.append(f"removed snapshot {node.name} that an interrupted backup left")

    @staticmethod
    def _incremental_base(frozen: list[devices.Disk], since: dict[str, Any] | None,
                          cbt_was_on: bool) -> tuple[Literal["full", "incremental"], str]:
        """("incremental", what from) when every disk's tracking continues the previous point's,
        else ("full", why)."""
        if since is None or "disks" not in since:
            return "full", "no previous restore point of this VM"
        if not cbt_was_on:
            return "full", "changed block tracking was off"
        for d in frozen:
            before = since["disks"].get(d.name)
            if before is None:
                return "full", f"disk {d.name} is new since the previous point"
            if before.get("size") != d.capacity:
                return "full", f"disk {d.name} was resized ({before.get('size')} → {d.capacity} bytes)"
            if not d.change_id or not before.get("change_id"):
                return "full", f"disk {d.name} has no changeId (changed block tracking gives none)"
            if cbt.epoch(d.change_id) != cbt.epoch(before["change_id"]):
                return "full", f"changed block tracking of disk {d.name} was reset since the previous point"
        return "incremental", "changes since the previous point's changeIds (changed block tracking)"

    # -- restore ---------------------------------------------------------------------------------
    def restore_vm(self, config: dict[str, Any], *, name: str, disks: dict[str, int], as_new: bool,
                   storage: str | None = None, place: dict[str, str] | None = None,
                   retry: bool = False) -> AbstractContextManager[VMRestore]:
        """As a new VM: an NFC import, each disk streamed as a streamOptimized VMDK. Over the
        original: each disk streamed over its flat file with a datastore PUT (see restore.py)."""
        if config.get("kind") != "vsphere":
            raise HypervisorError(f"this point is of a {config.get('kind', 'foreign')} VM: restore it onto that kind "
                                  "of hypervisor, or its disks with --disk")
        if as_new:
            return restore.new_vm(self, config, name=name, disks=disks, datastore=storage, place=place or {},
                                  retry=retry)
        return restore.original_vm(self, name, disks)

    def remove_restored(self, name: str) -> bool:
        """Remove VM ``name`` if a restore made it (its annotation carries restore.MARK); whether
        one was there. Refuses to touch any other VM."""
        if not self.exists(name):
            return False
        ref = self.vm(name)
        notes = self.session.one(ref, ["config.annotation"]).get("config.annotation") or ""
        if restore.MARK not in notes:
            raise HypervisorError(f"a VM named {name!r} exists on {self.host} that this restore did not make; "
                                  "restore under another name")
        restore.destroy(self, ref, name)
        return True
