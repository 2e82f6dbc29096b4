"""The point in time of a libvirt VM, and what happens to checkpoints around it.

A running VM: optional fsfreeze through the guest agent, then a new checkpoint and either a
pull-mode backup job (hotadd, nbd: pull_backup.py) or an external snapshot whose frozen bases the
proxy reads itself (san: san.py); the fsthaw follows at once, since the point in time is fixed
then. On failure the new checkpoint is deleted (its bitmap merges back into its parent's, so the
next incremental is still right); on success vmkeep's older checkpoints are, so bitmaps do not
pile up. A VM that is shut off is read from its image files (offline.py).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import replace
from typing import Any

import libvirt

from vmkeep.errors import ImageError
from vmkeep.hypervisors.base import HypervisorError, NbdTls, PointInTimeInfo, Quiesce, wire_of
from vmkeep.hypervisors.libvirt.checkpoints import (
    checkpoint_document,
    delete_checkpoint,
    new_checkpoint_name,
    prune_checkpoints,
)
from vmkeep.hypervisors.libvirt.connection import Connection
from vmkeep.hypervisors.libvirt.domain_xml import DiskSpec
from vmkeep.hypervisors.libvirt.jobs import clear_stale_job, explain_lost_export
from vmkeep.hypervisors.libvirt.offline import offline
from vmkeep.hypervisors.libvirt.point_source import PointSource, find_source, nvram
from vmkeep.hypervisors.libvirt.pull_backup import PullBackup
from vmkeep.hypervisors.libvirt.quiesce import quiesced
from vmkeep.hypervisors.libvirt.san import SanPoint, frozen_bases, serve_images, unreadable_disks
from vmkeep.hypervisors.libvirt.scratch import scratch_root

log = logging.getLogger(__name__)


@contextmanager
def point_in_time(connection: Connection, vm: str, *, since: dict[str, Any] | None,
                  previous_disks: dict[str, int] | None, transports: list[str], quiesce: Quiesce,
                  nbd_tls: NbdTls) -> Iterator[PointInTimeInfo]:
    """The Connector's point_in_time (vmkeep.hypervisors.base) for VM ``vm``."""
    source = find_source(connection, vm, since, previous_disks)
    point: AbstractContextManager[PointInTimeInfo]
    if source.dom.state()[0] in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
        writable = [s for s in source.disks if not s.readonly]
        if not writable:
            raise HypervisorError(f"VM {vm} runs with read-only disks only, which libvirt cannot back up; back "
                                  "their images up with `vmkeep disk backup`")
        point = online(replace(source, disks=writable), [s for s in source.disks if s.readonly], transports,
                       quiesce, nbd_tls)
    else:
        point = offline(source)
    with point as info:
        info.config.update(nvram(source.dom))  # read once the point in time is fixed
        yield info


def choose_transport(connection: Connection, transports: list[str], eligible: list[DiskSpec],
                     notes: list[str]) -> str:
    """The first of ``transports`` this proxy can use for ``eligible``; why the others were skipped in ``notes``."""
    for t in transports:
        if t == "san" and (hidden := unreadable_disks(eligible)):
            notes.append(f"transport san skipped: this proxy cannot open the images of {', '.join(hidden)} "
                         "(give it access to the VM's storage)")
        elif t == "hotadd" and not connection.is_local:
            notes.append(f"transport hotadd skipped: this proxy is not on the VM's host {connection.host}")
        else:
            log.info("transport %s chosen from %s%s", t, ":".join(transports),
                     f" ({'; '.join(notes)})" if notes else "")
            return t
    raise HypervisorError(f"none of the transports {':'.join(transports)} can reach the VM: "
                          + "; ".join(notes) + " (add nbd to --transport)")


@contextmanager
def online(source: PointSource, readonly: list[DiskSpec], transports: list[str], quiesce: Quiesce,
           nbd_tls: NbdTls) -> Iterator[PointInTimeInfo]:
    """A running VM. ``source.disks``: those libvirt's job or snapshot covers; ``readonly``: disks
    the VM only reads, served from their images beside them (skipped, with a note, by a proxy that
    cannot open them)."""
    connection, dom, vm, eligible, notes = source.connection, source.dom, source.vm, source.disks, source.notes
    clear_stale_job(connection, dom, notes)
    transport = choose_transport(connection, transports, eligible, notes)
    if hidden := unreadable_disks(readonly):
        notes.append(f"read-only disks {', '.join(hidden)} skipped: this proxy cannot open their images")
        readonly = [s for s in readonly if s.target not in hidden]
    capacities = {s.target: dom.blockInfo(s.target)[0] for s in eligible + readonly}
    log.debug("%s: disk capacities %s", vm, capacities)
    parent_cp, reason = source.base(eligible + readonly, capacities)
    images = ExitStack()
    checkpoint = new_checkpoint_name()
    bitmap_targets = [s.target for s in eligible if s.bitmaps]
    chain = {"checkpoint": checkpoint if bitmap_targets else None, "disks": bitmap_targets}
    committed = False
    try:
        read_only_disks = serve_images(images, vm, readonly, None)
        # Cleaning up a job or checkpoint that never came to be is harmless, so assume both exist
        # from here on: an interrupt the instant they are made must not leak them.
        live: AbstractContextManager[SanPoint | PullBackup]
        if transport == "san":
            live = frozen_bases(dom, eligible, capacities, scratch_root() / f"{vm}-{secrets.token_hex(4)}",
                                checkpoint_document(eligible, checkpoint), parent_cp, reason,
                                lambda: quiesced(dom, quiesce, notes))
        else:
            live = PullBackup(connection=connection, dom=dom, eligible=eligible, capacities=capacities,
                              checkpoint=checkpoint, transport=transport, quiesce=quiesce, nbd_tls=nbd_tls,
                              notes=notes, parent_cp=parent_cp, reason=reason).running()
        with live as fixed:
            disks = {**fixed.disks, **read_only_disks}
            try:
                yield PointInTimeInfo(
                    vm=vm, transport=transport, consistency=fixed.consistency,
                    mode="incremental" if fixed.parent_cp else "full", reason=fixed.reason,
                    disks=disks, config=source.config, chain=chain, notes=notes, wire=wire_of(disks),
                    release=fixed.release)
            except ImageError as exc:
                if transport == "san":
                    raise
                raise explain_lost_export(connection, dom, exc) from exc
        committed = True
    finally:
        images.close()
        _settle_checkpoints(connection, dom, checkpoint, committed, notes)


def _settle_checkpoints(connection: Connection, dom: libvirt.virDomain, checkpoint: str, committed: bool,
                        notes: list[str]) -> None:
    """Committed: the older checkpoints go, ``checkpoint`` tracks on. Else ``checkpoint`` goes."""
    try:
        fresh = connection.alive(dom)
    except libvirt.libvirtError as exc:
        log.warning("%s: libvirtd did not come back (%s); checkpoint %s is cleaned up next run", dom.name(),
                    exc.get_error_message(), checkpoint)
        notes.append("libvirtd did not come back: the checkpoint is cleaned up next run")
        return
    if committed:
        prune_checkpoints(fresh, keep=checkpoint)
    else:
        delete_checkpoint(fresh, checkpoint)
