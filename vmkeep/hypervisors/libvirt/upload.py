"""Restored disks sent to a libvirt host this proxy does not run on: each disk is uploaded into a
storage volume over libvirt's own connection (a sparse stream: the zero runs travel as holes,
not as bytes), then converted on the host into the qcow2 volume the VM runs from.

The volumes live in a storage pool whose directory is the restore's storage; where the host has
no pool there, a transient one is made for the restore and removed after (its files stay).
"""

from __future__ import annotations

import hashlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath

import libvirt

from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.libvirt.pools import refresh

log = logging.getLogger(__name__)

SEND_PIECE = 256 << 10  # the largest payload of one libvirt stream message
UPLOADING_SUFFIX = ".vmkeep-upload"
TRANSIENT_PREFIX = "vmkeep-restore-"  # pools a restore makes over a directory the host has none for


@contextmanager
def pool_for(conn: libvirt.virConnect, directory: PurePosixPath,
             pool: libvirt.virStoragePool | None = None) -> Iterator[libvirt.virStoragePool]:
    """An active storage pool of the host over ``directory``: ``pool`` (the host's own), or a
    transient one (the directory made) that goes again when the restore ends."""
    if pool is not None and not pool.name().startswith(TRANSIENT_PREFIX):
        refresh(pool)
        log.debug("restoring into the host's storage pool %s (%s)", pool.name(), directory)
        yield pool
        return
    if pool is not None:  # one a restore that died left: this restore's to remove now
        _destroy(pool)
    root = ET.Element("pool", type="dir")
    # named after the directory: an attempt that died and its retry meet the same pool
    ET.SubElement(root, "name").text = TRANSIENT_PREFIX + hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    ET.SubElement(ET.SubElement(root, "target"), "path").text = str(directory)
    try:
        made = conn.storagePoolCreateXML(ET.tostring(root, encoding="unicode"),
                                         libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot use {directory} on {conn.getHostname()} for the restored disks: "
                              f"{exc.get_error_message()}; give --storage a directory the host can write") from exc
    log.debug("made the transient storage pool %s over %s", made.name(), directory)
    try:
        yield made
    finally:
        _destroy(made)


def _destroy(pool: libvirt.virStoragePool) -> None:
    """End a transient pool (its files stay)."""
    try:
        pool.destroy()
    except libvirt.libvirtError as exc:
        log.warning("the transient storage pool %s stays on the host: %s", pool.name(), exc.get_error_message())


def _volume_xml(name: str, size: int, fmt: str) -> str:
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity", unit="bytes").text = str(size)
    ET.SubElement(root, "allocation", unit="bytes").text = "0"
    ET.SubElement(ET.SubElement(root, "target"), "format", type=fmt)
    return ET.tostring(root, encoding="unicode")


class VolumeUpload:
    """A sequential disk writer: data and holes in offset order into an open upload stream."""

    sequential = True

    def __init__(self, stream: libvirt.virStream) -> None:
        self.stream = stream

    def encode(self, data: bytes, offset: int) -> bytes:
        return data

    def write(self, encoded: bytes, offset: int) -> None:
        view = memoryview(encoded)
        for at in range(0, len(view), SEND_PIECE):
            piece = view[at:at + SEND_PIECE]
            while piece:
                sent = self.stream.send(bytes(piece))
                if sent < 0:
                    raise OSError(f"libvirt refused the upload stream ({sent})")
                piece = piece[sent:]

    def zero(self, offset: int, length: int) -> None:
        self.stream.sendHole(length, 0)


def _delete(volume: libvirt.virStorageVol) -> None:
    try:
        volume.delete(0)
    except libvirt.libvirtError as exc:
        log.warning("cannot remove the volume %s: %s", volume.path(), exc.get_error_message())


@contextmanager
def upload_disk(conn: libvirt.virConnect, pool: libvirt.virStoragePool, name: str, size: int,
                fmt: str) -> Iterator[VolumeUpload]:
    """Volume ``name`` (``fmt``, ``size`` bytes) written through the yielded writer. A format
    other than raw is uploaded into a raw volume beside it first, which the host converts
    (qemu-img) and then removes. On failure nothing stays."""
    staged = name if fmt == "raw" else name + UPLOADING_SUFFIX
    try:
        raw = pool.createXML(_volume_xml(staged, size, "raw"), 0)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot create the volume {staged} on {conn.getHostname()}: "
                              f"{exc.get_error_message()}") from exc
    done = False
    try:
        stream = conn.newStream(0)
        raw.upload(stream, 0, size, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
        log.debug("uploading %d bytes into %s", size, raw.path())
        try:
            yield VolumeUpload(stream)
            stream.finish()
        except BaseException:
            try:
                stream.abort()
            except libvirt.libvirtError as exc:
                log.warning("aborting the upload into %s: %s", raw.path(), exc.get_error_message())
            raise
        if fmt != "raw":
            log.debug("the host converts %s into %s (%s)", raw.path(), name, fmt)
            pool.createXMLFrom(_volume_xml(name, size, fmt), raw, 0)
        done = True
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"uploading {name} to {conn.getHostname()} failed: {exc.get_error_message()}") from exc
    finally:
        if staged != name or not done:
            _delete(raw)
