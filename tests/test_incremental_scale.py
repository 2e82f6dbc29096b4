"""An incremental's cost follows what the guest wrote, not the disk's size: the engine must not
visit the clean slots of a large disk one by one in Python (a 1 TiB disk has 262,144 slots of
4 MiB). Counted in Python calls, which do not depend on the machine's speed."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from vmkeep.engine.backup import PARENT_SEARCHES, DiskJob, backup_point
from vmkeep.repository.backends.fs import FilesystemBackend
from vmkeep.repository.config import Credentials
from vmkeep.repository.index import ZERO_ID, DiskIndex
from vmkeep.repository.repo import Repository
from vmkeep.transport.extents import Extent

MiB = 1 << 20
GiB = 1 << 30
T = TypeVar("T")


class SyntheticDisk:
    """A disk as large as the test wants with nothing behind it: ``allocated`` reports as data,
    each MiB filled with one value, which changes with the ``generation`` of the disk's content."""

    def __init__(self, size: int, allocated: list[Extent], generation: int = 0) -> None:
        self.size = size
        self.allocated = allocated
        self.generation = generation
        self.reads: list[Extent] = []

    def data_extents(self) -> list[Extent]:
        return list(self.allocated)

    def pread(self, length: int, offset: int) -> bytes:
        assert offset // MiB == (offset + length - 1) // MiB, "a read spans two MiB"
        self.reads.append(Extent(offset, length))
        return bytes([(offset // MiB + self.generation) % 251 + 1]) * length


def python_calls(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn``'s result and the number of Python function calls it made, in every thread."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    threading.setprofile(count)  # type: ignore[arg-type]
    sys.setprofile(count)  # type: ignore[arg-type]
    try:
        result = fn()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return result, calls


def test_incremental_of_a_large_full_disk_visits_only_the_written_slot(tmp_path: Path) -> None:
    size = 256 * GiB  # 262,144 slots of 1 MiB
    repo = Repository.init(FilesystemBackend(tmp_path / "repo"), chunk_size=MiB, compression=1, encrypt=True,
                           credentials=Credentials(passphrase=b"pw"))
    first = SyntheticDisk(size, [Extent(0, 4 * MiB)])
    full = backup_point(repo, "big", [DiskJob("vda", first)])
    parent = repo.load_index(full, "vda")
    # by now the guest has filled the whole disk (every slot reports data) and rewritten 4 KiB
    disk = SyntheticDisk(size, [Extent(0, size)], generation=1)
    written = Extent(2 * MiB + 8192, 4096)
    incr, calls = python_calls(
        lambda: backup_point(repo, "big", [DiskJob("vda", disk, [written])], parent=full))
    index = repo.load_index(incr, "vda")
    assert disk.reads == [written]
    assert index.get(2) not in (parent.get(2), ZERO_ID)
    index.put(2, parent.get(2))
    assert index.ids == parent.ids  # every other slot is the parent's
    stats = incr.disks["vda"].stats
    assert (stats["bytes_read"], stats["bytes_reused"]) == (4096, size - MiB)
    # walking the 262,144 slots took over a million calls; the work itself takes a few thousand
    assert calls < 20_000, calls


def test_an_index_holds_only_ids_at_slot_boundaries() -> None:
    index = DiskIndex.empty(3 * MiB, MiB)
    a, b = bytes(range(32)), bytes(range(100, 132))
    index.put(0, a)
    index.put(1, b)
    straddling = a[16:] + b[:16]  # present in the bytes, but no slot's id
    assert index.holds(a) and index.holds(b)
    assert not index.holds(straddling)
    assert index.chunk_ids() == {a, b}  # the zero slot refers to nothing


def test_a_full_over_a_parent_asks_the_repository_only_for_new_chunks(tmp_path: Path) -> None:
    """The parent's chunks are known without asking the repository, also past PARENT_SEARCHES
    claims, when they are looked up in a set."""
    slots = PARENT_SEARCHES + 40
    repo = Repository.init(FilesystemBackend(tmp_path / "repo"), chunk_size=MiB, compression=1, encrypt=True,
                           credentials=Credentials(passphrase=b"pw"))
    first = backup_point(repo, "d", [DiskJob("vda", SyntheticDisk(slots * MiB, [Extent(0, slots * MiB)]))])
    # one MiB more of new content at the end; everything before is the parent's
    again = SyntheticDisk((slots + 1) * MiB, [Extent(0, (slots + 1) * MiB)])
    stored: list[bytes] = []
    store = repo.store_chunk

    def counting(cid: bytes, data: bytes | bytearray | memoryview) -> int:
        stored.append(cid)
        return store(cid, data)
    repo.store_chunk = counting  # type: ignore[method-assign]
    second = backup_point(repo, "d", [DiskJob("vda", again)], parent=first)
    assert first.disks["vda"].stats["chunks_new"] == slots
    assert stored == [repo.load_index(second, "vda").get(slots)]


class FailingDisk(SyntheticDisk):
    def pread(self, length: int, offset: int) -> bytes:
        if offset >= 2 * MiB:
            raise OSError("the export went away")
        return super().pread(length, offset)


def test_reads_done_comes_after_the_last_read_and_before_the_commit(tmp_path: Path) -> None:
    """The hypervisor is told it may let go once every read of every disk returned, while the
    point is still being stored; never when a read failed."""
    repo = Repository.init(FilesystemBackend(tmp_path / "repo"), chunk_size=MiB, compression=1, encrypt=True,
                           credentials=Credentials(passphrase=b"pw"))
    disks = {"vda": SyntheticDisk(8 * MiB, [Extent(0, 8 * MiB)]), "vdb": SyntheticDisk(4 * MiB, [Extent(0, 3 * MiB)])}
    seen: list[tuple[int, int]] = []

    def reads_done() -> None:
        seen.append((sum(len(d.reads) for d in disks.values()), len(repo.list_points("two"))))
    point = backup_point(repo, "two", [DiskJob(n, d) for n, d in disks.items()], reads_done=reads_done)
    assert seen == [(8 + 3, 0)]  # every slot read, nothing committed yet
    assert len(repo.list_points("two")) == 1

    # an incremental with nothing written reads nothing: it may let go at once
    seen.clear()
    backup_point(repo, "two", [DiskJob(n, d, []) for n, d in disks.items()], parent=point, reads_done=reads_done)
    assert seen == [(8 + 3, 1)]

    called: list[bool] = []
    failing = FailingDisk(4 * MiB, [Extent(0, 4 * MiB)])
    with pytest.raises(OSError, match="went away"):
        backup_point(repo, "broken", [DiskJob("vda", failing)], reads_done=lambda: called.append(True))
    assert not called
