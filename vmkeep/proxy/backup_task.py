"""The task a proxy runs for one VM of a policy run: back up, record, catalog, apply retention."""

from __future__ import annotations

import logging
import tempfile
import threading
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from procrastinate import JobContext
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.catalog.models import JobVM, Proxy, RestorePointRecord
from vmkeep.catalog.rebuild import upsert_points
from vmkeep.engine.boot_check import boot_check
from vmkeep.engine.mount import PointSpec
from vmkeep.engine.throttle import throttled
from vmkeep.engine.vm import backup_vm
from vmkeep.errors import Cancelled
from vmkeep.hypervisors.base import Connector, HypervisorError, SandboxBoot, parse_transports
from vmkeep.jobs.keys import open_secret
from vmkeep.jobs.queue import tasks
from vmkeep.jobs.registered import connector_for, open_registered, passphrase_context
from vmkeep.jobs.settle import settle_job
from vmkeep.jobs.status import FINAL, JobStatus
from vmkeep.proxy.log_lines import catalog_log
from vmkeep.proxy.progress import RowProgress
from vmkeep.proxy.work import BackupOrder, RepositoryOrder, backup_order
from vmkeep.repository.prune import RetentionPolicy, prune
from vmkeep.repository.repo import Repository
from vmkeep.repository.verify import VerifyReport, verify

log = logging.getLogger(__name__)

ABORT_POLL_SECONDS = 1.0


@tasks.task(name="backup_vm", pass_context=True)
def backup_vm_task(context: JobContext, job_vm_id: int) -> None:
    state: dict[str, Any] = context.additional_context
    cancel, done = threading.Event(), threading.Event()

    def watch() -> None:  # a cancelled job asks its task to abort: stop at the next chunk
        while not done.wait(ABORT_POLL_SECONDS):
            if context.should_abort():
                log.info("backup task %s asked to abort: stopping at the next chunk", job_vm_id)
                cancel.set()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_backup(state["sessions"], state["proxy"], job_vm_id, cancel, state.get("max_rate"))
    finally:
        done.set()


def run_backup(sessions: sessionmaker[Session], proxy: str, job_vm_id: int,
               cancel: threading.Event | None = None, max_rate: float | None = None) -> None:
    """Back one VM up for its policy run; the outcome goes into its JobVM row, never lost, and
    its log lines into the catalog beside it (vmkeep.proxy.log_lines)."""
    with sessions() as session:
        row = session.get(JobVM, job_vm_id)
        whose = (row.job_id, row.vm_name) if row is not None else None
    if whose is None:
        log.info("backup task %s: nothing to do (its row is gone)", job_vm_id)
        return
    with catalog_log(sessions, job_vm_id, *whose):
        _run_backup(sessions, proxy, job_vm_id, cancel, max_rate)


