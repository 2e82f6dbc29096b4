"""vSphere's NFC import: a new VM and its disks in one lease, each disk sent as one streamOptimized
VMDK straight from the restore (no copy on the proxy, holes never sent).

``ResourcePool.ImportVApp`` creates the VM from a ConfigSpec and hands back an ``HttpNfcLease``;
once the lease is ``ready`` its ``info.deviceUrl`` says where each disk goes. The lease is kept
alive with ``HttpNfcLeaseProgress`` while the disks upload (vSphere drops a lease that stays
silent for its timeout), then ``HttpNfcLeaseComplete`` hands the VM over; every other way out
calls ``HttpNfcLeaseAbort`` and the caller removes the VM.

Which URL is which disk: the entries with ``disk=True`` come in the order of the new VM's
virtual disks (vcsim names them ``/VMNAME/VirtualDisk:N`` in ``importKey``, vSphere by
controller and unit, both in device order), so the i-th disk entry is the i-th disk of
``config.hardware.device``. The host part of a URL is ``*`` when it is the server the client
talks to; it is replaced by the address of the session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyVmomi import vim, vmodl

from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.vmware import devices
from vmkeep.hypervisors.vmware.datastore import StreamUpload
from vmkeep.hypervisors.vmware.session import Session
from vmkeep.hypervisors.vmware.stream_vmdk import Encoded, StreamVmdk

log = logging.getLogger(__name__)

STREAM_VMDK = "application/x-vnd.vmware-streamVmdk"
PROGRESS_EVERY = 20.0  # seconds between HttpNfcLeaseProgress calls; vSphere's lease timeout is 300 s
READY_TIMEOUT = 600.0


class NfcWriter:
    """A disk going out as a streamOptimized VMDK: workers compress (``encode``), the writing
    thread appends to the stream; zeros are simply not sent."""

    sequential = True

    def __init__(self, stream: StreamVmdk, upload: StreamUpload) -> None:
        self.stream = stream
        self.upload = upload
        self.reached = 0  # bytes of the disk the stream has passed

    def encode(self, data: bytes, offset: int) -> Encoded:
        return self.stream.encode(data, offset)

    def write(self, encoded: Encoded, offset: int) -> None:
        self.upload.send(self.stream.append(encoded))
        self.reached = offset + encoded.length

    def zero(self, offset: int, length: int) -> None:
        """A missing grain reads as zeros: nothing to send."""
        self.reached = offset + length


class ImportLease:
    """One ``ImportVApp`` lease: the VM it makes and the upload of its disks."""

    def __init__(self, session: Session, lease: Any, name: str) -> None:
        self.session = session
        self.lease = lease
        self.name = name
        self.vm: Any = None
        self.urls: list[str] = []  # the disks' upload URLs, in device order
        self._writers: list[tuple[NfcWriter, int]] = []
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    @classmethod
    def begin(cls, session: Session, pool: Any, spec: Any, folder: Any, host: Any) -> ImportLease:
        """Ask for the import of a VM made from ``spec`` (a ConfigSpec)."""
        log.info("ImportVApp of VM %s into pool %s, folder %s, host %s", spec.name, pool, folder, host)
        try:
            lease = pool.ImportVApp(spec=vim.vm.VmImportSpec(configSpec=spec), folder=folder, host=host)
        except vmodl.MethodFault as exc:
            raise HypervisorError(f"vSphere refused to import VM {spec.name} on {session.target.host}: "
                                  f"{getattr(exc, 'msg', None) or type(exc).__name__}") from exc
        log.info("ImportVApp of %s gave lease %s", spec.name, lease._moId)
        return cls(session, lease, spec.name)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for the lease to be ``ready`` (or fail with its error); then the VM and the
        disks' URLs are known, and the lease is kept alive until it ends."""
        deadline, delay = time.monotonic() + timeout, 0.05
        while True:
            props = self.session.one(self.lease, ["state", "error", "info"])
            state = props.get("state")
            if props.get("info") is not None:
                self.vm = props["info"].entity
            if state == vim.HttpNfcLease.State.ready:
                break
            if state == vim.HttpNfcLease.State.error:
                fault = props.get("error")
                message = getattr(fault, "localizedMessage", None) or str(fault)
                raise HypervisorError(f"vSphere could not prepare the import of {self.name}: {message}")
            if time.monotonic() > deadline:
                raise HypervisorError(f"the import lease of {self.name} was not ready within {timeout:.0f} s "
                                      f"(it is {state})")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        info = props["info"]
        found = [d for d in info.deviceUrl or [] if d.disk]
        log.info("lease %s of %s is ready: VM %s, disks %s", self.lease._moId, self.name, self.vm._moId,
                 [(d.importKey, d.url) for d in found])
        self.urls = [self._address(d.url) for d in found]
        self._keeper = threading.Thread(target=self._keep_alive, name="vmkeep-nfc-lease", daemon=True)
        self._keeper.start()

    def _address(self, url: str) -> str:
        """``https://*/nfc/…`` → the address of the server this session talks to."""
        target = self.session.target
        scheme, rest = url.split("://", 1)
        host, _, path = rest.partition("/")
        if host == "*":
            host = f"{target.host}:{target.port}"
            scheme = "http" if target.http else "https"
        return f"{scheme}://{host}/{path}"

    def url_of(self, disk: devices.Disk, made: list[devices.Disk]) -> str:
        """The upload URL of ``disk``, one of the new VM's disks ``made`` (in device order)."""
        index = [d.key for d in made].index(disk.key)
        if index >= len(self.urls):
            raise HypervisorError(f"the import lease of {self.name} has no upload URL for disk {disk.name} "
                                  f"({len(self.urls)} disk URLs for {len(made)} disks)")
        return self.urls[index]

    @contextmanager
    def upload(self, disk: devices.Disk, url: str) -> Iterator[NfcWriter]:
        """The writer of one disk; leaving the context ends its stream and checks the answer."""
        stream = StreamVmdk(disk.capacity, name=devices.split_datastore_path(disk.file)[1].rsplit("/", 1)[-1])
        upload = StreamUpload(self.session, "POST", url, what=f"the upload of disk {disk.name} of {self.name}",
                              content_type=STREAM_VMDK)
        writer = NfcWriter(stream, upload)
        entry = (writer, disk.capacity)
        self._writers.append(entry)
        try:
            upload.send(stream.header())
            yield writer
            upload.send(stream.trailer())
            upload.finish()
            writer.reached = disk.capacity
            log.info("disk %s of %s imported: %d bytes sent for %d", disk.name, self.name, upload.sent,
                     disk.capacity)
        except BaseException:
            upload.abort()
            raise

    def _percent(self) -> int:
        total = sum(size for _w, size in self._writers) or 1
        return min(99, int(100 * sum(min(w.reached, size) for w, size in self._writers) / total))

    def _keep_alive(self) -> None:
        while not self._stop.wait(PROGRESS_EVERY):
            try:
                self.lease.HttpNfcLeaseProgress(percent=self._percent())
            except Exception as exc:  # noqa: BLE001 - the upload itself reports a dead lease
                log.warning("HttpNfcLeaseProgress on the lease of %s failed: %s", self.name, exc)

    def _stop_keeping(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=60)

    def complete(self) -> None:
        """Every disk is uploaded: the VM is vSphere's now."""
        self._stop_keeping()
        log.info("HttpNfcLeaseComplete on %s (VM %s)", self.lease._moId, self.name)
        try:
            self.lease.HttpNfcLeaseComplete()
        except vmodl.MethodFault as exc:
            raise HypervisorError(f"vSphere did not accept the import of {self.name}: "
                                  f"{getattr(exc, 'msg', None) or type(exc).__name__}") from exc

    def abort(self, why: str) -> None:
        """Give the lease up (vSphere drops what it imported); never raises."""
        self._stop_keeping()
        log.info("HttpNfcLeaseAbort on %s (VM %s): %s", self.lease._moId, self.name, why)
        try:
            self.lease.HttpNfcLeaseAbort(fault=vmodl.fault.SystemError(reason=why[:500]))
        except Exception as exc:  # noqa: BLE001 - a lease that ended already (timeout, error) is fine
            log.info("HttpNfcLeaseAbort on %s: %s", self.lease._moId, exc)
