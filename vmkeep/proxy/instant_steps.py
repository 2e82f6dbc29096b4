"""An instant recovery started through the server, step by step on one proxy: start (the point's
disks exported by detached nbdkit processes on this machine, the VM booted over them), then
finish (its disks moved to real storage while it runs) or discard (the VM and its changes gone).

The exports and ``instant.STATE/<name>/state.json`` live on this proxy's machine, so the master
sends the later steps to the same proxy; the connector must be on this machine too (QEMU opens
the exports' unix sockets).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from vmkeep.catalog.models import RestoreJob
from vmkeep.engine import instant
from vmkeep.engine.mount import PointSpec
from vmkeep.errors import UsageError
from vmkeep.hypervisors.base import Connector
from vmkeep.jobs.keys import open_secret
from vmkeep.jobs.registered import passphrase_context
from vmkeep.jobs.status import DISCARDED, INSTANT, JobStatus
from vmkeep.progress import Progress
from vmkeep.proxy.work import RepositoryOrder
from vmkeep.repository.repo import Repository

log = logging.getLogger(__name__)


def instant_step(repo: Repository, record: RepositoryOrder, connector: Connector, job: RestoreJob,
                 progress: Progress) -> tuple[str, dict[str, str], str]:
    """Do the row's step; the VM's name, its disks (start: the layers it writes to; finish: the
    moved disks) and the row's status afterwards."""
    assert job.new_name is not None
    context = {"restore": job.id, "vm": job.new_name}
    if job.step == "start":
        return job.new_name, start(repo, record, connector, job), INSTANT
    running = instant.InstantVM.load(job.new_name)
    if job.step == "finish":
        assert job.storage is not None
        log.info("finishing instant recovery %s: moving its disks to %s", job.new_name, job.storage, extra=context)
        return job.new_name, instant.finish(connector, running, Path(job.storage), progress), JobStatus.SUCCEEDED
    if job.step == "discard":
        log.info("discarding instant recovery %s", job.new_name, extra=context)
        instant.discard(connector, running)
        return job.new_name, {}, DISCARDED
    raise UsageError(f"restore {job.id}: unknown instant recovery step {job.step!r}")


def start(repo: Repository, record: RepositoryOrder, connector: Connector, job: RestoreJob) -> dict[str, str]:
    """Boot the point as ``new_name`` from the repository; the layers it writes to. An encrypted
    repository's passphrase reaches the exports in a 0600 file of the recovery's own state
    directory, removed with it."""
    assert job.new_name is not None
    if not connector.is_local:
        raise UsageError(f"instant recovery runs on the hypervisor's host (QEMU opens the exports on this proxy's "
                         f"machine): {connector.uri} is not local to this proxy")
    directory = instant.STATE / job.new_name
    if (directory / "state.json").exists():
        raise UsageError(f"an instant recovery named {job.new_name} is running on this proxy: finish or discard it "
                         "first")
    secret = None
    if record.passphrase_sealed:
        directory.mkdir(parents=True, exist_ok=True)
        secret = directory / "passphrase"
        secret.touch(mode=0o600)
        secret.write_text(open_secret(record.passphrase_sealed, passphrase_context(record.name)))
    base = PointSpec(record.location, job.vm_name, job.point_id, "", record.s3_endpoint, None,
                     str(secret) if secret else None, plain=not record.encrypted)
    try:
        running = instant.start(repo, base, connector, job.vm_name, job.point_id, job.new_name)
    except BaseException:
        if not (directory / "state.json").exists():  # refused before it began: the passphrase goes
            shutil.rmtree(directory, ignore_errors=True)
        raise
    log.info("instant recovery %s runs from %s (exports %s)", job.new_name, running.source, running.exports,
             extra={"restore": job.id, "vm": job.new_name})
    return dict(running.overlays)
