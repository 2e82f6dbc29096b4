"""Garbage collection: mark what live points and running backups reference, sweep the rest.

Safe while backups run:

1. ``T0`` is read from the storage's own clock, then the live writer sessions are listed.
2. Mark: every chunk of every committed point, and of every index a live session protects
   (its parent point, which it dedups against without asking the repository).
3. The sessions are listed again, and the protects of any session that appeared are marked.
4. Sweep: an unmarked chunk is deleted only if its mtime is before
   ``cutoff = min(T0, start of every live session)``. Chunks an unfinished backup wrote are
   newer than its session's start; chunks it deduped against were touched by it and are newer
   too. The backend's ``delete_if_older`` re-checks the mtime atomically with the delete.

A point whose manifest or index cannot be read stops the collection: nobody could then say
which chunks it needs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vmkeep.errors import ObjectMissing, RepositoryError
from vmkeep.repository.backends.fs import FilesystemBackend
from vmkeep.repository.index import DiskIndex
from vmkeep.repository.repo import Repository
from vmkeep.repository.sessions import SessionInfo, list_sessions

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    chunks_total: int = 0
    chunks_live: int = 0
    chunks_deleted: int = 0
    bytes_freed: int = 0
    chunks_kept_recent: int = 0
    indexes_deleted: int = 0
    sessions_live: int = 0
    stale_sessions_removed: int = 0
    dry_run: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _mark_protects(repo: Repository, sessions: list[SessionInfo], marked: set[bytes], live_keys: set[str]) -> None:
    for s in sessions:
        for key in s.protects:
            if key in live_keys:
                continue
            try:
                index = DiskIndex.decode(repo.backend.get(key), key)
            except ObjectMissing:
                continue  # the session's own start check fails it: it never relies on a missing parent
            marked |= index.chunk_ids()
            live_keys.add(key)


def collect(repo: Repository, dry_run: bool = False) -> GcReport:
    started = time.monotonic()
    report = GcReport(dry_run=dry_run)
    backend = repo.backend
    t0 = backend.now()
    all_sessions = list_sessions(backend)
    live = [s for s in all_sessions if s.is_live(t0)]
    points, damaged = repo.scan_points()
    if damaged:
        raise RepositoryError(
            f"refusing to collect garbage: {damaged[0][0]} is damaged ({damaged[0][1]}); "
            "run `vmkeep repo verify` and remove or repair the damaged point first"
        )
    marked: set[bytes] = set()
    live_keys: set[str] = set()
    for m in points:
        for disk, entry in m.disks.items():
            try:
                marked |= repo.load_index(m, disk).chunk_ids()
            except RepositoryError as exc:
                raise RepositoryError(
                    f"refusing to collect garbage: {exc}; nothing was deleted. Run `vmkeep repo verify`, "
                    "then prune the damaged point"
                ) from None
            live_keys.add(entry.index_key)
    _mark_protects(repo, live, marked, live_keys)
    seen = {s.key for s in all_sessions}
    late = [s for s in list_sessions(backend) if s.key not in seen and s.is_live(t0)]
    _mark_protects(repo, late, marked, live_keys)
    live += late
    cutoff = min([t0, *(s.started for s in live)])
    report.sessions_live = len(live)
    report.chunks_live = len(marked)

    for info in backend.list("chunks/"):
        report.chunks_total += 1
        try:
            cid = bytes.fromhex(info.key.rsplit("/", 1)[1])
        except ValueError:
            log.warning("%s under chunks/ is not a chunk: left alone", info.key)
            continue
        if cid in marked:
            continue
        if info.mtime >= cutoff:
            report.chunks_kept_recent += 1
            continue
        freed = info.size if dry_run else backend.delete_if_older(info.key, cutoff)
        if freed or dry_run:
            report.chunks_deleted += 1
            report.bytes_freed += freed
        else:
            report.chunks_kept_recent += 1

    for info in backend.list("indexes/"):
        if info.key not in live_keys and info.mtime < cutoff:
            report.indexes_deleted += 1
            if not dry_run:
                backend.delete_if_older(info.key, cutoff)

    if not dry_run:
        for s in all_sessions:
            if not s.is_live(t0):
                backend.delete(s.key)
                report.stale_sessions_removed += 1
        if isinstance(backend, FilesystemBackend):
            for tmp in backend.stale_temporaries(cutoff):
                tmp.unlink(missing_ok=True)
    report.seconds = round(time.monotonic() - started, 3)
    return report
