"""The XML documents vmkeep hands libvirt for a job: backup, checkpoint, external snapshot and the
destination of a block copy.

Built with ElementTree, never by splicing strings: scratch directories, sockets, overlays and
targets are paths an operator chooses (``VMKEEP_SCRATCH_DIR``, ``--storage``), and a path holding
``&``, ``<`` or a quote would otherwise break the document or inject elements into it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BackupDisk:
    """One disk of a pull-mode backup: its scratch file, and the checkpoint it is incremental from
    (None: read in full, as a raw disk without bitmaps is even within an incremental job)."""

    target: str
    scratch: Path
    incremental: str | None = None


def _text(parent: ET.Element, tag: str, text: str) -> ET.Element:
    child = ET.SubElement(parent, tag)
    child.text = text
    return child


def _serialize(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def backup_xml(disks: Iterable[BackupDisk], *, socket: Path | None = None, host: str = "", port: int = 0,
               tls: bool = False) -> str:
    """``<domainbackup mode='pull'>``: QEMU serves the disks on a unix ``socket`` (hotadd), or else
    on TCP at ``host``:``port``, with TLS when told (nbd)."""
    root = ET.Element("domainbackup", mode="pull")
    if socket is not None:
        ET.SubElement(root, "server", transport="unix", socket=str(socket))
    else:
        ET.SubElement(root, "server", transport="tcp", name=host, port=str(port), tls="yes" if tls else "no")
    element = ET.SubElement(root, "disks")
    for d in disks:
        disk = ET.SubElement(element, "disk", name=d.target, backup="yes", type="file")
        if d.incremental:
            disk.set("backupmode", "incremental")
            disk.set("incremental", d.incremental)
        else:
            disk.set("backupmode", "full")
        ET.SubElement(disk, "scratch", file=str(d.scratch))
    return _serialize(root)


def checkpoint_xml(name: str, disks: Mapping[str, bool]) -> str:
    """``<domaincheckpoint>`` named ``name``; ``disks``: target → whether it gets a bitmap (a raw
    disk cannot hold one)."""
    root = ET.Element("domaincheckpoint")
    _text(root, "name", name)
    element = ET.SubElement(root, "disks")
    for target, bitmap in disks.items():
        ET.SubElement(element, "disk", name=target, checkpoint="bitmap" if bitmap else "no")
    return _serialize(root)


def snapshot_xml(disks: Iterable[str], overlays: Mapping[str, Path]) -> str:
    """``<domainsnapshot>`` naming every disk of the VM: an external qcow2 overlay for those in
    ``overlays``, none for the rest (libvirt would otherwise snapshot CD-ROMs and shared disks too)."""
    root = ET.Element("domainsnapshot")
    element = ET.SubElement(root, "disks")
    for name in disks:
        if name in overlays:
            disk = ET.SubElement(element, "disk", name=name, snapshot="external")
            ET.SubElement(disk, "driver", type="qcow2")
            ET.SubElement(disk, "source", file=str(overlays[name]))
        else:
            ET.SubElement(element, "disk", name=name, snapshot="no")
    return _serialize(root)


def copy_destination_xml(target: Path) -> str:
    """The ``<disk>`` a block copy writes to: a qcow2 file at ``target``."""
    root = ET.Element("disk", type="file")
    ET.SubElement(root, "source", file=str(target))
    ET.SubElement(root, "driver", type="qcow2")
    return _serialize(root)
