"""The task a proxy runs for a repository's maintenance started through the server: verify, prune,
GC, a usage measurement (per-name unique and shared bytes), or a backup copy into another
repository (vmkeep.proxy.copy_task).

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
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.catalog.models import MaintenanceRun
from vmkeep.jobs.queue import tasks
from vmkeep.jobs.registered import open_registered
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.proxy.copy_task import copy_run
from vmkeep.proxy.progress import RowProgress
from vmkeep.proxy.retention import prune_points
from vmkeep.proxy.work import MaintenanceOrder, maintenance_order
from vmkeep.repository.gc import collect
from vmkeep.repository.info import repository_info
from vmkeep.repository.repo import Repository
from vmkeep.repository.verify import verify

log = logging.getLogger(__name__)


@tasks.task(name="maintain_repository", pass_context=True)
def maintain_repository_task(context: JobContext, run_id: int) -> None:
    state: dict[str, Any] = context.additional_context
    run_maintenance(state["sessions"], state["proxy"], run_id, state.get("max_rate"))


def run_maintenance(sessions: sessionmaker[Session], proxy: str, run_id: int, max_rate: float | None = None) -> None:
    """Do what the run's row asks; its report (or the reason it failed) goes back into the row.
    ``max_rate``: the proxy's --max-rate, which a copy keeps to like a backup."""
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
                repo = open_registered(order.repository, read_only=order.kind == "copy")  # a copy's source
            except Exception as exc:
                raise RuntimeError(f"proxy {proxy} cannot open repository {order.repository.name} at "
                                   f"{order.repository.location}: {exc}") from exc
            # progress lands through another connection: closed before this session writes the row
            rows = RowProgress(sessions, run_id, MaintenanceRun)
            try:
                result = perform(session, repo, order, rows, max_rate)
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


def perform(session: Session, repo: Repository, order: MaintenanceOrder, rows: RowProgress,
            max_rate: float | None = None) -> dict[str, Any]:
    """One kind of maintenance; its report as the row keeps it."""
    if order.kind == "verify":
        return verify(repo, progress=rows).as_dict()
    if order.kind == "gc":
        return collect(repo).as_dict()
    if order.kind == "usage":  # the catalog's trigger moves "names" into repository_usage
        return repository_info(repo).as_dict()
    if order.kind == "prune":
        return prune_points(session, repo, order)
    if order.kind == "copy":
        return copy_run(session, repo, order, rows, max_rate)
    raise ValueError(f"unknown maintenance {order.kind!r}")
