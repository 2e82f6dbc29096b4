"""Bringing a disk written in place to a restore point's content, slot by slot.

Every point's index names the chunk in each chunk-size slot of the disk, so what changed between
two points is where their ids differ: only those slots are written (a slot that became all zero
is zeroed), never the whole disk. When the disk's content is not known from an index — a replica
that ran, or an update that was interrupted — it is read back and each slot hashed with the
repository's chunk-id key: the slots whose ids differ from the point's are the ones to write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vmkeep.errors import ImageError
from vmkeep.hypervisors.base import DiskPatch
from vmkeep.pipeline import bounded_map, ordered_map
from vmkeep.progress import NoProgress, Progress
from vmkeep.repository.index import ID_SIZE, ZERO_ID, DiskIndex
from vmkeep.repository.repo import Repository


@dataclass
class SyncStats:
    bytes_written: int = 0  # bytes that went to the disk (zeroed slots included)
    bytes_zeroed: int = 0
    slots: int = 0  # chunk-size slots written
    extents: int = 0  # runs of consecutive slots written
    bytes_read_back: int = 0  # read from a disk to find what differs (a compare pass)

    def add(self, other: SyncStats) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def changed_slots(old: DiskIndex, new: DiskIndex) -> list[int]:
    """The slots whose chunk ids differ between two indexes of the same disk."""
    if (old.size, old.chunk_size) != (new.size, new.chunk_size):
        raise ValueError("indexes of different disk sizes or chunk sizes")
    a, b = memoryview(old.ids), memoryview(new.ids)
    changed = []
    stride = ID_SIZE * 1024  # compare in native blocks; look at single slots only where a block differs
    for start in range(0, len(a), stride):
        if a[start:start + stride] != b[start:start + stride]:
            end = min(start + stride, len(a))
            changed += [at // ID_SIZE for at in range(start, end, ID_SIZE) if a[at:at + ID_SIZE] != b[at:at + ID_SIZE]]
    return changed


def extents(slots: list[int]) -> int:
    """How many runs of consecutive slots ``slots`` (ascending) makes."""
    return sum(1 for i, slot in enumerate(slots) if i == 0 or slots[i - 1] != slot - 1)


def write_slots(repo: Repository, index: DiskIndex, disk: DiskPatch, slots: list[int], *, workers: int,
                progress: Progress | None = None, label: str = "replica") -> SyncStats:
    """Make ``slots`` (ascending) of ``disk`` what ``index`` holds there: chunks fetched and
    decrypted by the workers, zero slots zeroed."""
    stats = SyncStats(slots=len(slots), extents=extents(slots))
    task = (progress or NoProgress()).task(label, sum(index.slot_length(s) for s in slots))

    def load(slot: int) -> bytes | None:
        cid = index.get(slot)
        return None if cid == ZERO_ID else repo.load_chunk(cid, index.slot_length(slot))

    def put(slot: int, data: bytes | None) -> None:  # in the workers (FileDisk): no counting here
        offset = slot * index.chunk_size
        if data is None:
            disk.zero(offset, index.slot_length(slot))
        else:
            disk.write(data, offset)

    def count(slot: int, _result: object) -> None:  # in the caller's thread: the only one that counts
        length = index.slot_length(slot)
        stats.bytes_written += length
        if index.get(slot) == ZERO_ID:
            stats.bytes_zeroed += length
        task.advance(length)

    def put_in_order(slot: int, data: bytes | None) -> None:
        put(slot, data)
        count(slot, None)

    try:
        if disk.sequential:  # an upload stream: in offset order, from this thread
            ordered_map(load, slots, workers, put_in_order)
        else:
            bounded_map(lambda slot: put(slot, load(slot)), slots, workers, count)
    except OSError as exc:
        raise ImageError(f"writing the replica's disk failed: {exc}") from exc
    finally:
        task.finish()
    return stats


def differing_slots(repo: Repository, index: DiskIndex, disk: DiskPatch, *, workers: int,
                    found: Callable[[int, bytes | None], None] | None = None, progress: Progress | None = None,
                    label: str = "compare") -> tuple[list[int], int]:
    """Read ``disk`` back and hash each slot: the slots (ascending) whose content is not the one
    ``index`` names, and the bytes read. ``found`` gets each such slot with the disk's bytes
    there (None: all zero) as it is found, in order."""
    differ: list[int] = []

    def compare(slot: int, cid: bytes, data: bytes | None) -> None:
        if cid != index.get(slot):
            differ.append(slot)
            if found is not None:
                found(slot, None if cid == ZERO_ID else data)

    read = _hash_slots(repo, disk, index, compare, workers=workers, progress=progress, label=label)
    return differ, read


def disk_index(repo: Repository, disk: DiskPatch, chunk_size: int, *, workers: int, progress: Progress | None = None,
               label: str = "read") -> tuple[DiskIndex, int]:
    """What ``disk`` holds now as an index (each slot read and named as a backup would name it),
    and the bytes read: a disk whose content no point describes, compared slot by slot with another."""
    index = DiskIndex.empty(disk.size, chunk_size)
    read = _hash_slots(repo, disk, index, lambda slot, cid, _data: index.put(slot, cid), workers=workers,
                       progress=progress, label=label)
    return index, read


def _hash_slots(repo: Repository, disk: DiskPatch, index: DiskIndex, each: Callable[[int, bytes, bytes | None], None],
                *, workers: int, progress: Progress | None, label: str) -> int:
    """Read ``disk`` in ``index``'s slots, name each with the repository's chunk-id key (the
    workers hash), and give ``each`` (slot, id, bytes) in order; the bytes read."""
    zeros = bytes(index.chunk_size)
    task = (progress or NoProgress()).task(label, index.size)
    read = 0

    def ident(item: tuple[int, bytes | None]) -> bytes:
        data = item[1]
        return ZERO_ID if data is None or data == zeros[:len(data)] else repo.keys.chunk_id(data)

    def seen(item: tuple[int, bytes | None], cid: bytes) -> None:
        nonlocal read
        offset, data = item
        slot = offset // index.chunk_size
        read += 0 if data is None else len(data)
        task.advance(index.slot_length(slot))
        each(slot, cid, data)

    try:
        ordered_map(ident, disk.scan(index.chunk_size), workers, seen)
    finally:
        task.finish()
    return read
