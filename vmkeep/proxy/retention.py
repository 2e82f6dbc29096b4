"""Pruning a repository by the retention the master decided (its policies', or a copy target's):
the points each name's counts do not keep go, with the catalog's rows of them, in the caller's
transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, tuple_
from sqlalchemy.orm import Session

from vmkeep.catalog.models import RestorePointRecord
from vmkeep.proxy.work import MaintenanceOrder
from vmkeep.repository.points import Manifest
from vmkeep.repository.prune import RetentionPolicy, prune
from vmkeep.repository.repo import Repository


def prune_points(session: Session, repo: Repository, order: MaintenanceOrder) -> dict[str, Any]:
    """Per name, the points its policies' retention removes (a dry run only lists them), with the
    bytes their removal frees once GC runs; the catalog's rows of removed points go too."""
    dry_run = bool(order.params.get("dry_run", True))
    confirm: dict[str, list[str]] | None = order.params.get("confirm")
    names: dict[str, Any] = {}
    chosen: list[Manifest] = []
    for name, counts in sorted(order.params.get("retention", {}).items()):
        selected = prune(repo, RetentionPolicy.from_counts(counts), name, dry_run=True).get(name)
        if selected is None:
            continue  # no point of that name any more
        remove = selected.remove
        if confirm is not None:  # only what the confirmed dry run showed
            remove = [m for m in remove if m.point_id in confirm.get(name, [])]
        names[name] = {"keep": selected.keep, "remove": [m.point_id for m in remove], "retention": counts}
        chosen += remove
    frees = freed_by(repo, chosen)
    if not dry_run and chosen:
        repo.delete_points(chosen)
        keys = [(m.name, m.point_id) for m in chosen]
        session.execute(delete(RestorePointRecord).where(
            RestorePointRecord.repository_id == order.repository.id,
            tuple_(RestorePointRecord.name, RestorePointRecord.point_id).in_(keys)))
    return {"dry_run": dry_run, "names": names, "points_removed": len(chosen), "frees_bytes": frees,
            "unmanaged": order.params.get("unmanaged", [])}


def freed_by(repo: Repository, removed: list[Manifest]) -> int:
    """Stored bytes of the chunks only ``removed`` use: what GC frees once they are gone."""
    if not removed:
        return 0
    gone = {(m.name, m.point_id) for m in removed}
    dropped: set[bytes] = set()
    kept: set[bytes] = set()
    for m in repo.list_points():
        into = dropped if (m.name, m.point_id) in gone else kept
        for disk in m.disks:
            into |= repo.load_index(m, disk).chunk_ids()
    only = {c.hex() for c in dropped - kept}
    return sum(o.size for o in repo.backend.list("chunks/") if o.key.rsplit("/", 1)[1] in only)
