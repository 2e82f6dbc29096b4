"""Backup of disks into a restore point.

Per chunk slot the plan is one of: *zero* (no allocated data: nothing read, nothing stored),
*reuse* (incremental and the slot is clean: the parent's chunk id is copied without reading),
*patch* (incremental and the slot partly written: only the written ranges are read from the
disk, the rest comes from the parent's chunk in the repository), or *read* (read the allocated
ranges); then zero-check, hash, compress + encrypt + store unless the repository has the chunk.
The read path runs on worker threads; every step hands a whole chunk to native code that
releases the GIL (libnbd, BLAKE3, zstd, AES-GCM, write).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from vmkeep.errors import PointNotFound, UsageError
from vmkeep.pipeline import AnyOf, Flag, bounded_map, interleaved
from vmkeep.progress import NoProgress, Progress
from vmkeep.repository.index import ZERO_ID, DiskIndex
from vmkeep.repository.points import DiskEntry, Manifest, index_key, manifest_key, new_point_id
from vmkeep.repository.repo import Repository
from vmkeep.repository.sessions import WriterSession
from vmkeep.transport.extents import Extent, intersect, merge, ranges_by_slot, subtract

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 6
# A disk is read at this many places at once (see pipeline.interleaved); 2–4 measured alike, one
# per worker was slower again.
READ_STRETCHES = 4
# Parent chunks read ahead for the first partly written slots of an incremental (a hint: bounded
# so that a large incremental does not flood the page cache).
PREFETCH_CHUNKS = 32
# Chunk ids looked up in the parents' indexes directly before a set of them is built.
PARENT_SEARCHES = 64


class DiskSource(Protocol):
    """What the engine reads a disk through: an NBD export, whatever hypervisor is behind it."""

    size: int

    def pread(self, length: int, offset: int) -> bytes: ...

    def data_extents(self) -> list[Extent]: ...


@dataclass
class DiskJob:
    """One disk to back up: where to read it, and for an incremental which extents changed."""

    disk: str
    source: DiskSource
    changed: list[Extent] | None = None  # None: read every allocated extent


@dataclass
class DiskStats:
    size: int = 0
    bytes_read: int = 0
    bytes_zero: int = 0
    bytes_reused: int = 0
    chunks_read: int = 0
    chunks_new: int = 0
    bytes_new: int = 0
    bytes_stored: int = 0
    seconds: float = 0.0
    mode: str = "full"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Slot:
    """One chunk to build: the ``ranges`` to read from the source; for a slot only partly
    written since the parent point, the rest comes from the parent's chunk ``base`` (None:
    zeros), with ``clear`` — written to zero since — zeroed."""

    slot: int
    ranges: list[Extent]
    patch: bool = False
    base: bytes | None = None
    clear: list[Extent] = field(default_factory=list)


@dataclass
class _KnownChunks:
    """Chunk ids this backup may reference without asking the repository: the parents' (kept
    alive by the writer session) and those it stored itself.

    An incremental claims a handful of chunks, so the parents' indexes are searched as they are;
    a set of their ids (one entry per slot of the disks) is built only once a backup has claimed
    more than PARENT_SEARCHES, as a full over a parent does.
    """

    parents: list[DiskIndex] = field(default_factory=list)
    ids: set[bytes] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _searches: int = 0
    _parent_ids: set[bytes] | None = None

    def claim(self, cid: bytes) -> bool:
        """True if the id is new to this backup (the caller must store it)."""
        with self.lock:
            if cid in self.ids or self._in_parents(cid):
                return False
            self.ids.add(cid)
            return True

    def _in_parents(self, cid: bytes) -> bool:
        if self._parent_ids is None:
            if self._searches < PARENT_SEARCHES:
                self._searches += 1
                return any(p.holds(cid) for p in self.parents)
            self._parent_ids = set().union(*(p.chunk_ids() for p in self.parents))
        return cid in self._parent_ids


class _ReadsLeft:
    """Calls ``then`` once, when every disk has been planned and every slot of the plans read:
    the hypervisor may let go of its snapshot while the last chunks are hashed and stored."""

    def __init__(self, disks: int, then: Callable[[], None] | None) -> None:
        self._unplanned, self._slots, self._then = disks, 0, then
        self._lock = threading.Lock()

    def planned(self, slots: int) -> None:
        self._count(disks=-1, slots=slots)

    def read(self) -> None:
        self._count(disks=0, slots=-1)

    def _count(self, disks: int, slots: int) -> None:
        with self._lock:
            self._unplanned += disks
            self._slots += slots
            then = self._then if self._unplanned == 0 and self._slots == 0 else None
            if then is not None:
                self._then = None
        if then is not None:
            then()


def _plan(job: DiskJob, chunk_size: int, parent: DiskIndex | None, index: DiskIndex,
          stats: DiskStats) -> list[_Slot]:
    """The slots to read. Only slots holding data (full) or written since the parent
    (incremental) are visited: an empty or clean slot costs nothing, whatever the disk's size."""
    size = job.source.size
    extents = job.source.data_extents()
    if parent is None or job.changed is None:
        data = ranges_by_slot(extents, chunk_size)
        stats.bytes_zero = size - sum(index.slot_length(slot) for slot in data)
        return [_Slot(slot, data[slot]) for slot in sorted(data)]
    index.ids[:] = parent.ids  # every clean slot keeps the parent's chunk
    dirty = ranges_by_slot(job.changed, chunk_size)
    stats.bytes_reused = size - sum(index.slot_length(slot) for slot in dirty)
    # the data extents split into slots only where slots were written: an incremental of a
    # large, full disk must not walk every one of its allocated slots
    spans = merge(Extent(slot * chunk_size, index.slot_length(slot)) for slot in dirty)
    data = ranges_by_slot(intersect(extents, spans), chunk_size)
    slots = []
    for slot in sorted(dirty):
        written, length = dirty[slot], index.slot_length(slot)
        if sum(e.length for e in written) < length:
            # partly written since the parent: read only what changed, keep the rest of its chunk
            base = parent.get(slot)
            slots.append(_Slot(slot, intersect(written, data.get(slot, [])), patch=True,
                               base=None if base == ZERO_ID else base, clear=subtract(written, data.get(slot, []))))
        elif slot not in data:
            stats.bytes_zero += length
            index.put(slot, ZERO_ID)
        else:
            slots.append(_Slot(slot, data[slot]))
    return slots


