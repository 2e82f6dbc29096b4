"""The task a proxy runs for a restore started through the server."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from procrastinate import JobContext
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.catalog.models import RestoreJob
from vmkeep.engine.vm import restore_vm_as, restore_vm_overwrite
from vmkeep.proxy.queue import tasks


@tasks.task(name="restore_vm", pass_context=True)
def restore_vm_task(context: JobContext, restore_id: int) -> None:
    state: dict[str, Any] = context.additional_context
    run_restore(state["sessions"], state["proxy"], restore_id)


def run_restore(sessions: sessionmaker[Session], proxy: str, restore_id: int) -> None:
    """Restore as the row says; the outcome (or the reason it failed) goes back into the row."""
    from vmkeep.server.inventory import connector_for
    from vmkeep.server.repositories import open_registered

    with sessions() as session:
        job = session.get(RestoreJob, restore_id)
        if job is None or job.status not in ("queued", "running"):
            return
        job.status, job.proxy = "running", proxy
        session.commit()
        connector = None
        try:
            repo = open_registered(job.repository)
            connector = connector_for(job.hypervisor)
            if job.mode == "overwrite":
                result = restore_vm_overwrite(repo, connector, job.vm_name, job.point_id)
            else:
                assert job.new_name is not None
                result = restore_vm_as(repo, connector, job.vm_name, job.point_id, job.new_name,
                                       storage=Path(job.storage) if job.storage else None, start=job.start_vm)
            job.status, job.disks = "succeeded", result.disks
        except Exception as exc:  # recorded for the user; the task itself ends cleanly
            job.status, job.error = "failed", str(exc)
        finally:
            if connector is not None:
                connector.close()
            job.finished = datetime.now(UTC)
            session.commit()
