"""File-level restore: files of a restore point, without restoring the VM.

The point's disk is served read-only from the repository (vmkeep.engine.mount) and opened with
libguestfs, which mounts ext2/3/4, xfs, FAT and NTFS read-only in its own appliance. Guest paths
are never trusted: the tree is walked with ``lstat``, symbolic links are recreated as links and
never followed, and the output tree is written only through directory descriptors opened with
``O_NOFOLLOW`` (``mkdirat``, ``openat(O_EXCL)``, ``symlinkat``, ``fchmod``, ``futimens``), so no
link planted in the output, before or during the copy, can send a write outside it. Unless the
guest's owners are asked for (root only), setuid, setgid, sticky and world-write bits are dropped:
a copy owned by the user running vmkeep, often root, must not become a setuid binary on the host.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import logging
import os
import stat
import unicodedata
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

from vmkeep.engine.mount import PointSpec, serve
from vmkeep.errors import UsageError, VmkeepError
from vmkeep.transport.nbd_client import unix_socket_of

log = logging.getLogger(__name__)

# Dropped from every restored mode unless the guest's owners are kept: a guest's setuid/setgid
# program owned by the host user (often root) would run with that user's rights, and a
# world-writable file or directory lets any local user change or plant restored data.
DANGEROUS_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
READ_CHUNK = 1 << 20  # one pread: libguestfs' protocol caps a call's reply near 2 MiB
_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class FileRestoreError(VmkeepError):
    """A guest file could not be listed or copied out."""


def shown(text: str) -> str:
    """``text`` (a guest or host path) safe to print on a terminal or in JSON: control characters
    (C0, DEL, C1), bidirectional and line-separator formatting characters and bytes that are not
    UTF-8 become escapes (``\\x1b``, ``\\n``, ``\\xff``, ``\\u0085``, ``\\u202e``) and a backslash
    ``\\\\``, so a guest name can neither drive the terminal nor pass for another name."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x80 and unicodedata.category(ch) == "Cc":
            out.append(f"\\x{code:02x}")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") and not 0x200C <= code <= 0x200D:
            out.append(f"\\u{code:04x}")  # C1, bidi overrides, separators; ZWJ/ZWNJ (emoji, scripts) kept
        else:
            out.append(ch)
    return "".join(out)


