"""Backup copy: restore points from one repository into another (a second site, S3 under Object Lock).

Only what the target lacks travels. A point already in the target is skipped whole. For the
rest, chunks are named by id: those the target's newest point of the same name uses are known
present (its index is protected by this copy's writer session, so garbage collection keeps
them), any other is touched in the target and sent only when the touch finds nothing. Touching
is also what keeps a concurrent garbage collection of the target off a chunk this copy relies on
(see repository/gc.py), exactly as for a backup.

When both repositories share key material (the target made with ``repo init --like``), chunks
and indexes travel as stored: never decrypted, their checksum checked on arrival. Otherwise each
chunk is decrypted and proven against its id, named by the target's key and encrypted for it.

A point becomes visible in the target when its manifest is written, after every chunk and index
it needs is durable there: a copy killed at any moment leaves nothing partial visible, and the
next run sends only what did not arrive.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from vmkeep.engine.throttle import Throttle
from vmkeep.engine.vm import config_context
from vmkeep.errors import (
    BackendError,
    ObjectCorrupt,
    ObjectMissing,
    PointNotFound,
    RepositoryError,
    UsageError,
    VmkeepError,
)
from vmkeep.pipeline import bounded_map
from vmkeep.progress import NoProgress, Progress
from vmkeep.repository.chunks import check_stored, decode_chunk
from vmkeep.repository.index import ZERO_ID, DiskIndex
from vmkeep.repository.points import DiskEntry, Manifest
from vmkeep.repository.repo import Repository, chunk_key
from vmkeep.repository.sessions import WriterSession

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 8
RAW, REENCRYPT = "raw", "re-encrypt"


@dataclass
class CopyReport:
    mode: str  # raw: chunks copied as stored; re-encrypt: decrypted and encrypted for the target
    points_copied: list[str] = field(default_factory=list)  # name@point_id, oldest first
    points_present: list[str] = field(default_factory=list)  # already in the target: nothing travelled
    chunks_sent: int = 0
    chunks_present: int = 0
    bytes_read: int = 0  # stored bytes read from the source
    bytes_sent: int = 0  # stored bytes written to the target
    bytes_logical: int = 0  # logical size of the points copied
    verified: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class CopyFailed(VmkeepError):
    """A copy that stopped part-way: the cause's message and exit code, and in ``report`` the points
    that did arrive before it (complete and visible in the target), so a caller keeping a catalog
    can list them."""

    def __init__(self, cause: VmkeepError, report: CopyReport) -> None:
        super().__init__(str(cause))
        self.report = report
        self.exit_code = cause.exit_code


def choose_points(source: Repository, *, names: str | None = None, point: str | None = None,
                  latest: int | None = None) -> list[Manifest]:
    """The points to copy, oldest first: of the names matching the glob ``names`` (all by
    default), the one whose id is or begins with ``point``, or the newest ``latest`` per name."""
    if point is not None and latest is not None:
        raise UsageError("--point and --latest choose points in two ways: give one of them")
    points = [m for m in source.list_points() if names is None or fnmatch.fnmatchcase(m.name, names)]
    if point is not None:
        points = [m for m in points if m.point_id.startswith(point)]
        if len(points) != 1:
            which = "no" if not points else "more than one"
            raise PointNotFound(f"{which} restore point matches {point!r}"
                                + (f" among the names matching {names!r}" if names else "")
                                + f"; see `vmkeep points --repo {source.backend.url}`")
    elif latest is not None:
        by_name: dict[str, list[Manifest]] = {}
        for m in points:
            by_name.setdefault(m.name, []).append(m)
        kept = {id(m) for group in by_name.values() for m in group[-latest:]} if latest > 0 else set()
        points = [m for m in points if id(m) in kept]
    if not points and names is not None:
        raise PointNotFound(f"no restore point of a name matching {names!r} in {source.backend.url}; "
                            f"see `vmkeep points --repo {source.backend.url}`")
    return points


def _check_pair(source: Repository, target: Repository) -> str:
    """The copy's mode, after refusing a pair that cannot work."""
    if source.config.repo_id == target.config.repo_id:
        raise UsageError(f"{source.backend.url} and {target.backend.url} are the same repository (id "
                         f"{source.config.repo_id}): copy into another one")
    if source.config.chunk_size != target.config.chunk_size:
        raise UsageError(
            f"{target.backend.url} uses {target.config.chunk_size >> 20} MiB chunks and {source.backend.url} "
            f"{source.config.chunk_size >> 20} MiB: copy into a repository made with `vmkeep repo init TARGET "
            f"--like {source.backend.url}` (or --chunk-size {source.config.chunk_size >> 20}M)")
    if source.config.encrypted and not target.config.encrypted:
        raise UsageError(
            f"{source.backend.url} is encrypted and {target.backend.url} is not: the copy would keep the backups "
            f"in plain text there; copy into a repository made with `vmkeep repo init TARGET --like "
            f"{source.backend.url}` (or --encrypt)")
    return RAW if source.keys == target.keys else REENCRYPT


