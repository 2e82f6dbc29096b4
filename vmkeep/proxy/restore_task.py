"""The task a proxy runs for a restore started through the server (and each step of an instant recovery)."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from procrastinate import JobContext
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.catalog.models import RestoreJob
from vmkeep.engine.image import restore_image
from vmkeep.engine.throttle import throttled
from vmkeep.engine.vm import restore_vm_as, restore_vm_overwrite
from vmkeep.errors import UsageError
from vmkeep.jobs.queue import tasks
from vmkeep.jobs.registered import connector_for
from vmkeep.jobs.status import ACTIVE, INSTANT, JobStatus
from vmkeep.progress import Progress
from vmkeep.proxy.instant_steps import instant_step
from vmkeep.proxy.progress import RowProgress
from vmkeep.proxy.restore_source import Source, open_source
from vmkeep.proxy.work import RestoreOrder, restore_order
from vmkeep.repository.repo import Repository

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
        source = None
        try:
            source = open_source(order, job.vm_name, job.point_id, prefer=job.source_repository,
                                 disk=job.disk if job.mode == "disk-file" else None)
            note_source(job, order, source)
            session.commit()
            # progress lands through another connection: closed before this session writes the row
            rows = RowProgress(sessions, restore_id, RestoreJob)
            try:
                name, disks, status = perform(source.repo, replace(order, repository=source.record), job,
                                              throttled(rows, max_rate))
            finally:
                rows.close()
            job.status, job.disks = status, disks
            log.info("restore %s: %s, %d disks", status, name, len(disks), extra=context)
        except Exception as exc:  # recorded for the user; the task itself ends cleanly
            # a failed finish or discard leaves the VM running from the backup, as it was
            job.status = INSTANT if job.mode == "instant" and job.step != "start" else JobStatus.FAILED
            job.error = str(exc)
            log.warning("restore failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG), extra=context)
        finally:
            if source is not None:
                source.repo.close()
            if job.status != INSTANT:
                job.finished = datetime.now(UTC)
            session.commit()


def note_source(job: RestoreJob, order: RestoreOrder, source: Source) -> None:
    """Record the repository the point is read from; a copy used instead of the restore's own
    repository is a warning that says why."""
    job.source_repository = source.record.name
    if source.record.id != order.repository.id and not any(source.record.name in w for w in job.warnings):
        job.warnings = [*job.warnings, f"restored from the copy in repository {source.record.name}: "
                                       f"{'; '.join(source.passed_over) or order.repository.name + ' holds no copy'}"]
        log.warning("%s", job.warnings[-1], extra={"restore": job.id, "vm": job.vm_name})


def perform(repo: Repository, order: RestoreOrder, job: RestoreJob,
            progress: Progress) -> tuple[str, dict[str, str], str]:
    """Do the row's restore (or its instant recovery's step): what it made (a VM's or a file's
    name), its disks' paths and the row's status afterwards."""
    if job.mode == "disk-file":  # a file written here, on the host: no hypervisor call
        return *restore_disk_file(repo, job, progress), JobStatus.SUCCEEDED
    connector = connector_for(order.hypervisor)
    try:
        if job.mode == "instant":
            return instant_step(repo, order.repository, connector, job, progress)
        if job.mode == "overwrite":  # re-stages every disk: a retry needs nothing removed first
            result = restore_vm_overwrite(repo, connector, job.vm_name, job.point_id, progress=progress)
        else:
            assert job.new_name is not None
            place = {k: v for k, v in (("network", job.network), ("host", job.host), ("folder", job.folder)) if v}
            result = restore_vm_as(repo, connector, job.vm_name, job.point_id, job.new_name,
                                   storage=job.storage, start=job.start_vm, place=place,
                                   progress=progress, retry=job.attempts > 1)
        return result.name, result.disks, JobStatus.SUCCEEDED
    finally:
        connector.close()


def restore_disk_file(repo: Repository, job: RestoreJob, progress: Progress) -> tuple[str, dict[str, str]]:
    """One disk of the point to ``storage/new_name`` on this machine (the proxy runs on the target
    host: the master chose it so). A retry's file is the partial one an earlier attempt left: it
    goes first; a failed attempt's file goes too (``open_file_writer`` removes it)."""
    assert job.storage and job.new_name and job.disk and job.format
    if "/" in job.new_name or ".." in job.new_name:  # the master checked it; the row is checked again here
        raise UsageError(f"{job.new_name!r} is not a plain file name")
    directory = Path(job.storage)
    path = directory / job.new_name
    if job.attempts > 1 and path.exists():
        log.info("removing %s, the partial file of an earlier attempt", path, extra={"restore": job.id})
        path.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    restore_image(repo, job.vm_name, job.point_id, path, disk=job.disk, fmt=job.format, progress=progress)
    return str(path), {job.disk: str(path)}
