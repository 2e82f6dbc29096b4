"""What the master does on its own: policy runs when their cron schedule comes due, inventory
discovery at each hypervisor's interval, and a notice when a run ends."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import procrastinate
from cronsim import CronSim, CronSimError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from vmkeep.catalog.models import Hypervisor, Job, Policy
from vmkeep.errors import VmkeepError
from vmkeep.server.dispatch import run_policy
from vmkeep.server.endpoints import EndpointPolicy
from vmkeep.server.inventory import discover
from vmkeep.server.notify import Mailer, notify_job

log = logging.getLogger("vmkeep.server")


def next_run(schedule: str, after: datetime) -> datetime:
    """The first time after ``after`` that the five-field cron ``schedule`` names (UTC)."""
    try:
        return next(CronSim(schedule, after.astimezone(UTC).replace(tzinfo=None))).replace(tzinfo=UTC)
    except (CronSimError, StopIteration) as exc:
        raise VmkeepError(f"schedule {schedule!r} is not a cron expression (minute hour day month weekday): "
                          f"{exc}") from None


async def run_due_policies(session: Session, queue: procrastinate.App, now: datetime) -> list[int]:
    """Start every scheduled policy whose time has come; the ids of the jobs started."""
    started = []
    due = session.scalars(select(Policy).where(Policy.next_run.is_not(None), Policy.next_run <= now))
    for policy in list(due):
        assert policy.schedule is not None
        policy.next_run = next_run(policy.schedule, now)  # set first: a failing run does not repeat
        session.commit()
        job = await run_policy(session, queue, policy, "schedule")
        started.append(job.id)
    return started


async def discover_due(sessions: sessionmaker[Session], now: datetime) -> int:
    """Refresh the inventory of hypervisors whose interval has passed; how many were refreshed."""
    with sessions() as session:
        due = [h.id for h in session.scalars(select(Hypervisor))
               if h.discovered_at is None or now - h.discovered_at >= timedelta(minutes=h.discovery_minutes)]
    for hid in due:
        def one(hypervisor_id: int = hid) -> None:
            with sessions() as s:
                h = s.get(Hypervisor, hypervisor_id)
                if h is None:
                    return
                try:
                    discover(s, h)
                except VmkeepError as exc:  # recorded on the hypervisor; tried again next interval
                    h.discovered_at = now
                    s.commit()
                    log.warning("discovery of %s failed: %s", h.name, exc)
        await asyncio.to_thread(one)
    return len(due)


async def notify_finished(session: Session, mailer: Mailer | None,
                          endpoints: EndpointPolicy = EndpointPolicy()) -> int:
    """Send the notice of every finished run not yet announced; how many were sent."""
    sent = 0
    pending = session.scalars(select(Job).where(Job.finished.is_not(None), Job.notified_at.is_(None)))
    for job in list(pending):
        policy = job.policy
        if policy is None or not (policy.notify_webhook or policy.notify_email):
            job.notified_at = datetime.now(UTC)
            continue
        error = await asyncio.to_thread(notify_job, job, mailer, endpoints)
        job.notified_at, job.notify_error = datetime.now(UTC), error
        sent += error is None
    session.commit()
    return sent
