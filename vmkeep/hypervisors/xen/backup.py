"""A point in time of a XenServer / XCP-ng VM: a XAPI snapshot read over XAPI's NBD server.

The flow follows XAPI's changed block tracking design (xs-cbt-samples): CBT is turned on where
it is off (that backup is full); what crashed runs left goes first (leftovers.py: vmkeep's snapshot VMs and
their VDIs, marked snapshot VDIs whose snapshot VM is gone, CBT metadata VDIs past the newest few
per disk that other chains may build on), never an administrator's own snapshot nor a snapshot a
backup running now reads; the VM is snapshotted (quiesced when asked and the guest tools can) and
its snapshot VDIs marked as vmkeep's at once, so that a crash at any later step leaves VDIs the
next run finds; for an incremental
``VDI.list_changed_blocks`` runs between the previous point's snapshot and the new one *before*
any NBD connection (XAPI refuses it on an attached VDI); the disks are read over NBD, with TLS
where a network's purpose is ``nbd``. Once read, each new snapshot VDI is ``data_destroy``-ed:
its data goes, its CBT metadata stays as the next incremental's base, and the snapshot VM is
destroyed. On every failure path the snapshot VM and all its VDIs go instead: a failed point is
no base, and nothing stays attached.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from vmkeep.hypervisors.base import (
    Consistency,
    DiskExport,
    HypervisorError,
    NbdTls,
    PointInTimeInfo,
    Quiesce,
    wire_of,
)
from vmkeep.hypervisors.early_release import EarlyRelease
from vmkeep.hypervisors.xen import cbt
from vmkeep.hypervisors.xen.inventory import NULL, Disk, Records, disks, find_vm, saved_config
from vmkeep.hypervisors.xen.leftovers import SNAPSHOT_PREFIX, Leftovers, SnapshotVdis
from vmkeep.hypervisors.xen.session import XapiError, XapiSession, url_host
from vmkeep.transport.extents import Extent

log = logging.getLogger(__name__)

NBD_PURPOSES = ("nbd", "insecure_nbd")
Mode = Literal["full", "incremental"]


def network_list(networks: dict[str, dict[str, Any]]) -> str:
    """The pool's networks as an administrator picks one: name, uuid and purpose."""
    return ", ".join(f"{n.get('name_label', '')!r} (uuid {n.get('uuid', '')}"
                     f"{', purpose ' + '+'.join(n['purpose']) if n.get('purpose') else ''})"
                     for n in sorted(networks.values(), key=lambda n: str(n.get("name_label", "")))) or "none"


def nbd_remedy(networks: dict[str, dict[str, Any]]) -> str:
    return ("give the network the hosts reach this proxy on the purpose nbd (NBD with TLS): xe network-param-add "
            "param-name=purpose param-key=nbd uuid=<its uuid> (XAPI: network.add_purpose); the pool's networks: "
            f"{network_list(networks)}")


def base_uuids(since: dict[str, Any] | None) -> set[str]:
    """The snapshot VDIs (now CBT metadata) the previous point's chain builds on."""
    return {str(d["vdi"]) for d in ((since or {}).get("disks") or {}).values() if isinstance(d, dict) and d.get("vdi")}


def choose_transport(transports: list[str], notes: list[str]) -> str:
    """XAPI serves a snapshot's disks over NBD only: ``nbd`` (TLS when the network allows) or
    ``nbdssl`` (TLS only) from the wanted transports; the others are noted as skipped."""
    chosen = next((t for t in transports if t in ("nbd", "nbdssl")), None)
    if chosen is None:
        raise HypervisorError(f"none of the transports {':'.join(transports)} reads XenServer / XCP-ng disks: XAPI "
                              "serves them over NBD (add nbd to --transport)")
    skipped = [t for t in transports[:transports.index(chosen)]]
    if skipped:
        notes.append(f"transports {':'.join(skipped)} skipped: XAPI serves a snapshot's disks over NBD only")
    return chosen


