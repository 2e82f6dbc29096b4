"""The libvirt connector: points in time from checkpoints and pull-mode backup jobs.

A running VM: optional fsfreeze through the guest agent, then ``backupBegin`` in pull mode with
a new checkpoint (persistent qcow2 bitmaps) and, for an incremental, ``<incremental>`` naming the
previous point's checkpoint; the fsthaw follows at once, since the point in time is fixed when
the job starts. QEMU then serves each disk of that instant over NBD (unix socket for hotadd,
TCP for nbd) with a ``qemu:dirty-bitmap:backup-<disk>`` context of what changed. Leaving the
context aborts the job and removes scratch files; on failure the new checkpoint is deleted too
(its bitmap merges back into its parent's, so the next incremental is still right), on success
the older vmkeep checkpoints are deleted so bitmaps do not pile up.

A VM that is shut off is read from its image files through qemu-nbd.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import quote

import libvirt

from vmkeep.errors import ImageError, VmkeepError
from vmkeep.hypervisors.base import (
    Consistency,
    DiskExport,
    HypervisorError,
    NbdTls,
    PointInTimeInfo,
    Quiesce,
    VMInfo,
    wire_of,
)
from vmkeep.hypervisors.early_release import EarlyRelease
from vmkeep.hypervisors.libvirt import restore
from vmkeep.hypervisors.libvirt.connection import Connection
from vmkeep.hypervisors.libvirt.domain_xml import (
    DiskSpec,
    disk_specs,
    host_paths_to_create,
    nvram_path,
    renamed_copy,
    with_disk_paths,
    with_nvram_path,
)
from vmkeep.hypervisors.libvirt.inventory import list_vms
from vmkeep.hypervisors.libvirt.job_xml import BackupDisk, backup_xml, checkpoint_xml
from vmkeep.hypervisors.libvirt.restore import LibvirtRestore
from vmkeep.hypervisors.libvirt.san import (
    CHECKPOINT_PREFIX,
    frozen_bases,
    merge_stale_overlays,
    serve_images,
    unreadable_disks,
)
from vmkeep.hypervisors.libvirt.scratch import explain_full_scratch, out_of_space, scratch_root, sweep_scratch
from vmkeep.hypervisors.libvirt.scratch_watch import ScratchWatch
from vmkeep.polling import Backoff
from vmkeep.transport.nbd_client import DEFAULT_TLS_DIR, client_tls_dir, unix_uri

RESTART_GRACE_SECONDS = 20

# What libvirt or QEMU say when the host cannot serve the export over TLS (no such directory,
# "Unable to access credentials …/ca-cert.pem", a certificate that does not load).
TLS_WORDS = ("tls", "x509", "certificate", "credentials")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class LibvirtConnector:
    """The Connector for libvirt hosts, composed of the connection, the inventory and the point
    in time of a VM (each in a module of its own)."""

    kind = "libvirt"

    def __init__(self, uri: str = "qemu:///system", nbd_tls: NbdTls = "auto",
                 credentials: tuple[str, str] | None = None) -> None:
        """``nbd_tls``: ``auto`` encrypts the nbd transport when this proxy has client
        certificates and the host accepts TLS, ``require`` refuses to go without, ``off`` never.
        ``credentials``: user name and password for hosts that ask (SASL), else none."""
        self.connection = Connection(uri, credentials)
        self.uri = uri
        self.nbd_tls = nbd_tls
        self.credentials = credentials
        self.host = self.connection.host
        self.is_local = self.connection.is_local

    @property
    def conn(self) -> libvirt.virConnect:
        """The libvirt connection now (a new one after libvirtd restarted under a backup)."""
        return self.connection.conn

    def boot_check(self, repo: Any, spec: Any, vm: str, point: str | None, *, timeout: float = 300.0,
                   marker: str | None = None, script: Path | None = None) -> dict[str, Any]:
        """The BootChecks capability (vmkeep.hypervisors.libvirt.boot_check)."""
        from vmkeep.hypervisors.libvirt.boot_check import boot_check  # it imports this module

        return boot_check(repo, spec, self, vm, point, timeout=timeout, marker=marker, script=script)

    def close(self) -> None:
        self.connection.close()

    # -- inventory -------------------------------------------------------------------------------
    def domain(self, name: str) -> libvirt.virDomain:
        return self.connection.domain(name)

    def exists(self, name: str) -> bool:
        return self.connection.exists(name)

    def inventory(self) -> list[VMInfo]:
        """Every VM with its disks (vmkeep.hypervisors.libvirt.inventory)."""
        return list_vms(self.connection)

    # -- restore ---------------------------------------------------------------------------------
    def restore_vm(self, config: dict[str, Any], *, name: str, disks: dict[str, int], as_new: bool,
                   storage: str | None = None, place: dict[str, str] | None = None,
                   retry: bool = False) -> AbstractContextManager[LibvirtRestore]:
        """Disks as new qcow2 images where the VM runs from, then the domain defined (restore.py)."""
        return restore.restore_vm(self, config, name=name, disks=disks, as_new=as_new, storage=storage, place=place,
                                  retry=retry)

    def define_restored(self, config: dict[str, Any], *, name: str, disk_paths: dict[str, str],
                        storage: str | None, as_new: bool, start: bool,
                        place: dict[str, str] | None = None) -> dict[str, str]:
        """Define the saved configuration with its restored disks (and UEFI variables), then start.

        As a new VM it gets the new name, a new UUID and fresh MACs, and its variables go beside
        its disks; over the original, the variables go back to the original's file. Files written
        here are removed again if libvirt refuses the result.
        """
        restore.check_config(config, place)
        xml = config["domain_xml"]
        xml = renamed_copy(xml, name, disk_paths) if as_new else with_disk_paths(xml, disk_paths)
        written: list[Path] = []
        try:
            nvram = config.get("nvram")
            if nvram:
                if not self.is_local:
                    raise HypervisorError(f"{name} has UEFI variables to restore onto {self.host}: run the restore "
                                          "on that host")
                beside = Path(next(iter(disk_paths.values()))).parent if disk_paths else Path(storage or ".")
                target = Path(nvram["path"]) if not as_new else beside / f"{name}_VARS.fd"
                target.parent.mkdir(parents=True, exist_ok=True)
                staged = target.with_name(target.name + ".vmkeep-restore")
                staged.write_bytes(base64.b64decode(nvram["data"]))
                os.replace(staged, target)
                if as_new:
                    written.append(target)
                xml = with_nvram_path(xml, str(target))
            if self.is_local:
                for d in host_paths_to_create(xml):
                    Path(d).mkdir(parents=True, exist_ok=True)
            self._define(xml, start=start)
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        return dict(disk_paths)

    def _define(self, xml: str, *, start: bool) -> None:
        try:
            dom = self.conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt refused the restored configuration: {exc.get_error_message()}") from None
        if start:
            try:
                dom.create()
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"the restored VM {dom.name()} is defined but does not start: "
                                      f"{exc.get_error_message()}") from None

    def _nvram(self, dom: libvirt.virDomain) -> dict[str, Any]:
        """The VM's UEFI variables, for the point's configuration (empty without UEFI)."""
        path = nvram_path(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        if path is None:
            return {}
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise HypervisorError(f"cannot read the UEFI variables of {dom.name()} ({path}): {exc.strerror}; the "
                                  "proxy must see the host's files for that (run it on the host)") from None
        return {"nvram": {"path": path, "data": base64.b64encode(data).decode()}}

    def require_shut_off(self, vm: str) -> None:
        if self.domain(vm).state()[0] != libvirt.VIR_DOMAIN_SHUTOFF:
            raise HypervisorError(f"VM {vm} is running: shut it off first (virsh -c {self.uri} shutdown {vm}), "
                                  "then restore over it")

    def remove_restored(self, name: str, disk_paths: list[str]) -> bool:
        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError:
            return False
        sources = sorted(spec.source for spec in disk_specs(dom.XMLDesc()) if spec.source)
        if sources != sorted(disk_paths):
            raise HypervisorError(f"a VM named {name!r} exists on {self.uri} that this restore did not make (its "
                                  f"disks are {', '.join(sources) or 'none'}); restore under another name")
        self.remove_domain(dom, "left by an earlier attempt of this restore")
        return True

    @staticmethod
    def remove_domain(dom: libvirt.virDomain, why: str) -> None:
        """Power off and undefine a VM vmkeep made (its UEFI variables and metadata with it)."""
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot remove {dom.name()}, {why}: {exc.get_error_message()}") from None

    def forget_checkpoints(self, vm: str) -> None:
        """Drop libvirt's checkpoint records of a VM whose disks are being replaced."""
        dom = self.domain(vm)
        for cp in dom.listAllCheckpoints():
            try:
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            except libvirt.libvirtError:
                pass

    # -- point in time ---------------------------------------------------------------------------
    @contextmanager
    def point_in_time(
        self,
        vm: str,
        *,
        since: dict[str, Any] | None,
        previous_disks: dict[str, int] | None,
        transports: list[str],
        quiesce: Quiesce,
    ) -> Iterator[PointInTimeInfo]:
        dom = self.domain(vm)
        notes = []
        sweep_scratch()
        live_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
        if merge_stale_overlays(dom, live_xml):
            notes.append("merged back the snapshot overlays of an earlier vmkeep run that did not finish")
            live_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
        specs = disk_specs(live_xml)
        notes += [s.reason for s in specs if s.reason]
        eligible = [s for s in specs if s.eligible]
        if not eligible:
            raise HypervisorError(f"VM {vm} has no disk that can be backed up ({'; '.join(notes) or 'no disks'})")
        config = {"domain_xml": dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE),
                  "disks": {s.target: {"source": s.source, "format": s.format} for s in eligible}}
        if dom.state()[0] in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
            writable = [s for s in eligible if not s.readonly]
            if not writable:
                raise HypervisorError(f"VM {vm} runs with read-only disks only, which libvirt cannot back up; back "
                                      "their images up with `vmkeep disk backup`")
            point = self._online(dom, writable, [s for s in eligible if s.readonly], since, previous_disks,
                                 transports, quiesce, config, notes)
        else:
            point = self._offline(dom, eligible, since, previous_disks, config, notes)
        with point as info:
            info.config.update(self._nvram(dom))  # read once the point in time is fixed
            yield info

    def _choose_transport(self, transports: list[str], eligible: list[DiskSpec], notes: list[str]) -> str:
        for t in transports:
            if t == "san" and (hidden := unreadable_disks(eligible)):
                notes.append(f"transport san skipped: this proxy cannot open the images of {', '.join(hidden)} "
                             "(give it access to the VM's storage)")
            elif t == "hotadd" and not self.is_local:
                notes.append(f"transport hotadd skipped: this proxy is not on the VM's host {self.host}")
            else:
                return t
        raise HypervisorError(f"none of the transports {':'.join(transports)} can reach the VM: "
                              + "; ".join(notes) + " (add nbd to --transport)")

    def _incremental_base(self, dom: libvirt.virDomain, eligible: list[DiskSpec], since: dict[str, Any] | None,
                          previous_disks: dict[str, int] | None,
                          capacities: dict[str, int] | None = None) -> tuple[str | None, str]:
        """The checkpoint to build on, or None and the reason the backup must be full.

        ``capacities``: the disks' sizes now, when the caller has them already."""
        if since is None:
            return None, "no previous restore point to build on"
        parent = since.get("checkpoint")
        if not parent:
            return None, "the previous restore point has no checkpoint (it was taken while the VM was off)"
        try:
            existing = {c.getName() for c in dom.listAllCheckpoints()}
        except libvirt.libvirtError as exc:
            return None, f"cannot list checkpoints ({exc.get_error_message()})"
        if parent not in existing:
            return None, (f"checkpoint {parent} of the previous point is gone (deleted by hand, or the VM was "
                          "restored or reverted)")
        now = capacities if capacities is not None else {s.target: dom.blockInfo(s.target)[0] for s in eligible}
        if previous_disks is not None and now != previous_disks:
            return None, f"the disks changed since the previous point (were {previous_disks}, now {now})"
        bitmap_disks = {s.target for s in eligible if s.bitmaps}
        cp_disks = set(since.get("disks", []))
        if bitmap_disks != cp_disks:
            return None, "the set of disks with bitmaps differs from the previous checkpoint's"
        return parent, f"changes since checkpoint {parent}"

    @contextmanager
    def _online(self, dom: libvirt.virDomain, eligible: list[DiskSpec], readonly: list[DiskSpec],
                since: dict[str, Any] | None, previous_disks: dict[str, int] | None, transports: list[str],
                quiesce: Quiesce, config: dict[str, Any], notes: list[str]) -> Iterator[PointInTimeInfo]:
        """``eligible``: the disks libvirt's job or snapshot covers; ``readonly``: disks the VM only
        reads, served from their images beside them (skipped, with a note, by a proxy that cannot
        open them)."""
        vm = dom.name()
        self._clear_stale_job(dom, notes)
        transport = self._choose_transport(transports, eligible, notes)
        if hidden := unreadable_disks(readonly):
            notes.append(f"read-only disks {', '.join(hidden)} skipped: this proxy cannot open their images")
            readonly = [s for s in readonly if s.target not in hidden]
        capacities = {s.target: dom.blockInfo(s.target)[0] for s in eligible + readonly}
        parent_cp, reason = self._incremental_base(dom, eligible + readonly, since, previous_disks, capacities)
        images = ExitStack()
        checkpoint = f"{CHECKPOINT_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"
        bitmap_targets = [s.target for s in eligible if s.bitmaps]
        chain = {"checkpoint": checkpoint if bitmap_targets else None, "disks": bitmap_targets}
        committed = False
        try:
            read_only_disks = serve_images(images, vm, readonly, None)
            # Cleaning up a job or checkpoint that never came to be is harmless, so assume both exist
            # from here on: an interrupt the instant they are made must not leak them.
            if transport == "san":
                with frozen_bases(dom, eligible, capacities, scratch_root() / f"{vm}-{secrets.token_hex(4)}",
                                  self._checkpoint_xml(eligible, checkpoint), parent_cp, reason,
                                  lambda: self._quiesced(dom, quiesce, notes)) as san:
                    yield PointInTimeInfo(
                        vm=vm, transport=transport, consistency=san.consistency,
                        mode="incremental" if san.parent_cp else "full", reason=san.reason,
                        disks={**san.disks, **read_only_disks}, config=config, chain=chain, notes=notes,
                        wire=wire_of({**san.disks, **read_only_disks}), release=san.release)
            else:
                with self._backup_job(dom, eligible, capacities, parent_cp, reason, checkpoint, transport, quiesce,
                                      notes) as (consistency, parent_cp, reason, disks, release):
                    try:
                        yield PointInTimeInfo(
                            vm=vm, transport=transport, consistency=consistency,
                            mode="incremental" if parent_cp else "full", reason=reason,
                            disks={**disks, **read_only_disks}, config=config, chain=chain, notes=notes,
                            wire=wire_of({**disks, **read_only_disks}), release=release)
                    except ImageError as exc:
                        raise self._explain_lost_export(dom, exc) from None
            committed = True
        finally:
            images.close()
            try:
                fresh = self.connection.alive(dom)
            except libvirt.libvirtError:
                notes.append("libvirtd did not come back: the checkpoint is cleaned up next run")
            else:
                if committed:
                    self._prune_checkpoints(fresh, keep=checkpoint)
                else:
                    self._delete_checkpoint(fresh, checkpoint)

    @contextmanager
    def _backup_job(self, dom: libvirt.virDomain, eligible: list[DiskSpec], capacities: dict[str, int],
                    parent_cp: str | None, reason: str,
                    checkpoint: str, transport: str, quiesce: Quiesce,
                    notes: list[str]) -> Iterator[tuple[Consistency, str | None, str, dict[str, DiskExport],
                                                         Callable[[], None]]]:
        """A pull-mode backup job exporting the disks over NBD; aborted and its scratch removed on exit
        (or earlier, by the last item yielded, once the engine's reads are done)."""
        port = _free_port() if transport == "nbd" else 0
        tls_dir = self._tls_dir(notes) if transport == "nbd" else None  # may refuse: before anything is made
        scratch = scratch_root() / f"{dom.name()}-{secrets.token_hex(4)}"
        scratch.mkdir(parents=True)
        socket_path = scratch / "nbd.sock"
        early: EarlyRelease[None] | None = None
        try:
            consistency, parent_cp, reason, tls_dir = self._begin(
                dom, eligible, parent_cp, reason, checkpoint, scratch, transport, socket_path, port, tls_dir,
                quiesce, notes)
            if tls_dir:
                notes.append(f"nbd transport encrypted with TLS (client certificates in {tls_dir})")
            disks = {}
            for s in eligible:
                if transport == "hotadd":
                    # paths percent-encoded: a scratch directory may hold '&', ' ' or '#' (libnbd decodes them)
                    uri = unix_uri(socket_path, s.target)
                elif tls_dir:
                    uri = (f"nbds://{self._nbd_host()}:{port}/{s.target}"
                           f"?tls-certificates={quote(str(tls_dir), safe='/')}")
                else:
                    uri = f"nbd://{self._nbd_host()}:{port}/{s.target}"
                dirty = f"qemu:dirty-bitmap:backup-{s.target}" if (parent_cp and s.bitmaps) else None
                disks[s.target] = DiskExport(s.target, uri, capacities[s.target], dirty)
            early = EarlyRelease(lambda: self._end_job(dom), f"vmkeep-release-{dom.name()}")
            try:
                # a full scratch directory pauses the VM; the proxy can only see a local host's
                with (ScratchWatch(dom, scratch, early, "ended the backup job") if self.is_local else nullcontext()):
                    yield consistency, parent_cp, reason, disks, early.start
            finally:
                early.join()
        finally:
            try:
                fresh = self.connection.alive(dom)
            except libvirt.libvirtError:
                notes.append("libvirtd did not come back: the backup job is cleaned up next run")
            else:
                if not (early is not None and early.succeeded and fresh is dom):
                    self._end_job(fresh)
                if fresh is not dom:
                    # libvirtd restarted: it re-attaches the jobs it knew several seconds later, after
                    # our abort found nothing; watch for the job to reappear and abort it then.
                    deadline = time.monotonic() + RESTART_GRACE_SECONDS
                    while time.monotonic() < deadline:
                        time.sleep(0.5)
                        if self._job_present(fresh):
                            self._end_job(fresh)
                            break
            shutil.rmtree(scratch, ignore_errors=True)

    def _clear_stale_job(self, dom: libvirt.virDomain, notes: list[str]) -> None:
        """A backup job left by a vmkeep run that died (kill -9, lost connection) is aborted and its
        scratch files removed; someone else's job is left alone and reported."""
        try:
            job = dom.backupGetXMLDesc()
        except libvirt.libvirtError:
            return  # no backup job running
        root = scratch_root()
        if str(root) not in job:
            raise HypervisorError(f"another backup job (not vmkeep's) runs on VM {dom.name()}; wait for it or abort "
                                  f"it with `virsh -c {self.uri} domjobabort {dom.name()}`")
        self._end_job(dom)
        for scratch in root.glob(f"{dom.name()}-*"):
            if str(scratch) in job:
                shutil.rmtree(scratch, ignore_errors=True)
        notes.append("aborted a backup job left by an earlier vmkeep run that did not finish")

    def _explain_lost_export(self, dom: libvirt.virDomain, exc: ImageError) -> VmkeepError:
        """Reading failed: say why in the VM's terms when the VM or its backup job went away.

        A VM being destroyed drops the export a moment before libvirt reports it inactive, so the
        state is watched for a few seconds before deciding.
        """
        deadline = time.monotonic() + 3
        job_alive = True
        while time.monotonic() < deadline:
            try:
                dom = self.connection.alive(dom)
                if not dom.isActive():
                    return HypervisorError(f"VM {dom.name()} stopped during the backup; nothing was committed. "
                                           "Run the backup again: a shut-off VM is read from its images")
                try:
                    dom.backupGetXMLDesc()
                    job_alive = True
                except libvirt.libvirtError:
                    job_alive = False
            except libvirt.libvirtError:
                job_alive = False
            time.sleep(0.2)
        if job_alive:  # the job still serves: the connection itself failed, twice
            return ImageError(f"{exc}; nothing was committed, run the backup again (check the network between "
                              f"this proxy and {self.host})")
        return HypervisorError(f"the backup job of {dom.name()} ended under vmkeep (aborted from outside, or "
                               f"libvirtd lost it): {exc}; nothing was committed, run the backup again")

    def _nbd_host(self) -> str:
        return "127.0.0.1" if self.is_local else self.host

    def _tls_dir(self, notes: list[str]) -> Path | None:
        """The client certificates to encrypt the nbd transport with, or None for plain NBD."""
        if self.nbd_tls == "off":
            return None
        directory = client_tls_dir()
        if directory is None:
            from vmkeep.settings import settings

            where = settings().nbd_tls_dir or DEFAULT_TLS_DIR
            if self.nbd_tls == "require":
                raise HypervisorError(f"encrypted NBD is required (--nbd-tls require, a policy's nbd_tls), but this "
                                      f"proxy has no NBD client certificates in {where} (ca-cert.pem, client-cert.pem, "
                                      "client-key.pem): install them, or allow plain NBD with auto")
            notes.append(f"nbd transport not encrypted: no client certificates in {where}")
        return directory

    def _start_job(self, dom: libvirt.virDomain, eligible: list[DiskSpec], parent_cp: str | None,
                   checkpoint: str, scratch: Path, transport: str, socket_path: Path, port: int,
                   tls_dir: Path | None, notes: list[str]) -> Path | None:
        """backupBegin, over TLS when asked; in ``auto`` a host without backup TLS gets plain NBD."""
        try:
            dom.backupBegin(self._backup_xml(eligible, parent_cp, scratch, transport, socket_path, port,
                                             self._nbd_host(), tls_dir is not None),
                            self._checkpoint_xml(eligible, checkpoint), 0)
            return tls_dir
        except libvirt.libvirtError as exc:
            why = exc.get_error_message()
            if tls_dir is None or not any(w in why.lower() for w in TLS_WORDS):
                raise
            if self.nbd_tls == "require":
                raise HypervisorError(f"--nbd-tls require, but {self.host or 'the host'} cannot encrypt the backup "
                                      f"export ({why}); give its qemu.conf a backup_tls_x509_cert_dir with server "
                                      "certificates, or use --nbd-tls auto") from None
            notes.append(f"nbd transport not encrypted: the host refused TLS ({why}); set "
                         "backup_tls_x509_cert_dir in its qemu.conf")
            dom.backupBegin(self._backup_xml(eligible, parent_cp, scratch, transport, socket_path, port,
                                             self._nbd_host(), False),
                            self._checkpoint_xml(eligible, checkpoint), 0)
            return None

    def _begin(self, dom: libvirt.virDomain, eligible: list[DiskSpec], parent_cp: str | None, reason: str,
               checkpoint: str, scratch: Path, transport: str, socket_path: Path, port: int, tls_dir: Path | None,
               quiesce: Quiesce, notes: list[str]) -> tuple[Consistency, str | None, str, Path | None]:
        """Start the backup job (quiesced if asked); falls back to full if libvirt refuses the incremental."""
        with self._quiesced(dom, quiesce, notes) as consistency:
            try:
                tls_dir = self._start_job(dom, eligible, parent_cp, checkpoint, scratch, transport, socket_path,
                                          port, tls_dir, notes)
            except libvirt.libvirtError as exc:
                if parent_cp is None or out_of_space(exc.get_error_message()):  # a full job would fail alike
                    raise self._cannot_start(dom, exc, scratch) from None
                reason = f"libvirt refused the incremental from {parent_cp} ({exc.get_error_message()})"
                self._delete_checkpoint(dom, checkpoint)
                parent_cp = None
                try:
                    tls_dir = self._start_job(dom, eligible, None, checkpoint, scratch, transport, socket_path,
                                              port, tls_dir, notes)
                except libvirt.libvirtError as exc2:
                    raise self._cannot_start(dom, exc2, scratch) from None
        return consistency, parent_cp, reason, tls_dir

    @staticmethod
    def _cannot_start(dom: libvirt.virDomain, exc: libvirt.libvirtError, scratch: Path) -> HypervisorError:
        why = exc.get_error_message()
        remedy = explain_full_scratch(why, scratch.parent)
        return HypervisorError(f"libvirt cannot start a backup of {dom.name()}: {why}{f'; {remedy}' if remedy else ''}")

    @contextmanager
    def _quiesced(self, dom: libvirt.virDomain, quiesce: Quiesce, notes: list[str]) -> Iterator[Consistency]:
        """Guest filesystems frozen through the agent for the block; yields the consistency gained."""
        frozen = False
        if quiesce != "off":
            try:
                dom.fsFreeze()
                frozen = True
            except libvirt.libvirtError as exc:
                why = exc.get_error_message()
                if quiesce == "required":
                    raise HypervisorError(f"cannot quiesce {dom.name()} through the guest agent ({why}); use "
                                          "--quiesce try to accept a crash-consistent point") from None
                notes.append(f"not quiesced: {why}")
        try:
            yield "application" if frozen else "crash"
        finally:
            if frozen:
                self._thaw(dom, notes)

    @staticmethod
    def _thaw(dom: libvirt.virDomain, notes: list[str]) -> None:
        for attempt in range(5):
            try:
                dom.fsThaw()
                return
            except libvirt.libvirtError as exc:
                if attempt == 4:
                    notes.append(f"fsthaw failed: {exc.get_error_message()}")
                time.sleep(0.2)

    @staticmethod
    def _backup_xml(eligible: list[DiskSpec], parent_cp: str | None, scratch: Path, transport: str,
                    socket_path: Path, port: int, listen: str, tls: bool) -> str:
        # Per disk: a raw disk has no bitmap and is read in full within an incremental job.
        disks = [BackupDisk(s.target, scratch / f"{s.target}.qcow2", parent_cp if s.bitmaps else None)
                 for s in eligible]
        if transport == "hotadd":
            return backup_xml(disks, socket=socket_path)
        return backup_xml(disks, host=listen, port=port, tls=tls)

    @staticmethod
    def _checkpoint_xml(eligible: list[DiskSpec], checkpoint: str) -> str:
        return checkpoint_xml(checkpoint, {s.target: s.bitmaps for s in eligible})

    @staticmethod
    def _job_present(dom: libvirt.virDomain) -> bool:
        try:
            dom.backupGetXMLDesc()
            return True
        except libvirt.libvirtError:
            return False

    @staticmethod
    def _end_job(dom: libvirt.virDomain) -> None:
        """Abort the pull-mode job and wait until libvirt no longer reports it (abort is asynchronous)."""
        try:
            dom.abortJob()
        except libvirt.libvirtError:
            pass  # the job already ended (VM shut down, libvirtd restarted)
        deadline, backoff = time.monotonic() + 15, Backoff(first=0.001)
        while time.monotonic() < deadline and LibvirtConnector._job_present(dom):
            backoff.sleep()

    @staticmethod
    def _delete_checkpoint(dom: libvirt.virDomain, name: str) -> None:
        try:
            dom.checkpointLookupByName(name).delete()
        except libvirt.libvirtError:
            try:  # the VM is gone or off: drop libvirt's record at least
                dom.checkpointLookupByName(name).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            except libvirt.libvirtError:
                pass

    def _prune_checkpoints(self, dom: libvirt.virDomain, keep: str) -> None:
        """Delete vmkeep's older checkpoints, oldest first; their bitmaps merge into the newer ones."""
        try:
            old = [c for c in dom.listAllCheckpoints() if c.getName().startswith(CHECKPOINT_PREFIX)
                   and c.getName() != keep]
        except libvirt.libvirtError:
            return
        for cp in sorted(old, key=lambda c: c.getName()):
            self._delete_checkpoint(dom, cp.getName())

    @contextmanager
    def _offline(self, dom: libvirt.virDomain, eligible: list[DiskSpec], since: dict[str, Any] | None,
                 previous_disks: dict[str, int] | None, config: dict[str, Any],
                 notes: list[str]) -> Iterator[PointInTimeInfo]:
        """A shut-off VM: its image files are the point in time, served read-only by qemu-nbd
        (which also keeps the VM from starting and writing to them meanwhile).

        With a previous point, the bitmap of its checkpoint (stored cleanly in the qcow2 when
        QEMU stopped) gives the changes. No new checkpoint is made: the point keeps the previous
        one as its chain, whose bitmap goes on tracking from there when the VM runs again, so
        the next incremental reads a superset of what changed, never less.
        """
        if not self.is_local:
            raise HypervisorError(f"VM {dom.name()} is shut off on {self.host}: offline backups read its image "
                                  "files, so run the proxy on that host")
        parent_cp, reason = self._incremental_base(dom, eligible, since, previous_disks)
        with ExitStack() as stack:
            try:
                disks = serve_images(stack, dom.name(), eligible, parent_cp)
            except ImageError as exc:
                if parent_cp is None:
                    raise
                # the bitmap is missing or was left in use by a QEMU that crashed: read it all
                stack.close()
                reason = f"the bitmap of checkpoint {parent_cp} cannot be used ({exc})"
                parent_cp = None
                disks = serve_images(stack, dom.name(), eligible, None)
            yield PointInTimeInfo(
                vm=dom.name(), transport="offline", consistency="application",
                mode="incremental" if parent_cp else "full",
                reason=(f"the VM is shut off: {reason}, read from its image files" if parent_cp
                        else f"the VM is shut off: read from its image files ({reason})"),
                disks=disks, config=config,
                chain=dict(since or {}) if parent_cp else {"checkpoint": None, "disks": []}, notes=notes,
            )
