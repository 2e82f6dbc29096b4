"""Lab VMs: TCG guests booted straight into the lab initramfs and driven over their serial console.

Each VM keeps its qcow2 v3 disks and console socket in LAB_ROOT/<name>/, and carries lab metadata in
its libvirt XML, so a later process finds it again by name and nothing else is ever taken for one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

import libvirt
import libvirt_qemu

from vmkeep.errors import LabError
from vmkeep.lab import LOCAL_URI
from vmkeep.lab.guest import (
    BEGIN_MARK,
    END_MARK,
    FREEZE_LOG,
    LAB_ROOT,
    MKE2FS,
    POOL_PATH,
    GuestImage,
    ensure_guest,
    write_plan,
)
from vmkeep.lab.services import ensure_libvirtd

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions, not on stderr

MiB = 1 << 20
GiB = 1 << 30
SECTOR = 512
MAX_DISKS = 8
MEMORY_MIB = 256
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")  # short: the console socket path has to fit 108 bytes
NS = "https://vmkeep.dev/xmlns/lab/1"
NS_PREFIX = "vmkeeplab"
ET.register_namespace(NS_PREFIX, NS)  # the prefix the lab's domain XML has always used
AGENT_CHANNEL = "org.qemu.guest_agent.0"
GUEST_SLACK = 10.0  # seconds the host waits beyond a command's guest-side time limit
BOOT_TIMEOUT = 120.0  # seconds a lab VM may take from start to answering on its console
GUEST_READ_RATE = 15 * MiB  # bytes/s a TCG guest hashes or writes at, at worst (for time limits)


def vm_dir(name: str) -> Path:
    return LAB_ROOT / name


def _check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise LabError(f"{name!r} is not a usable lab VM name: use up to 40 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")


def _require_local(uri: str) -> None:
    """Lab disks and the guest image are files on this machine, so only the local libvirtd can use them."""
    host = urlparse(uri).hostname
    if host not in (None, "", "localhost", "127.0.0.1", "::1"):
        raise LabError(f"lab VMs run on this machine only (their disks are made here): use {LOCAL_URI}, not {uri}")


def _open(uri: str) -> libvirt.virConnect:
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LabError(f"cannot connect to libvirt at {uri}: {exc}; is libvirtd running (`libvirtd -d`)?") from None


def _lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise LabError(f"cannot look up domain {name}: {exc}") from None


def _lab_metadata(dom: libvirt.virDomain) -> ET.Element | None:
    """The lab metadata element, or None for a domain that is not a lab VM."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0)
    except libvirt.libvirtError as exc:
        # no lab metadata, or the domain went since it was listed: not a lab VM (any more)
        if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
            raise LabError(f"cannot read the metadata of {dom.name()}: {exc.get_error_message()}") from exc
        return None
    return ET.fromstring(text)


def _remove_domain(dom: libvirt.virDomain) -> None:
    """Power off and undefine, checkpoint and snapshot metadata included (the disks go with the VM)."""
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    if dom.isActive():
        raise LabError(f"lab VM {dom.name()} does not stop: try `virsh destroy {dom.name()}`")
    if dom.isPersistent():
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError as exc:
            raise LabError(f"cannot undefine lab VM {dom.name()}: {exc}") from None


def _disk_target(index: int) -> str:
    return "vd" + chr(ord("a") + index)


def _create_disk(path: Path, size: int) -> None:
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", str(path), str(size)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"cannot create lab disk {path}: {proc.stderr.strip()}")


