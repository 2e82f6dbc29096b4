"""Writing big objects with O_DIRECT: straight from an aligned buffer to the disk.

A buffered write copies every byte into freshly allocated page-cache pages and leaves the
kernel to write them back later — on two cores that copy and the writeback compete with hashing
and encryption for the CPU. O_DIRECT skips both: the device reads the buffer itself. The object's
parts are gathered into one page-aligned buffer per thread (``memmove`` through ctypes, which
releases the GIL), written padded to the alignment, and the file is cut back to its true length.

O_DIRECT writes bypass the page cache but not the device's volatile cache, so durability is
unchanged: the backend's ``syncfs`` before a manifest still flushes them.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Sequence

ALIGN = 4096  # covers every logical block size Linux devices use (512 or 4096 bytes)
MIN_SIZE = 256 * 1024  # smaller objects gain nothing; they go through the page cache

Part = bytes | bytearray | memoryview


class DirectUnsupported(Exception):
    """The filesystem refuses O_DIRECT (tmpfs, some FUSE filesystems): write buffered instead."""


class _AlignedBuffer:
    """A page-aligned anonymous mapping, grown on demand and kept for the thread's next object."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.view = memoryview(self.map)


_local = threading.local()


def _buffer(size: int) -> _AlignedBuffer:
    buf: _AlignedBuffer | None = getattr(_local, "buffer", None)
    if buf is None or buf.size < size:
        buf = _local.buffer = _AlignedBuffer(size)
    return buf


def _copy_into(address: int, part: Part) -> None:
    """memmove ``part`` to ``address`` without holding the GIL (ctypes releases it for the call)."""
    n = len(part)
    if isinstance(part, bytes):
        ctypes.memmove(address, part, n)
        return
    view = memoryview(part)
    if view.readonly:
        ctypes.memmove(address, bytes(view), n)  # rare: a read-only view of something not bytes
        return
    ctypes.memmove(address, (ctypes.c_char * view.nbytes).from_buffer(view), view.nbytes)


def write_file(path: str, parts: Sequence[Part]) -> int:
    """Create ``path`` (which must not exist) holding ``parts`` back to back; return its size.

    Raises :class:`DirectUnsupported` when the filesystem refuses O_DIRECT; nothing is left behind.
    """
    total = sum(len(p) for p in parts)
    padded = -(-total // ALIGN) * ALIGN
    buf = _buffer(padded)
    offset = 0
    for part in parts:
        _copy_into(buf.address + offset, part)
        offset += len(part)
    if padded > total:
        ctypes.memset(buf.address + total, 0, padded - total)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise DirectUnsupported(str(exc)) from None
        raise
    try:
        written = 0
        while written < padded:
            written += os.pwrite(fd, buf.view[written:padded], written)
        if padded != total:
            os.ftruncate(fd, total)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        if exc.errno == errno.EINVAL:
            raise DirectUnsupported(str(exc)) from None
        raise
    os.close(fd)
    return total
