"""What the restore pages read of the catalog, one page at a time: the names that have points
(a million points, ten thousand names: never grouped whole), one name's timeline, restores.

The names are walked with a loose index scan of ``ix_restore_points_name_created`` (one index
probe per distinct name, not a scan of every point); each shown name's count and newest point come
from the same index.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from vmkeep.catalog.models import JobVM, RepositoryRecord, RestoreJob, RestorePointRecord
from vmkeep.catalog.queries import glob_to_like
from vmkeep.server.console.paging import Paging

# The distinct names after :after, one index probe each; PostgreSQL evaluates a WITH query only as
# far as its reader fetches, so a page costs a probe per name it passes, never a walk of them all.
NAMES = text("""
WITH RECURSIVE names(name) AS (
    (SELECT name FROM restore_points WHERE name > :after ORDER BY name LIMIT 1)
    UNION ALL
    SELECT (SELECT p.name FROM restore_points p WHERE p.name > names.name ORDER BY p.name LIMIT 1)
    FROM names WHERE names.name IS NOT NULL
), shown AS (
    SELECT name FROM names WHERE name IS NOT NULL AND name ILIKE :pattern ESCAPE '\\' LIMIT :limit
)
SELECT shown.name, s.points, s.newest, s.repositories, latest.kind, r.name AS repository
FROM shown
CROSS JOIN LATERAL (SELECT count(*) AS points, max(created) AS newest, count(DISTINCT repository_id) AS repositories
                    FROM restore_points WHERE name = shown.name) s
CROSS JOIN LATERAL (SELECT kind, repository_id FROM restore_points WHERE name = shown.name
                    ORDER BY created DESC LIMIT 1) latest
JOIN repositories r ON r.id = latest.repository_id
ORDER BY shown.name
""")


@dataclass
class NamePoints:
    """A VM (or image) that has restore points."""

    name: str
    points: int
    newest: datetime
    kind: str  # of the newest point: vm or image
    repository: str  # of the newest point
    repositories: int


@dataclass
class TimelinePoint:
    """One restore point with what its backup found out about it."""

    point: RestorePointRecord
    repository: str
    verified: bool | None  # None: not asked for, or made outside a policy run
    boot_check: dict[str, Any] | None

    @property
    def booted(self) -> bool | None:
        return None if self.boot_check is None else bool(self.boot_check.get("passed"))


def names_with_points(session: Session, search: str, after: str, per_page: int) -> tuple[list[NamePoints], str | None]:
    """One page of the names that have points, by name, from the first name after ``after``;
    ``search`` is a part of the name (any case). With the page comes the ``after`` of the next
    page (None: this is the last). Keyset paging: page 200 costs what page 1 does, and no count
    walks every name."""
    pattern = "%" + glob_to_like(search.replace("*", "")) + "%" if search else "%"
    rows = session.execute(NAMES, {"after": after, "pattern": pattern, "limit": per_page + 1}).all()
    names = [NamePoints(r.name, r.points, r.newest, r.kind, r.repository, r.repositories) for r in rows[:per_page]]
    return names, (names[-1].name if len(rows) > per_page else None)


def timeline(session: Session, name: str, paging: Paging) -> list[TimelinePoint]:
    """One page of a name's points, newest first, each with its backup's verify and boot check."""
    paging.total = session.scalar(select(func.count()).select_from(RestorePointRecord)
                                  .where(RestorePointRecord.name == name)) or 0
    rows = session.execute(
        select(RestorePointRecord, RepositoryRecord.name).join(RepositoryRecord)
        .where(RestorePointRecord.name == name)
        .order_by(RestorePointRecord.created.desc(), RestorePointRecord.id.desc())
        .offset(paging.offset).limit(paging.per_page)).tuples().all()
    made = {v.point_id: v for v in session.scalars(select(JobVM).where(
        JobVM.vm_name == name, JobVM.point_id.in_([p.point_id for p, _ in rows])))}
    return [TimelinePoint(p, repository, *_checks(made.get(p.point_id))) for p, repository in rows]


def _checks(made: JobVM | None) -> tuple[bool | None, dict[str, Any] | None]:
    return (None, None) if made is None else (made.verified, made.boot_check)


def find_point(session: Session, name: str, point_id: str) -> tuple[RestorePointRecord, str] | None:
    """A point of ``name`` by its id (the newest, should two repositories hold a copy), with its
    repository's name; found through the name's index."""
    row = session.execute(select(RestorePointRecord, RepositoryRecord.name).join(RepositoryRecord)
                          .where(RestorePointRecord.name == name, RestorePointRecord.point_id == point_id)
                          .order_by(RestorePointRecord.created.desc()).limit(1)).tuples().first()
    return None if row is None else (row[0], row[1])


def restores(session: Session, paging: Paging) -> list[RestoreJob]:
    """One page of the restores, newest first."""
    paging.total = session.scalar(select(func.count()).select_from(RestoreJob)) or 0
    return list(session.scalars(select(RestoreJob).order_by(RestoreJob.id.desc())
                                .offset(paging.offset).limit(paging.per_page)))
