"""The XML documents handed to libvirt, without a VM: paths and names holding XML's special
characters come back intact when parsed, and ordinary ones give the documents libvirt always got."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmkeep.hypervisors.libvirt.checkpoints import checkpoint_document
from vmkeep.hypervisors.libvirt.domain_xml import DiskSpec
from vmkeep.hypervisors.libvirt.job_xml import copy_destination_xml
from vmkeep.hypervisors.libvirt.pull_backup import backup_document
from vmkeep.hypervisors.libvirt.san import snapshot_xml
from vmkeep.lab.guest import GuestImage
from vmkeep.lab.vm import NS, domain_xml

ODD = ["a&b", "a<b>c", "it's", 'say "x"', "two  spaces ", "&amp;'\"<x/>"]
SPECS = [DiskSpec("vda", "/i/vda.qcow2", "qcow2", True, ""), DiskSpec("vdb", "/i/vdb.raw", "raw", True, "")]


def attr(root: ET.Element, path: str, name: str) -> str | None:
    element = root.find(path)
    assert element is not None, path
    return element.get(name)


def backup(scratch: Path, parent: str | None, transport: str = "hotadd", host: str = "", tls: bool = False) -> str:
    socket = scratch / "nbd.sock" if transport == "hotadd" else None
    return backup_document(SPECS, parent, scratch, socket=socket, host=host, port=10809, tls=tls)


def domain_with_disks(sources: dict[str, str]) -> str:
    """A domain's XML with these disks (target → source) and a CD-ROM."""
    root = ET.Element("domain")
    devices = ET.SubElement(root, "devices")
    for target, source in sources.items():
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "source", file=source)
        ET.SubElement(disk, "target", dev=target)
    ET.SubElement(ET.SubElement(devices, "disk", type="file", device="cdrom"), "target", dev="sda")
    return ET.tostring(root, encoding="unicode")


@pytest.mark.parametrize("odd", ODD)
def test_backup_paths_come_back_exactly(odd: str) -> None:
    scratch = Path(f"/var/lib/vmkeep {odd}/vm-{odd}-1a2b")
    root = ET.fromstring(backup(scratch, f"cp-{odd}"))
    assert attr(root, "server", "socket") == str(scratch / "nbd.sock")
    disks = root.findall("disks/disk")
    assert [d.get("name") for d in disks] == ["vda", "vdb"]
    assert [attr(d, "scratch", "file") for d in disks] == [str(scratch / "vda.qcow2"), str(scratch / "vdb.qcow2")]
    assert disks[0].get("incremental") == f"cp-{odd}" and disks[1].get("incremental") is None

    tcp = ET.fromstring(backup(scratch, None, "nbd", host=odd, tls=True)).find("server")
    assert tcp is not None and tcp.attrib == {"transport": "tcp", "name": odd, "port": "10809", "tls": "yes"}


@pytest.mark.parametrize("odd", ODD)
def test_checkpoint_snapshot_and_copy_come_back_exactly(odd: str) -> None:
    checkpoint = ET.fromstring(checkpoint_document(SPECS, odd))
    assert checkpoint.findtext("name") == odd and len(checkpoint.findall("disks/disk")) == 2

    overlay = Path(f"/scratch/{odd}-1a2b/vda.vmkeep-overlay.qcow2")
    domain = domain_with_disks({"vda": f"/i/{odd}/vda", "vdb": f"/i/{odd}/vdb"})
    snapshot = ET.fromstring(snapshot_xml(domain, {"vda": overlay}))
    disks = snapshot.findall("disks/disk")
    assert [(d.get("name"), d.get("snapshot")) for d in disks] == [("vda", "external"), ("vdb", "no"), ("sda", "no")]
    assert attr(disks[0], "source", "file") == str(overlay)

    target = Path(f"/storage/{odd}/vda.qcow2")
    assert attr(ET.fromstring(copy_destination_xml(target)), "source", "file") == str(target)


@pytest.mark.parametrize("odd", ODD)
def test_lab_domain_names_and_paths_come_back_exactly(odd: str) -> None:
    guest = GuestImage(kernel=Path(f"/k/{odd}/vmlinuz"), initrd=Path(f"/k/{odd}/initrd"), key=odd, versions={})
    lab = Path(f"/lab/{odd}")
    root = ET.fromstring(domain_xml(odd, guest, {"vda": lab / "vda.qcow2"}, lab / "c.sock", lab / "c.log"))
    assert root.findtext("name") == odd and root.findtext("os/kernel") == str(guest.kernel)
    assert root.findtext("os/initrd") == str(guest.initrd)
    assert attr(root, f"metadata/{{{NS}}}lab/{{{NS}}}console", "path") == str(lab / "c.sock")
    assert attr(root, f"metadata/{{{NS}}}lab/{{{NS}}}guest", "key") == odd
    assert attr(root, "devices/disk/source", "file") == str(lab / "vda.qcow2")
    assert attr(root, "devices/serial/source", "path") == str(lab / "c.sock")
    assert attr(root, "devices/serial/log", "file") == str(lab / "c.log")


def test_ordinary_names_give_the_documents_libvirt_always_got() -> None:
    """Canonical forms of what the f-strings built before ElementTree (issue 23)."""
    s = "/var/lib/libvirt/images/vmkeep-scratch/vm1-abcd"
    scratch = (f'<disk backup="yes" backupmode="incremental" incremental="cp1" name="vda" type="file">'
               f'<scratch file="{s}/vda.qcow2"></scratch></disk>'
               f'<disk backup="yes" backupmode="full" name="vdb" type="file"><scratch file="{s}/vdb.qcow2"></scratch>'
               f'</disk></disks></domainbackup>')
    assert ET.canonicalize(backup(Path(s), "cp1")) == (
        f'<domainbackup mode="pull"><server socket="{s}/nbd.sock" transport="unix"></server><disks>' + scratch)
    assert ET.canonicalize(backup(Path(s), "cp1", "nbd", "192.168.1.5", True)) == (
        '<domainbackup mode="pull"><server name="192.168.1.5" port="10809" tls="yes" transport="tcp"></server>'
        '<disks>' + scratch)
    plain = ET.canonicalize(backup(Path(s), None, "nbd", "192.168.1.5"))
    assert plain.count('backupmode="full"') == 2 and 'tls="no"' in plain and "incremental=" not in plain
    assert ET.canonicalize(checkpoint_document(SPECS, "vmkeep-20260101T000000Z-abcdef")) == (
        '<domaincheckpoint><name>vmkeep-20260101T000000Z-abcdef</name><disks><disk checkpoint="bitmap" name="vda">'
        '</disk><disk checkpoint="no" name="vdb"></disk></disks></domaincheckpoint>')
    domain = domain_with_disks({"vda": "/i/vda.qcow2", "vdb": "/i/vdb.raw"})
    assert ET.canonicalize(snapshot_xml(domain, {"vda": Path(f"{s}/vda.overlay")})) == (
        f'<domainsnapshot><disks><disk name="vda" snapshot="external"><driver type="qcow2"></driver>'
        f'<source file="{s}/vda.overlay"></source></disk><disk name="vdb" snapshot="no"></disk>'
        f'<disk name="sda" snapshot="no"></disk></disks></domainsnapshot>')
    assert ET.canonicalize(copy_destination_xml(Path("/s/new-vda.qcow2"))) == (
        '<disk type="file"><source file="/s/new-vda.qcow2"></source><driver type="qcow2"></driver></disk>')
