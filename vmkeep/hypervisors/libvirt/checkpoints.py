"""vmkeep's libvirt checkpoints: naming a new one, judging whether the previous point's one can
still be the base of an incremental, and deleting them.

Each backup of a running VM makes a checkpoint (a persistent dirty bitmap per qcow2 disk). A
deleted checkpoint's bitmap merges into its parent's, so deleting never loses a change: the next
incremental reads a superset of what changed, never less.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, NamedTuple

import libvirt

from vmkeep.hypervisors.libvirt.domain_xml import DiskSpec
from vmkeep.hypervisors.libvirt.job_xml import checkpoint_xml
from vmkeep.hypervisors.libvirt.san import CHECKPOINT_PREFIX

log = logging.getLogger(__name__)


class Base(NamedTuple):
    """The checkpoint an incremental builds on (None: the backup is full), and why."""

    checkpoint: str | None
    reason: str


def new_checkpoint_name() -> str:
    """A name that sorts by time (pruning deletes the oldest first) and never repeats."""
    return f"{CHECKPOINT_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def checkpoint_document(eligible: list[DiskSpec], name: str) -> str:
    """The ``<domaincheckpoint>`` for ``eligible``: a bitmap on each disk that can hold one."""
    return checkpoint_xml(name, {s.target: s.bitmaps for s in eligible})


def incremental_base(dom: libvirt.virDomain, eligible: list[DiskSpec], since: dict[str, Any] | None,
                     previous_disks: dict[str, int] | None, capacities: dict[str, int] | None = None) -> Base:
    """The previous point's checkpoint if it still tells every change since, else why not.

    ``capacities``: the disks' sizes now, when the caller has them already."""
    base = _judge(dom, eligible, since, previous_disks, capacities)
    log.info("%s: %s", dom.name(), f"incremental, {base.reason}" if base.checkpoint else f"full: {base.reason}")
    return base


def _judge(dom: libvirt.virDomain, eligible: list[DiskSpec], since: dict[str, Any] | None,
           previous_disks: dict[str, int] | None, capacities: dict[str, int] | None) -> Base:
    if since is None:
        return Base(None, "no previous restore point to build on")
    parent = since.get("checkpoint")
    if not parent:
        return Base(None, "the previous restore point has no checkpoint (it was taken while the VM was off)")
    try:
        existing = {c.getName() for c in dom.listAllCheckpoints()}
    except libvirt.libvirtError as exc:
        return Base(None, f"cannot list checkpoints ({exc.get_error_message()})")
    log.debug("%s has checkpoints %s", dom.name(), sorted(existing))
    if parent not in existing:
        return Base(None, f"checkpoint {parent} of the previous point is gone (deleted by hand, or the VM was "
                          "restored or reverted)")
    now = capacities if capacities is not None else {s.target: dom.blockInfo(s.target)[0] for s in eligible}
    if previous_disks is not None and now != previous_disks:
        return Base(None, f"the disks changed since the previous point (were {previous_disks}, now {now})")
    bitmap_disks = {s.target for s in eligible if s.bitmaps}
    cp_disks = set(since.get("disks", []))
    if bitmap_disks != cp_disks:
        return Base(None, "the set of disks with bitmaps differs from the previous checkpoint's")
    return Base(parent, f"changes since checkpoint {parent}")


def delete_checkpoint(dom: libvirt.virDomain, name: str) -> None:
    """Delete checkpoint ``name`` (its bitmaps merge into its parent's); when the VM is gone or off
    and QEMU cannot merge, libvirt's record of it at least."""
    try:
        dom.checkpointLookupByName(name).delete()
        log.debug("deleted checkpoint %s of %s", name, dom.name())
    except libvirt.libvirtError as exc:
        log.debug("deleting checkpoint %s of %s: %s; dropping its metadata", name, dom.name(),
                  exc.get_error_message())
        try:
            dom.checkpointLookupByName(name).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        except libvirt.libvirtError as exc2:
            if exc2.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:  # never made: the job did not start
                log.debug("no checkpoint %s on %s to delete", name, dom.name())
            else:
                log.warning("checkpoint %s of %s not deleted: %s", name, dom.name(), exc2.get_error_message())


def prune_checkpoints(dom: libvirt.virDomain, keep: str) -> None:
    """Delete vmkeep's older checkpoints, oldest first; their bitmaps merge into the newer ones."""
    try:
        old = [c for c in dom.listAllCheckpoints() if c.getName().startswith(CHECKPOINT_PREFIX)
               and c.getName() != keep]
    except libvirt.libvirtError as exc:
        log.warning("cannot list the checkpoints of %s to prune them (next run does): %s", dom.name(),
                    exc.get_error_message())
        return
    for cp in sorted(old, key=lambda c: c.getName()):
        delete_checkpoint(dom, cp.getName())
