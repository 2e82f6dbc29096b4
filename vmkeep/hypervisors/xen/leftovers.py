"""What interrupted backups of a XenServer VM left, found and removed before the next snapshot.

vmkeep marks each snapshot VDI (``other_config`` ``vmkeep-base`` = the VM's uuid) the moment the
snapshot exists, so whatever step a crash interrupts leaves VDIs the next run recognises: snapshot
VMs named ``vmkeep-…`` with their VDIs, marked snapshot VDIs whose snapshot VM is gone, and CBT
metadata VDIs past the newest few per disk. Never an administrator's own snapshot, nor a
snapshot whose disks a backup running now reads; a leftover that cannot go is a note, not a failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.xen.inventory import NULL, Records
from vmkeep.hypervisors.xen.session import XapiError, XapiSession

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "vmkeep-"
BASE_KEY = "vmkeep-base"  # other_config of vmkeep's snapshot VDIs, from the snapshot on (later bases): the VM's uuid
OTHER_BASES_KEPT = 3  # per source disk, besides the previous point's: other repositories' chains build on them
METADATA = 'field "type"="cbt_metadata"'  # XAPI's query language (VDI.get_all_records_where)


@dataclass
class SnapshotVdis:
    """The VDIs of vmkeep's snapshots of one VM: marking them, finding them, removing them."""

    session: XapiSession
    records: Records
    vm: str  # its name, for messages
    vm_uuid: str

    @property
    def context(self) -> dict[str, str]:
        return {"vm": self.vm}

    def mark(self, vdi_ref: str) -> None:
        try:
            self.session.call("VDI.add_to_other_config", vdi_ref, BASE_KEY, self.vm_uuid)
        except XapiError as exc:
            if exc.code != "MAP_DUPLICATE_KEY":  # XAPI copied the key from the source VDI: set it to this VM
                raise
            self.session.call("VDI.remove_from_other_config", vdi_ref, BASE_KEY)
            self.session.call("VDI.add_to_other_config", vdi_ref, BASE_KEY, self.vm_uuid)

    def destroy(self, vdi_ref: str, strict: bool = False) -> None:
        """``strict``: a failure raises (the caller notes it); else it is logged. Gone already is fine."""
        try:
            self.session.call("VDI.destroy", vdi_ref)
        except XapiError as exc:
            if exc.code != "HANDLE_INVALID":
                if strict:
                    raise
                log.warning("removing VDI %s of %s failed (%s); the next backup removes it", vdi_ref, self.vm,
                            exc, extra=self.context)
        except HypervisorError as exc:
            if strict:
                raise
            log.warning("removing VDI %s of %s failed (%s)", vdi_ref, self.vm, exc, extra=self.context)

    def held(self, vdi: dict[str, Any]) -> bool:
        """Whether a snapshot VM still holds the VDI (a VBD of it): then that VM's clean-up is its."""
        for vbd_ref in vdi.get("VBDs") or []:
            try:
                vm_ref = str(self.records.get("VBD", vbd_ref).get("VM") or NULL)
                if vm_ref != NULL and self.records.get("VM", vm_ref).get("is_a_snapshot"):
                    return True
            except XapiError as exc:
                if exc.code != "HANDLE_INVALID":
                    raise
        return False

    def attached(self, vdi_ref: str, vdi: dict[str, Any] | None = None) -> bool:
        """Whether the VDI is in use right now: a plugged VBD (XAPI plugs one in dom0 for every NBD
        connection) or an operation running on it."""
        vdi = vdi if vdi is not None else self.records.get("VDI", vdi_ref)
        if vdi.get("current_operations"):
            return True
        for vbd_ref in vdi.get("VBDs") or []:
            try:
                if self.records.get("VBD", vbd_ref).get("currently_attached"):
                    return True
            except XapiError as exc:
                if exc.code != "HANDLE_INVALID":
                    raise
        return False

    def disk_vdis(self, snap: dict[str, Any]) -> dict[str, str]:
        """userdevice → snapshot VDI of a snapshot VM's disk VBDs (never a CD's image: it is shared),
        and under "suspend" the memory image a snapshot of a suspended VM carries."""
        refs = {}
        for vbd_ref in snap.get("VBDs") or []:
            vbd = self.records.get("VBD", vbd_ref)
            vdi_ref = str(vbd.get("VDI") or NULL)
            if vbd.get("type") == "Disk" and vdi_ref != NULL and self.records.get("VDI", vdi_ref).get("is_a_snapshot"):
                refs[str(vbd.get("userdevice"))] = vdi_ref
        suspend = str(snap.get("suspend_VDI") or NULL)
        if suspend != NULL:
            refs["suspend"] = suspend
        return refs


