"""The task a proxy runs for a repository's maintenance started through the server: verify, prune,
GC, or a usage measurement (per-name unique and shared bytes).

Each calls the repository's own code (``vmkeep.repository.verify/prune/gc/info``, what ``vmkeep
repo verify|prune|gc|info`` run) and writes its report into the run's row; the catalog's restore
points follow a prune in the same transaction as its outcome. Which points a prune removes was
decided by the master from its policies' retention (``params["retention"]``: counts per name); a
prune confirmed from a dry run (``params["confirm"]``) removes only points that dry run listed and
the retention still removes now.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from procrastinate import JobContext
from sqlalchemy import delete, tuple_
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.catalog.models import MaintenanceRun, RestorePointRecord
from vmkeep.jobs.queue import tasks
from vmkeep.jobs.registered import open_registered
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.proxy.progress import RowProgress
from vmkeep.proxy.work import MaintenanceOrder, maintenance_order
from vmkeep.repository.gc import collect
from vmkeep.repository.info import repository_info
from vmkeep.repository.points import Manifest
from vmkeep.repository.prune import RetentionPolicy, prune
from vmkeep.repository.repo import Repository
from vmkeep.repository.verify import verify

log = logging.getLogger(__name__)


@tasks.task(name="maintain_repository", pass_context=True)
def maintain_repository_task(context: JobContext, run_id: int) -> None:
    state: dict[str, Any] = context.additional_context
    run_maintenance(state["sessions"], state["proxy"], run_id)


def run_maintenance(sessions: sessionmaker[Session], proxy: str, run_id: int) -> None:
    """Do what the run's row asks; its report (or the reason it failed) goes back into the row."""
    with sessions() as session:
        run = session.get(MaintenanceRun, run_id)
        order = maintenance_order(session, run_id)
        if run is None or run.status not in ACTIVE:
            log.info("maintenance task %s: nothing to do (%s)", run_id,
                     "its row is gone" if run is None else f"already {run.status}")
            return
        context = {"maintenance": run_id, "repository": run.repository_name, "proxy": proxy}
        if order is None:
            log.warning("maintenance not started: its repository was removed", extra=context)
            run.status, run.finished = JobStatus.FAILED, datetime.now(UTC)
            run.error = "its repository was removed from the catalog before the run started"
            session.commit()
            return
        run.status, run.proxy, run.attempts, run.error = JobStatus.RUNNING, proxy, run.attempts + 1, None
        run.started = datetime.now(UTC)
        session.commit()
        log.info("%s of repository %s started (attempt %d)", order.kind, order.repository.name, run.attempts,
                 extra=context)
        repo = None
        try:
            try:
                repo = open_registered(order.repository)
            except Exception as exc:
                raise RuntimeError(f"proxy {proxy} cannot open repository {order.repository.name} at "
                                   f"{order.repository.location}: {exc}") from exc
            # progress lands through another connection: closed before this session writes the row
            rows = RowProgress(sessions, run_id, MaintenanceRun)
            try:
                result = perform(session, repo, order, rows)
            finally:
                rows.close()
            run.result, run.status = result, JobStatus.SUCCEEDED
            log.info("%s of repository %s succeeded", order.kind, order.repository.name, extra=context)
        except Exception as exc:  # recorded for the user; the task itself ends cleanly
            session.rollback()  # a prune's catalog changes go only with its success
            run.status, run.error = JobStatus.FAILED, str(exc)[:4000] or type(exc).__name__
            log.warning("%s of repository %s failed: %s", order.kind, order.repository.name, exc,
                        exc_info=log.isEnabledFor(logging.DEBUG), extra=context)
        finally:
            if repo is not None:
                repo.close()
            run.finished = datetime.now(UTC)
            session.commit()


def perform(session: Session, repo: Repository, order: MaintenanceOrder, rows: RowProgress) -> dict[str, Any]:
    """One kind of maintenance; its report as the row keeps it."""
    if order.kind == "verify":
        return verify(repo, progress=rows).as_dict()
    if order.kind == "gc":
        return collect(repo).as_dict()
    if order.kind == "usage":  # the catalog's trigger moves "names" into repository_usage
        return repository_info(repo).as_dict()
    if order.kind == "prune":
        return prune_points(session, repo, order)
    raise ValueError(f"unknown maintenance {order.kind!r}")


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
