"""A VM restored onto libvirt: each disk written as a new qcow2 image where the VM will run from,
then the saved domain defined with them (as a new VM, or over the shut-off original).

A new VM's images go to ``--storage`` or the images directory; over the original, each image is
written beside the one it replaces and swapped in only when every disk is complete, so a restore
that fails leaves the original as it was. Whatever a failed restore wrote is removed.

On this machine the images are written directly (qemu-nbd); on a host the proxy does not run on,
they are uploaded through libvirt as storage volumes (upload.py), holes sent as holes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath, PurePosixPath
from typing import TYPE_CHECKING, Any

import libvirt

from vmkeep.errors import UsageError
from vmkeep.hypervisors.base import DISCONNECTED, HypervisorError
from vmkeep.hypervisors.libvirt import pools
from vmkeep.hypervisors.libvirt.upload import UPLOADING_SUFFIX, pool_for, upload_disk
from vmkeep.transport.targets import DiskWriter, open_file_writer

if TYPE_CHECKING:
    from vmkeep.hypervisors.libvirt.connector import LibvirtConnector

log = logging.getLogger(__name__)

IMAGES = Path("/var/lib/libvirt/images")
FORMAT = "qcow2"
STAGED_SUFFIX = ".vmkeep-restore"


def check_config(config: dict[str, Any], place: dict[str, str] | None) -> None:
    """Refuse a point of another hypervisor, or choices libvirt does not have (a libvirt
    hypervisor is one host, without VM folders: only ``network`` is a choice)."""
    other = sorted(k for k, v in (place or {}).items() if v and k != "network")
    if other:
        raise HypervisorError(f"{', '.join(other)}: vSphere placement choices; a libvirt restore takes --storage "
                              "and --network (each libvirt host is a hypervisor of its own: restore onto that one)")
    if config.get("kind", "libvirt") != "libvirt" or not config.get("domain_xml"):
        raise HypervisorError(f"this point is of a {config.get('kind', 'foreign')} VM: restore it onto that "
                              "kind of hypervisor, or its disks with --disk")


class LibvirtRestore:
    """One VM being restored (the connector's ``VMRestore``): disks to ``paths``, then defined.
    ``pool``: the host's storage pool the disks are uploaded into, when it is not this machine."""

    def __init__(self, connector: LibvirtConnector, config: dict[str, Any], name: str,
                 paths: dict[str, PurePath], *, as_new: bool, storage: str | None,
                 pool: libvirt.virStoragePool | None = None, place: dict[str, str] | None = None) -> None:
        self.connector = connector
        self.config = config
        self.name = name
        self.as_new = as_new
        self.storage = storage
        self.paths = paths  # where each disk lives once the VM is defined
        self.pool = pool
        self.place = place  # the network chosen for a new VM's interfaces (checked already)
        self.undo: list[Callable[[], None]] = []  # removes what was written and not handed over

    def staged(self, disk: str) -> Path:
        """Where a disk is written here: its final place for a new VM, beside the original's otherwise."""
        final = Path(self.paths[disk])
        return final if self.as_new else final.with_name(final.name + STAGED_SUFFIX)

    @contextmanager
    def disk(self, name: str, size: int) -> Iterator[DiskWriter]:
        if name not in self.paths:
            raise HypervisorError(f"disk {name} is not one of this restore's ({', '.join(self.paths)})")
        if self.pool is not None:
            volume = self.paths[name].name
            with upload_disk(self.connector.conn, self.pool, volume, size, FORMAT) as upload:
                yield upload
            self.undo.append(lambda: _delete_volume(self.pool, volume))
            return
        path = self.staged(name)
        if not self.as_new:
            path.unlink(missing_ok=True)  # a staged copy an interrupted restore left
        log.debug("writing disk %s of %s into %s", name, self.name, path)
        with open_file_writer(path, FORMAT, size) as writer:
            self.undo.append(lambda: path.unlink(missing_ok=True))
            yield writer

    def finish(self, *, start: bool) -> dict[str, str]:
        disk_paths = {d: str(p) for d, p in self.paths.items()}
        if not self.as_new:
            self.connector.forget_checkpoints(self.name)  # their bitmaps lived in the images being replaced
            for disk, final in self.paths.items():
                os.replace(self.staged(disk), final)
            self.undo.clear()
        placed = self.connector.define_restored(self.config, name=self.name, disk_paths=disk_paths,
                                                storage=self.storage, as_new=self.as_new, start=False,
                                                place=self.place)
        self.undo.clear()  # handed over: the VM is defined with these disks
        if start:
            self.connector.start_restored(self.name)
        log.info("restored %s on %s with disks %s", self.name, self.connector.uri, ", ".join(placed.values()))
        return placed

    def discard(self) -> None:
        """Remove what this restore wrote and did not hand over."""
        for undo in reversed(self.undo):
            undo()
        self.undo.clear()


def network_names(conn: libvirt.virConnect) -> list[str]:
    """The host's libvirt networks, sorted: active or not (one that is not active must be started
    before the new VM starts, which libvirt then refuses with that reason)."""
    return sorted(n.name() for n in conn.listAllNetworks())


def check_network(connector: LibvirtConnector, place: dict[str, str] | None) -> str | None:
    """The network every interface of the new VM goes on (``DISCONNECTED``: none), refused before
    anything is written when the host has no such network; None: the original's interfaces."""
    network = (place or {}).get("network") or None
    if network is None or network == DISCONNECTED:
        return network
    try:
        known = network_names(connector.conn)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot list the networks of {connector.host}: {exc.get_error_message()}") from exc
    log.debug("networks of %s: %s", connector.host, known)
    if network not in known:
        raise UsageError(f"no libvirt network {network!r} on {connector.host} (there are: {', '.join(known) or 'none'}"
                         f"; or {DISCONNECTED!r} for a VM without network interfaces)")
    return network


def _delete_volume(pool: libvirt.virStoragePool | None, name: str) -> None:
    if pool is None:
        return
    try:
        pool.storageVolLookupByName(name).delete(0)
    except libvirt.libvirtError as exc:
        log.warning("cannot remove the volume %s a failed restore uploaded: %s", name, exc.get_error_message())


def _volume_exists(pool: libvirt.virStoragePool, name: str) -> bool:
    try:
        pool.storageVolLookupByName(name)
        return True
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
            log.warning("cannot look up volume %s (%s): taken as absent", name, exc.get_error_message())
        return False


@contextmanager
def restore_vm(connector: LibvirtConnector, config: dict[str, Any], *, name: str, disks: dict[str, int],
               as_new: bool, storage: str | None, place: dict[str, str] | None,
               retry: bool) -> Iterator[LibvirtRestore]:
    """The restore session; see ``Connector.restore_vm``."""
    check_config(config, place)
    if not as_new and (place or {}).get("network"):
        raise UsageError("a restore over the original keeps its network: --network is for a new VM (--as)")
    check_network(connector, place)
    if not connector.is_local:
        if not as_new:
            raise HypervisorError(f"a restore over the original VM on {connector.host} runs on that host (a proxy "
                                  "there): its disks are swapped in place; or restore --as NEW from here")
        if config.get("nvram"):
            raise HypervisorError(f"{name} has UEFI variables, which are written beside its disks on the host: run "
                                  f"this restore on {connector.host} (a proxy there)")
        with _remote_restore(connector, config, name, disks, storage, retry, place) as session:
            yield session
        return
    pool = None
    if as_new:
        placed_in, pool = placement(connector, config, name, storage)
        directory = Path(placed_in)
        paths = new_disk_paths(directory, name, disks)
        if retry:
            connector.remove_restored(name, [str(p) for p in paths.values()])
            for p in paths.values():
                Path(p).unlink(missing_ok=True)
        _refuse_taken(connector, name, [str(p) for p in paths.values() if Path(p).exists()])
    else:
        connector.require_shut_off(name)
        sources = config.get("disks", {})
        paths = {disk: PurePath(sources.get(disk, {}).get("source") or IMAGES / f"{name}-{disk}.{FORMAT}")
                 for disk in disks}
        directory = Path(next(iter(paths.values())).parent) if paths else IMAGES
    made_directory = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    session = LibvirtRestore(connector, config, name, paths, as_new=as_new, storage=storage, place=place)
    try:
        yield session
    finally:
        session.discard()
        if made_directory and directory.exists() and not any(directory.iterdir()):
            directory.rmdir()
        if pool is not None:
            pools.refresh(pool)  # libvirt lists the new volumes (or forgets the removed ones)


def placement(connector: LibvirtConnector, config: dict[str, Any], name: str,
              storage: str | None) -> tuple[PurePosixPath, libvirt.virStoragePool | None]:
    """Where a new VM's disks go, and the host's storage pool there (None: plain files):
    ``storage`` naming a pool (no ``/``) or a directory; else the pool the original's disks were
    in, so libvirt manages the copy's disks as it did the original's; else a directory of its own
    under the images directory."""
    conn = connector.conn
    if storage and "/" not in storage:
        pool = pools.named(conn, storage)
        if pool is None:
            have = ", ".join(sorted(p.name() for p in conn.listAllStoragePools(
                libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE))) or "none"
            raise UsageError(f"no active storage pool {storage!r} with a directory on {connector.host} (active "
                             f"pools: {have}): give --storage a pool's name or a directory")
        directory = pools.pool_path(pool)
        assert directory is not None  # named() returns pools with a directory only
        return directory, pool
    if storage:
        return PurePosixPath(storage), pools.covering(conn, PurePosixPath(storage))
    for disk in (config.get("disks") or {}).values():
        source = disk.get("source") if isinstance(disk, dict) else None
        pool = pools.holding(conn, source) if source else None
        if pool is not None:
            log.info("restoring %s into storage pool %s, where the original's disks are", name, pool.name())
            return pools.pool_path(pool) or PurePosixPath(IMAGES), pool
    directory = PurePosixPath(IMAGES) / name
    return directory, pools.covering(conn, directory)


def new_disk_paths(directory: PurePath, name: str, disks: dict[str, int]) -> dict[str, PurePath]:
    return {disk: directory / f"{name}-{disk}.{FORMAT}" for disk in disks}


def _refuse_taken(connector: LibvirtConnector, name: str, taken: list[str]) -> None:
    if connector.exists(name):
        raise UsageError(f"a VM named {name!r} already exists on {connector.uri}; choose another --as name")
    if taken:
        raise UsageError(f"restored disks would overwrite {', '.join(taken)}; choose another --storage")


@contextmanager
def _remote_restore(connector: LibvirtConnector, config: dict[str, Any], name: str, disks: dict[str, int],
                    storage: str | None, retry: bool, place: dict[str, str] | None) -> Iterator[LibvirtRestore]:
    """A new VM on a host this proxy does not run on: its disks uploaded into a storage pool there."""
    directory, chosen = placement(connector, config, name, storage)
    paths = new_disk_paths(directory, name, disks)
    with pool_for(connector.conn, directory, chosen) as pool:
        if retry:  # what the attempt that died left: its VM, its volumes, a half-sent upload
            connector.remove_restored(name, [str(p) for p in paths.values()])
            for p in paths.values():
                for volume in (p.name, p.name + UPLOADING_SUFFIX):
                    if _volume_exists(pool, volume):
                        _delete_volume(pool, volume)
        _refuse_taken(connector, name, [str(p) for p in paths.values() if _volume_exists(pool, p.name)])
        session = LibvirtRestore(connector, config, name, paths, as_new=True, storage=storage, pool=pool,
                                 place=place)
        try:
            yield session
        finally:
            session.discard()
