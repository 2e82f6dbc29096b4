"""Verify: re-read, decrypt and re-hash the chunks live restore points use, and name the points a
bad chunk or index breaks."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from vmkeep.errors import ObjectCorrupt, ObjectMissing, RepositoryError
from vmkeep.pipeline import bounded_map
from vmkeep.progress import NoProgress, Progress
from vmkeep.repository.points import DiskRef, Manifest
from vmkeep.repository.repo import Repository


@dataclass
class VerifyReport:
    points: int = 0
    chunks_total: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    bad_chunks: dict[str, str] = field(default_factory=dict)
    broken_points: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad_chunks and not self.broken_points

    def as_dict(self) -> dict[str, object]:
        return {**self.__dict__, "ok": self.ok}


def verify(repo: Repository, sample_pct: float = 100.0, workers: int = 4,
           progress: Progress | None = None, only: list[Manifest] | None = None) -> VerifyReport:
    """Check every live point, or ``only`` those (a backup just made, say)."""
    progress = progress or NoProgress()
    started = time.monotonic()
    report = VerifyReport()
    users: dict[bytes, list[DiskRef]] = {}
    sizes: dict[bytes, int] = {}
    if only is None:
        points, damaged = repo.scan_points()
    else:
        points, damaged = only, []
    for key, reason in damaged:
        report.broken_points.setdefault(key, []).append(reason)
    report.points = len(points)
    for m in points:
        for disk in m.disks:
            ref = DiskRef(m.name, m.point_id, disk)
            try:
                index = repo.load_index(m, disk)
            except RepositoryError as exc:
                report.broken_points.setdefault(f"{m.name}@{m.point_id}", []).append(str(exc))
                continue
            for slot, cid in index.nonzero():
                users.setdefault(cid, []).append(ref)
                sizes[cid] = index.slot_length(slot)
    report.chunks_total = len(sizes)
    chosen = list(sizes)
    if sample_pct < 100:
        chosen = random.sample(chosen, max(1, round(len(chosen) * sample_pct / 100)) if chosen else 0)
    task = progress.task("verify", sum(sizes[c] for c in chosen))

    def check(cid: bytes) -> str | None:
        try:
            repo.load_chunk(cid, sizes[cid])
            return None
        except (ObjectCorrupt, ObjectMissing) as exc:
            return str(exc)
        finally:
            task.advance(sizes[cid])

    def done(cid: bytes, problem: str | None) -> None:
        report.chunks_checked += 1
        report.bytes_checked += sizes[cid]
        if problem:
            report.bad_chunks[cid.hex()] = problem
            for ref in users[cid]:
                report.broken_points.setdefault(f"{ref.name}@{ref.point_id}", []).append(
                    f"disk {ref.disk}: {problem}")

    try:
        bounded_map(check, chosen, workers, done)
    finally:
        task.finish()
    report.seconds = round(time.monotonic() - started, 3)
    return report