class _Base:
    """The target's newest point of a name, when the source has it too: which target chunk each
    of its source chunks is, known with no request. The copy's writer session protects its
    indexes, so garbage collection of the target keeps those chunks while the copy relies on them."""

    def __init__(self, point: Manifest | None = None, ids: dict[bytes, bytes] | None = None) -> None:
        self.point = point
        self.ids = ids or {}  # source chunk id -> target chunk id
        self.ids.pop(ZERO_ID, None)

    @classmethod
    def of(cls, source: Repository, target: Repository, name: str, present: set[str]) -> _Base:
        """The target's newest point of ``name`` as a base, read from both repositories; none when
        it cannot be read: it only spares requests, so a damaged or vanished base point costs a
        touch per chunk, not the copy."""
        try:
            newest = target.latest_point(name) if present else None
            theirs = source.load_point(name, newest.point_id) if newest is not None else None
            if newest is None or theirs is None:
                return cls()
            ids: dict[bytes, bytes] = {}
            for disk in newest.disks.keys() & theirs.disks.keys():
                mine, other = target.load_index(newest, disk), source.load_index(theirs, disk)
                if mine.slots == other.slots:
                    ids.update((other.get(slot), mine.get(slot)) for slot in range(mine.slots))
        except RepositoryError as exc:
            log.warning("copying %s into %s without skipping its newest point's chunks: %s", name,
                        target.backend.url, exc)
            return cls()
        log.debug("copy of %s dedups against %s@%s in %s (%d chunks)", name, name, newest.point_id,
                  target.backend.url, len(ids))
        return cls(newest, ids)

    @property
    def protects(self) -> list[str]:
        return [e.index_key for e in self.point.disks.values()] if self.point else []

    def check_kept(self, target: Repository) -> None:
        """Once the session is registered: if the base was pruned meanwhile, rely on it no more."""
        if self.point is not None and target.load_point(self.point.name, self.point.point_id) is None:
            log.info("%s@%s left %s before the copy's session began: not used to skip chunks", self.point.name,
                     self.point.point_id, target.backend.url)
            self.ids.clear()


@dataclass
class _Moved:
    target_id: bytes
    read: int  # stored bytes read from the source
    sent: int  # stored bytes written to the target


class _PointCopy:
    """One point's chunks and indexes into the target; the manifest is the caller's to commit."""

    def __init__(self, source: Repository, target: Repository, mode: str, base: _Base, report: CopyReport,
                 progress: Progress, pacer: Throttle | None, workers: int) -> None:
        self.source, self.target, self.mode, self.base = source, target, mode, base
        self.report, self.progress, self.pacer, self.workers = report, progress, pacer, workers
        self.known: dict[bytes, bytes] = {}  # source id -> target id of chunks this copy made sure of

    def chunk(self, item: tuple[bytes, int]) -> _Moved:
        """Runs in a worker: source chunk ``item`` (id, plaintext size) made present in the target."""
        cid, size = item
        if cid in self.known:
            return _Moved(self.known[cid], 0, 0)
        known = self.base.ids.get(cid)
        if known is not None:
            self.target.backend.retain(chunk_key(known))  # an immutable copy keeps it as long as this point
            return _Moved(known, 0, 0)
        if self.mode == RAW:
            if self.target.backend.touch(chunk_key(cid)):
                return _Moved(cid, 0, 0)
            stored = self.source.backend.get(chunk_key(cid))
            check_stored(stored, f"chunk {cid.hex()} of {self.source.backend.url}")
            moved = _Moved(cid, len(stored), len(stored) if self.target.backend.put(chunk_key(cid), stored,
                                                                                     if_absent=True) else 0)
        else:
            stored = self.source.backend.get(chunk_key(cid))
            plaintext = decode_chunk(self.source.keys, cid, stored, size)
            new_id = self.target.keys.chunk_id(plaintext)
            moved = _Moved(new_id, len(stored), self.target.store_chunk(new_id, plaintext))
        if self.pacer is not None:  # what crossed the link: read from the source, or written to the target
            self.pacer.pace(max(moved.read, moved.sent))
        return moved

    def disk(self, manifest: Manifest, disk: str, entry: DiskEntry) -> DiskEntry:
        """Copy one disk's chunks, then its index; the entry for the target's manifest."""
        index, stored_index = self.source.load_index_data(manifest, disk)
        items = {cid: index.slot_length(slot) for slot, cid in index.nonzero()}
        task = self.progress.task(f"copy {manifest.name}@{manifest.point_id} {disk}", sum(items.values()))

        def arrived(item: tuple[bytes, int], moved: _Moved) -> None:
            self.known[item[0]] = moved.target_id
            self.report.bytes_read += moved.read
            self.report.bytes_sent += moved.sent
            self.report.chunks_sent += bool(moved.sent)
            self.report.chunks_present += not moved.sent
            task.advance(item[1])

        try:
            bounded_map(self.chunk, list(items.items()), self.workers, arrived)
        finally:
            task.finish()
        if self.mode == RAW:
            self.target.backend.put(entry.index_key, stored_index)
            return entry
        out = DiskIndex.empty(index.size, index.chunk_size)
        for slot, cid in index.nonzero():
            out.put(slot, self.known[cid])
        return replace(entry, index_mac=self.target.write_index(entry.index_key, out))


