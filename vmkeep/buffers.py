"""Big-buffer copies that do not hold the GIL, and the page-aligned buffers direct I/O needs.

A 4 MiB ``memoryview`` slice assignment is a memcpy done with the GIL held, which stalls the
other worker threads for its duration; ``ctypes.memmove`` releases the GIL for the call.
"""

from __future__ import annotations

import ctypes
import mmap

Bytes = bytes | bytearray | memoryview


def address_of(buffer: bytearray | memoryview | mmap.mmap) -> int:
    """The address of a writable buffer's first byte."""
    view = memoryview(buffer)
    return ctypes.addressof((ctypes.c_char * max(view.nbytes, 1)).from_buffer(view))


def copy_into(dest: memoryview, src: Bytes) -> None:
    """Copy ``src`` to the start of ``dest`` (writable, at least as long) without the GIL."""
    n = len(src)
    if n == 0:
        return
    if n > len(dest):
        raise ValueError(f"{n} bytes do not fit into a buffer of {len(dest)}")
    target = address_of(dest)
    if isinstance(src, bytes):
        ctypes.memmove(target, src, n)
        return
    view = memoryview(src)
    if view.readonly:
        ctypes.memmove(target, bytes(view), n)  # rare: a read-only view of something not bytes
    else:
        ctypes.memmove(target, address_of(view), n)


class AlignedBuffer:
    """A page-aligned anonymous mapping (what O_DIRECT requires of a buffer's address)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size)
        self.address = address_of(self.map)
        self.view = memoryview(self.map)
