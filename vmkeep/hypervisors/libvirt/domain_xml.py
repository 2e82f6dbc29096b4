"""Reading and rewriting libvirt domain XML: which disks to back up, and a copy for restore."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DiskSpec:
    target: str
    source: str
    format: str
    eligible: bool
    reason: str  # why not eligible, or a note (raw: full every time)
    readonly: bool = False  # the VM only reads it: read from the image, outside libvirt's job

    @property
    def bitmaps(self) -> bool:
        """Only qcow2 can carry the persistent dirty bitmaps that checkpoints need, and libvirt
        makes checkpoints of writable disks only."""
        return self.eligible and self.format == "qcow2" and not self.readonly


def disk_elements(root: ET.Element) -> Iterator[tuple[str, ET.Element]]:
    """(target name, ``<disk>`` element) for each disk device of a domain, CD-ROMs included."""
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is not None:
            yield target.get("dev", "?"), disk


def source_path(disk: ET.Element) -> str:
    source = disk.find("source")
    return "" if source is None else source.get("file") or source.get("dev") or source.get("name") or ""


def point_disk_at(disk: ET.Element, path: str, fmt: str, *, as_file: bool) -> None:
    """Make a ``<disk>`` read ``path`` in ``fmt``, dropping the backing chain libvirt recorded.

    ``as_file`` turns any source (block device, network) into a file; otherwise a block device
    stays one.
    """
    source = disk.find("source")
    if source is None:
        source = ET.SubElement(disk, "source")
    if as_file:
        disk.set("type", "file")
        for attr in ("dev", "name", "protocol"):
            source.attrib.pop(attr, None)
    source.set("dev" if source.get("dev") is not None else "file", path)
    driver = disk.find("driver")
    if driver is not None:
        driver.set("type", fmt)
    backing = disk.find("backingStore")
    if backing is not None:
        disk.remove(backing)


def disk_specs(xml: str) -> list[DiskSpec]:
    specs = []
    for name, disk in disk_elements(ET.fromstring(xml)):
        device = disk.get("device", "disk")
        path = source_path(disk)
        driver = disk.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        if device in ("cdrom", "floppy"):
            continue
        if device == "lun":
            specs.append(DiskSpec(name, path, fmt, False, f"disk {name} is a passthrough LUN: skipped"))
        elif disk.find("shareable") is not None:
            specs.append(DiskSpec(name, path, fmt, False, f"disk {name} is shareable between VMs: skipped"))
        elif disk.find("readonly") is not None and path:
            # libvirt neither snapshots nor exports a read-only disk for backup; nothing writes it
            specs.append(DiskSpec(name, path, fmt, True, f"disk {name} is read-only: read from its image, in full "
                                                         "each time", readonly=True))
        elif not path:
            specs.append(DiskSpec(name, path, fmt, False, f"disk {name} has no source (empty drive): skipped"))
        elif fmt != "qcow2":
            specs.append(DiskSpec(name, path, fmt, True, f"disk {name} is {fmt}: no dirty bitmap, full every time"))
        else:
            specs.append(DiskSpec(name, path, fmt, True, ""))
    return specs


def _retarget_disks(root: ET.Element, disk_paths: dict[str, str]) -> None:
    for name, disk in disk_elements(root):
        if name in disk_paths:
            point_disk_at(disk, disk_paths[name], "qcow2", as_file=True)


def renamed_copy(xml: str, new_name: str, disk_paths: dict[str, str]) -> str:
    """The saved configuration as a new VM: new name and UUID, fresh MACs, restored disk paths.

    Unix socket and console log paths that embed the old VM's name (serial consoles, agent
    channels) follow the new name, so the copy can run beside the original.
    """
    root = ET.fromstring(xml)
    name_el = root.find("name")
    old_name = name_el.text or "" if name_el is not None else ""
    if name_el is not None:
        name_el.text = new_name
    uuid_el = root.find("uuid")
    if uuid_el is not None:
        uuid_el.text = str(uuid.uuid4())
    for iface in root.findall("./devices/interface"):
        mac = iface.find("mac")
        if mac is not None:
            iface.remove(mac)
    _retarget_disks(root, disk_paths)
    for el, attr in [(e, "path") for e in root.iter("source")] + [(e, "file") for e in root.iter("log")]:
        path = el.get(attr)
        if path and old_name and old_name in path:
            el.set(attr, path.replace(old_name, new_name))
    return ET.tostring(root, encoding="unicode")


def host_paths_to_create(xml: str) -> list[str]:
    """Directories the VM's unix sockets and console logs need on the host (QEMU does not make them)."""
    root = ET.fromstring(xml)
    paths = [e.get("path", "") for e in root.iter("source") if e.get("mode") == "bind"]
    paths += [e.get("file", "") for e in root.iter("log")]
    return sorted({p.rsplit("/", 1)[0] for p in paths if p.startswith("/") and "/" in p})


def remove_own_host_files(xml: str, name: str) -> None:
    """Remove the console logs and sockets of a removed VM that lie in a directory of its own
    (named after it, as a restored copy's are), and that directory once empty: the directories
    ``host_paths_to_create`` made for it. Files of directories shared with other VMs stay."""
    root = ET.fromstring(xml)
    files = [e.get("path", "") for e in root.iter("source") if e.get("mode") == "bind"]
    files += [e.get("file", "") for e in root.iter("log")]
    own = [Path(f) for f in files if f.startswith("/") and Path(f).parent.name == name]
    for path in own:
        path.unlink(missing_ok=True)
    for directory in {p.parent for p in own}:
        try:
            directory.rmdir()
        except OSError:  # something else is in it: not only this VM's
            pass


def with_disk_paths(xml: str, disk_paths: dict[str, str]) -> str:
    """The saved configuration, same identity, disks pointing at restored files (overwrite restore)."""
    root = ET.fromstring(xml)
    _retarget_disks(root, disk_paths)
    return ET.tostring(root, encoding="unicode")


def nvram_path(xml: str) -> str | None:
    """The file holding the VM's UEFI variables, if it has one."""
    el = ET.fromstring(xml).find("./os/nvram")
    return el.text.strip() if el is not None and el.text and el.text.strip() else None


def with_nvram_path(xml: str, path: str) -> str:
    root = ET.fromstring(xml)
    el = root.find("./os/nvram")
    if el is not None:
        el.text = path
    return ET.tostring(root, encoding="unicode")


def without_network(xml: str) -> str:
    """The configuration with every network interface taken out (a sandbox that reaches nothing)."""
    root = ET.fromstring(xml)
    devices = root.find("devices")
    if devices is not None:
        for iface in devices.findall("interface"):
            devices.remove(iface)
    return ET.tostring(root, encoding="unicode")


def on_network(xml: str, network: str) -> str:
    """The configuration with every network interface on libvirt network ``network`` (a bridge,
    user or direct interface becomes a network one); model, MAC and other settings stay."""
    root = ET.fromstring(xml)
    for iface in root.findall("./devices/interface"):
        iface.set("type", "network")
        for el in iface.findall("source") + iface.findall("target"):  # target: a tap name of the old VM's host
            iface.remove(el)
        source = ET.Element("source", {"network": network})
        iface.insert(0, source)
    return ET.tostring(root, encoding="unicode")
