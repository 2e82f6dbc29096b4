"""Restore of one disk of a restore point into a disk writer (a file, an NBD export, an upload).

The index is complete, so restore is one pass over it: every non-zero chunk is fetched, checked,
decrypted, decompressed, re-hashed and handed to the writer by worker threads; the writer is told
where the zero runs are instead of being sent them. A sequential writer (a stream) gets its data
and zeros in offset order while the workers still prepare chunks ahead of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vmkeep.errors import ImageError
from vmkeep.pipeline import bounded_map, ordered_map
from vmkeep.progress import NoProgress, Progress
from vmkeep.repository.index import DiskIndex
from vmkeep.repository.repo import Repository
from vmkeep.transport.targets import DiskWriter

DEFAULT_WORKERS = 6


@dataclass
class RestoreStats:
    size: int
    bytes_written: int = 0
    chunks: int = 0
    seconds: float = 0.0


def zero_runs(index: DiskIndex, data: list[tuple[int, bytes]] | None = None) -> list[tuple[int, int]]:
    """(offset, length) of each run of zero slots, in order; ``data``: the index's non-zero
    slots when the caller has listed them already (one pass over a large index is enough)."""
    runs: list[tuple[int, int]] = []
    at = 0
    for slot, _cid in index.nonzero() if data is None else data:
        start = slot * index.chunk_size
        if start > at:
            runs.append((at, start - at))
        at = start + index.slot_length(slot)
    if at < index.size:
        runs.append((at, index.size - at))
    return runs


def restore_disk(
    repo: Repository,
    index: DiskIndex,
    writer: DiskWriter,
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

    def load(item: tuple[int, bytes]) -> object:
        slot, cid = item
        return writer.encode(repo.load_chunk(cid, index.slot_length(slot)), slot * index.chunk_size)

    def count(item: tuple[int, bytes]) -> None:
        length = index.slot_length(item[0])
        stats.bytes_written += length
        stats.chunks += 1
        task.advance(length)

    try:
        if writer.sequential:
            zeros = iter(zero_runs(index, slots) + [(index.size, 0)])
            pending = next(zeros)

            def write_in_order(item: tuple[int, bytes], encoded: object) -> None:
                nonlocal pending
                offset = item[0] * index.chunk_size
                while pending[0] < offset:
                    writer.zero(*pending)
                    pending = next(zeros)
                writer.write(encoded, offset)
                count(item)

            ordered_map(load, slots, workers, write_in_order)
            while pending[1]:
                writer.zero(*pending)
                pending = next(zeros)
        else:
            for offset, length in zero_runs(index, slots):
                writer.zero(offset, length)

            def work(item: tuple[int, bytes]) -> None:
                writer.write(load(item), item[0] * index.chunk_size)

            bounded_map(work, slots, workers, lambda item, _none: count(item))
    except OSError as exc:
        raise ImageError(f"writing the restored disk failed: {exc}") from exc
    finally:
        task.finish()
    stats.seconds = time.monotonic() - started
    return stats