def _target_manifest(source: Repository, target: Repository, manifest: Manifest, mode: str,
                     disks: dict[str, DiskEntry]) -> Manifest:
    """The manifest as the target keeps it: the VM's sealed configuration sealed for the target."""
    meta = dict(manifest.meta)
    if mode == REENCRYPT and "config_sealed" in meta:
        context = config_context(manifest.name)
        meta["config_sealed"] = target.seal_record(source.open_record(meta["config_sealed"], context), context)
    return replace(manifest, disks=disks, meta=meta)


def _verify(target: Repository, manifest: Manifest, workers: int) -> None:
    """Read back every chunk the copied point uses from the target, decrypt and re-hash it."""
    items: dict[bytes, int] = {}
    for disk in manifest.disks:
        index = target.load_index(manifest, disk)
        items.update((cid, index.slot_length(slot)) for slot, cid in index.nonzero())
    try:
        bounded_map(lambda item: target.load_chunk(*item), list(items.items()), workers, lambda _i, _r: None)
    except (ObjectCorrupt, ObjectMissing) as exc:
        raise ObjectCorrupt(f"verifying {manifest.name}@{manifest.point_id} in {target.backend.url}: {exc}; "
                            "the point was not committed there: run the copy again, and `vmkeep repo verify` "
                            "on the target") from exc


def copy_points(source: Repository, target: Repository, points: Iterable[Manifest], *,
                workers: int = DEFAULT_WORKERS, max_rate: float | None = None, verify: bool = False,
                progress: Progress | None = None) -> CopyReport:
    """Copy ``points`` (oldest first) from ``source`` into ``target``; ``max_rate``: MiB/s read
    from the source or written to the target at most; ``verify``: read each point back from the
    target before committing it."""
    started = time.monotonic()
    mode = _check_pair(source, target)
    report = CopyReport(mode=mode, verified=verify)
    progress = progress or NoProgress()
    pacer = Throttle(NoProgress(), max_rate * (1 << 20)) if max_rate else None
    present: dict[str, set[str]] = {}
    bases: dict[str, _Base] = {}
    log.info("copying %s into %s (%s)", source.backend.url, target.backend.url, mode)
    try:
        for manifest in points:
            label = f"{manifest.name}@{manifest.point_id}"
            if manifest.name not in present:
                present[manifest.name] = set(target.point_ids(manifest.name))
            if manifest.point_id in present[manifest.name]:
                report.points_present.append(label)
                continue
            # the point this run copied last is the next one's base: its chunks are known already
            base = bases.pop(manifest.name, None) or _Base.of(source, target, manifest.name, present[manifest.name])
            try:
                with WriterSession(target.backend, protects=base.protects):
                    base.check_kept(target)
                    copier = _PointCopy(source, target, mode, base, report, progress, pacer, workers)
                    disks = {disk: copier.disk(manifest, disk, entry) for disk, entry in manifest.disks.items()}
                    copied = _target_manifest(source, target, manifest, mode, disks)
                    if verify:
                        target.backend.flush()
                        _verify(target, copied, workers)
                    target.commit_point(copied)
            except BackendError as exc:  # the storage's own message names the object, not the repository
                raise BackendError(f"copying {label} from {source.backend.url} into {target.backend.url}: {exc} "
                                   f"({label} is not visible in the target; run the copy again: only what is "
                                   "missing travels)") from exc
            present[manifest.name].add(manifest.point_id)
            bases[manifest.name] = _Base(copied, dict(copier.known))
            report.points_copied.append(label)
            report.bytes_logical += manifest.logical_size
            log.info("copied %s into %s", label, target.backend.url)
    except VmkeepError as exc:  # what arrived is in the report: a catalog can list it
        report.seconds = round(time.monotonic() - started, 3)
        raise CopyFailed(exc, report) from exc
    report.seconds = round(time.monotonic() - started, 3)
    return report