def _guest_bytes(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _guest_str(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


@dataclass
class Entry:
    path: str  # as the guest names it; bytes that are not UTF-8 kept as surrogate escapes
    kind: str  # file, dir, link, other
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    target: str | None = None  # a link's target, as the guest wrote it
    mtime_ns: int = field(default=0, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """For output: the path and target escaped (:func:`shown`), the time in seconds."""
        d = {k: v for k, v in self.__dict__.items() if k != "mtime_ns"}
        d["path"] = shown(self.path)
        d["target"] = None if self.target is None else shown(self.target)
        return d


def _kind(mode: int) -> str:
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "link" if stat.S_ISLNK(mode) else \
        "other"


class _StatNS(ctypes.Structure):
    _fields_ = [(f"st_{n}", ctypes.c_int64) for n in (
        "dev", "ino", "mode", "nlink", "uid", "gid", "rdev", "size", "blksize", "blocks", "atime_sec", "atime_nsec",
        "mtime_sec", "mtime_nsec", "ctime_sec", "ctime_nsec", "spare1", "spare2", "spare3", "spare4", "spare5",
        "spare6")]


@cache
def _libguestfs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libguestfs and libc with the prototypes :class:`_BytePaths` calls (once)."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    lib = ctypes.CDLL("libguestfs.so.0")
    h, s = ctypes.c_void_p, ctypes.c_char_p
    for name, restype, argtypes in (
            ("guestfs_lstatns", ctypes.POINTER(_StatNS), [h, s]), ("guestfs_free_statns", None, [ctypes.c_void_p]),
            ("guestfs_readlink", ctypes.c_void_p, [h, s]), ("guestfs_ls0", ctypes.c_int, [h, s, s]),
            ("guestfs_find0", ctypes.c_int, [h, s, s]), ("guestfs_download", ctypes.c_int, [h, s, s]),
            ("guestfs_pread", ctypes.c_void_p, [h, s, ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_size_t)]),
            ("guestfs_last_error", s, [h])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    libc = ctypes.CDLL(None)
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    return lib, libc


class _BytePaths:
    """The few libguestfs calls file restore needs, with guest paths as bytes.

    The Python binding converts every path strictly to and from UTF-8, so one guest name that is
    not UTF-8 (any bytes but / and NUL make a valid Linux name) fails the listing of its whole
    directory and cannot be read at all. The C API takes bytes: these calls use it, on the same
    handle, through ctypes."""

    def __init__(self, g: Any) -> None:
        self.lib, self.libc = _libguestfs()
        self.h = ctypes.pythonapi.PyCapsule_GetPointer(g._o, b"guestfs_h")  # the binding's guestfs_h *

    def _failed(self) -> RuntimeError:
        return RuntimeError((self.lib.guestfs_last_error(self.h) or b"unknown error").decode("utf-8", "replace"))

    def lstat(self, path: bytes) -> _StatNS:
        st = self.lib.guestfs_lstatns(self.h, path)
        if not st:
            raise self._failed()
        try:
            return _StatNS.from_buffer_copy(st.contents)
        finally:
            self.lib.guestfs_free_statns(st)

    def readlink(self, path: bytes) -> bytes:
        ptr = self.lib.guestfs_readlink(self.h, path)
        if not ptr:
            raise self._failed()
        try:
            return ctypes.string_at(ptr)
        finally:
            self.libc.free(ptr)

    def download(self, path: bytes, fd: int) -> None:
        """The guest file's bytes into ``fd``, through its /proc/self/fd link: the very file that
        was opened, whatever happens to its name meanwhile."""
        if self.lib.guestfs_download(self.h, path, f"/proc/self/fd/{fd}".encode()) == -1:
            raise self._failed()

    def pread(self, path: bytes, count: int, offset: int) -> bytes:
        """Up to ``count`` bytes of the guest file from ``offset`` (libguestfs caps one call near
        2 MiB); empty at its end."""
        size = ctypes.c_size_t()
        ptr = self.lib.guestfs_pread(self.h, path, count, offset, ctypes.byref(size))
        if not ptr:
            raise self._failed()
        try:
            return ctypes.string_at(ptr, size.value)
        finally:
            self.libc.free(ptr)

    def names(self, call: str, path: bytes) -> list[bytes]:
        """What ``guestfs_ls0`` or ``guestfs_find0`` lists (NUL-separated), read back from a memfd."""
        fd = os.memfd_create("vmkeep-guest-names", os.MFD_CLOEXEC)
        try:
            if getattr(self.lib, f"guestfs_{call}")(self.h, path, f"/proc/self/fd/{fd}".encode()) == -1:
                raise self._failed()
            with os.fdopen(os.dup(fd), "rb") as listing:
                return [n for n in listing.read().split(b"\0") if n]
        finally:
            os.close(fd)


def require_root_for_owners() -> None:
    """``--preserve-owner`` gives files away and keeps setuid/setgid bits: only root may."""
    if os.geteuid() != 0:
        raise UsageError("--preserve-owner restores the guest's owners and setuid/setgid bits, which only root may "
                         "set: run vmkeep as root, or leave --preserve-owner out to get the files as your own with "
                         "those bits and world-write dropped")


@contextmanager
def _host(what: str, path: Path) -> Iterator[None]:
    """Turns a failure writing the output into an error that names the host path and what to do."""
    try:
        yield
    except FileExistsError as exc:
        raise FileRestoreError(f"cannot {what} {shown(str(path))}: {exc.strerror} (an existing file is never "
                               "overwritten: choose an empty --output or remove it)") from exc
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise FileRestoreError(f"cannot {what} {shown(str(path))}: it is a symbolic link or not a directory in "
                                   "the output, and links in the output are never followed: remove it or choose "
                                   "another --output") from exc
        raise FileRestoreError(f"cannot {what} {shown(str(path))}: {exc.strerror}") from exc


class GuestFiles:
    """One point's disk opened with libguestfs, its filesystem mounted read-only at /."""

    def __init__(self, g: Any, hint: str = "") -> None:
        self.g = g
        self.hint = hint  # what to do when the point's data reads back as an I/O error
        self.raw = _BytePaths(g)

    def entry(self, path: str) -> Entry:
        raw = _guest_bytes(path)
        try:
            st = self.raw.lstat(raw)
            kind = _kind(st.st_mode)
            target = _guest_str(self.raw.readlink(raw)) if kind == "link" else None
        except RuntimeError as exc:
            raise FileRestoreError(f"{shown(path)}: {shown(str(exc))}") from exc
        mtime_ns = st.st_mtime_sec * 1_000_000_000 + st.st_mtime_nsec
        return Entry(path, kind, st.st_size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                     st.st_mtime_sec + st.st_mtime_nsec / 1e9, target, mtime_ns)

    def _names(self, directory: str) -> list[bytes]:
        """A guest directory's names, sorted; a name no filesystem can hold is refused."""
        try:
            names = sorted(self.raw.names("ls0", _guest_bytes(directory)))
        except RuntimeError as exc:
            raise FileRestoreError(f"cannot list {shown(directory)}: {shown(str(exc))}{self.hint}") from exc
        for name in names:
            if b"/" in name or name in (b".", b".."):
                raise FileRestoreError(f"refusing the guest name {shown(_guest_str(name))} in {shown(directory)}")
        return names

    def _children(self, directory: str) -> Iterator[tuple[bytes, Entry]]:
        for name in self._names(directory):
            yield name, self.entry(str(PurePosixPath(directory) / _guest_str(name)))

    def read(self, path: str, offset: int, count: int = READ_CHUNK) -> bytes:
        """A piece of a guest file (empty at its end): a download streamed in pieces holds the
        appliance only for one piece at a time."""
        try:
            return self.raw.pread(_guest_bytes(path), count, offset)
        except RuntimeError as exc:
            raise FileRestoreError(f"cannot read {shown(path)} from the point: {shown(str(exc))}{self.hint}") from exc

    def listdir(self, path: str) -> list[Entry]:
        top = self.entry(path)
        if top.kind != "dir":
            return [top]
        return [e for _name, e in self._children(path)]

    def walk(self, path: str) -> Iterator[Entry]:
        """``path`` and, for a directory, everything under it; links are not followed."""
        top = self.entry(path)
        yield top
        if top.kind == "dir":
            for _name, e in self._children(path):
                yield from self.walk(e.path)

    def find(self, pattern: str) -> list[str]:
        """Paths (from /) whose full path or name matches the glob ``pattern``."""
        try:
            listed = self.raw.names("find0", b"/")
        except RuntimeError as exc:
            raise FileRestoreError(f"cannot search the point: {shown(str(exc))}{self.hint}") from exc
        found = []
        for rel in listed:
            full = "/" + _guest_str(rel)
            if fnmatch.fnmatchcase(full, pattern) or fnmatch.fnmatchcase(PurePosixPath(full).name, pattern):
                found.append(full)
        return found

    def copy_out(self, path: str, output: Path, preserve_owner: bool = False) -> list[str]:
        """Copy ``path`` (a file, or a directory tree) into ``output``, keeping modes and times
        (without the :data:`DANGEROUS_BITS` unless ``preserve_owner``, which also keeps owners and
        needs root); the host paths written, as they are named (print them through :func:`shown`)."""
        if preserve_owner:
            require_root_for_owners()
        top = self.entry(path)
        with _host("create", output):
            output.mkdir(parents=True, exist_ok=True)
        root = output.resolve()
        with _host("open", root):
            root_fd = os.open(root, _DIR_FLAGS)
        written: list[str] = []
        try:
            name = PurePosixPath(path).name
            if name == ".." or (not name and top.kind != "dir"):
                raise FileRestoreError(f"refusing the guest path {shown(path)}: name it without '..'")
            if name:
                self._copy(top, root_fd, _guest_bytes(name), root / name, written, preserve_owner)
            else:  # the guest's / itself is the output directory
                written.append(str(root))
                self._copy_dir(top, root_fd, root, written, preserve_owner)
        finally:
            os.close(root_fd)
        return written

    def _copy(self, e: Entry, parent_fd: int, name: bytes, host: Path, written: list[str],
              preserve_owner: bool) -> None:
        """One guest entry as ``name`` in the directory ``parent_fd``; never through a link."""
        if e.kind == "dir":
            with _host("create the directory", host):
                try:
                    os.mkdir(name, 0o700, dir_fd=parent_fd)  # only ours until its contents are in
                except FileExistsError:
                    pass  # merged into an existing directory, if it really is one (O_NOFOLLOW below)
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            written.append(str(host))
            try:
                self._copy_dir(e, fd, host, written, preserve_owner)
            finally:
                os.close(fd)
        elif e.kind == "link":
            with _host("create the link", host):
                os.symlink(_guest_bytes(e.target or ""), name, dir_fd=parent_fd)  # as it was, never followed
                if preserve_owner:
                    os.chown(name, e.uid, e.gid, dir_fd=parent_fd, follow_symlinks=False)
                os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
            written.append(str(host))
        elif e.kind == "file":
            with _host("create", host):
                fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=parent_fd)
            try:
                try:
                    self.raw.download(_guest_bytes(e.path), fd)
                except BaseException as exc:  # interrupted too: no half-copied file is left
                    with suppress(OSError):
                        os.unlink(name, dir_fd=parent_fd)
                    if isinstance(exc, RuntimeError):
                        raise FileRestoreError(f"cannot read {shown(e.path)} from the point: {shown(str(exc))}"
                                               f"{self.hint}") from exc
                    raise
                with _host("set the mode and time of", host):
                    _set_metadata(fd, e, preserve_owner)
            finally:
                os.close(fd)
            written.append(str(host))
        # devices, sockets, fifos: nothing to restore as a file

    def _copy_dir(self, e: Entry, fd: int, host: Path, written: list[str], preserve_owner: bool) -> None:
        for name, child in self._children(e.path):
            self._copy(child, fd, name, host / _guest_str(name), written, preserve_owner)
        with _host("set the mode and time of", host):
            _set_metadata(fd, e, preserve_owner)  # after its contents, or writing them would move the time


def _set_metadata(fd: int, e: Entry, preserve_owner: bool) -> None:
    """Owner (when kept), mode and times through the open descriptor, never a path."""
    mode = e.mode
    if preserve_owner:
        os.fchown(fd, e.uid, e.gid)  # before the mode: a change of owner clears setuid/setgid
    elif mode & DANGEROUS_BITS:
        log.debug("dropping %o from the mode %o of %s", mode & DANGEROUS_BITS, mode, shown(e.path))
        mode &= ~DANGEROUS_BITS
    os.fchmod(fd, mode)
    os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))


