"""A VM's libvirt backup job seen from outside: whether one runs, ending it, clearing one a dead
vmkeep run left, and explaining an export that went away under the reads."""

from __future__ import annotations

import logging
import shutil
import time

import libvirt

from vmkeep.errors import ImageError, VmkeepError
from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.libvirt.connection import Connection
from vmkeep.hypervisors.libvirt.scratch import scratch_root
from vmkeep.polling import Backoff

log = logging.getLogger(__name__)

END_SECONDS = 15  # abortJob is asynchronous: how long to wait for libvirt to drop the job
RESTART_GRACE_SECONDS = 20  # libvirtd re-attaches the jobs it knew this long after it restarts
LOST_EXPORT_SECONDS = 3  # a VM being destroyed drops its export a moment before libvirt says so


def job_present(dom: libvirt.virDomain) -> bool:
    try:
        dom.backupGetXMLDesc()
        return True
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_NO_DOMAIN):
            log.warning("cannot read the backup job of %s (%s): taken as gone", dom.name(), exc.get_error_message())
        return False


def end_job(dom: libvirt.virDomain) -> None:
    """Abort the pull-mode job and wait until libvirt no longer reports it (abort is asynchronous)."""
    try:
        dom.abortJob()
        log.debug("aborted the backup job of %s", dom.name())
    except libvirt.libvirtError as exc:
        # the job already ended (VM shut down, libvirtd restarted): the wait below confirms it
        log.warning("aborting the backup job of %s: %s", dom.name(), exc.get_error_message())
    deadline, backoff = time.monotonic() + END_SECONDS, Backoff(first=0.001)
    while time.monotonic() < deadline and job_present(dom):
        backoff.sleep()


def end_reattached_job(dom: libvirt.virDomain) -> None:
    """After libvirtd restarted: it re-attaches the jobs it knew several seconds later, after an
    abort found nothing; watch for the job to reappear and abort it then."""
    deadline = time.monotonic() + RESTART_GRACE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if job_present(dom):
            log.info("libvirtd re-attached the backup job of %s after restarting; ending it", dom.name())
            end_job(dom)
            break


def clear_stale_job(connection: Connection, dom: libvirt.virDomain, notes: list[str]) -> None:
    """A backup job left by a vmkeep run that died (kill -9, lost connection) is aborted and its
    scratch files removed; someone else's job is left alone and reported."""
    try:
        job = dom.backupGetXMLDesc()
    except libvirt.libvirtError as exc:
        log.debug("no backup job runs on %s (%s)", dom.name(), exc.get_error_message())
        return
    root = scratch_root()
    if str(root) not in job:
        raise HypervisorError(f"another backup job (not vmkeep's) runs on VM {dom.name()}; wait for it or abort "
                              f"it with `virsh -c {connection.uri} domjobabort {dom.name()}`")
    log.info("%s: aborting the backup job an earlier vmkeep run left", dom.name())
    end_job(dom)
    for scratch in root.glob(f"{dom.name()}-*"):
        if str(scratch) in job:
            shutil.rmtree(scratch, ignore_errors=True)
    notes.append("aborted a backup job left by an earlier vmkeep run that did not finish")


def explain_lost_export(connection: Connection, dom: libvirt.virDomain, exc: ImageError) -> VmkeepError:
    """Reading failed: say why in the VM's terms when the VM or its backup job went away.

    A VM being destroyed drops the export a moment before libvirt reports it inactive, so the
    state is watched for a few seconds before deciding.
    """
    log.info("%s: reading the export failed (%s); watching the VM and its job", dom.name(), exc)
    deadline = time.monotonic() + LOST_EXPORT_SECONDS
    job_alive = True
    while time.monotonic() < deadline:
        try:
            dom = connection.alive(dom)
            if not dom.isActive():
                return HypervisorError(f"VM {dom.name()} stopped during the backup; nothing was committed. "
                                       "Run the backup again: a shut-off VM is read from its images")
            job_alive = job_present(dom)
        except libvirt.libvirtError as lost:
            log.debug("%s: libvirtd does not answer: %s", dom.name(), lost.get_error_message())
            job_alive = False
        time.sleep(0.2)
    if job_alive:  # the job still serves: the connection itself failed, twice
        return ImageError(f"{exc}; nothing was committed, run the backup again (check the network between "
                          f"this proxy and {connection.host})")
    return HypervisorError(f"the backup job of {dom.name()} ended under vmkeep (aborted from outside, or "
                           f"libvirtd lost it): {exc}; nothing was committed, run the backup again")
