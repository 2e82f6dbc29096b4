"""A backup copy run on a proxy: the points the master chose, from the run's repository (opened
read-only) into its target (vmkeep.engine.copy), then the target's own retention.

The copied points' catalog rows for the target are written in the session of the run's outcome,
so the catalog lists a copy exactly when it is in the target; points the target already had are
(re)cataloged too (a copy made outside the server shows up). A run failing part-way still catalogs
the points that arrived before the failure (committed before the failure is recorded: the task
rolls back what a failed run did), or the master would send them again and never list them.

Which points: ``params["points"]`` ("name@point_id", the policy's points the target lacks and its
retention would keep, chosen by the master from the catalog), or
``names`` (a glob) with ``point`` or ``latest`` as ``vmkeep copy`` takes them. ``retention``
(counts per name, the master's plan for the target) prunes the target afterwards.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from vmkeep.catalog.rebuild import upsert_points
from vmkeep.engine.copy import CopyFailed, choose_points, copy_points
from vmkeep.jobs.registered import open_registered
from vmkeep.progress import Progress
from vmkeep.proxy.retention import prune_points
from vmkeep.proxy.work import MaintenanceOrder, RepositoryOrder
from vmkeep.repository.points import Manifest
from vmkeep.repository.repo import Repository

log = logging.getLogger(__name__)


class CopyRunFailed(Exception):
    """A copy that could not be done, with what to do about it."""


def copy_run(session: Session, source: Repository, order: MaintenanceOrder, progress: Progress,
             max_rate: float | None = None) -> dict[str, Any]:
    """Copy, catalog and prune as the order says; the run's result (the engine's report, the
    points asked for that the source no longer has, the target's prune). ``max_rate``: MiB/s."""
    target_order = order.target
    if target_order is None:
        raise CopyRunFailed(f"the copy's target repository was removed from the catalog before the run started: "
                            f"register it again, or start a copy of {order.repository.name} to another one")
    try:
        target = open_registered(target_order)
    except Exception as exc:
        raise CopyRunFailed(f"cannot open the copy's target repository {target_order.name} at "
                            f"{target_order.location}: {exc}; make it reachable from this proxy (or fix its "
                            "registration), then start the copy again: only what it lacks travels") from exc
    try:
        points, missing = chosen(source, order.params)
        log.info("copying %d points of %s to %s", len(points), order.repository.name, target_order.name)
        try:
            report = copy_points(source, target, points, verify=bool(order.params.get("verify")), progress=progress,
                                 max_rate=max_rate)
        except Exception as exc:
            arrived = catalog_arrived(session, target_order, points, exc)
            kept = f"{arrived} points copied before this stay and are cataloged; " if arrived else ""
            raise CopyRunFailed(f"copying from {order.repository.name} to {target_order.name} failed: {exc} "
                                f"({kept}running the copy again sends only what the target lacks)") from exc
        if points:
            upsert_points(session, target_order.id, points)
        result: dict[str, Any] = {**report.as_dict(), "missing": missing}
        retention = order.params.get("retention")
        if retention:
            result.update(prune_target(session, target, target_order, retention))
        log.info("copy to %s: %d copied, %d present, %d bytes sent (%s)", target_order.name,
                 len(report.points_copied), len(report.points_present), report.bytes_sent, report.mode)
        return result
    finally:
        target.close()


def catalog_arrived(session: Session, target: RepositoryOrder, points: list[Manifest], failure: Exception) -> int:
    """The points a failed copy did put in the target (and those it found there), cataloged for
    the target and committed now; how many."""
    if not isinstance(failure, CopyFailed):
        return 0
    done = set(failure.report.points_copied) | set(failure.report.points_present)
    arrived = [m for m in points if f"{m.name}@{m.point_id}" in done]
    if not arrived:
        return 0
    try:
        upsert_points(session, target.id, arrived)
        session.commit()
    except Exception as exc:  # noqa: BLE001 - the copy's own failure is what the run reports
        session.rollback()
        log.warning("copy to %s failed after %d points, which could not be cataloged (%s): `vmkeep repository "
                    "rebuild %s` (with --server) catalogs them", target.name, len(arrived), exc, target.name)
        return 0
    log.info("copy to %s failed after %d points: cataloged them", target.name, len(arrived))
    return len(arrived)


def prune_target(session: Session, target: Repository, record: RepositoryOrder,
                 retention: dict[str, Any]) -> dict[str, Any]:
    """The target's retention applied after the copy: ``{"prune": report}``, or ``{"prune_error":
    what to do}`` when it fails (Object Lock refusing a deletion, say): the copy itself stands."""
    try:
        with session.begin_nested():  # its catalog deletions go back with it, the copied rows stay
            return {"prune": prune_points(session, target, MaintenanceOrder(
                "prune", {"dry_run": False, "retention": retention}, record))}
    except Exception as exc:  # noqa: BLE001 - reported in the run's result; the copy succeeded
        log.warning("prune of %s after the copy failed: %s", record.name, exc)
        return {"prune_error": f"the copy succeeded, but pruning {record.name} by its retention failed: {exc}; "
                               f"prune it later (POST /api/repositories/{record.name}/prune), then rebuild its "
                               "catalog if points went"}


def chosen(source: Repository, params: dict[str, Any]) -> tuple[list[Manifest], list[str]]:
    """The source's manifests the run asks for, oldest first, and the "name@point_id" asked for by
    name that the source no longer has (pruned since the master chose them: nothing to copy)."""
    wanted: list[str] | None = params.get("points")
    if wanted is None:
        return choose_points(source, names=params.get("names"), point=params.get("point"),
                             latest=params.get("latest")), []
    by_name: dict[str, set[str]] = {}
    for key in wanted:
        name, _, point_id = key.partition("@")
        by_name.setdefault(name, set()).add(point_id)
    found = [m for name in sorted(by_name) for m in source.list_points(name) if m.point_id in by_name[name]]
    have = {f"{m.name}@{m.point_id}" for m in found}
    return sorted(found, key=lambda m: m.created), [k for k in wanted if k not in have]
