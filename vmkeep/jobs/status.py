"""The states of a backup (one VM of a policy run), a restore and a run, as the catalog stores them."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    WAITING = "waiting"  # over a concurrency limit; the master sends it on as a slot frees
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"  # a run: some VMs succeeded
    FAILED = "failed"
    CANCELLED = "cancelled"


# plain strings, as the catalog stores them and the database driver sends them
ACTIVE: tuple[str, ...] = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)  # on a proxy's queue or being done
FINAL: tuple[str, ...] = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value,
                          JobStatus.CANCELLED.value)  # a backup's or restore's outcome

# an instant recovery's restore row (not a backup's state): the VM runs from the backup until it is
# finished (then succeeded) or discarded
INSTANT = "instant"
DISCARDED = "discarded"
