"""File-level restore: files of a restore point, without restoring the VM.

The point's disk is served read-only from the repository (vmkeep.engine.mount) and opened with
libguestfs, which mounts ext2/3/4, xfs, FAT and NTFS read-only in its own appliance. Guest paths
are never trusted: the tree is walked with ``lstat``, symbolic links are recreated as links and
never followed, and every file is created fresh (``O_EXCL|O_NOFOLLOW``) under a directory that is
checked to be the output's own, so nothing lands outside the output directory.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from vmkeep.engine.mount import PointSpec, serve
from vmkeep.errors import UsageError, VmkeepError

COPY_BLOCK = 4 << 20


class FileRestoreError(VmkeepError):
    """A guest file could not be listed or copied out."""


@dataclass
class Entry:
    path: str
    kind: str  # file, dir, link, other
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    target: str | None = None  # a link's target, as the guest wrote it

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _kind(mode: int) -> str:
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "link" if stat.S_ISLNK(mode) else \
        "other"


class GuestFiles:
    """One point's disk opened with libguestfs, its filesystem mounted read-only at /."""

    def __init__(self, g: Any, hint: str = "") -> None:
        self.g = g
        self.hint = hint  # what to do when the point's data reads back as an I/O error

    def entry(self, path: str) -> Entry:
        try:
            st = self.g.lstatns(path)
        except RuntimeError as exc:
            raise FileRestoreError(f"{path}: {exc}") from None
        kind = _kind(st["st_mode"])
        return Entry(path, kind, st["st_size"], stat.S_IMODE(st["st_mode"]), st["st_uid"], st["st_gid"],
                     st["st_mtime_sec"] + st["st_mtime_nsec"] / 1e9, self.g.readlink(path) if kind == "link" else None)

    def listdir(self, path: str) -> list[Entry]:
        top = self.entry(path)
        if top.kind != "dir":
            return [top]
        names = sorted(self.g.ls(path))
        return [self.entry(str(PurePosixPath(path) / n)) for n in names]

    def walk(self, path: str) -> Iterator[Entry]:
        """``path`` and, for a directory, everything under it; links are not followed."""
        top = self.entry(path)
        yield top
        if top.kind == "dir":
            for name in sorted(self.g.ls(path)):
                yield from self.walk(str(PurePosixPath(path) / name))

    def find(self, pattern: str) -> list[str]:
        """Paths (from /) whose full path or name matches the glob ``pattern``."""
        found = []
        for rel in self.g.find("/"):
            full = "/" + rel
            if fnmatch.fnmatchcase(full, pattern) or fnmatch.fnmatchcase(PurePosixPath(full).name, pattern):
                found.append(full)
        return found

    def copy_out(self, path: str, output: Path) -> list[str]:
        """Copy ``path`` (a file, or a directory tree) into ``output``, keeping modes and times;
        the host paths written."""
        output.mkdir(parents=True, exist_ok=True)
        root = output.resolve()
        base = PurePosixPath(path).parent
        written: list[str] = []
        dirs: list[tuple[Path, Entry]] = []
        for e in self.walk(path):
            rel = PurePosixPath(e.path).relative_to(base)
            if any(part in ("..", "") for part in rel.parts) or rel.is_absolute():
                raise FileRestoreError(f"refusing the guest path {e.path!r}")
            target = root.joinpath(*rel.parts)  # the guest's / itself is the output directory
            _check_inside(root, target.parent if rel.parts else target)
            if e.kind == "dir":
                target.mkdir(exist_ok=True)
                if target.is_symlink() or not target.is_dir():
                    raise FileRestoreError(f"{target} is not a directory of the output")
                dirs.append((target, e))
            elif e.kind == "link":
                os.symlink(e.target or "", target)  # recreated as it was, never followed
                os.utime(target, (e.mtime, e.mtime), follow_symlinks=False)
            elif e.kind == "file":
                self._download(e.path, target)
                os.chmod(target, e.mode)
                os.utime(target, (e.mtime, e.mtime))
            else:
                continue  # devices, sockets, fifos: nothing to restore as a file
            written.append(str(target))
        for target, e in reversed(dirs):  # after their contents, or writing them would move the times
            os.chmod(target, e.mode)
            os.utime(target, (e.mtime, e.mtime))
        return written

    def _download(self, path: str, target: Path) -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            size = self.g.lstatns(path)["st_size"]
            offset = 0
            while offset < size:
                block = self.g.pread(path, min(COPY_BLOCK, size - offset), offset)
                if not block:
                    raise FileRestoreError(f"{path} ended at {offset} of {size} bytes")
                os.write(fd, block)
                offset += len(block)
        except RuntimeError as exc:
            target.unlink(missing_ok=True)
            raise FileRestoreError(f"cannot read {path} from the point: {exc}{self.hint}") from None
        finally:
            os.close(fd)


def _check_inside(root: Path, directory: Path) -> None:
    real = directory.resolve()
    if real != root and root not in real.parents:
        raise FileRestoreError(f"{directory} leads outside the output directory {root}")


@contextmanager
def open_point_files(spec: PointSpec, filesystem: str | None = None) -> Iterator[GuestFiles]:
    """The point's disk as a read-only filesystem (the only one on it, or ``filesystem``, e.g.
    /dev/sda1); released afterwards."""
    import guestfs  # Debian's python3-guestfs

    with serve(spec) as uri, tempfile.TemporaryDirectory(prefix="vmkeep-files-") as _tmp:
        sock = uri.split("socket=", 1)[1]
        g = guestfs.GuestFS(python_return_dict=True)
        try:
            g.add_drive_opts("", protocol="nbd", server=[f"unix:{sock}"], format="raw", readonly=True)
            try:
                g.launch()
                found = g.list_filesystems()
            except RuntimeError as exc:
                raise FileRestoreError(f"libguestfs could not open {spec.name}@{spec.point} disk {spec.disk}: "
                                       f"{exc}") from None
            found = {dev: kind for dev, kind in found.items() if kind not in ("unknown", "swap", "")}
            hint = (f" (a damaged or missing chunk reads as an I/O error: `vmkeep repo verify {spec.repo} --point "
                    f"{spec.name}@{spec.point}` names it)")
            if not found:
                raise FileRestoreError(f"no readable filesystem on disk {spec.disk} of {spec.name}@{spec.point}: it "
                                       f"holds none that libguestfs knows, or its data is damaged{hint}")
            if filesystem is None:
                if len(found) != 1:
                    raise UsageError(f"disk {spec.disk} holds {len(found)} filesystems "
                                     f"({', '.join(f'{d} ({k})' for d, k in found.items())}): choose one "
                                     "with --filesystem")
                filesystem = next(iter(found))
            elif filesystem not in found:
                raise UsageError(f"no filesystem {filesystem} on disk {spec.disk} (there are: {', '.join(found)})")
            try:
                g.mount_ro(filesystem, "/")
            except RuntimeError as exc:
                raise FileRestoreError(f"cannot mount {filesystem} ({found[filesystem]}): {exc}{hint}") from None
            yield GuestFiles(g, hint)
        finally:
            g.close()