def _patch_bases(changed: list[Extent], parent: DiskIndex, chunk_size: int) -> list[bytes]:
    """The parent's chunks that the first partly written slots will be patched from (at most
    PREFETCH_CHUNKS), so that reading them from the repository starts at once."""
    bases = []
    for slot, written in ranges_by_slot(changed, chunk_size).items():
        length = parent.slot_length(slot)
        if sum(e.length for e in written) < length and (cid := parent.get(slot)) != ZERO_ID:
            bases.append(cid)
            if len(bases) == PREFETCH_CHUNKS:
                break
    return bases


def backup_disk(
    repo: Repository,
    job: DiskJob,
    parent: DiskIndex | None,
    known: _KnownChunks,
    workers: int,
    progress: Progress,
    reads: _ReadsLeft,
    cancel: Flag | None = None,
) -> tuple[DiskIndex, DiskStats]:
    chunk_size = repo.chunk_size
    size = job.source.size
    stats = DiskStats(size=size)
    if parent is not None and parent.size != size:
        raise UsageError(
            f"disk {job.disk} is {size} bytes but was {parent.size} in the previous point: "
            "run a full backup (without --since)"
        )
    if parent is not None and job.changed is not None:
        stats.mode = "incremental"
    index = DiskIndex.empty(size, chunk_size)
    zeros = bytes(chunk_size)
    lock = threading.Lock()
    started = time.monotonic()
    slots = _plan(job, chunk_size, parent, index, stats)
    reads.planned(len(slots))
    log.debug("disk %s: %s, %d of %d chunk slots to read (%d bytes zero, %d reused)", job.disk, stats.mode,
              len(slots), index.slots, stats.bytes_zero, stats.bytes_reused, extra={"disk": job.disk})
    task = progress.task(job.disk, sum(r.length for s in slots for r in s.ranges))

    def work(item: _Slot) -> tuple[bytes, int, int, int]:
        start = item.slot * chunk_size
        length = min(chunk_size, size - start)
        ranges = item.ranges
        nread = sum(r.length for r in ranges)
        buf: bytes | bytearray
        if item.patch:
            fresh = [job.source.pread(r.length, r.offset) for r in ranges]  # the disk first, then the parent
            reads.read()
            buf = bytearray(repo.load_chunk(item.base, length)) if item.base is not None else bytearray(length)
            for r in item.clear:
                buf[r.offset - start : r.end - start] = bytes(r.length)
            for r, data in zip(ranges, fresh, strict=True):
                buf[r.offset - start : r.end - start] = data
        elif len(ranges) == 1 and ranges[0].offset == start and ranges[0].length == length:
            buf = job.source.pread(length, start)
            reads.read()
        else:
            buf = bytearray(length)
            for r in ranges:
                buf[r.offset - start : r.end - start] = job.source.pread(r.length, r.offset)
            reads.read()
        task.advance(nread)
        if buf == (zeros if length == chunk_size else zeros[:length]):
            return ZERO_ID, nread, 0, 0
        cid = repo.keys.chunk_id(buf)
        if not known.claim(cid):
            return cid, nread, 0, 0
        written = repo.store_chunk(cid, buf)
        return cid, nread, (length if written else 0), written

    def done(item: _Slot, result: tuple[bytes, int, int, int]) -> None:
        cid, nread, new, written = result
        index.put(item.slot, cid)
        with lock:
            stats.bytes_read += nread
            stats.chunks_read += 1
            if cid == ZERO_ID:
                stats.bytes_zero += min(chunk_size, size - item.slot * chunk_size)
            if written:
                stats.chunks_new += 1
                stats.bytes_new += new
                stats.bytes_stored += written

    try:
        bounded_map(work, interleaved(slots, READ_STRETCHES), workers, done, cancel)
    finally:
        task.finish()
    stats.seconds = time.monotonic() - started
    log.info("disk %s: %s, %d bytes read, %d new chunks (%d bytes stored) in %.1f s", job.disk, stats.mode,
             stats.bytes_read, stats.chunks_new, stats.bytes_stored, stats.seconds, extra={"disk": job.disk})
    return index, stats


