"""What the restore pages read of the catalog, one page at a time: the names that have points
(a million points, ten thousand names: never grouped whole), one name's timeline, restores.

The names come from ``newest_points`` (a row per name and repository, kept by the database), each
shown name's count and newest point from ``ix_restore_points_name_created``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import distinct, func, select, text
from sqlalchemy.orm import Session

from vmkeep.catalog.models import JobVM, NewestPoint, RepositoryRecord, RestoreJob, RestorePointRecord
from vmkeep.catalog.queries import glob_to_like, held_earlier, point_repositories
from vmkeep.server.console.paging import Paging

# newest_points (kept by triggers, migration 0016) has a row per name and repository: the names,
# their newest point and repositories come from its ~10,000 rows; only the page's names are counted
# in restore_points (an index range each; a point and its copies in other repositories count once).
NAMES = text("""
WITH per_name AS (
    SELECT name, max(created) AS newest, count(*) AS repositories FROM newest_points
    WHERE name ILIKE :pattern ESCAPE '\\' GROUP BY name
), shown AS (
    SELECT *, count(*) OVER () AS total FROM per_name ORDER BY name LIMIT :limit OFFSET :offset
)
SELECT shown.name, shown.total, shown.newest, shown.repositories, s.points, latest.kind, r.name AS repository
FROM shown
CROSS JOIN LATERAL (SELECT count(DISTINCT point_id) AS points FROM restore_points WHERE name = shown.name) s
CROSS JOIN LATERAL (SELECT kind, repository_id FROM restore_points WHERE name = shown.name
                    ORDER BY created DESC, id LIMIT 1) latest
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
    copies: list[str] = field(default_factory=list)  # the other repositories holding it (backup copies)

    @property
    def booted(self) -> bool | None:
        return None if self.boot_check is None else bool(self.boot_check.get("passed"))


def names_with_points(session: Session, search: str, paging: Paging) -> list[NamePoints]:
    """One page of the names that have points, by name; ``search`` is a part of the name (any case)."""
    pattern = "%" + glob_to_like(search.replace("*", "")) + "%" if search else "%"
    rows = session.execute(NAMES, {"pattern": pattern, "limit": paging.per_page, "offset": paging.offset}).all()
    if rows:
        paging.total = rows[0].total
    else:  # past the last page, or nothing matches: counted without the page
        paging.total = session.scalar(select(func.count(distinct(NewestPoint.name))).where(
            NewestPoint.name.ilike(pattern, escape="\\"))) or 0
    return [NamePoints(r.name, r.points, r.newest, r.kind, r.repository, r.repositories) for r in rows]


def timeline(session: Session, name: str, paging: Paging) -> list[TimelinePoint]:
    """One page of a name's points, newest first, each once (in the repository that held it first,
    with its copies), with its backup's verify and boot check."""
    paging.total = session.scalar(select(func.count()).select_from(RestorePointRecord)
                                  .where(RestorePointRecord.name == name, ~held_earlier())) or 0
    rows = session.execute(
        select(RestorePointRecord, RepositoryRecord.name).join(RepositoryRecord)
        .where(RestorePointRecord.name == name, ~held_earlier())
        .order_by(RestorePointRecord.created.desc(), RestorePointRecord.id.desc())
        .offset(paging.offset).limit(paging.per_page)).all()
    # the backups of that name (ix_job_vms_vm_name), not a scan of every backup
    made = {v.point_id: v for v in session.scalars(select(JobVM).where(
        JobVM.vm_name == name, JobVM.point_id.in_([p.point_id for p, _ in rows])))}
    where = point_repositories(session, [(p.name, p.point_id) for p, _ in rows])
    return [TimelinePoint(p, repository, *_checks(made.get(p.point_id)),
                          copies=[r for r in where.get((p.name, p.point_id), []) if r != repository])
            for p, repository in rows]


def _checks(made: JobVM | None) -> tuple[bool | None, dict[str, Any] | None]:
    return (None, None) if made is None else (made.verified, made.boot_check)


def find_point(session: Session, name: str, point_id: str) -> tuple[RestorePointRecord, str] | None:
    """A point of ``name`` by its id (the newest, should two repositories hold a copy), with its
    repository's name; found through the name's index."""
    row = session.execute(select(RestorePointRecord, RepositoryRecord.name).join(RepositoryRecord)
                          .where(RestorePointRecord.name == name, RestorePointRecord.point_id == point_id)
                          .order_by(RestorePointRecord.created.desc()).limit(1)).first()
    return None if row is None else (row[0], row[1])


def restores(session: Session, paging: Paging) -> list[RestoreJob]:
    """One page of the restores, newest first."""
    paging.total = session.scalar(select(func.count()).select_from(RestoreJob)) or 0
    return list(session.scalars(select(RestoreJob).order_by(RestoreJob.id.desc())
                                .offset(paging.offset).limit(paging.per_page)))
