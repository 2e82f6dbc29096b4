"""The host's storage pools, as a restore picks where disks go: a pool named by the user, the pool
a path lies in, or the one the original VM's disks were in. Disks in a pool are libvirt's to
manage (``virsh vol-list``, ``virsh undefine --remove-all-storage``)."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import PurePosixPath

import libvirt

log = logging.getLogger(__name__)


def pool_path(pool: libvirt.virStoragePool) -> PurePosixPath | None:
    """The directory a file-based pool keeps its volumes in (None for other kinds)."""
    target = ET.fromstring(pool.XMLDesc(0)).find("./target/path")
    return PurePosixPath(target.text) if target is not None and target.text else None


def named(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool | None:
    """The active pool ``name`` with a directory, or None."""
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            log.warning("cannot look up storage pool %s (%s): taken as absent", name, exc.get_error_message())
        return None
    return pool if pool.isActive() and pool_path(pool) is not None else None


def covering(conn: libvirt.virConnect, directory: PurePosixPath) -> libvirt.virStoragePool | None:
    """The active pool whose directory is ``directory``, or None."""
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        if pool_path(pool) == directory:
            return pool
    return None


def holding(conn: libvirt.virConnect, path: str) -> libvirt.virStoragePool | None:
    """The active pool ``path`` is a volume of (after a refresh of the pool over its directory)."""
    pool = covering(conn, PurePosixPath(path).parent)
    if pool is None:
        return None
    refresh(pool)
    try:
        pool.storageVolLookupByName(PurePosixPath(path).name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
            log.warning("cannot look up %s in pool %s (%s): taken as outside it", path, pool.name(),
                        exc.get_error_message())
        return None
    return pool


def refresh(pool: libvirt.virStoragePool) -> None:
    """Have libvirt list the volumes written into the pool's directory behind its back."""
    try:
        pool.refresh(0)
    except libvirt.libvirtError as exc:
        log.warning("refreshing the storage pool %s: %s", pool.name(), exc.get_error_message())
