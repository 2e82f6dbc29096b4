"""A shut-off VM's disks written in place at offsets and read back (the ``DiskPatch``es of a
replica being updated, or of an original receiving a failback).

On this machine a raw image is a file (pwrite, holes punched, holes skipped by SEEK_DATA) and any
other format goes through qemu-nbd. On another host only raw volumes can be patched: libvirt's
volume upload takes an offset and writes the bytes as they come, into the file itself (a qcow2
would be corrupted), and its download sends holes as holes. A hole in an upload stream is no
use here: libvirt truncates the file where it ends, so zeros travel as zeros (rare: a slot the
guest trimmed).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePosixPath

import libvirt

from vmkeep.hypervisors.base import DiskPatch, HypervisorError
from vmkeep.hypervisors.libvirt import pools
from vmkeep.hypervisors.libvirt.domain_xml import disk_specs
from vmkeep.hypervisors.libvirt.upload import SEND_PIECE, VolumeUpload, pool_for
from vmkeep.transport.nbd_client import NbdExport
from vmkeep.transport.qemu_nbd import UNLIMITED, probe_image, serve_image

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
ZERO_PIECE = bytes(SEND_PIECE)


def write_zeros(disk: DiskPatch, offset: int, length: int) -> None:
    """Zeros written as data, a piece at a time (where no hole can be made)."""
    for at in range(offset, offset + length, SEND_PIECE):
        disk.write(ZERO_PIECE[:min(SEND_PIECE, offset + length - at)], at)


class FileDisk:
    """A raw image file on this machine."""

    sequential = False

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def write(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, offset: int, length: int) -> None:
        """Punch the range out (it reads as zeros and takes no space); write zeros where the
        filesystem cannot punch."""
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self.fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) == 0:
            return
        log.debug("punching a hole failed (%s): writing zeros", os.strerror(ctypes.get_errno()))
        write_zeros(self, offset, length)

    def scan(self, slot_size: int) -> Iterator[tuple[int, bytes | None]]:
        for offset in range(0, self.size, slot_size):
            length = min(slot_size, self.size - offset)
            try:
                data_at = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data_at = self.size  # nothing but hole from here on
            yield offset, None if data_at >= offset + length else os.pread(self.fd, length, offset)


class NbdDisk:
    """An image of any format on this machine, through qemu-nbd (QEMU's own block layer, so a
    qcow2's persistent dirty bitmaps see the writes: the next incremental backup has them)."""

    sequential = False

    def __init__(self, export: NbdExport) -> None:
        self.export = export
        self.size = export.size

    def write(self, data: bytes, offset: int) -> None:
        self.export.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        write_zeros(self, offset, length)

    def scan(self, slot_size: int) -> Iterator[tuple[int, bytes | None]]:
        for offset in range(0, self.size, slot_size):
            yield offset, self.export.pread(min(slot_size, self.size - offset), offset)


class VolumeDisk:
    """A raw storage volume on another host: written through upload streams starting at an offset
    (one stream per run of consecutive writes), read through a sparse download."""

    sequential = True

    def __init__(self, conn: libvirt.virConnect, volume: libvirt.virStorageVol, size: int) -> None:
        self.conn = conn
        self.volume = volume
        self.size = size
        self.stream: libvirt.virStream | None = None
        self.at = -1  # where the open stream writes next

    def write(self, data: bytes, offset: int) -> None:
        if self.stream is None or offset != self.at:
            self.finish()
            log.debug("uploading into %s from offset %d", self.volume.path(), offset)
            self.stream = self.conn.newStream(0)
            self.volume.upload(self.stream, offset, 0, 0)  # length 0: up to the end, nothing after touched
            self.at = offset
        VolumeUpload(self.stream).write(data, offset)
        self.at += len(data)

    def zero(self, offset: int, length: int) -> None:
        write_zeros(self, offset, length)

    def finish(self) -> None:
        """End the open upload (its data is in the file once this returns)."""
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.finish()

    def abort(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.abort()
            except libvirt.libvirtError as exc:
                log.warning("aborting the upload into %s: %s", self.volume.path(), exc.get_error_message())

    def scan(self, slot_size: int) -> Iterator[tuple[int, bytes | None]]:
        """The volume downloaded sparsely: holes arrive as lengths, not bytes."""
        stream = self.conn.newStream(0)
        self.volume.download(stream, 0, self.size, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)
        slot, filled, has_data = bytearray(min(slot_size, self.size)), 0, False
        offset = 0
        try:
            while offset < self.size:
                got = stream.recvFlags(slot_size, libvirt.VIR_STREAM_RECV_STOP_AT_HOLE)
                if isinstance(got, int):  # at a hole (-3): its length next
                    hole, data = stream.recvHole(0), None
                elif not got:
                    raise HypervisorError(f"the download of {self.volume.path()} ended at {offset + filled} of "
                                          f"{self.size} bytes")
                else:
                    hole, data = len(got), got
                at = 0
                while at < hole:
                    take = min(hole - at, len(slot) - filled)
                    if data is not None:  # a hole needs nothing: each slot's buffer starts as zeros
                        slot[filled:filled + take] = data[at:at + take]
                        has_data = True
                    at, filled = at + take, filled + take
                    if filled == len(slot):
                        yield offset, bytes(slot) if has_data else None
                        offset += filled
                        slot, filled, has_data = bytearray(min(slot_size, self.size - offset)), 0, False
            stream.finish()
        except BaseException:
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
            raise


@contextmanager
def open_disks(conn: libvirt.virConnect, host: str, is_local: bool, vm: str, names: Collection[str], *,
               writable_only: bool = False) -> Iterator[dict[str, DiskPatch]]:
    """Disks ``names`` of shut-off VM ``vm`` to patch in place, and no other (a shared or
    passthrough disk of the VM is never opened); refuses a running VM or a name it lacks. A
    read-only disk is opened too (a replica's copy of one is written by vmkeep, not by its guest),
    unless ``writable_only``."""
    try:
        dom = conn.lookupByName(vm)
        if dom.isActive():
            raise HypervisorError(f"VM {vm} on {host} is running: shut it down first (virsh shutdown {vm}); its "
                                  "disks are written in place only while it is off")
        specs = {s.target: s for s in disk_specs(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))}
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot look at VM {vm} on {host}: {exc.get_error_message()}") from exc
    lacking = [name for name in names if name not in specs or not specs[name].source]
    if lacking:
        raise HypervisorError(f"VM {vm} on {host} has no disk {', '.join(sorted(lacking))} with an image (it has "
                              f"{', '.join(sorted(t for t, s in specs.items() if s.source)) or 'none'}): it is not the "
                              "VM the replica came from, or its disks changed; see virsh dumpxml " + vm)
    chosen = [specs[name] for name in names if not (writable_only and specs[name].readonly)]
    with ExitStack() as stack:
        opened: dict[str, DiskPatch] = {}
        for spec in chosen:
            if is_local:
                opened[spec.target] = stack.enter_context(_local_disk(Path(spec.source), spec.format))
            elif spec.format != "raw":
                raise HypervisorError(f"disk {spec.target} of {vm} is {spec.format}: on another host only raw disks "
                                      f"are written in place; run this on {host} (a proxy there)")
            else:
                opened[spec.target] = stack.enter_context(_volume_disk(conn, PurePosixPath(spec.source)))
        yield opened


@contextmanager
def _local_disk(path: Path, fmt: str) -> Iterator[DiskPatch]:
    if fmt == "raw":
        fd = os.open(path, os.O_RDWR)
        try:
            yield FileDisk(fd, os.fstat(fd).st_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    with serve_image(probe_image(path, fmt), readonly=False, connections=UNLIMITED) as uri:
        export = NbdExport(uri)
        try:
            yield NbdDisk(export)
            export.flush()
        finally:
            export.close()


@contextmanager
def _volume_disk(conn: libvirt.virConnect, path: PurePosixPath) -> Iterator[DiskPatch]:
    """A disk file of another host as a volume of the pool over its directory (a transient pool
    there while it is written, where the host has none)."""
    with pool_for(conn, path.parent, pools.covering(conn, path.parent)) as pool:
        try:
            volume = pool.storageVolLookupByName(path.name)
            size = volume.info()[1]
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot find {path} as a storage volume on {conn.getHostname()}: "
                                  f"{exc.get_error_message()}") from exc
        disk = VolumeDisk(conn, volume, size)
        try:
            yield disk
            disk.finish()
        except libvirt.libvirtError as exc:
            disk.abort()
            raise HypervisorError(f"reading or writing {path} on {conn.getHostname()} failed: "
                                  f"{exc.get_error_message()}") from exc
        except BaseException:
            disk.abort()
            raise


def disk_stamps(conn: libvirt.virConnect, is_local: bool, paths: Mapping[str, str]) -> dict[str, str]:
    """Each disk file's ``size:mtime_ns:ctime_ns`` now: any write to it (or a VM started on it,
    whose disks libvirt relabels) changes them. Another host's come from the volume's
    ``<timestamps>`` (libvirt stats the file for them), in the same form as a local stat's."""
    stamps: dict[str, str] = {}
    for disk, source in paths.items():
        if is_local:
            try:
                st = os.stat(source)
            except OSError as exc:  # gone or unreadable: not as left (opening it says why)
                stamps[disk] = f"unknown ({exc.strerror})"
                continue
            stamps[disk] = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
            continue
        path = PurePosixPath(source)
        with pool_for(conn, path.parent, pools.covering(conn, path.parent)) as pool:
            try:
                xml = pool.storageVolLookupByName(path.name).XMLDesc(0)
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"cannot look at {path} on {conn.getHostname()}: "
                                      f"{exc.get_error_message()}") from exc
        stamps[disk] = volume_stamp(xml)
    log.debug("replica disk stamps: %s", stamps)
    return stamps


def volume_stamp(xml: str) -> str:
    """``size:mtime_ns:ctime_ns`` of a volume's XML (libvirt writes ``SECONDS[.NANOSECONDS]``)."""
    root = ET.fromstring(xml)

    def ns(which: str) -> int:
        text = root.findtext(f"./target/timestamps/{which}") or "0"
        seconds, _, fraction = text.strip().partition(".")
        return int(seconds) * 10**9 + int(fraction.ljust(9, "0")[:9] or 0)

    return f"{root.findtext('capacity', '0').strip()}:{ns('mtime')}:{ns('ctime')}"
