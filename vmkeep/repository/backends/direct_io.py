"""Writing big objects with O_DIRECT: straight from an aligned buffer to the disk.

A buffered write copies every byte into freshly allocated page-cache pages and leaves the
kernel to write them back later — on two cores that copy and the writeback compete with hashing
and encryption for the CPU. O_DIRECT skips both: the device reads the buffer itself. Each thread
has one page-aligned staging buffer; the chunk encoder writes straight into it
(:func:`staging`), other objects are gathered into it. The write is padded to the alignment and
the file cut back to its true length.

O_DIRECT writes bypass the page cache but not the device's volatile cache, so durability is
unchanged: the backend's ``syncfs`` before a manifest still flushes them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Sequence

from vmkeep.buffers import AlignedBuffer, Bytes, address_of, copy_into

ALIGN = 4096  # covers every logical block size Linux devices use (512 or 4096 bytes)
MIN_SIZE = 256 * 1024  # smaller objects gain nothing; they go through the page cache


class DirectUnsupported(Exception):
    """The filesystem refuses O_DIRECT (some FUSE filesystems, older tmpfs): write buffered instead."""


_local = threading.local()


def _buffer(size: int) -> AlignedBuffer:
    padded = -(-size // ALIGN) * ALIGN
    buf: AlignedBuffer | None = getattr(_local, "buffer", None)
    if buf is None or buf.size < padded:
        buf = _local.buffer = AlignedBuffer(padded)
    return buf


def staging(size: int) -> memoryview:
    """This thread's aligned buffer, for an object of up to ``size`` bytes to be encoded into.

    An object written from its start (a single part) goes to the disk without another copy.
    The view is valid until the thread's next call.
    """
    return _buffer(size).view[:size]


def _gather(parts: Sequence[Bytes], total: int) -> AlignedBuffer:
    buf = _buffer(total)
    if len(parts) == 1 and isinstance(parts[0], memoryview) and not parts[0].readonly \
            and address_of(parts[0]) == buf.address:
        return buf  # encoded in place
    offset = 0
    for part in parts:
        copy_into(buf.view[offset:], part)
        offset += len(part)
    return buf


def write_file(path: str, parts: Sequence[Bytes]) -> int:
    """Create ``path`` (which must not exist) holding ``parts`` back to back; return its size.

    Raises :class:`DirectUnsupported` when the filesystem refuses O_DIRECT; nothing is left behind.
    """
    total = sum(len(p) for p in parts)
    padded = -(-total // ALIGN) * ALIGN
    buf = _gather(parts, total)
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
