"""The lab guest: a Debian cloud kernel and a busybox initramfs with qemu-ga and e2fsprogs' mke2fs,
built from Debian packages.

It boots in seconds under TCG, answers shell commands on its serial console and runs the real guest
agent, so backups can be tested with guest writes and fsfreeze without any OS image download.
Built once and cached under LAB_ROOT, keyed by the package versions and the recipe below.
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmkeep.errors import LabError

LAB_ROOT = Path("/var/lib/libvirt/images/vmkeep-lab")  # libvirt's QEMU user can read under images/
GUEST_ROOT = LAB_ROOT / ".guest"  # the dot keeps it apart from VM directories (names start alphanumeric)
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
AGENT = "qemu-guest-agent"
E2FSPROGS = "e2fsprogs"  # busybox's mke2fs makes only ext2; lab filesystems are real ext4
PACKAGES = (KERNEL_META, BUSYBOX, AGENT, E2FSPROGS)
MKE2FS = "/usr/sbin/mke2fs"  # where the guest has e2fsprogs' mke2fs (busybox's applet is /bin/mke2fs)
MODULES = (  # insmod order: dependencies first; built-in or absent ones are skipped
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk",
    "virtio_console", "crc16", "crc32c_generic", "libcrc32c", "mbcache", "jbd2", "ext4",
)
RECIPE = 1  # bump when the layout changes in a way the scripts below do not show

# Serial command protocol. The host sends one line "ID SECONDS BASE64(SCRIPT)"; the guest answers
# BEGIN_MARK ID ">>>\n", the script's output, "\n" END_MARK ID " " STATUS ">>>\n". The markers never
# occur in what the host sends, so an echo of the input cannot be mistaken for an answer.
BEGIN_MARK = "<<<VMK-BEGIN "
END_MARK = "<<<VMK-END "
READY_LINE = "VMKEEP-LAB-READY"
FREEZE_LOG = "/run/fsfreeze.log"

# Deterministic "random" data for guest writes: a pool of pseudo-random bytes in the initramfs; each
# 1 MiB of a disk gets a window of it chosen by (seed, MiB index), so the host can compute what the
# guest wrote (pattern()) while the guest only runs dd.
POOL_PATH = "/lab/pool"
POOL_SIZE = 4 << 20
PIECE = 1 << 20
POOL_STEP = 4096


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    key: str
    versions: dict[str, str]


INIT = """#!/bin/sh
# vmkeep lab guest: set up, start qemu-ga, then serve shell commands on ttyS0.
export PATH=/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lab /tmp /mnt
for m in @MODULES@; do
    insmod /lib/modules/$m.ko || echo "vmkeep-lab: insmod $m failed"
done
port=
n=0
while [ -z "$port" ] && [ $n -lt 50 ]; do
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat $d/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${d##*/}
    done
    [ -n "$port" ] || { n=$((n + 1)); usleep 100000; }
done
if [ -n "$port" ]; then
    n=0
    while [ ! -e "$port" ] && [ $n -lt 50 ]; do n=$((n + 1)); usleep 100000; done
    qemu-ga -d -m virtio-serial -p "$port" -t /var/run -F/etc/qemu/fsfreeze-hook -l /run/qemu-ga.log \
        || echo "vmkeep-lab: qemu-ga did not start"
else
    echo "vmkeep-lab: no org.qemu.guest_agent.0 port, qemu-ga not started"
fi
dmesg -n 1
stty -F /dev/ttyS0 raw -echo
echo @READY@ > /dev/ttyS0
while :; do
    sh /lab/loop < /dev/ttyS0 > /dev/ttyS0 2>&1
done
"""

LOOP = """# One command per line: ID SECONDS BASE64; see vmkeep/lab/guest.py for the framing.
while read -r id secs b64; do
    case "$id$secs" in *[!0-9a-f]*|"") continue ;; esac
    echo "$b64" | base64 -d > /run/lab/cmd.sh 2>/dev/null
    printf '@BEGIN@%s>>>\\n' "$id"
    timeout -s KILL "$secs" sh /run/lab/cmd.sh < /dev/null 2>&1
    rc=$?
    printf '\\n@END@%s %s>>>\\n' "$id" "$rc"
done
"""

HOOK = """#!/bin/sh
# qemu-ga runs this with "freeze" before freezing and "thaw" after thawing the filesystems.
echo "$(date +%s) $1" >> @LOG@
"""


def init_script(modules: list[str]) -> str:
    return INIT.replace("@MODULES@", " ".join(modules)).replace("@READY@", READY_LINE)


def loop_script() -> str:
    return LOOP.replace("@BEGIN@", BEGIN_MARK).replace("@END@", END_MARK)


def hook_script() -> str:
    return HOOK.replace("@LOG@", FREEZE_LOG)


@functools.cache
def pool() -> bytes:
    """The guest's pool of pseudo-random bytes (the same on every build)."""
    return hashlib.shake_256(b"vmkeep-lab-pool").digest(POOL_SIZE)


