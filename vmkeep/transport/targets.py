"""Where a restored disk's data goes: the writer protocol, and writers of local image files.

A restore hands each chunk of data to a :class:`DiskWriter` and tells it where the point holds
zeros, so holes never travel. Writers that take data in any order (a file, a writable NBD
export) are written from the engine's worker threads; a *sequential* writer (an upload stream)
gets its data and zeros in ascending offsets from one thread, after ``encode`` has done the heavy
part (compression, framing) on the workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from vmkeep.errors import UsageError
from vmkeep.fsutil import start_writeback
from vmkeep.transport.nbd_client import NbdExport
from vmkeep.transport.qemu_nbd import UNLIMITED, ImageInfo, create_image, serve_image

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2")


class DiskWriter(Protocol):
    """One disk being restored."""

    sequential: bool  # data and zeros must arrive in ascending offsets, from one thread (a stream)

    def encode(self, data: bytes, offset: int) -> Any:
        """Work on a chunk that may run on any worker thread before ``write`` (compression for a
        stream); returns what ``write`` takes. Writers without such work return ``data``."""

    def write(self, encoded: Any, offset: int) -> None:
        """Store an encoded chunk at ``offset``."""

    def zero(self, offset: int, length: int) -> None:
        """The point reads as zeros here; a new, empty disk has nothing to do."""


class RawFileWriter:
    """A new sparse raw file written with pwrite (which releases the GIL); each written range
    starts its writeback at once so the disk works while the next chunks are decrypted."""

    sequential = False

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.writeback = True

    def encode(self, data: bytes, offset: int) -> bytes:
        return data

    def write(self, encoded: bytes, offset: int) -> None:
        start, view = offset, memoryview(encoded)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        if self.writeback:
            self.writeback = start_writeback(self.fd, start, len(encoded))

    def zero(self, offset: int, length: int) -> None:
        """A new sparse file reads as zeros already."""


class NbdWriter:
    """A writable NBD export of a new image: data written, zeros left as they are."""

    sequential = False

    def __init__(self, export: NbdExport) -> None:
        self.export = export

    def encode(self, data: bytes, offset: int) -> bytes:
        return data

    def write(self, encoded: bytes, offset: int) -> None:
        self.export.pwrite(encoded, offset)

    def zero(self, offset: int, length: int) -> None:
        """A new image reads as zeros already."""


@contextmanager
def open_file_writer(path: Path, fmt: str, size: int, connections: int | None = None) -> Iterator[DiskWriter]:
    """Create ``path`` (refusing to overwrite) as a ``fmt`` image of ``size`` bytes and yield its
    writer; on failure the file is removed. ``connections``: how many threads write at once
    (None: any number — each writing thread holds a connection, and one beyond the server's
    limit would wait forever)."""
    if fmt not in FORMATS:
        raise UsageError(f"unsupported output format {fmt!r}: use raw or qcow2")
    if path.exists():
        raise UsageError(f"{path} already exists; choose another --output or remove it first")
    try:
        if fmt == "raw":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, size)
                yield RawFileWriter(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            create_image(path, "qcow2", size)
            log.debug("writing %s through qemu-nbd (%s connections)", path, connections or "any number of")
            limit = UNLIMITED if connections is None else connections + 1  # + the probe's
            with serve_image(ImageInfo(path, "qcow2", size), readonly=False, connections=limit, direct=True) as uri:
                export = NbdExport(uri)
                try:
                    yield NbdWriter(export)
                    export.flush()
                finally:
                    export.close()
    except BaseException:
        path.unlink(missing_ok=True)
        raise