def _runs_in_a_vm() -> bool:
    """Whether this machine is itself a virtual machine (the CPU says so)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " hypervisor" in line for line in cpuinfo)
    except OSError:
        return False


def _appliance_on_this_machine(g: Any) -> bool:
    """libguestfs boots a small appliance VM; inside a VM that is nested KVM, which on the machines
    vmkeep runs on fails or stalls, so the appliance is emulated there (slower, but it boots). An
    administrator's own LIBGUESTFS_BACKEND_SETTINGS wins. Whether KVM may still be tried."""
    settings = os.environ.get("LIBGUESTFS_BACKEND_SETTINGS")
    if settings is None and _runs_in_a_vm():
        log.info("this machine is a VM: libguestfs' appliance runs emulated (force_tcg)")
        g.set_backend_settings(["force_tcg"])
        return False
    return "force_tcg" not in (settings or "")


def _logging_into_ours(g: Any, guestfs: Any) -> None:
    """libguestfs' messages (its warnings always; with --debug, the appliance's console and each
    call) go to vmkeep's log instead of stderr."""
    events = guestfs.EVENT_WARNING
    if log.isEnabledFor(logging.DEBUG):
        g.set_verbose(True)
        g.set_trace(True)
        events |= guestfs.EVENT_APPLIANCE | guestfs.EVENT_LIBRARY | guestfs.EVENT_TRACE

    def forward(event: int, _handle: int, buf: bytes, _array: Any) -> None:
        text = buf.decode(errors="replace").rstrip() if isinstance(buf, bytes) else str(buf).rstrip()
        if text:
            log.log(logging.WARNING if event == guestfs.EVENT_WARNING else logging.DEBUG, "libguestfs: %s", text)

    g.set_event_callback(forward, events)


