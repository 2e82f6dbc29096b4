"""Re-import what a repository holds into the catalog: the repository is the source of truth.

Every readable manifest becomes (or refreshes) a restore-point row; rows of points the repository
no longer has (pruned, or lost with a damaged manifest) are removed. Damaged manifests are
reported, not imported. Safe to run at any time and as often as wanted.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import delete, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from vmkeep.catalog.models import RepositoryRecord, RestorePointRecord
from vmkeep.errors import RepositoryError
from vmkeep.repository.config import RepoConfig
from vmkeep.repository.points import Manifest
from vmkeep.repository.repo import Repository

BATCH = 1000


@dataclass
class RebuildReport:
    repository: str
    points: int = 0
    removed: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)


class Pinned(Protocol):
    """What the catalog recorded of a repository when it was registered (its row, or a copy of it
    a proxy was given)."""

    @property
    def name(self) -> str: ...
    @property
    def location(self) -> str: ...
    @property
    def repo_id(self) -> str: ...
    @property
    def encrypted(self) -> bool: ...


def check_pinned(record: Pinned, config: RepoConfig) -> None:
    """Refuse a repository that is not the one the catalog registered at this location: its id
    and whether it is encrypted were recorded then, and a config that now says otherwise was
    replaced or tampered with (to make the next backup store plaintext, say)."""
    if config.repo_id != record.repo_id:
        raise RepositoryError(
            f"{record.location} now holds repository {config.repo_id}, but the catalog registered repository "
            f"{record.repo_id} there as {record.name}; if its config.json was replaced, restore it from a copy of "
            "the repository; if the repository was really re-created, remove it from the catalog and add it again"
        )
    if config.encrypted != record.encrypted:
        said, now = ("encrypted", "unencrypted") if record.encrypted else ("unencrypted", "encrypted")
        raise RepositoryError(
            f"the catalog registered {record.name} ({record.location}) as {said}, but its config.json now says "
            f"{now}: the config was replaced or tampered with; nothing was read or written; restore config.json "
            "from a copy of the repository"
        )


def register_repository(session: Session, repo: Repository, name: str | None = None,
                        s3_endpoint: str | None = None) -> RepositoryRecord:
    """The catalog's record of ``repo``, created on first sight (by location); a record of
    another repository at that location is refused (:func:`check_pinned`)."""
    location = repo.backend.url
    record = session.scalar(select(RepositoryRecord).where(RepositoryRecord.location == location))
    if record is not None:
        check_pinned(record, repo.config)
    else:
        record = RepositoryRecord(name=name or location, location=location, s3_endpoint=s3_endpoint,
                                  repo_id=repo.config.repo_id, encrypted=repo.config.encrypted)
        session.add(record)
        session.flush()
    return record


def point_row(repository_id: int, m: Manifest) -> dict[str, Any]:
    meta, stats = m.meta, m.stats
    return {
        "repository_id": repository_id, "name": m.name, "point_id": m.point_id, "parent": m.parent,
        "created": datetime.fromisoformat(m.created), "kind": meta.get("kind", "image"), "mode": meta.get("mode"),
        "transport": meta.get("transport"), "consistency": meta.get("consistency"),
        "logical_bytes": m.logical_size, "read_bytes": stats.get("bytes_read"),
        "stored_bytes": stats.get("bytes_stored"), "duration_seconds": stats.get("seconds"),
        "disks": {d: e.size for d, e in m.disks.items()}, "wire": meta.get("wire"),
    }


def upsert_points(session: Session, repository_id: int, manifests: list[Manifest]) -> None:
    for start in range(0, len(manifests), BATCH):
        rows = [point_row(repository_id, m) for m in manifests[start:start + BATCH]]
        stmt = insert(RestorePointRecord).values(rows)
        keep = {c: stmt.excluded[c] for c in rows[0] if c not in ("repository_id", "name", "point_id")}
        session.execute(stmt.on_conflict_do_update(index_elements=["repository_id", "name", "point_id"], set_=keep))


def rebuild(session: Session, repo: Repository, name: str | None = None,
            s3_endpoint: str | None = None) -> RebuildReport:
    """Make the catalog's rows for ``repo`` match its manifests; one transaction."""
    record = register_repository(session, repo, name, s3_endpoint)
    manifests, damaged = repo.scan_points()
    report = RebuildReport(record.name, points=len(manifests), damaged=damaged)
    if manifests:
        upsert_points(session, record.id, manifests)
    present = {(m.name, m.point_id) for m in manifests}
    stale = [k for k in session.execute(
        select(RestorePointRecord.name, RestorePointRecord.point_id)
        .where(RestorePointRecord.repository_id == record.id)).tuples() if k not in present]
    for start in range(0, len(stale), BATCH):
        result = session.execute(delete(RestorePointRecord).where(
            RestorePointRecord.repository_id == record.id,
            tuple_(RestorePointRecord.name, RestorePointRecord.point_id).in_(stale[start:start + BATCH])))
        report.removed += result.rowcount  # type: ignore[attr-defined]
    record.used_bytes = sum(o.size for o in repo.backend.list("chunks/"))
    if "://" not in record.location:
        record.capacity_bytes = shutil.disk_usage(record.location).total
    record.scanned_at = datetime.now(UTC)
    session.commit()
    return report
