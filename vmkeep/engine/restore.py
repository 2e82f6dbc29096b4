"""Restore of one disk of a restore point into a raw file or a qcow2 image.

The index is complete, so restore is one pass over it: zero slots are skipped (the target
reads as zeros there), every other chunk is fetched, checked, decrypted, decompressed,
re-hashed and written at its offset by worker threads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmkeep.errors import ImageError, UsageError
from vmkeep.fsutil import start_writeback
from vmkeep.pipeline import bounded_map
from vmkeep.progress import NoProgress, Progress
from vmkeep.repository.index import DiskIndex
from vmkeep.repository.repo import Repository
from vmkeep.transport.nbd_client import NbdExport
from vmkeep.transport.qemu_nbd import ImageInfo, create_image, serve_image

DEFAULT_WORKERS = 6


class DiskTarget(Protocol):
    def pwrite(self, data: bytes, offset: int) -> None: ...


@dataclass
class RestoreStats:
    size: int
    bytes_written: int = 0
    chunks: int = 0
    seconds: float = 0.0


class RawFileTarget:
    """A sparse raw file written with pwrite (which releases the GIL); each written range starts
    its writeback at once so the disk works while the next chunks are decrypted."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.writeback = True

    def pwrite(self, data: bytes, offset: int) -> None:
        start, view = offset, memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        if self.writeback:
            self.writeback = start_writeback(self.fd, start, len(data))


@contextmanager
def open_target(path: Path, fmt: str, size: int, workers: int) -> Iterator[DiskTarget]:
    """Create ``path`` (refusing to overwrite) and yield a writer; on failure the file is removed."""
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"unsupported output format {fmt!r}: use raw or qcow2")
    if path.exists():
        raise UsageError(f"{path} already exists; choose another --output or remove it first")
    try:
        if fmt == "raw":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, size)
                yield RawFileTarget(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            create_image(path, "qcow2", size)
            with serve_image(ImageInfo(path, "qcow2", size), readonly=False, connections=workers + 1) as uri:
                export = NbdExport(uri)
                try:
                    yield export
                    export.flush()
                finally:
                    export.close()
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def restore_disk(
    repo: Repository,
    index: DiskIndex,
    target: DiskTarget,
    *,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
    label: str = "restore",
) -> RestoreStats:
    progress = progress or NoProgress()
    stats = RestoreStats(size=index.size)
    started = time.monotonic()
    slots = list(index.nonzero())
    task = progress.task(label, sum(index.slot_length(s) for s, _ in slots))

    def work(item: tuple[int, bytes]) -> int:
        slot, cid = item
        length = index.slot_length(slot)
        data = repo.load_chunk(cid, length)
        target.pwrite(data, slot * index.chunk_size)
        task.advance(length)
        return length

    def done(_item: tuple[int, bytes], length: int) -> None:
        stats.bytes_written += length
        stats.chunks += 1

    try:
        bounded_map(work, slots, workers, done)
    except OSError as exc:
        raise ImageError(f"writing the restored disk failed: {exc}") from None
    finally:
        task.finish()
    stats.seconds = time.monotonic() - started
    return stats
