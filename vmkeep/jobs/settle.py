"""Closing a policy run once every VM of it has an outcome: the master does it for VMs it fails
itself (no proxy could take them), a proxy for the VMs it backed up."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from vmkeep.catalog.models import Job
from vmkeep.jobs.status import FINAL, JobStatus

log = logging.getLogger(__name__)


def settle_job(session: Session, job: Job) -> None:
    """Close the policy run once every VM has an outcome."""
    session.refresh(job)
    statuses = [v.status for v in job.vms]
    if job.finished is not None or any(s not in FINAL for s in statuses):
        return
    if all(s == JobStatus.SUCCEEDED for s in statuses):
        job.status = JobStatus.SUCCEEDED.value
    elif any(s == JobStatus.SUCCEEDED for s in statuses):
        job.status = JobStatus.PARTIAL.value
    elif all(s == JobStatus.CANCELLED for s in statuses):
        job.status = JobStatus.CANCELLED.value
    else:
        job.status = JobStatus.FAILED.value
    job.finished = datetime.now(UTC)
    session.commit()
    log.info("policy run %s ended %s (%d VMs)", job.id, job.status, len(statuses),
             extra={"job": job.id, "policy": job.policy_name})
