"""Random access to one disk of a restore point, straight from the repository.

Reads map to chunk lookups in the point's index; decoded chunks stay in an LRU cache, and a
read that continues the previous one fetches the next chunks ahead in the background, so a
sequential reader (a VM booting, a copy) rarely waits on the repository. Zero chunks are never
fetched. Used by the NBD export of a point (``vmkeep mount``, instant recovery, file restore).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from vmkeep.repository.index import ZERO_ID, DiskIndex
from vmkeep.repository.points import Manifest
from vmkeep.repository.repo import Repository

DEFAULT_CACHE_CHUNKS = 32
DEFAULT_READ_AHEAD = 4


class PointReader:
    def __init__(self, repo: Repository, manifest: Manifest, disk: str, *, cache_chunks: int = DEFAULT_CACHE_CHUNKS,
                 read_ahead: int = DEFAULT_READ_AHEAD, workers: int = 4) -> None:
        self.repo = repo
        self.index: DiskIndex = repo.load_index(manifest, disk)
        self.size = self.index.size
        self.chunk_size = self.index.chunk_size
        self.cache_chunks, self.read_ahead = max(cache_chunks, read_ahead + 2), read_ahead
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pending: dict[int, Future[bytes]] = {}
        self._lock = threading.RLock()  # a fetch that ends at once stores its chunk from inside the lock
        self._last_slot = -2
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmkeep-point-read")
        self.fetched = 0  # chunks read from the repository (for tests and figures)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _load(self, slot: int) -> bytes:
        data = self.repo.load_chunk(self.index.get(slot), self.index.slot_length(slot))
        with self._lock:
            self.fetched += 1
        return data

    def _chunk(self, slot: int) -> bytes:
        """The decoded chunk ``slot`` (from the cache, a fetch under way, or the repository)."""
        with self._lock:
            data = self._cache.get(slot)
            if data is not None:
                self._cache.move_to_end(slot)
                return data
            future = self._pending.get(slot)
            if future is None:
                future = self._fetch(slot)
        return future.result()

    def _fetch(self, slot: int) -> Future[bytes]:
        """Start loading ``slot``; once loaded it moves to the cache (read or not), so a
        prefetched chunk nobody asks for is dropped with the cache's oldest. Hold the lock."""
        future = self._pending[slot] = self._pool.submit(self._load, slot)
        future.add_done_callback(lambda f: self._store(slot, f))
        return future

    def _store(self, slot: int, future: Future[bytes]) -> None:
        with self._lock:
            self._pending.pop(slot, None)
            if future.cancelled() or future.exception() is not None:
                return  # the reader that waits on it gets the error
            self._cache[slot] = future.result()
            self._cache.move_to_end(slot)
            while len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)

    def _prefetch(self, slot: int) -> None:
        """A sequential reader will want the next chunks: start fetching them now."""
        last = min(slot + self.read_ahead, self.index.slots - 1)
        with self._lock:
            for s in range(slot + 1, last + 1):
                if s in self._cache or s in self._pending or self.index.get(s) == ZERO_ID:
                    continue
                self._fetch(s)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the disk's bytes from ``offset`` (past the end is an error)."""
        if offset < 0 or offset + len(buf) > self.size:
            raise ValueError(f"read of {len(buf)} bytes at {offset} is outside the {self.size}-byte disk")
        pos, done = offset, 0
        while done < len(buf):
            slot = pos // self.chunk_size
            start = pos - slot * self.chunk_size
            n = min(len(buf) - done, self.index.slot_length(slot) - start)
            cid = self.index.get(slot)
            if cid == ZERO_ID:
                buf[done:done + n] = bytes(n)
            else:
                if slot == self._last_slot + 1 or slot == self._last_slot:
                    self._prefetch(slot)
                buf[done:done + n] = self._chunk(slot)[start:start + n]
            self._last_slot = slot
            pos += n
            done += n

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_zero) runs covering ``offset``..``offset+length``, chunk-aligned."""
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, min(offset + length, self.size)
        while pos < end:
            slot = pos // self.chunk_size
            stop = min(end, slot * self.chunk_size + self.index.slot_length(slot))
            zero = self.index.get(slot) == ZERO_ID
            if out and out[-1][2] == zero and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + stop - pos, zero)
            else:
                out.append((pos, stop - pos, zero))
            pos = stop
        return out