def backup_point(
    repo: Repository,
    name: str,
    jobs: list[DiskJob],
    *,
    parent: Manifest | None = None,
    meta: dict[str, Any] | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    reads_done: Callable[[], None] | None = None,
) -> Manifest:
    """Back up every disk of ``jobs`` and commit one restore point; nothing is visible on failure.

    ``parent`` is the previous point: its chunks are referenced without asking the repository,
    and for jobs with ``changed`` extents the clean slots are copied from it without reading.
    ``reads_done`` is called (on a worker thread) once the last read of every disk returned,
    before the last chunks are stored and the point committed; never if a read fails.
    """
    progress = progress or NoProgress()
    started = time.monotonic()
    point_id = new_point_id()
    protects = [e.index_key for e in parent.disks.values()] if parent else []
    with WriterSession(repo.backend, protects):
        known = _KnownChunks()
        parents: dict[str, DiskIndex] = {}
        if parent is not None:
            if repo.backend.stat(manifest_key(parent.name, parent.point_id)) is None:
                raise PointNotFound(
                    f"the previous point {parent.name}@{parent.point_id} was deleted while this backup "
                    "started; run the backup again"
                )
            for job in jobs:
                if job.disk in parent.disks:
                    parents[job.disk] = repo.load_index(parent, job.disk)
                    known.parents.append(parents[job.disk])
        for job in jobs:
            if job.changed is not None and job.disk not in parents:
                raise UsageError(f"disk {job.disk} is not in the previous point: an incremental is impossible")
            if job.changed is not None:
                repo.prefetch_chunks(_patch_bases(job.changed, parents[job.disk], repo.chunk_size))
        failed = threading.Event()
        per_disk = max(2, workers // len(jobs))
        reads = _ReadsLeft(len(jobs), reads_done)

        def one(job: DiskJob) -> tuple[DiskEntry, DiskStats]:
            """One disk; the disks of a VM run side by side, and a failing one stops the others."""
            try:
                disk_parent = parents.get(job.disk) if job.changed is not None else None
                index, stats = backup_disk(repo, job, disk_parent, known, per_disk, progress, reads,
                                           AnyOf(cancel, failed))
                key = index_key(name, point_id, job.disk)
                return DiskEntry(index.size, key, repo.write_index(key, index), stats.as_dict()), stats
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="vmkeep-disk") as pool:
            futures = [pool.submit(one, job) for job in jobs]
            try:
                outcomes = [f.result() for f in futures]
            except BaseException:  # a failed disk, or Ctrl-C here: the other disks stop at their next chunk
                failed.set()
                raise
        disks = {job.disk: entry for job, (entry, _s) in zip(jobs, outcomes, strict=True)}
        all_stats = {job.disk: stats for job, (_e, stats) in zip(jobs, outcomes, strict=True)}
        repo.backend.flush()  # chunks and indexes durable; counted in the backup's duration
        totals = {k: sum(getattr(s, k) for s in all_stats.values())
                  for k in ("size", "bytes_read", "bytes_zero", "bytes_reused", "chunks_new", "bytes_new",
                            "bytes_stored")}
        totals["seconds"] = round(time.monotonic() - started, 3)
        manifest = Manifest(
            name=name,
            point_id=point_id,
            created=datetime.now(UTC).isoformat(timespec="microseconds"),
            parent=parent.point_id if parent else None,
            disks=disks,
            chunk_size=repo.chunk_size,
            meta=meta or {},
            stats=totals,
        )
        repo.commit_point(manifest)
    log.info("point %s committed: %d bytes read, %d stored, %.1f s", point_id, totals["bytes_read"],
             totals["bytes_stored"], totals["seconds"], extra={"vm": name})
    return manifest