def domain_xml(name: str, guest: GuestImage, disks: dict[str, Path], console: Path, log: Path) -> str:
    """TCG (KVM guests never boot on the lab machines), direct kernel boot, console on a unix socket.

    Built with ElementTree, so no name or path can break the document or add elements to it."""
    root = ET.Element("domain", type="qemu")
    _text(root, "name", name)
    lab = ET.SubElement(ET.SubElement(root, "metadata"), f"{{{NS}}}lab")
    ET.SubElement(lab, f"{{{NS}}}console", path=str(console))
    ET.SubElement(lab, f"{{{NS}}}guest", key=guest.key)
    _text(root, "memory", str(MEMORY_MIB)).set("unit", "MiB")
    _text(root, "vcpu", "1")
    os_ = ET.SubElement(root, "os")
    _text(os_, "type", "hvm").attrib.update(arch="x86_64", machine="pc")
    _text(os_, "kernel", str(guest.kernel))
    _text(os_, "initrd", str(guest.initrd))
    _text(os_, "cmdline", "console=ttyS0")
    ET.SubElement(ET.SubElement(root, "features"), "acpi")
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        _text(root, event, action)
    devices = ET.SubElement(root, "devices")
    for target, path in disks.items():
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="none", discard="unmap")
        ET.SubElement(disk, "source", file=str(path))
        ET.SubElement(disk, "target", dev=target, bus="virtio")
    serial = ET.SubElement(devices, "serial", type="unix")
    ET.SubElement(serial, "source", mode="bind", path=str(console))
    ET.SubElement(serial, "log", file=str(log), append="off")
    ET.SubElement(serial, "target", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL)
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")


def _text(parent: ET.Element, tag: str, text: str) -> ET.Element:
    child = ET.SubElement(parent, tag)
    child.text = text
    return child


