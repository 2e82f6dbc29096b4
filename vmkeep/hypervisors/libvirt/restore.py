"""A VM restored onto libvirt: each disk written as a new qcow2 image where the VM will run from,
then the saved domain defined with them (as a new VM, or over the shut-off original).

A new VM's images go to ``--storage`` or the images directory; over the original, each image is
written beside the one it replaces and swapped in only when every disk is complete, so a restore
that fails leaves the original as it was. Whatever a failed restore wrote is removed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkeep.errors import UsageError
from vmkeep.hypervisors.base import HypervisorError
from vmkeep.transport.targets import DiskWriter, open_file_writer

if TYPE_CHECKING:
    from vmkeep.hypervisors.libvirt.connector import LibvirtConnector

log = logging.getLogger(__name__)

IMAGES = Path("/var/lib/libvirt/images")
FORMAT = "qcow2"
STAGED_SUFFIX = ".vmkeep-restore"
WRITER_CONNECTIONS = 8  # qemu-nbd connections per image: one per restore worker and then some


def check_config(config: dict[str, Any], place: dict[str, str] | None) -> None:
    """Refuse a point of another hypervisor, or choices libvirt does not have."""
    if place:
        raise HypervisorError(f"{', '.join(place)}: vSphere placement choices; a libvirt restore takes --storage")
    if config.get("kind", "libvirt") != "libvirt" or not config.get("domain_xml"):
        raise HypervisorError(f"this point is of a {config.get('kind', 'foreign')} VM: restore it onto that "
                              "kind of hypervisor, or its disks with --disk")


class LibvirtRestore:
    """One VM being restored (the connector's ``VMRestore``): disks to ``paths``, then defined."""

    def __init__(self, connector: LibvirtConnector, config: dict[str, Any], name: str, paths: dict[str, Path],
                 *, as_new: bool, storage: str | None) -> None:
        self.connector = connector
        self.config = config
        self.name = name
        self.as_new = as_new
        self.storage = storage
        self.paths = paths  # where each disk lives once the VM is defined
        self.written: list[Path] = []

    def staged(self, disk: str) -> Path:
        """Where a disk is written: its final place for a new VM, beside the original's otherwise."""
        final = self.paths[disk]
        return final if self.as_new else final.with_name(final.name + STAGED_SUFFIX)

    @contextmanager
    def disk(self, name: str, size: int) -> Iterator[DiskWriter]:
        if name not in self.paths:
            raise HypervisorError(f"disk {name} is not one of this restore's ({', '.join(self.paths)})")
        path = self.staged(name)
        if not self.as_new:
            path.unlink(missing_ok=True)  # a staged copy an interrupted restore left
        log.debug("writing disk %s of %s into %s", name, self.name, path)
        with open_file_writer(path, FORMAT, size, WRITER_CONNECTIONS) as writer:
            self.written.append(path)
            yield writer

    def finish(self, *, start: bool) -> dict[str, str]:
        disk_paths = {d: str(p) for d, p in self.paths.items()}
        if not self.as_new:
            self.connector.forget_checkpoints(self.name)  # their bitmaps lived in the images being replaced
            for disk, final in self.paths.items():
                os.replace(self.staged(disk), final)
            self.written.clear()
        placed = self.connector.define_restored(self.config, name=self.name, disk_paths=disk_paths,
                                                storage=self.storage, as_new=self.as_new, start=start)
        self.written.clear()
        log.info("restored %s on %s with disks %s", self.name, self.connector.uri, ", ".join(placed.values()))
        return placed

    def discard(self) -> None:
        """Remove what this restore wrote and did not hand over."""
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written.clear()


@contextmanager
def restore_vm(connector: LibvirtConnector, config: dict[str, Any], *, name: str, disks: dict[str, int],
               as_new: bool, storage: str | None, place: dict[str, str] | None,
               retry: bool) -> Iterator[LibvirtRestore]:
    """The restore session; see ``Connector.restore_vm``."""
    check_config(config, place)
    if as_new:
        directory = Path(storage) if storage else IMAGES / name
        paths = {disk: directory / f"{name}-{disk}.{FORMAT}" for disk in disks}
        if retry:
            connector.remove_restored(name, [str(p) for p in paths.values()])
            for p in paths.values():
                p.unlink(missing_ok=True)
        if connector.exists(name):
            raise UsageError(f"a VM named {name!r} already exists on {connector.uri}; choose another --as name")
        taken = [str(p) for p in paths.values() if p.exists()]
        if taken:
            raise UsageError(f"restored disks would overwrite {', '.join(taken)}; choose another --storage")
    else:
        connector.require_shut_off(name)
        sources = config.get("disks", {})
        paths = {disk: Path(sources.get(disk, {}).get("source") or IMAGES / f"{name}-{disk}.{FORMAT}")
                 for disk in disks}
        directory = next(iter(paths.values())).parent if paths else IMAGES
    made_directory = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    session = LibvirtRestore(connector, config, name, paths, as_new=as_new, storage=storage)
    try:
        yield session
    finally:
        session.discard()
        if made_directory and directory.exists() and not any(directory.iterdir()):
            directory.rmdir()
