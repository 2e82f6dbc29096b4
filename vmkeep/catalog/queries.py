"""Reading the catalog: the searches behind `vmkeep catalog points` and the API."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, exists, select, tuple_
from sqlalchemy.orm import Session, aliased

from vmkeep.catalog.models import RepositoryRecord, RestorePointRecord

BATCH = 1000


def glob_to_like(glob: str) -> str:
    """A ``*`` glob as a LIKE pattern (escape character backslash)."""
    return glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")


def find_points(session: Session, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Newest first; ``name`` is exact, or a glob when it holds ``*`` (served by the name index).
    A point copied to other repositories is listed once: ``repository`` is the one that holds it
    first (its backup's, as a rule), ``repositories`` every one that holds it."""
    query = select(RestorePointRecord, RepositoryRecord.name).join(RepositoryRecord).where(~held_earlier())
    if name and "*" in name:
        query = query.where(RestorePointRecord.name.like(glob_to_like(name), escape="\\"))
    elif name:
        query = query.where(RestorePointRecord.name == name)
    query = query.order_by(RestorePointRecord.created.desc()).limit(limit)
    rows = session.execute(query).tuples().all()
    where = point_repositories(session, [(p.name, p.point_id) for p, _ in rows])
    return [
        {"name": p.name, "point_id": p.point_id, "parent": p.parent, "created": p.created.isoformat(),
         "kind": p.kind, "mode": p.mode, "transport": p.transport, "consistency": p.consistency,
         "wire": p.wire,
         "logical_bytes": p.logical_bytes, "read_bytes": p.read_bytes, "stored_bytes": p.stored_bytes,
         "duration_seconds": p.duration_seconds, "disks": p.disks, "repository": repo_name,
         "repositories": where.get((p.name, p.point_id), [repo_name])}
        for p, repo_name in rows
    ]


def held_earlier() -> ColumnElement[bool]:
    """Whether another row holds the same point and was cataloged before this one (a condition on
    ``RestorePointRecord``): not it, for one row per point, the original's."""
    other = aliased(RestorePointRecord)
    return exists(select(other.id).where(other.name == RestorePointRecord.name,
                                         other.point_id == RestorePointRecord.point_id,
                                         other.id < RestorePointRecord.id))


def point_repositories(session: Session, keys: list[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    """Per (name, point_id), the repositories that hold it, in the order they were cataloged."""
    where: dict[tuple[str, str], list[str]] = {}
    for start in range(0, len(keys), BATCH):
        rows = session.execute(
            select(RestorePointRecord.name, RestorePointRecord.point_id, RepositoryRecord.name).join(RepositoryRecord)
            .where(tuple_(RestorePointRecord.name, RestorePointRecord.point_id).in_(keys[start:start + BATCH]))
            .order_by(RestorePointRecord.id)).tuples()
        for name, point_id, repository in rows:
            where.setdefault((name, point_id), []).append(repository)
    return where
