"""The VM a point in time is taken of, as found when the backup begins: its domain, the disks to
read, the configuration saved with the point, and what the engine asked (the previous point's
chain and disk sizes). Leftovers of dead runs (scratch directories, snapshot overlays) are
cleared first, so they are not mistaken for the VM's own disks."""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.libvirt.checkpoints import Base, incremental_base
from vmkeep.hypervisors.libvirt.connection import Connection
from vmkeep.hypervisors.libvirt.domain_xml import DiskSpec, disk_specs, nvram_path
from vmkeep.hypervisors.libvirt.san import merge_stale_overlays
from vmkeep.hypervisors.libvirt.scratch import sweep_scratch

log = logging.getLogger(__name__)


@dataclass
class PointSource:
    connection: Connection
    dom: libvirt.virDomain
    disks: list[DiskSpec]  # the disks the point reads
    config: dict[str, Any]  # saved with the point: the domain XML and each disk's source
    since: dict[str, Any] | None  # the previous point's chain (its checkpoint and bitmap disks)
    previous_disks: dict[str, int] | None  # the previous point's disk sizes
    notes: list[str]  # skipped disks and transports, clean-ups done, with reasons

    @property
    def vm(self) -> str:
        return str(self.dom.name())

    def base(self, disks: list[DiskSpec], capacities: dict[str, int] | None = None) -> Base:
        """The checkpoint an incremental of ``disks`` builds on, or why the backup is full."""
        return incremental_base(self.dom, disks, self.since, self.previous_disks, capacities)


def find_source(connection: Connection, vm: str, since: dict[str, Any] | None,
                previous_disks: dict[str, int] | None) -> PointSource:
    """VM ``vm`` with the disks that can be backed up; refuses a VM without any."""
    dom = connection.domain(vm)
    notes = []
    if swept := sweep_scratch():
        log.debug("removed scratch directories of dead runs: %s", ", ".join(map(str, swept)))
    live_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
    if merge_stale_overlays(dom, live_xml):
        log.info("%s: merged back the snapshot overlays of an earlier run", vm)
        notes.append("merged back the snapshot overlays of an earlier vmkeep run that did not finish")
        live_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
    specs = disk_specs(live_xml)
    notes += [s.reason for s in specs if s.reason]
    eligible = [s for s in specs if s.eligible]
    log.debug("%s: disks %s; skipped: %s", vm, ", ".join(f"{s.target}={s.source} ({s.format})" for s in eligible),
              "; ".join(s.reason for s in specs if s.reason) or "none")
    if not eligible:
        raise HypervisorError(f"VM {vm} has no disk that can be backed up ({'; '.join(notes) or 'no disks'})")
    config = {"domain_xml": dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE),
              "disks": {s.target: {"source": s.source, "format": s.format} for s in eligible}}
    return PointSource(connection, dom, eligible, config, since, previous_disks, notes)


def nvram(dom: libvirt.virDomain) -> dict[str, Any]:
    """The VM's UEFI variables, for the point's configuration (empty without UEFI)."""
    path = nvram_path(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    if path is None:
        return {}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise HypervisorError(f"cannot read the UEFI variables of {dom.name()} ({path}): {exc.strerror}; the "
                              "proxy must see the host's files for that (run it on the host)") from exc
    log.debug("read %d bytes of UEFI variables of %s from %s", len(data), dom.name(), path)
    return {"nvram": {"path": path, "data": base64.b64encode(data).decode()}}
