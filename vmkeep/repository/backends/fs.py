"""Repository on a local (or NFS-mounted) filesystem.

Atomicity: every object is written to a unique temporary name in the same directory and
renamed into place. Durability: chunk files are not fsynced one by one; :meth:`flush` issues a
single ``syncfs`` on the repository's filesystem before the manifest that references them is
written with fsync + rename + fsync of its directory. A crash therefore leaves either the old
state or the new one. Chunks are written with O_DIRECT where the filesystem allows it
(:mod:`.direct_io`), which spares the CPU the page-cache copy and the writeback.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from vmkeep.errors import BackendError, ObjectMissing
from vmkeep.fsutil import in_memory, start_writeback, syncfs
from vmkeep.repository.backends import direct_io
from vmkeep.repository.backends.base import Backend, Data, ObjectInfo, check_key

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
TRASH = "trash"


def _write_all(fd: int, parts: list[bytes | bytearray | memoryview]) -> None:
    """One writev for all parts; loops only on a short write."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _translate(exc: OSError, what: str) -> BackendError:
    log.debug("writing %s failed: %s (errno %s)", what, exc, exc.errno)
    if exc.errno == errno.ENOSPC:
        return BackendError(f"the repository's filesystem is full while writing {what}; free space and retry")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BackendError(f"no permission to write {what}: {exc.strerror}")
    return BackendError(f"cannot write {what}: {exc}")


class FilesystemBackend(Backend):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = str(self.root)
        self._made_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._start_writeback = True
        self._direct: bool | None = None  # O_DIRECT for chunks: decided at the first big write

    def _writeback(self, fd: int) -> None:
        """Start writing the file to disk now, without waiting: disk writes then overlap with the
        hashing and encryption of the next chunks instead of all piling up for the final syncfs."""
        if not start_writeback(fd):
            self._start_writeback = False  # not supported here; syncfs still makes it durable
            log.debug("%s: early writeback unsupported; the final syncfs makes chunks durable", self.root)

    def _path(self, key: str, *, prefix: bool = False) -> Path:
        """Where ``key`` lives: always under the root (see :func:`check_key`)."""
        return self.root / check_key(key, prefix=prefix)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._made_dirs:
            return
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._made_dirs.add(directory)

    def put(self, key: str, data: Data, *, if_absent: bool = False, durable: bool = False) -> bool:
        path = self._path(key)
        if if_absent and path.exists():
            return False
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
        try:
            self._ensure_dir(path.parent)
            self._write_new(tmp, data if isinstance(data, list) else [data], durable)
            if if_absent:
                # link() fails if the name exists: a concurrent writer of the same key wins.
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    log.debug("%s stored meanwhile by another writer: kept", key)
                    return False
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
            if durable:
                self._fsync_dir(path.parent)
            return True
        except OSError as exc:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass  # never created, or already moved into place
            except OSError as cleanup:
                log.warning("cannot remove the temporary %s (%s); `vmkeep repo gc` removes it later", tmp, cleanup)
            raise _translate(exc, key) from exc

    def _use_direct(self) -> bool:
        if self._direct is None:
            try:
                self._direct = not in_memory(str(self.root))  # on tmpfs it would only add a copy
            except OSError as exc:
                log.debug("%s: cannot tell its filesystem yet (%s): buffered writes for now", self.root, exc)
                return False  # no root yet: buffered now, decided once it exists
        return self._direct

    def _goes_direct(self, size: int) -> bool:
        return size >= direct_io.MIN_SIZE and self._use_direct()

    def staging_buffer(self, size: int) -> memoryview | None:
        return direct_io.staging(size) if self._goes_direct(size) else None

    def _write_new(self, tmp: Path, parts: list[bytes | bytearray | memoryview], durable: bool) -> None:
        """Write a new file: big objects (chunks) straight to the disk with O_DIRECT where the
        filesystem allows it, everything else through the page cache."""
        if not durable and self._goes_direct(sum(len(p) for p in parts)):
            try:
                direct_io.write_file(str(tmp), parts)
                return
            except direct_io.DirectUnsupported as exc:
                self._direct = False  # the filesystem refuses O_DIRECT: buffered from now on
                log.info("%s refuses O_DIRECT (%s): chunks go through the page cache", self.root, exc)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, parts)
            if durable:
                os.fsync(fd)
            elif self._start_writeback:
                self._writeback(fd)
        finally:
            os.close(fd)

    def _fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{key} is missing from the repository at {self.root}") from exc
        except OSError as exc:
            raise BackendError(f"cannot read {key}: {exc}") from exc

    def prefetch(self, keys: list[str]) -> None:
        """The kernel reads the files into the page cache in the background (chunks are written
        with O_DIRECT, so a chunk read back soon after is not cached)."""
        for key in keys:
            try:
                fd = os.open(self._path(key), os.O_RDONLY)
            except OSError:
                continue  # a missing object is reported by the read itself
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def touch(self, key: str) -> bool:
        try:
            os.utime(self._path(key))
            return True
        except FileNotFoundError:
            return False

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            log.debug("%s already gone", key)

    def delete_if_older(self, key: str, cutoff: float) -> int:
        """Move the object aside, then look at its mtime: a touch that came first is seen and
        the object is put back; a touch that comes later finds nothing and the writer stores
        the chunk again itself."""
        path = self._path(key)
        trash = self.root / TRASH / f"{uuid.uuid4().hex}"
        self._ensure_dir(trash.parent)
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return 0
        st = os.stat(trash)
        if st.st_mtime >= cutoff:
            try:
                os.link(trash, path)
            except FileExistsError:
                pass  # a writer stored it again meanwhile: identical content
            os.unlink(trash)
            return 0
        os.unlink(trash)
        return st.st_size

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix, prefix=True)
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                if name.endswith(TMP_SUFFIX):
                    continue
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root)
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, st.st_size, st.st_mtime)

    def flush(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs(fd)
        except OSError as exc:
            raise _translate(exc, "chunks (syncfs)") from exc
        finally:
            os.close(fd)

    def now(self) -> float:
        key = "clock"
        self.put(key, str(time.time()).encode())
        info = self.stat(key)
        assert info is not None
        return info.mtime

    def stale_temporaries(self, older_than: float) -> Iterator[Path]:
        """Temporary files left by a writer that died mid-put."""
        for dirpath, _d, filenames in os.walk(self.root):
            for name in filenames:
                if name.endswith(TMP_SUFFIX):
                    full = Path(dirpath) / name
                    try:
                        if full.stat().st_mtime < older_than:
                            yield full
                    except FileNotFoundError:
                        continue