def _window(seed: str, piece: int) -> int:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{piece}".encode()).digest()[:8], "big")
    return (h % ((POOL_SIZE - PIECE) // POOL_STEP + 1)) * POOL_STEP


def write_plan(seed: str, offset: int, length: int) -> list[tuple[int, int, int]]:
    """(disk offset, pool offset, length) copies that put pattern(seed, offset, length) on a disk."""
    plan = []
    pos, end = offset, offset + length
    while pos < end:
        piece = pos // PIECE
        stop = min(end, (piece + 1) * PIECE)
        plan.append((pos, _window(seed, piece) + pos - piece * PIECE, stop - pos))
        pos = stop
    return plan


def pattern(seed: str, offset: int, length: int) -> bytes:
    """The bytes LabVM.write(disk, offset, length, seed) puts at that offset."""
    data = pool()
    return b"".join(data[src:src + n] for _, src, n in write_plan(seed, offset, length))


# --- building -----------------------------------------------------------------------------------


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise LabError(f"{what} failed: `{' '.join(cmd)}`: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _apt_update() -> None:
    _run(["apt-get", "update", "-q"], "apt-get update (the Debian mirror must be reachable)")


def _records(packages: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Package → fields of its candidate version, from one apt-cache call (each call takes about a second)."""
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", *packages], capture_output=True, text=True)
    records: dict[str, dict[str, str]] = {}
    for block in proc.stdout.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", block, re.M))
        if "Package" in fields:
            records.setdefault(fields["Package"], fields)
    return records


def _versions() -> dict[str, str]:
    records = _records(PACKAGES)
    missing = [p for p in PACKAGES if p not in records]
    if missing:
        raise LabError(f"apt-cache knows no {', '.join(missing)}; run apt-get update, or check that "
                       "/etc/apt/sources.list has Debian bookworm main")
    # linux-image-cloud-amd64 is a meta package: the kernel is in the versioned package it depends on
    m = re.search(r"\b(linux-image-[0-9][^\s,()]*)(?:\s*\(=\s*([^)\s]+)\))?", records[KERNEL_META].get("Depends", ""))
    if not m:
        raise LabError(f"{KERNEL_META} does not depend on a linux-image-* package; run apt-get update")
    kernel, kversion = m.group(1), m.group(2)
    if not kversion:
        kversion = _records((kernel,)).get(kernel, {}).get("Version", "")
        if not kversion:
            raise LabError(f"{KERNEL_META} depends on {kernel}, which apt-cache does not know; run apt-get update")
    return {kernel: kversion, **{p: records[p]["Version"] for p in (BUSYBOX, AGENT, E2FSPROGS)}}


def resolve_versions() -> dict[str, str]:
    """Package → candidate version for everything the guest is built from (apt-get update if unknown)."""
    try:
        return _versions()
    except LabError:
        _apt_update()
        return _versions()


def _download(versions: dict[str, str], dest: Path) -> None:
    cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *(f"{p}={v}" for p, v in versions.items())]
    if subprocess.run(cmd, capture_output=True, cwd=dest).returncode != 0:
        _apt_update()
        _run(cmd, "apt-get download of the lab guest packages", cwd=dest)


def _key(versions: dict[str, str]) -> str:
    recipe = json.dumps({"recipe": RECIPE, "versions": versions, "modules": MODULES, "init": INIT, "loop": LOOP,
                         "hook": HOOK, "pool": POOL_SIZE}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


class _Cpio:
    """A cpio 'newc' archive (the initramfs format), built in memory with root ownership."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 0
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.parts.append(header + b"\0" * (-len(header) % 4))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self.dirs:
            return
        self.dir(os.path.dirname(name))
        self.dirs.add(name)
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def gzipped(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return gzip.compress(b"".join(self.parts), compresslevel=6, mtime=0)


def _module_file(modroot: Path, name: str) -> Path | None:
    for pattern_ in (f"{name}.ko", f"{name}.ko.xz", f"{name}.ko.zst"):
        found = sorted(modroot.rglob(pattern_))
        if found:
            return found[0]
    return None


def _module_bytes(path: Path) -> bytes:
    """busybox insmod wants plain .ko files; newer Debian kernels ship them compressed."""
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


def _libraries(binary: Path) -> list[Path]:
    """The host's copies of the shared libraries (and loader) the binary links against, as ldd finds them."""
    out = _run(["ldd", str(binary)], f"ldd {binary.name}")
    libs: list[Path] = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            lib = line.split()[0]
            raise LabError(f"{binary.name} needs {lib}, which this host lacks: apt-get install the package that "
                           f"ships it (apt-file search {lib}), e.g. libglib2.0-0 libnuma1 liburing2 libudev1")
        m = re.match(r"(?:\S+\s+=>\s+)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _build(versions: dict[str, str], work: Path) -> tuple[bytes, bytes, list[str]]:
    """Kernel image, gzipped initramfs, and the modules it loads."""
    debs = work / "debs"
    root = work / "root"
    debs.mkdir()
    root.mkdir()
    _download(versions, debs)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise LabError(f"the kernel package {next(iter(versions))} holds no /boot/vmlinuz-*")
    kver = kernels[0].name.removeprefix("vmlinuz-")
    modroot = next((p for p in (root / "lib/modules" / kver, root / "usr/lib/modules" / kver) if p.is_dir()), None)
    if modroot is None:
        raise LabError(f"the kernel package holds no modules directory for {kver}")
    busybox = next((p for p in (root / "bin/busybox", root / "usr/bin/busybox") if p.exists()), None)
    agent = next((p for p in (root / "usr/sbin/qemu-ga", root / "usr/bin/qemu-ga") if p.exists()), None)
    mke2fs = next((p for p in (root / "sbin/mke2fs", root / "usr/sbin/mke2fs") if p.exists()), None)
    if busybox is None or agent is None or mke2fs is None:
        raise LabError(f"{BUSYBOX}, {AGENT} or {E2FSPROGS} did not unpack a busybox / qemu-ga / mke2fs binary")

    cpio = _Cpio()
    for d in ("dev", "proc", "sys", "run", "tmp", "mnt", "etc/qemu", "lab", "usr/sbin"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.symlink("var/run", "/run")
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = _run([str(busybox), "--list"], "busybox --list").split()
    for applet in sorted(set(applets) - {"busybox"}):
        cpio.symlink(f"bin/{applet}", "busybox")
    loaded = []
    for name in MODULES:
        path = _module_file(modroot, name)
        if path is not None:  # otherwise built in (modules.builtin) or not needed by this kernel
            cpio.file(f"lib/modules/{name}.ko", _module_bytes(path))
            loaded.append(name)
    if "virtio_blk" not in loaded and not _builtin(modroot, "virtio_blk"):
        raise LabError(f"kernel {kver} has virtio_blk neither as a module nor built in")
    cpio.file("usr/sbin/qemu-ga", agent.read_bytes(), 0o755)
    cpio.symlink("bin/qemu-ga", "/usr/sbin/qemu-ga")
    cpio.file(MKE2FS, mke2fs.read_bytes(), 0o755)
    for lib in sorted({*_libraries(agent), *_libraries(mke2fs)}):
        cpio.file(str(lib), lib.resolve().read_bytes(), 0o755)
    cpio.file("etc/qemu/fsfreeze-hook", hook_script().encode(), 0o755)
    cpio.file("lab/loop", loop_script().encode())
    cpio.file(POOL_PATH, pool())
    cpio.file("init", init_script(loaded).encode(), 0o755)
    return kernels[0].read_bytes(), cpio.gzipped(), loaded


def _builtin(modroot: Path, name: str) -> bool:
    builtin = modroot / "modules.builtin"
    return builtin.exists() and any(line.rsplit("/", 1)[-1] == f"{name}.ko" for line in builtin.read_text().split())


def _install_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)


def ensure_guest() -> GuestImage:
    """The cached lab guest for the current Debian package versions, built first if needed (about 10 s).

    Builds for older versions are kept: stopped lab VMs may still boot from them.
    """
    _install_dir(LAB_ROOT)
    _install_dir(GUEST_ROOT)
    versions = resolve_versions()
    key = _key(versions)
    final = GUEST_ROOT / key
    with open(GUEST_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find the result
        if not (final / "manifest.json").exists():
            work = Path(tempfile.mkdtemp(prefix=".build-", dir=GUEST_ROOT))
            try:
                kernel, initrd, loaded = _build(versions, work)
                out = work / "out"
                out.mkdir(mode=0o755)
                (out / "vmlinuz").write_bytes(kernel)
                (out / "initrd.gz").write_bytes(initrd)
                manifest = {"key": key, "versions": versions, "modules": loaded}
                (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
                for f in out.iterdir():
                    f.chmod(0o644)
                shutil.rmtree(final, ignore_errors=True)
                out.rename(final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return GuestImage(final / "vmlinuz", final / "initrd.gz", key, versions)
