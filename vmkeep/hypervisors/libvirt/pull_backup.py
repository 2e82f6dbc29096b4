"""A pull-mode backup job: ``backupBegin`` with a new checkpoint, after which QEMU serves each
disk of that instant over NBD (a unix socket for hotadd, TCP for nbd, with TLS when both ends
can) with a ``qemu:dirty-bitmap:backup-<disk>`` context of what changed since the parent
checkpoint. The guest's writes meanwhile copy the old blocks into the job's scratch files first.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import libvirt

from vmkeep.hypervisors.base import Consistency, DiskExport, HypervisorError, NbdTls, Quiesce
from vmkeep.hypervisors.early_release import EarlyRelease
from vmkeep.hypervisors.libvirt.checkpoints import checkpoint_document, delete_checkpoint
from vmkeep.hypervisors.libvirt.connection import Connection
from vmkeep.hypervisors.libvirt.domain_xml import DiskSpec
from vmkeep.hypervisors.libvirt.job_xml import BackupDisk, backup_xml
from vmkeep.hypervisors.libvirt.jobs import end_job, end_reattached_job
from vmkeep.hypervisors.libvirt.quiesce import quiesced
from vmkeep.hypervisors.libvirt.scratch import explain_full_scratch, out_of_space, scratch_root
from vmkeep.hypervisors.libvirt.scratch_watch import ScratchWatch
from vmkeep.transport.nbd_client import DEFAULT_TLS_DIR, client_tls_dir, unix_uri

log = logging.getLogger(__name__)

# What libvirt or QEMU say when the host cannot serve the export over TLS (no such directory,
# "Unable to access credentials …/ca-cert.pem", a certificate that does not load).
# Read from the message: a host without backup TLS fails backupBegin with a generic code (QEMU's
# failure to load the x509 credentials, or libvirt's refusal to set TLS up), none of its own.
TLS_WORDS = ("tls", "x509", "certificate", "credentials")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def client_tls(nbd_tls: NbdTls, notes: list[str]) -> Path | None:
    """The client certificates to encrypt the nbd transport with, or None for plain NBD."""
    if nbd_tls == "off":
        return None
    directory = client_tls_dir()
    if directory is None:
        from vmkeep.settings import settings

        where = settings().nbd_tls_dir or DEFAULT_TLS_DIR
        if nbd_tls == "require":
            raise HypervisorError(f"encrypted NBD is required (--nbd-tls require, a policy's nbd_tls), but this "
                                  f"proxy has no NBD client certificates in {where} (ca-cert.pem, client-cert.pem, "
                                  "client-key.pem): install them, or allow plain NBD with auto")
        notes.append(f"nbd transport not encrypted: no client certificates in {where}")
    return directory


def backup_document(eligible: list[DiskSpec], parent_cp: str | None, scratch: Path, *, socket: Path | None = None,
                    host: str = "", port: int = 0, tls: bool = False) -> str:
    """The job's ``<domainbackup>``: served on ``socket``, or else at ``host``:``port``; each disk's
    scratch file in ``scratch``. A raw disk has no bitmap and is read in full within an incremental."""
    disks = [BackupDisk(s.target, scratch / f"{s.target}.qcow2", parent_cp if s.bitmaps else None)
             for s in eligible]
    return backup_xml(disks, socket=socket, host=host, port=port, tls=tls)


@dataclass(eq=False, kw_only=True)
class PullBackup:
    """One pull-mode job: what it was asked, and what it found on the way (the consistency gained,
    a full read where libvirt refused the incremental, TLS or not, the exports).

    ``running()`` starts the job; leaving it aborts the job and removes the scratch files, or
    ``release`` does that earlier, once the engine's reads are done.
    """

    connection: Connection
    dom: libvirt.virDomain
    eligible: list[DiskSpec]
    capacities: dict[str, int]  # target → size in bytes, from libvirt
    checkpoint: str  # the checkpoint the job makes
    transport: str  # hotadd (unix socket, on the VM's host) or nbd (TCP)
    quiesce: Quiesce
    nbd_tls: NbdTls
    notes: list[str]  # the point's notes, added to
    parent_cp: str | None  # the checkpoint the incremental builds on; None: full
    reason: str  # why full, or what the incremental is relative to
    consistency: Consistency = field(default="crash", init=False)
    disks: dict[str, DiskExport] = field(default_factory=dict, init=False)
    scratch: Path = field(init=False)  # the job's scratch files and socket
    port: int = field(default=0, init=False)
    tls_dir: Path | None = field(default=None, init=False)  # the client certificates, while encrypted
    _early: EarlyRelease[None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.scratch = scratch_root() / f"{self.dom.name()}-{secrets.token_hex(4)}"

    @property
    def socket_path(self) -> Path:
        return self.scratch / "nbd.sock"

    @property
    def nbd_host(self) -> str:
        return "127.0.0.1" if self.connection.is_local else self.connection.host

    def release(self) -> None:
        """The engine's reads are done: end the job now, on a thread of its own."""
        if self._early is not None:
            self._early.start()

    @contextmanager
    def running(self) -> Iterator[PullBackup]:
        """The job, started (quiesced if asked) and exporting ``disks``."""
        vm = self.dom.name()
        if self.transport == "nbd":
            self.port = free_port()
            self.tls_dir = client_tls(self.nbd_tls, self.notes)  # may refuse: before anything is made
        self.scratch.mkdir(parents=True)
        try:
            self._begin()
            if self.tls_dir:
                self.notes.append(f"nbd transport encrypted with TLS (client certificates in {self.tls_dir})")
            self.disks = {s.target: self._export(s) for s in self.eligible}
            log.info("%s: %s backup job serves %s over %s%s", vm, "incremental" if self.parent_cp else "full",
                     ", ".join(self.disks), self.transport, " with TLS" if self.tls_dir else "")
            self._early = EarlyRelease(lambda: end_job(self.dom), f"vmkeep-release-{vm}")
            try:
                # a full scratch directory pauses the VM; the proxy can only see a local host's
                with (ScratchWatch(self.dom, self.scratch, self._early, "ended the backup job")
                      if self.connection.is_local else nullcontext()):
                    yield self
            finally:
                self._early.join()
        finally:
            self._clean_up()

    def _begin(self) -> None:
        """Start the job; falls back to full if libvirt refuses the incremental."""
        with quiesced(self.dom, self.quiesce, self.notes) as self.consistency:
            try:
                self._start()
            except libvirt.libvirtError as exc:
                if self.parent_cp is None or out_of_space(exc.get_error_message()):  # a full job would fail alike
                    raise self._cannot_start(exc) from exc
                self.reason = f"libvirt refused the incremental from {self.parent_cp} ({exc.get_error_message()})"
                log.info("%s: full backup instead: %s", self.dom.name(), self.reason)
                delete_checkpoint(self.dom, self.checkpoint)
                self.parent_cp = None
                try:
                    self._start()
                except libvirt.libvirtError as exc2:
                    raise self._cannot_start(exc2) from exc2

    def _start(self) -> None:
        """backupBegin, over TLS when asked; in ``auto`` a host without backup TLS gets plain NBD."""
        try:
            self._backup_begin(tls=self.tls_dir is not None)
        except libvirt.libvirtError as exc:
            why = exc.get_error_message()
            if self.tls_dir is None or not any(w in why.lower() for w in TLS_WORDS):
                raise
            if self.nbd_tls == "require":
                raise HypervisorError(f"--nbd-tls require, but {self.connection.host or 'the host'} cannot encrypt "
                                      f"the backup export ({why}); give its qemu.conf a backup_tls_x509_cert_dir "
                                      "with server certificates, or use --nbd-tls auto") from exc
            log.info("%s: the host refused TLS for the export (%s); plain NBD", self.dom.name(), why)
            self.notes.append(f"nbd transport not encrypted: the host refused TLS ({why}); set "
                              "backup_tls_x509_cert_dir in its qemu.conf")
            self._backup_begin(tls=False)
            self.tls_dir = None

    def _backup_begin(self, *, tls: bool) -> None:
        document = backup_document(self.eligible, self.parent_cp, self.scratch,
                                   socket=self.socket_path if self.transport == "hotadd" else None,
                                   host=self.nbd_host, port=self.port, tls=tls)
        checkpoint = checkpoint_document(self.eligible, self.checkpoint)
        log.debug("backupBegin on %s: %s with %s", self.dom.name(), document, checkpoint)
        self.dom.backupBegin(document, checkpoint, 0)
        log.debug("backupBegin on %s accepted", self.dom.name())

    def _cannot_start(self, exc: libvirt.libvirtError) -> HypervisorError:
        why = exc.get_error_message()
        remedy = explain_full_scratch(why, self.scratch.parent)
        return HypervisorError(f"libvirt cannot start a backup of {self.dom.name()}: {why}"
                               f"{f'; {remedy}' if remedy else ''}")

    def _export(self, s: DiskSpec) -> DiskExport:
        if self.transport == "hotadd":
            # paths percent-encoded: a scratch directory may hold '&', ' ' or '#' (libnbd decodes them)
            uri = unix_uri(self.socket_path, s.target)
        elif self.tls_dir:
            uri = (f"nbds://{self.nbd_host}:{self.port}/{s.target}"
                   f"?tls-certificates={quote(str(self.tls_dir), safe='/')}")
        else:
            uri = f"nbd://{self.nbd_host}:{self.port}/{s.target}"
        dirty = f"qemu:dirty-bitmap:backup-{s.target}" if (self.parent_cp and s.bitmaps) else None
        return DiskExport(s.target, uri, self.capacities[s.target], dirty)

    def _clean_up(self) -> None:
        """End the job unless the early release did, also across a libvirtd restart; remove the scratch."""
        try:
            fresh = self.connection.alive(self.dom)
        except libvirt.libvirtError as exc:
            log.warning("%s: libvirtd did not come back (%s); the backup job is cleaned up next run",
                        self.dom.name(), exc.get_error_message())
            self.notes.append("libvirtd did not come back: the backup job is cleaned up next run")
        else:
            if not (self._early is not None and self._early.succeeded and fresh is self.dom):
                end_job(fresh)
            if fresh is not self.dom:
                end_reattached_job(fresh)
        shutil.rmtree(self.scratch, ignore_errors=True)