def _what(specs: list[PointSpec]) -> str:
    """``vm@point disk vda`` (or ``disks vda, vdb``) for messages."""
    disks = ", ".join(s.disk for s in specs)
    return f"{specs[0].name}@{specs[0].point} disk{'s' if len(specs) > 1 else ''} {disks}"


def _launched(guestfs: Any, socks: list[str], specs: list[PointSpec], emulated: bool = False) -> Any:
    """A libguestfs handle with the point's disks (in order: /dev/sda, /dev/sdb, …), its appliance
    running. An appliance that fails under KVM (nested virtualisation: "failed to set MSR …") is
    started again emulated, said in one line; nothing to set by hand."""
    g = guestfs.GuestFS(python_return_dict=True)
    kvm = False
    try:
        _logging_into_ours(g, guestfs)
        if emulated:
            g.set_backend_settings(["force_tcg"])
        else:
            kvm = _appliance_on_this_machine(g) and os.path.exists("/dev/kvm")
        for sock in socks:
            g.add_drive_opts("", protocol="nbd", server=[f"unix:{sock}"], format="raw", readonly=True)
        g.launch()
        return g
    except RuntimeError as exc:
        g.close()
        if kvm:
            log.warning("libguestfs' appliance did not start with KVM (%s); starting it emulated, which is "
                        "slower", (str(exc).strip().splitlines() or ["?"])[0][:200])
            return _launched(guestfs, socks, specs, emulated=True)
        raise FileRestoreError(f"libguestfs could not open {_what(specs)}: {exc}") from exc
    except BaseException:
        g.close()
        raise


