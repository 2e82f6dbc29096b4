"""The task a proxy runs for a restore started through the server."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from procrastinate import JobContext
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.catalog.models import RestoreJob
from vmkeep.engine.throttle import throttled
from vmkeep.engine.vm import restore_vm_as, restore_vm_overwrite
from vmkeep.jobs.queue import tasks
from vmkeep.jobs.registered import connector_for, open_registered
from vmkeep.jobs.status import ACTIVE, JobStatus
from vmkeep.proxy.progress import RowProgress
from vmkeep.proxy.work import restore_order

log = logging.getLogger(__name__)


@tasks.task(name="restore_vm", pass_context=True)
def restore_vm_task(context: JobContext, restore_id: int) -> None:
    state: dict[str, Any] = context.additional_context
    run_restore(state["sessions"], state["proxy"], restore_id, state.get("max_rate"))


def run_restore(sessions: sessionmaker[Session], proxy: str, restore_id: int, max_rate: float | None = None) -> None:
    """Restore as the row says; the outcome (or the reason it failed) goes back into the row."""

    with sessions() as session:
        job = session.get(RestoreJob, restore_id)
        order = restore_order(session, restore_id)
        if job is None or job.status not in ACTIVE:
            log.info("restore task %s: nothing to do (%s)", restore_id,
                     "its row is gone" if job is None else f"already {job.status}")
            return
        context = {"restore": restore_id, "vm": job.vm_name, "proxy": proxy}
        if order is None:  # its hypervisor or repository went while it waited
            log.warning("restore not started: its hypervisor or repository was removed", extra=context)
            job.status, job.finished = JobStatus.FAILED, datetime.now(UTC)
            job.error = "its hypervisor or repository was removed before the restore started"
            session.commit()
            return
        job.status, job.proxy, job.attempts, job.error = JobStatus.RUNNING, proxy, job.attempts + 1, None
        session.commit()
        log.info("restore started (%s, attempt %d)", job.mode, job.attempts, extra=context)
        connector = None
        try:
            repo = open_registered(order.repository)
            connector = connector_for(order.hypervisor)
            # progress lands through another connection: closed before this session writes the row
            rows = RowProgress(sessions, restore_id, RestoreJob)
            progress = throttled(rows, max_rate)
            try:
                if job.mode == "overwrite":  # re-stages every disk: a retry needs nothing removed first
                    result = restore_vm_overwrite(repo, connector, job.vm_name, job.point_id, progress=progress)
                else:
                    assert job.new_name is not None
                    result = restore_vm_as(repo, connector, job.vm_name, job.point_id, job.new_name,
                                           storage=job.storage, start=job.start_vm,
                                           progress=progress, retry=job.attempts > 1)
            finally:
                rows.close()
            job.status, job.disks = JobStatus.SUCCEEDED, result.disks
            log.info("restore succeeded: VM %s, %d disks", result.name, len(result.disks), extra=context)
        except Exception as exc:  # recorded for the user; the task itself ends cleanly
            job.status, job.error = JobStatus.FAILED, str(exc)
            log.warning("restore failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG), extra=context)
        finally:
            if connector is not None:
                connector.close()
            job.finished = datetime.now(UTC)
            session.commit()