@dataclass(eq=False, kw_only=True)
class XenPoint:
    """One backup snapshot of a VM and what is made for it; ``taken()`` yields the point."""

    session: XapiSession
    vm: str  # its name
    since: dict[str, Any] | None
    previous_disks: dict[str, int] | None
    transports: list[str]
    quiesce: Quiesce
    nbd_tls: NbdTls
    plain_allowed: bool  # an administrator allowed plain NBD for this address (--insecure)
    notes: list[str] = field(default_factory=list)
    records: Records = field(init=False)
    snapshot: str | None = field(default=None, init=False)  # the snapshot VM's ref
    snap_vdis: dict[str, str] = field(default_factory=dict, init=False)  # disk → snapshot VDI ref (read)
    other_vdis: list[str] = field(default_factory=list, init=False)  # snapshot VDIs of disks not read
    tls_root: Path | None = field(default=None, init=False)
    vm_uuid: str = field(default="", init=False)
    base_refs: dict[str, str] = field(default_factory=dict, init=False)  # disk → the previous point's base VDI ref
    vdis: SnapshotVdis = field(init=False)
    _early: EarlyRelease[None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.records = Records(self.session)

    @property
    def context(self) -> dict[str, str]:
        return {"vm": self.vm}

    # -- the point in time -----------------------------------------------------------------------
    @contextmanager
    def taken(self) -> Iterator[PointInTimeInfo]:
        transport = choose_transport(self.transports, self.notes)
        ref = find_vm(self.session, self.vm)
        record = self.records.get("VM", ref)
        self.vm_uuid = str(record["uuid"])
        self._check_nbd_networks(transport)  # refuses before anything is made
        self.vdis = SnapshotVdis(self.session, self.records, self.vm, self.vm_uuid)
        Leftovers(self.session, self.records, self.vm, self.vm_uuid, base_uuids(self.since), self.notes).remove(record)
        found = disks(self.records, record)
        self.notes += [d.skip_reason for d in found if not d.backup]
        eligible = [d for d in found if d.backup]
        if not eligible:
            raise HypervisorError(f"VM {self.vm} has no disk that can be backed up "
                                  f"({'; '.join(self.notes) or 'no disks'})")
        cbt_was_off = self._enable_cbt(eligible)
        config = saved_config(self.records, record, found)
        try:
            consistency = self._take_snapshot(ref, record)
            snaps = self._snapshot_disks(eligible)
            mode, reason = self._incremental_base(eligible, cbt_was_off)
            changed: dict[str, list[Extent]] = {}
            if mode == "incremental":
                mode, reason, changed = self._changes(eligible, snaps, reason)  # before any NBD connection
            exports = {d.name: DiskExport(d.name, self._endpoint(d.name, snaps[d.name], record, transport), d.size,
                                          changed=changed.get(d.name)) for d in eligible}
            chain = {"disks": {d.name: {"vdi": str(snaps[d.name]["uuid"]), "source": d.uuid, "size": d.size,
                                        "sr": str(d.sr.get("uuid", ""))} for d in eligible}}
            self._early = EarlyRelease(self._keep_as_base, f"vmkeep-release-{self.vm}")
            log.info("%s point of %s: %s, %s-consistent, disks %s", mode, self.vm, reason, consistency,
                     ", ".join(exports), extra=self.context)
            yield PointInTimeInfo(self.vm, transport, consistency, mode, reason, exports, config, chain, self.notes,
                                  wire=wire_of(exports), release=self._early.start)
        except BaseException as exc:
            self._discard()
            self._mask_session(exc)
            raise
        else:
            self._finish()
        finally:
            if self.tls_root is not None:
                shutil.rmtree(self.tls_root, ignore_errors=True)

    def _mask_session(self, exc: BaseException) -> None:
        """The error without the session ref on its way to the job record and the command's output:
        an NBD URI (libnbd's errors quote it) carries the ref in its export name."""
        args = tuple(self.session.mask(a) if isinstance(a, str) else a for a in exc.args)
        if args != exc.args:
            exc.args = args

    # -- before the snapshot ---------------------------------------------------------------------
    def _check_nbd_networks(self, transport: str) -> None:
        """Refuse before anything is made when no network lets XAPI serve NBD, or only plain NBD
        does and plain reads are not allowed."""
        networks = self.records.all("network")
        purposes = {p for n in networks.values() for p in (n.get("purpose") or [])}
        if not purposes & set(NBD_PURPOSES):
            raise HypervisorError(f"XAPI cannot serve the disks of {self.vm}: no network of the pool has the purpose "
                                  f"nbd or insecure_nbd; {nbd_remedy(networks)}")
        if "nbd" not in purposes:
            self._plain_refusal(transport)  # raises unless plain NBD is allowed

    def _plain_refusal(self, transport: str) -> None:
        """Plain NBD (``insecure_nbd``) only with nbd_tls off, or auto where an administrator
        allowed it for this address; else the refusal with what to do."""
        if self.nbd_tls == "off" or (self.nbd_tls == "auto" and self.plain_allowed and transport == "nbd"):
            return
        why = ("encrypted reads are required (nbd_tls: require)" if self.nbd_tls == "require" or transport == "nbdssl"
               else "plain NBD is not allowed for this address (nbd_tls: auto)")
        raise HypervisorError(f"XAPI serves the disks of {self.vm} only over plain NBD (purpose insecure_nbd) and "
                              f"{why}: switch that network to TLS (xe network-param-remove param-name=purpose "
                              "param-key=insecure_nbd uuid=<its uuid>, then xe network-param-add param-name=purpose "
                              "param-key=nbd uuid=<its uuid>; the pool's networks: "
                              f"{network_list(self.records.all('network'))}), or allow plain NBD with --nbd-tls off")

    def _enable_cbt(self, eligible: list[Disk]) -> bool:
        """Turn CBT on where it is off; whether any disk had it off (this backup is then full)."""
        off = [d for d in eligible if not d.record.get("cbt_enabled")]
        for d in off:
            log.info("changed block tracking of %s disk %s is off: turning it on", self.vm, d.name, extra=self.context)
            self.session.call("VDI.enable_cbt", d.vdi)
            d.record["cbt_enabled"] = True
        if off:
            self.notes.append(f"changed block tracking was off on {', '.join(d.name for d in off)}: turned on now; "
                              "this backup is full, the next ones are incremental")
        return bool(off)

    def _take_snapshot(self, ref: str, record: dict[str, Any]) -> Consistency:
        """Snapshot the VM: quiesced (the guest's VSS) when asked and its tools offer it."""
        name = f"{SNAPSHOT_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        state = str(record.get("power_state"))
        if state == "Halted":
            self.snapshot = str(self.session.call("VM.snapshot", ref, name))
            return "application"  # nothing runs: the disks are at rest
        consistency: Consistency = "crash"
        if self.quiesce != "off" and state != "Running":  # Suspended, Paused: no guest runs to quiesce
            if self.quiesce == "required":
                raise HypervisorError(f"VM {self.vm} is {state.lower()}: a quiesced snapshot needs it running (its "
                                      "guest tools quiesce the disks); resume it, or use --quiesce try")
            self.notes.append(f"the VM is {state.lower()}: no guest runs to quiesce; crash-consistent snapshot")
        elif self.quiesce != "off":
            if "snapshot_with_quiesce" in (record.get("allowed_operations") or []):
                try:
                    self.snapshot = str(self.session.call("VM.snapshot_with_quiesce", ref, name))
                    consistency = "application"
                except XapiError as exc:
                    if self.quiesce == "required":
                        raise HypervisorError(f"VM {self.vm}: the quiesced snapshot failed ({' '.join(exc.details)}); "
                                              "check the guest's VSS service, or use --quiesce try") from exc
                    log.warning("quiescing %s failed (%s); crash-consistent snapshot instead", self.vm, exc,
                                extra=self.context)
                    self.notes.append(f"quiescing failed ({' '.join(exc.details)}); crash-consistent snapshot instead")
            elif self.quiesce == "required":
                raise HypervisorError(f"VM {self.vm} cannot take a quiesced snapshot (its allowed operations lack "
                                      "snapshot_with_quiesce: no guest tools with VSS support are running); install "
                                      "and start the guest tools with VSS, or use --quiesce try")
            else:
                self.notes.append("the guest cannot quiesce (no snapshot_with_quiesce: guest tools with VSS are not "
                                  "running): crash-consistent snapshot")
        if self.snapshot is None:
            self.snapshot = str(self.session.call("VM.snapshot", ref, name))
        log.info("snapshot %s of %s taken (%s-consistent)", name, self.vm, consistency, extra=self.context)
        return consistency

    # -- after the snapshot ----------------------------------------------------------------------
    def _snapshot_disks(self, eligible: list[Disk]) -> dict[str, dict[str, Any]]:
        """The snapshot VDI of each disk read (by the VBD's userdevice); the others are noted to go."""
        assert self.snapshot is not None
        by_device = self.vdis.disk_vdis(self.records.get("VM", self.snapshot))
        for vdi_ref in by_device.values():  # first: a crash at any later step leaves VDIs the next run finds
            self.vdis.mark(vdi_ref)
        wanted = {str(d.vbd_record.get("userdevice")): d for d in eligible}
        self.other_vdis = [v for u, v in by_device.items() if u not in wanted]
        found: dict[str, dict[str, Any]] = {}
        for userdevice, disk in wanted.items():
            if userdevice not in by_device:
                raise HypervisorError(f"the snapshot of {self.vm} has no disk {disk.name} (userdevice {userdevice}); "
                                      "was a disk added or removed while it was taken? Run the backup again")
            self.snap_vdis[disk.name] = by_device[userdevice]
            found[disk.name] = {**self.records.get("VDI", by_device[userdevice]), "ref": by_device[userdevice]}
            disk.record["virtual_size"] = found[disk.name]["virtual_size"]  # the size read is the snapshot's
        return found

    def _incremental_base(self, eligible: list[Disk], cbt_was_off: bool) -> tuple[Mode, str]:
        """("incremental", from what) when every disk continues the previous point's chain, else
        ("full", why): what changed about the disks first, then whether CBT can answer."""
        since = self.since
        if not since or not since.get("disks"):
            return "full", "no previous restore point of this VM"
        for d in eligible:
            before = since["disks"].get(d.name)
            if not isinstance(before, dict) or not before.get("vdi"):
                return "full", f"disk {d.name} is new since the previous point"
            if before.get("sr") != d.sr.get("uuid"):
                return "full", f"disk {d.name} moved to another SR since the previous point"
            if before.get("source") != d.uuid:
                return "full", f"disk {d.name} is another VDI than at the previous point (moved or replaced)"
            size = before.get("size", (self.previous_disks or {}).get(d.name))
            if size != d.size:
                return "full", f"disk {d.name} was resized ({size} → {d.size} bytes)"
        if cbt_was_off:
            return "full", "changed block tracking was off (turned on now)"
        for d in eligible:
            before = since["disks"][d.name]
            try:
                self.base_refs[d.name] = str(self.session.call("VDI.get_by_uuid", before["vdi"]))
            except XapiError as exc:
                if exc.code not in ("UUID_INVALID", "HANDLE_INVALID"):
                    raise
                return "full", (f"the previous point's snapshot of disk {d.name} is gone (its CBT metadata VDI "
                                f"{before['vdi']} no longer exists)")
        return "incremental", "changes since the previous point's snapshots (changed block tracking)"

    def _changes(self, eligible: list[Disk], snaps: dict[str, dict[str, Any]],
                 reason: str) -> tuple[Mode, str, dict[str, list[Extent]]]:
        """Each disk's changed extents; a full read (with why) where XAPI cannot give them."""
        changed = {}
        for d in eligible:
            try:
                changed[d.name] = cbt.changed_extents(self.session, self.base_refs[d.name], str(snaps[d.name]["ref"]),
                                                      d.size, d.name)
            except XapiError as exc:
                if exc.code == "VDI_NO_CBT_METADATA":
                    why = (f"changed block tracking of disk {d.name} was reset since the previous point (XAPI: "
                           "VDI_NO_CBT_METADATA): its change log no longer reaches the previous snapshot")
                else:
                    why = f"XAPI cannot list the changed blocks of disk {d.name} ({' '.join(exc.details)})"
                log.info("full backup instead: %s", why, extra=self.context)
                return "full", why, {}
        return "incremental", reason, changed

    def _endpoint(self, disk: str, snap: dict[str, Any], record: dict[str, Any], transport: str) -> str:
        """The NBD URI of a snapshot VDI: a TLS endpoint (the host's certificate trusted alone)
        when XAPI offers one, preferring the VM's host; plain NBD only where allowed."""
        infos = list(self.session.call("VDI.get_nbd_info", snap["ref"]))
        log.debug("NBD endpoints of %s disk %s: %s", self.vm, disk,
                  [(i.get("address"), i.get("port"), i.get("subject")) for i in infos], extra=self.context)
        if not infos:
            raise HypervisorError(f"XAPI offers no NBD endpoint for disk {disk} of {self.vm}: no host that sees its "
                                  f"SR is on a network with the purpose nbd; {nbd_remedy(self.records.all('network'))}")
        near = [self.records.get("host", r).get("address") for r in (record.get("resident_on"), record.get("affinity"))
                if r and r != NULL]
        infos.sort(key=lambda i: (i.get("address") not in near, i.get("address") != self.session.host))
        secure = [i for i in infos if i.get("cert")]
        if secure:
            info = secure[0]
            directory = self._tls_dir(disk, str(info["cert"]))
            return (f"nbds://{url_host(str(info['address']))}:{int(info['port'])}/"
                    f"{quote(str(info['exportname']), safe='')}?tls-certificates={quote(str(directory), safe='/')}")
        self._plain_refusal(transport)
        info = infos[0]
        self.notes.append(f"disk {disk} read over plain NBD (a network with purpose insecure_nbd): not encrypted")
        return f"nbd://{url_host(str(info['address']))}:{int(info['port'])}/{quote(str(info['exportname']), safe='')}"

    def _tls_dir(self, disk: str, cert: str) -> Path:
        """A private directory holding exactly the host's NBD certificate as ``ca-cert.pem``."""
        if self.tls_root is None:
            self.tls_root = Path(tempfile.mkdtemp(prefix="vmkeep-xapi-nbd-"))
        directory = self.tls_root / disk
        directory.mkdir(mode=0o700)
        path = directory / "ca-cert.pem"
        path.write_text(cert if cert.endswith("\n") else cert + "\n")
        os.chmod(path, 0o600)
        return directory

    # -- leaving ---------------------------------------------------------------------------------
    def _keep_as_base(self) -> None:
        """Reads done: each read snapshot VDI keeps only its CBT metadata (the next base; marked as
        this VM's since the snapshot); the snapshot VM and the VDIs of disks not read go."""
        for disk, vdi_ref in self.snap_vdis.items():
            self.session.call("VDI.data_destroy", vdi_ref)
            log.debug("snapshot VDI of %s disk %s is now CBT metadata", self.vm, disk, extra=self.context)
        if self.snapshot is not None:
            self.session.call("VM.destroy", self.snapshot)
            log.info("snapshot of %s released: its disks' CBT metadata kept as the next base", self.vm,
                     extra=self.context)
            self.snapshot = None
        for vdi_ref in self.other_vdis:
            self.vdis.destroy(vdi_ref)
        self.other_vdis = []

    def _finish(self) -> None:
        """Success: the release (started by the engine or now) has to have run; if it failed,
        everything of the snapshot goes, and the next backup is full."""
        assert self._early is not None
        try:
            self._early()
        except Exception as exc:  # noqa: BLE001 - the point is stored; what is left is cleaned up
            log.warning("releasing the snapshot of %s failed (%s); removing it, the next backup is full", self.vm,
                        exc, extra=self.context)
            self._discard()

    def _discard(self) -> None:
        """Failure: the snapshot VM and every VDI made for it go (a failed point is no base).
        Each step is tried on its own, so one refusal leaves as little as possible behind."""
        if self._early is not None:
            self._early.join()
        made = [*self.snap_vdis.values(), *self.other_vdis]
        if self.snapshot is None and not made:
            return
        if self.snapshot is not None:
            try:  # its VDIs, also when the failure came before they were looked at
                self.records.forget("VM", self.snapshot)
                snap = self.records.get("VM", self.snapshot)
                made += [v for v in self.vdis.disk_vdis(snap).values() if v not in made]
            except HypervisorError as exc:
                log.debug("the disks of the snapshot of %s: %s", self.vm, exc, extra=self.context)
            try:
                self.session.call("VM.destroy", self.snapshot)
            except HypervisorError as exc:
                log.warning("removing the snapshot of %s failed (%s); the next backup removes it", self.vm, exc,
                            extra=self.context)
        for vdi_ref in made:
            self.vdis.destroy(vdi_ref)
        log.info("snapshot of %s removed after the failure", self.vm, extra=self.context)
