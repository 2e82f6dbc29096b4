"""Linux file-system calls Python's os module lacks, made through libc (ctypes releases the GIL)."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
SYNC_FILE_RANGE_WRITE = 2


def syncfs(fd: int) -> None:
    """Flush every dirty page of the filesystem holding ``fd`` (one call instead of an fsync per file)."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> bool:
    """Begin writing a file range to disk without waiting for it; False where unsupported.

    Disk writes then overlap with the CPU work on the next data instead of piling up for the
    final flush. It is no durability guarantee: the caller still syncs before committing.
    """
    rc = _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), SYNC_FILE_RANGE_WRITE)
    return bool(rc == 0)


TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6


def filesystem_type(path: str) -> int:
    """The filesystem's magic number (``statfs`` f_type), e.g. :data:`TMPFS_MAGIC`."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(path.encode(), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little")


def in_memory(path: str) -> bool:
    """True on tmpfs or ramfs, where the page cache is the storage and O_DIRECT saves nothing."""
    return filesystem_type(path) in (TMPFS_MAGIC, RAMFS_MAGIC)
