"""Reading the catalog: the searches behind `vmkeep catalog points` and the API."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import RepositoryRecord, RestorePointRecord


def glob_to_like(glob: str) -> str:
    """A ``*`` glob as a LIKE pattern (escape character backslash)."""
    return glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")


def find_points(session: Session, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Newest first; ``name`` is exact, or a glob when it holds ``*`` (served by the name index)."""
    query = select(RestorePointRecord, RepositoryRecord.name).join(RepositoryRecord)
    if name and "*" in name:
        query = query.where(RestorePointRecord.name.like(glob_to_like(name), escape="\\"))
    elif name:
        query = query.where(RestorePointRecord.name == name)
    query = query.order_by(RestorePointRecord.created.desc()).limit(limit)
    return [
        {"name": p.name, "point_id": p.point_id, "parent": p.parent, "created": p.created.isoformat(),
         "kind": p.kind, "mode": p.mode, "transport": p.transport, "consistency": p.consistency,
         "wire": p.wire,
         "logical_bytes": p.logical_bytes, "read_bytes": p.read_bytes, "stored_bytes": p.stored_bytes,
         "duration_seconds": p.duration_seconds, "disks": p.disks, "repository": repo_name}
        for p, repo_name in session.execute(query).tuples()
    ]