class LabVM:
    """A running lab VM: shell commands over the serial console, guest writes and checksums, the agent."""

    def __init__(self, name: str, uri: str, console: Path, disks: dict[str, Path]) -> None:
        self.name = name
        self.uri = uri
        self.console = console
        self.disks = disks  # target (vda, …) → qcow2 image on the host
        self._conn: libvirt.virConnect | None = None
        self._answered = False  # the guest's command loop has answered this object once

    @classmethod
    def open(cls, name: str, uri: str = LOCAL_URI) -> LabVM:
        """The lab VM of that name, as a later process finds it through libvirt."""
        _check_name(name)
        conn = _open(uri)
        try:
            dom = _lookup(conn, name)
            if dom is None:
                raise LabError(f"there is no lab VM {name}: create it with `vmkeep lab create {name}`")
            meta = _lab_metadata(dom)
            if meta is None:
                raise LabError(f"domain {name} is not a vmkeep lab VM (it has no lab metadata)")
            console = meta.find("console")  # libvirt returns the element without its namespace
            if console is None:
                console = meta.find(f"{{{NS}}}console")
            if console is None or not console.get("path"):
                raise LabError(f"lab VM {name} has no console path in its metadata; destroy and re-create it")
            disks = {}
            live = ET.fromstring(dom.XMLDesc(0))
            serial = live.find("./devices/serial/source[@mode='bind']")
            if serial is not None and serial.get("path"):  # a restored copy's console follows its name
                console.set("path", serial.get("path", ""))
            for disk in live.iter("disk"):
                target, source = disk.find("target"), disk.find("source")
                if disk.get("device") == "disk" and target is not None and source is not None:
                    disks[target.get("dev", "")] = Path(source.get("file", ""))
        finally:
            conn.close()
        return cls(name, uri, Path(str(console.get("path"))), disks)

    # --- libvirt ---------------------------------------------------------------------------------

    def domain(self) -> libvirt.virDomain:
        if self._conn is None:
            self._conn = _open(self.uri)
        dom = _lookup(self._conn, self.name)
        if dom is None:
            raise LabError(f"lab VM {self.name} no longer exists")
        return dom

    def is_running(self) -> bool:
        return bool(self.domain().isActive())

    def console_log(self, lines: int = 30) -> str:
        """The end of what the guest printed on its console (boot messages, init's complaints)."""
        log = vm_dir(self.name) / "console.log"
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    # --- serial console commands ------------------------------------------------------------------

    def _exchange(self, cmd: str, guest_seconds: int, wait: float) -> tuple[int, str]:
        """Send one framed command and read its answer; LabError if none comes within ``wait`` seconds."""
        ident = secrets.token_hex(8)
        line = f"{ident} {guest_seconds} {base64.b64encode(cmd.encode()).decode()}\n".encode()
        begin = f"{BEGIN_MARK}{ident}>>>\n".encode()
        end = re.compile(rb"\n" + re.escape(f"{END_MARK}{ident} ".encode()) + rb"(\d+)>>>\n")
        deadline = time.monotonic() + wait
        buf = bytearray()
        with _console_lock(self.console), socket.socket(socket.AF_UNIX) as sock:
            self._connect(sock, deadline)
            try:
                sock.sendall(line)
            except OSError as exc:
                raise LabError(f"cannot write to the console of lab VM {self.name}: {exc}") from None
            while True:
                start = buf.find(begin)
                if start >= 0:
                    m = end.search(buf, start + len(begin))
                    if m:
                        return int(m.group(1)), buf[start + len(begin):m.start()].decode(errors="replace")
                else:  # keep only a tail that could hold the start of the marker
                    del buf[:max(0, len(buf) - len(begin))]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LabError(f"lab VM {self.name} did not answer `{_short(cmd)}` within {wait:.0f} s")
                sock.settimeout(min(remaining, 1.0))
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    raise LabError(f"the console of lab VM {self.name} closed during `{_short(cmd)}`; "
                                   f"did the VM stop? Console:\n{self.console_log()}")
                buf += chunk

    def _connect(self, sock: socket.socket, deadline: float) -> None:
        """QEMU serves one console client at a time and queues one more: retry while another has it."""
        while True:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.connect(str(self.console))
                return
            except BlockingIOError:  # the queue is full: another process is talking to this console
                if time.monotonic() > deadline:
                    raise LabError(f"the console of lab VM {self.name} stayed busy (another vmkeep lab command "
                                   "is using it)") from None
                time.sleep(0.05)
            except OSError as exc:
                raise LabError(f"cannot reach the console of lab VM {self.name} at {self.console}: {exc}; "
                               "is the VM running (`virsh -c qemu:///system list`)?") from None

    def run(self, cmd: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run a shell command in the guest and return its output (stdout and stderr together).

        The guest kills the command after ``timeout`` seconds; with ``check`` a non-zero exit raises.
        """
        if not self._answered:  # a VM started a moment ago reads no console yet: a command would be lost
            self.wait_ready(BOOT_TIMEOUT)
        seconds = max(1, math.ceil(timeout))
        rc, out = self._exchange(cmd, seconds, seconds + GUEST_SLACK)
        if check and rc != 0:
            why = f"was killed after {seconds} s" if rc == 137 else f"failed (exit {rc})"
            raise LabError(f"`{_short(cmd)}` {why} in lab VM {self.name}: {out.strip()[-2000:]}")
        return out

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the guest's command loop answers (about 5 s after start under TCG)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if not self.is_running():
                raise LabError(f"lab VM {self.name} stopped while booting; console:\n{self.console_log()}")
            try:
                if self._exchange("echo ready", 5, 2.0)[1].strip() == "ready":
                    self._answered = True
                    return
            except LabError as exc:  # expected while it boots; the last one is reported if it never answers
                last = str(exc)
            if time.monotonic() > deadline:
                raise LabError(f"lab VM {self.name} did not answer on its console within {timeout:.0f} s "
                               f"(last: {last}); console:\n{self.console_log()}")
            time.sleep(0.5)

    # --- guest-side disk work ---------------------------------------------------------------------

    def _device(self, disk: str) -> str:
        if disk not in self.disks:
            known = ", ".join(self.disks) or "none"
            raise LabError(f"lab VM {self.name} has no disk {disk!r} (it has: {known})")
        return f"/dev/{disk}"

    def disk_size(self, disk: str) -> int:
        self._device(disk)
        return int(self.domain().blockInfo(disk)[0])

    def write(self, disk: str, offset: int, length: int, seed: str = "vmkeep") -> None:
        """Make the guest write guest.pattern(seed, offset, length) at ``offset`` with dd, then sync."""
        dev = self._device(disk)
        if offset % SECTOR or length % SECTOR or offset < 0 or length <= 0:
            raise LabError(f"offset and length must be positive multiples of {SECTOR} (got {offset}, {length})")
        if offset + length > self.disk_size(disk):
            raise LabError(f"{offset}+{length} runs past the end of {disk} ({self.disk_size(disk)} bytes)")
        lines = ["set -e"]
        for dst, src, n in write_plan(seed, offset, length):
            lines.append(f"dd if={POOL_PATH} of={dev} bs=64k iflag=skip_bytes,count_bytes,fullblock "
                         f"oflag=seek_bytes conv=notrunc status=none skip={src} count={n} seek={dst}")
        lines.append("sync")
        self.run("\n".join(lines), timeout=60 + length / GUEST_READ_RATE)

    def checksum(self, disk: str) -> str:
        """SHA-256 of the whole block device as the guest reads it."""
        dev = self._device(disk)
        out = self.run(f"sha256sum {dev}", timeout=60 + self.disk_size(disk) / GUEST_READ_RATE)
        digest = out.split()[0] if out.split() else ""
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise LabError(f"unexpected sha256sum output from lab VM {self.name}: {out.strip()!r}")
        return digest

    def make_files(self, disk: str) -> dict[str, str]:
        """An ext4 filesystem (e2fsprogs' mke2fs) with a few files, mounted at /mnt/<disk>; returns
        path → SHA-256 of the files."""
        dev = self._device(disk)
        mnt = f"/mnt/{disk}"
        script = f"""set -e
umount {mnt} 2>/dev/null || true
{MKE2FS} -q -F -t ext4 -L vmkeep-{disk} {dev}
mkdir -p {mnt}
mount -t ext4 {dev} {mnt}
mkdir -p {mnt}/etc {mnt}/data
echo "hello from the vmkeep lab" > {mnt}/hello.txt
seq 1 20000 > {mnt}/etc/numbers.txt
dd if={POOL_PATH} of={mnt}/data/blob.bin bs=64k count=16 status=none
sync
cd {mnt} && find . -type f | sort | xargs sha256sum
"""
        out = self.run(script, timeout=120 + self.disk_size(disk) / (4 * GUEST_READ_RATE))
        files = {}
        for line in out.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
                files[parts[1].removeprefix("./")] = parts[0]
        return files

    def freeze_log(self) -> list[str]:
        """What the guest's fsfreeze hook recorded: one "EPOCH freeze|thaw" line per call."""
        return self.run(f"cat {FREEZE_LOG} 2>/dev/null || true").splitlines()

    def sync(self) -> None:
        self.run("sync")

    # --- guest agent ------------------------------------------------------------------------------

    def agent(self, command: str, arguments: dict[str, Any] | None = None, timeout: int = 10) -> Any:
        """Run a guest agent command through libvirt; returns its "return" value."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.domain(), json.dumps(request), timeout, 0)
        except libvirt.libvirtError as exc:
            raise LabError(f"guest agent of lab VM {self.name} failed {command}: {exc}") from None
        return json.loads(reply).get("return")

    def agent_ping(self, timeout: float = 30.0) -> None:
        """guest-ping, retried while the agent connects (it starts just before the console loop)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.agent("guest-ping", timeout=5)
                return
            except LabError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    # --- life cycle -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Sync the guest and power it off; the domain and its disks stay (read them from the host)."""
        if self.is_running():
            with contextlib.suppress(LabError):
                self.sync()
            with contextlib.suppress(libvirt.libvirtError):
                self.domain().destroy()

    def start(self, timeout: float = 120.0) -> None:
        """Boot a stopped lab VM again and wait for its console."""
        if not self.is_running():
            try:
                self.domain().create()
            except libvirt.libvirtError as exc:
                raise LabError(f"cannot start lab VM {self.name}: {exc}") from None
        self.wait_ready(timeout)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def destroy(self) -> None:
        """Stop and undefine the VM and delete its disks."""
        self.close()
        destroy_lab_vm(self.name, self.uri)

    def __enter__(self) -> LabVM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()


_console_locks: dict[Path, threading.Lock] = {}
_console_locks_guard = threading.Lock()


def _console_lock(console: Path) -> threading.Lock:
    """One exchange at a time per console within this process (threads would steal each other's turn)."""
    with _console_locks_guard:
        return _console_locks.setdefault(console, threading.Lock())


def _short(cmd: str) -> str:
    """The command's first line, shortened, for error messages."""
    lines = cmd.strip().splitlines() or [""]
    first = lines[0]
    return first if len(first) <= 80 and len(lines) == 1 else first[:77] + " …"


def create_lab_vm(name: str, disks: int = 1, size: int = 2 * GiB, uri: str = LOCAL_URI,
                  boot_timeout: float = 120.0) -> LabVM:
    """Define and boot a lab VM with ``disks`` empty qcow2 v3 disks (vda, vdb, …) of ``size`` bytes.

    Nothing is left behind when this fails: the domain is undefined and its directory removed.
    """
    _check_name(name)
    if not 1 <= disks <= MAX_DISKS:
        raise LabError(f"a lab VM has 1 to {MAX_DISKS} disks, not {disks}")
    if size < MiB or size % SECTOR:
        raise LabError(f"disk size must be at least 1 MiB and a multiple of {SECTOR} bytes (got {size})")
    _require_local(uri)
    ensure_libvirtd()
    guest = ensure_guest()
    conn = _open(uri)
    try:
        if _lookup(conn, name) is not None:
            raise LabError(f"a domain named {name} already exists: pick another name, or run "
                           f"`vmkeep lab destroy {name}` if it is an old lab VM")
        directory = vm_dir(name)
        if directory.exists():  # left by a lab VM whose domain is gone
            shutil.rmtree(directory)
        directory.mkdir(mode=0o755)
        dom: libvirt.virDomain | None = None
        vm: LabVM | None = None
        try:
            paths = {}
            for i in range(disks):
                target = _disk_target(i)
                paths[target] = directory / f"{target}.qcow2"
                _create_disk(paths[target], size)
            console = directory / "console.sock"
            try:
                dom = conn.defineXML(domain_xml(name, guest, paths, console, directory / "console.log"))
                dom.create()
            except libvirt.libvirtError as exc:
                raise LabError(f"libvirt cannot start lab VM {name}: {exc}") from None
            vm = LabVM(name, uri, console, paths)
            vm.wait_ready(boot_timeout)
            return vm
        except BaseException:
            if vm is not None:
                vm.close()
            if dom is not None:
                with contextlib.suppress(LabError, libvirt.libvirtError):
                    _remove_domain(dom)
            shutil.rmtree(directory, ignore_errors=True)
            raise
    finally:
        conn.close()


def destroy_lab_vm(name: str, uri: str = LOCAL_URI) -> bool:
    """Stop and undefine a lab VM and delete its files; fine on a half-created or already gone one.

    Refuses a domain without lab metadata, so a typo cannot destroy a real VM. Returns whether there
    was anything to remove.
    """
    _check_name(name)
    _require_local(uri)
    conn = _open(uri)
    try:
        dom = _lookup(conn, name)
        if dom is not None:
            if _lab_metadata(dom) is None:
                raise LabError(f"domain {name} is not a vmkeep lab VM (no lab metadata): refusing to destroy it")
            _remove_domain(dom)
    finally:
        conn.close()
    found = dom is not None or vm_dir(name).exists()
    shutil.rmtree(vm_dir(name), ignore_errors=True)
    if vm_dir(name).exists():
        raise LabError(f"cannot remove {vm_dir(name)}: delete it by hand")
    return found


def list_lab_vms(uri: str = LOCAL_URI) -> list[str]:
    """Names of the lab VMs libvirt knows, running or not."""
    conn = _open(uri)
    try:
        return sorted(d.name() for d in conn.listAllDomains(0) if _lab_metadata(d) is not None)
    finally:
        conn.close()


def wait_for_agent(name: str, timeout: float = 120.0, uri: str = LOCAL_URI) -> bool:
    """Whether the guest agent of domain ``name`` (any VM, a restored copy too) answers a ping
    within ``timeout`` seconds: the sign that the guest booted."""
    conn = _open(uri)
    try:
        dom = conn.lookupByName(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 5, 0)
                return True
            except libvirt.libvirtError:
                time.sleep(1)
        return False
    finally:
        conn.close()