def _run_backup(sessions: sessionmaker[Session], proxy: str, job_vm_id: int, cancel: threading.Event | None,
                max_rate: float | None) -> None:
    with sessions() as session:
        jv = session.get(JobVM, job_vm_id)
        order = backup_order(session, job_vm_id)
        if jv is None or jv.status in FINAL:
            log.info("backup task %s: nothing to do (%s)", job_vm_id,
                     "its row is gone" if jv is None else f"already {jv.status}")
            return  # removed, or cancelled before it started
        context = {"job": jv.job_id, "vm": jv.vm_name, "proxy": proxy}
        if order is None:  # its VM, hypervisor, policy or repository went while it waited
            log.warning("backup not started: its VM, hypervisor, policy or repository was removed", extra=context)
            jv.status, jv.finished = JobStatus.FAILED, datetime.now(UTC)
            jv.error = "its VM, hypervisor, policy or repository was removed before the backup started"
            session.commit()
            settle_job(session, jv.job)
            return
        jv.status, jv.proxy, jv.attempts, jv.started = JobStatus.RUNNING, proxy, jv.attempts + 1, datetime.now(UTC)
        jv.error = None
        session.commit()
        log.info("backup started (attempt %d)", jv.attempts, extra=context)
        connector = None
        try:
            repo = open_registered(order.repository)
            connector = connector_for(order.hypervisor, order.nbd_tls)
            previous = len(repo.point_ids(order.vm_name))
            full = bool(order.full_every) and previous % (order.full_every or 1) == 0
            if full:
                log.info("full backup: the policy asks for one every %d points and there are %d", order.full_every,
                         previous, extra=context)
            # progress rows are written from another connection: close it before this session
            # touches the row again, or the two would wait on each other's row lock
            progress = RowProgress(sessions, job_vm_id)
            try:
                m = backup_vm(repo, connector, order.vm_name, transports=usable_transports(session, order, proxy),
                              quiesce=order.quiesce, full=full, cancel=cancel,
                              progress=throttled(progress, max_rate))
                checked = verify(repo, progress=progress, only=[m]) if order.verify_after else None
            finally:
                progress.close()
            upsert_points(session, order.repository.id, [m])
            # the row stays running until the outcome is known: an ended row is the master's alone
            jv.mode, jv.transport, jv.point_id = m.meta["mode"], m.meta["transport"], m.point_id
            reason = (f"the policy asks for a full backup every {order.full_every} points" if full
                      else m.meta.get("reason"))
            jv.mode_reason = reason[:500] if reason else None
            jv.read_bytes, jv.stored_bytes = m.stats.get("bytes_read"), m.stats.get("bytes_stored")
            jv.duration_seconds = m.stats.get("seconds")
            jv.disks = {d: {"size": e.size, **e.stats} for d, e in m.disks.items()}
            jv.warnings = [*jv.warnings, *m.meta.get("notes", [])]
            if checked is not None:
                jv.verified = checked.ok
                if not checked.ok:  # older points stay: retention waits for a point that reads back
                    jv.status, jv.error = JobStatus.FAILED, _verify_failure(m.point_id, checked)
                    return
            if order.verify_boot:
                session.commit()  # the point is cataloged before the (long) boot check
                jv.boot_check = booted(repo, order.repository, connector, order.vm_name, m.point_id)
                if not jv.boot_check.get("passed"):  # stored, but not trusted: older points stay
                    jv.status = JobStatus.FAILED
                    jv.error = f"point {m.point_id} was stored but did not pass its boot check: " \
                               f"{jv.boot_check.get('reason')}"
                    return
            retention = RetentionPolicy.from_counts(order.retention) if order.retention else RetentionPolicy()
            if not retention.is_empty():
                kept = prune(repo, retention, order.vm_name)[order.vm_name].keep
                session.execute(delete(RestorePointRecord).where(
                    RestorePointRecord.repository_id == order.repository.id,
                    RestorePointRecord.name == order.vm_name,
                    RestorePointRecord.point_id.not_in(list(kept))))
            jv.status = JobStatus.SUCCEEDED
        except Cancelled:
            jv.status, jv.error = JobStatus.CANCELLED, "cancelled: nothing partial was committed"
        except Exception as exc:  # the row records any failure; the task itself ends cleanly
            jv.status, jv.error = JobStatus.FAILED, f"{exc}" or traceback.format_exc(limit=3)
            log.debug("backup failed", exc_info=True, extra=context)
        finally:
            if connector is not None:
                connector.close()
            jv.finished = datetime.now(UTC)
            _log_outcome(jv, context)
            session.commit()
            settle_job(session, jv.job)


def _log_outcome(jv: JobVM, context: dict[str, Any]) -> None:
    if jv.status == JobStatus.SUCCEEDED:
        log.info("backup succeeded: point %s, %s over %s, %s bytes read, %s stored", jv.point_id, jv.mode,
                 jv.transport, jv.read_bytes, jv.stored_bytes, extra=context)
    elif jv.status == JobStatus.CANCELLED:
        log.info("backup cancelled", extra=context)
    else:
        log.warning("backup ended %s: %s", jv.status, jv.error, extra=context)


def booted(repo: Repository, record: RepositoryOrder, connector: Connector, vm: str,
           point_id: str) -> dict[str, Any]:
    """The sandboxed boot check of the new point; the repository's passphrase reaches the
    export in a private file that is gone afterwards."""
    if not isinstance(connector, SandboxBoot):
        return {"passed": False, "reason": f"{connector.kind} connectors cannot boot a point in a sandbox"}
    if not connector.is_local:
        return {"passed": False, "reason": "boot checks run by a proxy on the VM's host"}
    with tempfile.TemporaryDirectory(prefix="vmkeep-boot-") as tmp:
        secret = None
        if record.passphrase_sealed:
            secret = Path(tmp) / "passphrase"
            secret.touch(mode=0o600)
            secret.write_text(open_secret(record.passphrase_sealed, passphrase_context(record.name)))
        spec = PointSpec(record.location, vm, point_id, "", record.s3_endpoint, None, str(secret) if secret else None,
                         plain=not record.encrypted)
        return boot_check(repo, spec, connector, vm, point_id)


def usable_transports(session: Session, order: BackupOrder, proxy: str) -> list[str]:
    """The policy's transports in its order, less those this proxy did not register for."""
    wanted = parse_transports(order.transports)
    row = session.scalar(select(Proxy).where(Proxy.name == proxy))
    usable = [t for t in wanted if row is None or t in row.transports]
    if not usable:
        raise HypervisorError(f"proxy {proxy} does none of the policy's transports {order.transports} "
                              f"(it does {':'.join(row.transports) if row else '?'})")
    return usable


def _verify_failure(point_id: str, report: VerifyReport) -> str:
    problems = [*report.bad_chunks.values(), *(w for ws in report.broken_points.values() for w in ws)]
    return (f"verify after backup: point {point_id} does not read back ({len(report.bad_chunks)} bad chunks; "
            f"first: {problems[0] if problems else '?'}); check the repository's storage, then run "
            "`vmkeep repo verify` and back up again")
