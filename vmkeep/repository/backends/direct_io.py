"""Writing big objects with O_DIRECT: straight from an aligned buffer to the disk.

A buffered write copies every byte into freshly allocated page-cache pages and leaves the
kernel to write them back later — on two cores that copy and the writeback compete with hashing
and encryption for the CPU. O_DIRECT skips both: the device reads the buffer itself. Each thread
has one page-aligned staging buffer; the chunk encoder writes straight into it
(:func:`staging`), other objects are gathered into it. Only the last partial block goes through
the page cache.

O_DIRECT writes bypass the page cache but not the device's volatile cache, so durability is
unchanged: the backend's ``syncfs`` before a manifest still flushes them.
"""

from __future__ import annotations

import errno
import fcntl
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

    The aligned bulk goes out with O_DIRECT; the last partial block (a chunk's header makes every
    object a few bytes longer than a multiple of the block) through the page cache — padding it
    and cutting the file back made ext4 zero that block again, 5 % of a worker's time.
    Raises :class:`DirectUnsupported` when the filesystem refuses O_DIRECT; nothing is left behind.
    """
    total = sum(len(p) for p in parts)
    aligned = total // ALIGN * ALIGN
    buf = _gather(parts, total)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise DirectUnsupported(str(exc)) from exc
        raise
    try:
        _pwrite_all(fd, buf.view[:aligned], 0)
        if total > aligned:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _pwrite_all(fd, buf.view[aligned:total], aligned)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        if exc.errno == errno.EINVAL:
            raise DirectUnsupported(str(exc)) from exc
        raise
    os.close(fd)
    return total


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)
