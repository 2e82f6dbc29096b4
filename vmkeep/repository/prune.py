"""Retention: which restore points of each name to keep (last N, and the newest point of each of
the last N hours / days / weeks / months / years)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from vmkeep.errors import UsageError
from vmkeep.repository.points import Manifest
from vmkeep.repository.repo import Repository

PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


@dataclass
class RetentionPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        # a negative count slices from the wrong end and keeps nothing: every point would go
        wrong = {k: v for k, v in self.__dict__.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
        if wrong:
            raise UsageError("retention counts are whole numbers, 0 or more (0: not used); got "
                             + ", ".join(f"{k}={v!r}" for k, v in wrong.items()))

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> RetentionPolicy:
        """From a stored or posted mapping (``{"last": 7, "daily": 14}``); unknown keys are refused."""
        unknown = sorted(set(counts) - {"last", *PERIODS})
        if unknown:
            raise UsageError(f"unknown retention {', '.join(unknown)}: use last, {', '.join(PERIODS)}")
        return cls(**counts)

    def is_empty(self) -> bool:
        return not any(self.__dict__.values())


@dataclass
class PruneResult:
    keep: dict[str, list[str]] = field(default_factory=dict)  # point id -> reasons
    remove: list[Manifest] = field(default_factory=list)


def select(points: list[Manifest], policy: RetentionPolicy, locked_until: datetime | None = None) -> PruneResult:
    """Apply ``policy`` to the points of one name; points newer than ``locked_until`` stay (Object Lock)."""
    newest_first = sorted(points, key=lambda m: (m.created, m.point_id), reverse=True)
    result = PruneResult()
    if locked_until is not None:
        for m in newest_first:
            if m.created_at > locked_until:
                result.keep.setdefault(m.point_id, []).append("immutable")
    for m in newest_first[: policy.last]:
        result.keep.setdefault(m.point_id, []).append("last")
    for period, bucket_of in PERIODS.items():
        wanted = getattr(policy, period)
        seen: set[tuple[int, ...]] = set()
        for m in newest_first:
            if len(seen) >= wanted:
                break
            bucket = bucket_of(m.created_at)
            if bucket not in seen:
                seen.add(bucket)
                result.keep.setdefault(m.point_id, []).append(period)
    if newest_first and not result.keep:
        raise UsageError("this retention keeps none of the points: give at least one --keep-* count above 0")
    result.remove = [m for m in newest_first if m.point_id not in result.keep]
    return result


def prune(repo: Repository, policy: RetentionPolicy, name: str | None = None,
          dry_run: bool = False) -> dict[str, PruneResult]:
    """Per name, select and (unless ``dry_run``) delete the points the policy does not keep."""
    if policy.is_empty():
        raise UsageError("give at least one --keep-* option; prune never deletes every point")
    by_name: dict[str, list[Manifest]] = {}
    for m in repo.list_points(name):
        by_name.setdefault(m.name, []).append(m)
    days = repo.config.immutable_days
    locked = datetime.now(UTC) - timedelta(days=days) if days else None
    results = {n: select(pts, policy, locked) for n, pts in by_name.items()}
    if not dry_run:
        for r in results.values():
            repo.delete_points(r.remove)
    return results