@dataclass
class Filesystem:
    device: str  # as libguestfs names it: /dev/sda1, /dev/sdb, /dev/vg/root
    kind: str  # ext4, xfs, vfat, ntfs, …
    disk: str | None  # the point's disk it is on (None: spans disks, an LVM volume say)
    size: int = 0  # of the partition or volume holding it (0: not known)


class PointFilesystems:
    """The filesystems of a point's disks in one libguestfs appliance; one of them is mounted
    read-only at / at a time (:meth:`mount`). Not for two threads at once: its user serialises."""

    def __init__(self, g: Any, specs: list[PointSpec], found: dict[str, str]) -> None:
        self.g = g
        self.specs = specs
        drives = {f"/dev/sd{chr(ord('a') + i)}": s.disk for i, s in enumerate(specs)}
        self.filesystems = [Filesystem(dev, kind, next((d for prefix, d in drives.items()
                                                         if dev == prefix or dev.startswith(prefix) and
                                                         dev[len(prefix):].isdigit()), None), self._size(dev))
                            for dev, kind in sorted(found.items())]
        s = specs[0]
        self.hint = (f" (a damaged or missing chunk reads as an I/O error: `vmkeep repo verify {s.repo} --point "
                     f"{s.name}@{s.point}` names it)")
        self.mounted: str | None = None

    def _size(self, device: str) -> int:
        try:
            return int(self.g.blockdev_getsize64(device))
        except RuntimeError:  # a filesystem libguestfs names otherwise (btrfs subvolume, …)
            return 0

    @property
    def largest(self) -> Filesystem:
        """The one to show first: the largest is the system's own (/, C:) far more often than the
        first (/boot, an EFI or recovery partition)."""
        return max(self.filesystems, key=lambda f: f.size)

    def mount(self, filesystem: str) -> GuestFiles:
        """``filesystem`` mounted read-only at / (the one mounted before unmounted)."""
        known = {f.device: f for f in self.filesystems}
        if filesystem not in known:
            raise UsageError(f"no filesystem {filesystem} on {_what(self.specs)} (there are: {', '.join(known)})")
        if self.mounted != filesystem:
            if self.mounted is not None:
                self.g.umount_all()
                self.mounted = None
            try:
                self.g.mount_ro(filesystem, "/")
            except RuntimeError as exc:
                raise FileRestoreError(f"cannot mount {filesystem} ({known[filesystem].kind}): {exc}{self.hint}") \
                    from exc
            self.mounted = filesystem
        return GuestFiles(self.g, self.hint)


@contextmanager
def open_point_filesystems(specs: list[PointSpec]) -> Iterator[PointFilesystems]:
    """The disks of ``specs`` (one point's) served read-only from the repository and opened in one
    libguestfs appliance; the filesystems it knows on them (at least one, or
    :class:`FileRestoreError`); everything released afterwards."""
    import guestfs  # Debian's python3-guestfs

    with ExitStack() as servers:
        socks = [unix_socket_of(servers.enter_context(serve(spec))) for spec in specs]
        g = _launched(guestfs, socks, specs)
        try:
            try:
                found = g.list_filesystems()
            except RuntimeError as exc:
                raise FileRestoreError(f"libguestfs could not open {_what(specs)}: {exc}") from exc
            found = {dev: kind for dev, kind in found.items() if kind not in ("unknown", "swap", "")}
            point = PointFilesystems(g, specs, found)
            if not found:
                raise FileRestoreError(f"no readable filesystem on {_what(specs)}: it holds none that libguestfs "
                                       f"knows, or its data is damaged{point.hint}")
            yield point
        finally:
            g.close()


@contextmanager
def open_point_files(spec: PointSpec, filesystem: str | None = None) -> Iterator[GuestFiles]:
    """The point's disk as a read-only filesystem (the only one on it, or ``filesystem``, e.g.
    /dev/sda1); released afterwards."""
    with open_point_filesystems([spec]) as point:
        if filesystem is None:
            if len(point.filesystems) != 1:
                raise UsageError(f"disk {spec.disk} holds {len(point.filesystems)} filesystems "
                                 f"({', '.join(f'{f.device} ({f.kind})' for f in point.filesystems)}): choose one "
                                 "with --filesystem")
            filesystem = point.filesystems[0].device
        yield point.mount(filesystem)
