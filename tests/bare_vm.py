"""A running libvirt domain with no guest OS: QEMU holds its disks, and tests write into them from
the host through QEMU's own block layer (HMP qemu-io), exactly as a guest's writes would land."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt

URI = "qemu:///system"
IMAGES = Path("/var/lib/libvirt/images/vmkeep-tests")


def virsh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {proc.stderr}")
    return proc.stdout


@dataclass
class BareVM:
    name: str
    disks: dict[str, Path]  # target → image
    extra: list[str] = field(default_factory=list)  # other VMs a test made from this one

    def _qdev(self, disk: str) -> str:
        """QEMU's device path of a disk (libvirt names virtio disks in target order)."""
        return f"/machine/peripheral/virtio-disk{list(self.disks).index(disk)}/virtio-backend"

    def _qemu_io(self, disk: str, command: str) -> None:
        out = virsh("qemu-monitor-command", self.name, "--hmp", f'qemu-io -d {self._qdev(disk)} "{command}"')
        assert "error" not in out.lower(), out

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        self._qemu_io(disk, f"write -P {pattern:#x} {offset} {length}")

    def snapshot(self, disk: str, dest: Path) -> Path:
        """The disk's content now, copied while the VM is paused."""
        virsh("suspend", self.name)
        try:
            subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(self.disks[disk]), str(dest)], check=True)
        finally:
            virsh("resume", self.name)
        return dest

    def discard(self, disk: str, offset: int, length: int) -> None:
        """The guest trims a range (its filesystem freed it): the image deallocates it."""
        self._qemu_io(disk, f"discard {offset} {length}")

    def drop_bitmap(self, disk: str, bitmap: str) -> None:
        """Remove a dirty bitmap inside QEMU, behind libvirt's back (as an image replaced or
        reverted outside libvirt would lose it): libvirt still lists the checkpoint."""
        blocks = json.loads(virsh("qemu-monitor-command", self.name, '{"execute":"query-block"}'))["return"]
        node = next(b["inserted"]["node-name"] for b in blocks if b.get("qdev") == self._qdev(disk))
        virsh("qemu-monitor-command", self.name, json.dumps(
            {"execute": "block-dirty-bitmap-remove", "arguments": {"node": node, "name": bitmap}}))

    def checkpoints(self) -> list[str]:
        return sorted(virsh("checkpoint-list", self.name, "--name").split())

    def job_running(self) -> bool:
        """Whether a backup job runs now (libvirt describes only a running one)."""
        conn = libvirt.open(URI)
        try:
            conn.lookupByName(self.name).backupGetXMLDesc()
            return True
        except libvirt.libvirtError:
            return False
        finally:
            conn.close()


def disk_xml(target: str, path: Path, fmt: str, shareable: bool = False) -> str:
    """Paths escaped: a VM's directory is named after it, and names may hold ``&`` or ``'``."""
    share = "<shareable/>" if shareable else ""
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}' cache='none' discard='unmap'/>"
            f"<source file={quoteattr(str(path))}/><target dev='{target}' bus='virtio'/>{share}</disk>")


MAC = "52:54:00:6b:65:01"  # every bare VM's network card: a restored copy must get another
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def create(disks: dict[str, tuple[int, str]], shareable: tuple[str, ...] = (), *, uefi: bool = False,
           start: bool = True, prefix: str = "vmkeep-t-", store: Path | None = None, devices: str = "") -> BareVM:
    """disks: target → (size, format). ``uefi``: OVMF firmware with its variables in the VM's
    directory (``VARS.fd``, copied from the template). ``store``: a directory other VMs share
    (a storage pool's), where the images go as ``<vm>-<target>.<format>``. ``devices``: more
    device XML, as is."""
    name = f"{prefix}{secrets.token_hex(3)}"
    directory = IMAGES / name
    directory.mkdir(parents=True)
    paths = {}
    for target, (size, fmt) in disks.items():
        path = store / f"{name}-{target}.{fmt}" if store else directory / f"{target}.{fmt}"
        opts = ["-o", "compat=1.1"] if fmt == "qcow2" else []
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *opts, str(path), str(size)], check=True)
        paths[target] = path
    devices += "".join(disk_xml(t, p, disks[t][1], t in shareable) for t, p in paths.items())
    devices += f"<interface type='user'><mac address='{MAC}'/><model type='virtio'/></interface>"
    firmware = ""
    if uefi:
        shutil.copyfile(OVMF_VARS, directory / "VARS.fd")
        firmware = (f"<loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>"
                    f"<nvram>{escape(str(directory / 'VARS.fd'))}</nvram>")
    xml = (f"<domain type='qemu'><name>{escape(name)}</name><memory unit='MiB'>48</memory><vcpu>1</vcpu>"
           f"<os><type arch='x86_64' machine='pc'>hvm</type>{firmware}</os>"
           f"<features><acpi/></features><devices>{devices}</devices></domain>")
    vm = BareVM(name, paths)
    conn = libvirt.open(URI)
    try:
        dom = conn.defineXML(xml)
        if start:
            dom.create()
    except BaseException:
        destroy(vm)  # nothing of a VM that never came up stays behind
        raise
    finally:
        conn.close()
    return vm


@contextmanager
def running(disks: dict[str, tuple[int, str]], shareable: tuple[str, ...] = (), *, uefi: bool = False,
            start: bool = True) -> Iterator[BareVM]:
    """A bare VM for the block (defined, and started unless told), destroyed with its images afterwards."""
    vm = create(disks, shareable, uefi=uefi, start=start)
    try:
        yield vm
    finally:
        destroy(vm)


def destroy(vm: BareVM) -> None:
    conn = libvirt.open(URI)
    try:
        for name in [vm.name, *vm.extra]:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    finally:
        conn.close()
    shutil.rmtree(IMAGES / vm.name, ignore_errors=True)
    for path in vm.disks.values():
        path.unlink(missing_ok=True)