@dataclass
class Leftovers(SnapshotVdis):
    """What interrupted backups of this VM left; ``keep``: the previous point's bases."""

    keep: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def remove(self, record: dict[str, Any]) -> None:
        """What interrupted backups of this VM left: snapshot VMs named ``vmkeep-…`` with their
        VDIs (not while their disks are attached: a backup running now reads them), marked snapshot
        VDIs whose snapshot VM is gone, and this VM's CBT metadata VDIs past the newest few per disk
        besides the previous point's (other repositories' chains build on those). Other snapshots
        of the VM are the administrator's and stay. A leftover that cannot go is noted; the backup
        goes on and the next one tries again."""
        keep = self.keep
        for snap_ref in record.get("snapshots") or []:
            self._leftover(f"snapshot {snap_ref}", self._remove_snapshot_vm, snap_ref, keep)
        self._leftover("CBT metadata VDIs", self._remove_old_bases, keep)
        for vbd_ref in record.get("VBDs") or []:
            self._leftover(f"snapshot VDIs of VBD {vbd_ref}", self._remove_orphans, vbd_ref)

    def _leftover(self, what: str, step: Any, *args: Any) -> bool:
        """``step(*args)``; whether it worked (a failure is logged and noted, not raised)."""
        try:
            step(*args)
        except HypervisorError as exc:  # it does not stop this backup; the next one tries again
            log.warning("removing what an interrupted backup of %s left (%s) failed: %s", self.vm, what, exc,
                        extra=self.context)
            self.notes.append(f"what an interrupted backup left ({what}) could not be removed ({exc}); the next "
                              "backup tries again")
            return False
        return True

    def _remove_snapshot_vm(self, snap_ref: str, keep: set[str]) -> None:
        try:
            snap = self.records.get("VM", snap_ref)
        except XapiError as exc:
            if exc.code != "HANDLE_INVALID":
                raise
            log.debug("snapshot %s of %s: gone (%s)", snap_ref, self.vm, exc, extra=self.context)
            return
        name = str(snap.get("name_label", ""))
        if not name.startswith(SNAPSHOT_PREFIX) or not snap.get("is_a_snapshot"):
            return
        vdis = self.disk_vdis(snap)
        if any(self.attached(v) for v in vdis.values()):
            log.info("snapshot %s of %s has attached disks: a backup running now reads it; left as it is", name,
                     self.vm, extra=self.context)
            self.notes.append(f"snapshot {name} left as it is: its disks are attached (a backup of {self.vm} "
                              "running now reads them)")
            return
        log.info("removing the snapshot %s an interrupted backup of %s left", name, self.vm, extra=self.context)
        for vdi_ref in vdis.values():  # marked first: if their removal fails, the next run finds them
            if (self.records.get("VDI", vdi_ref).get("other_config") or {}).get(BASE_KEY) != self.vm_uuid:
                self.mark(vdi_ref)
        try:
            self.session.call("VM.destroy", snap_ref)
        except HypervisorError as exc:
            log.warning("removing the leftover snapshot %s failed: %s", name, exc, extra=self.context)
            self.notes.append(f"snapshot {name} that an interrupted backup left could not be removed ({exc})")
            return
        for vdi_ref in vdis.values():
            self._leftover(f"VDI {vdi_ref} of snapshot {name}", self._remove_snapshot_vdi, vdi_ref, keep)
        self.notes.append(f"removed snapshot {name} that an interrupted backup left")

    def _remove_snapshot_vdi(self, vdi_ref: str, keep: set[str]) -> None:
        if str(self.records.get("VDI", vdi_ref).get("uuid")) not in keep:  # else the point's base (marked)
            self.destroy(vdi_ref, strict=True)

    def _remove_old_bases(self, keep: set[str]) -> None:
        """This VM's CBT metadata VDIs besides ``keep``: the newest OTHER_BASES_KEPT of each source
        disk stay (another repository's chain may build on one; one that goes makes that chain's
        next backup full, with the reason), older ones go."""
        by_disk: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for vdi_ref, vdi in self.session.call("VDI.get_all_records_where", METADATA).items():
            if (vdi.get("other_config") or {}).get(BASE_KEY) == self.vm_uuid and str(vdi.get("uuid")) not in keep:
                by_disk.setdefault(str(vdi.get("snapshot_of")), []).append((vdi_ref, vdi))
        for bases in by_disk.values():
            bases.sort(key=lambda b: str(b[1].get("snapshot_time")), reverse=True)  # XML-RPC times sort as text
            for vdi_ref, vdi in bases[OTHER_BASES_KEPT:]:
                log.info("removing CBT metadata VDI %s of %s: %d newer bases of its disk are kept", vdi.get("uuid"),
                         self.vm, OTHER_BASES_KEPT, extra=self.context)
                self._leftover(f"CBT metadata VDI {vdi.get('uuid')}", self.destroy, vdi_ref, True)

    def _remove_orphans(self, vbd_ref: str) -> None:
        """Snapshot VDIs of the VM's disk behind ``vbd_ref`` that vmkeep marked, still holding data,
        whose snapshot VM is gone: a run died between destroying the snapshot VM and its VDIs."""
        vbd = self.records.get("VBD", vbd_ref)
        vdi_ref = str(vbd.get("VDI") or NULL)
        if vbd.get("type") != "Disk" or vdi_ref == NULL:
            return
        query = f'field "snapshot_of"="{vdi_ref}"'
        for snap_ref, vdi in self.session.call("VDI.get_all_records_where", query).items():
            if ((vdi.get("other_config") or {}).get(BASE_KEY) != self.vm_uuid or vdi.get("type") == "cbt_metadata"
                    or self.held(vdi) or self.attached(snap_ref, vdi)):
                continue
            log.info("removing snapshot VDI %s of %s that an interrupted backup left", vdi.get("uuid"), self.vm,
                     extra=self.context)
            if self._leftover(f"snapshot VDI {vdi.get('uuid')}", self.destroy, snap_ref, True):
                self.notes.append(f"removed snapshot VDI {vdi.get('uuid')} that an interrupted backup left")
