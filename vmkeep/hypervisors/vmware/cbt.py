"""Changed block tracking: the areas of a snapshot's disk changed since a ``changeId``.

A changeId looks like ``52 1c … 9e/42``: the part before the slash names the tracking epoch
(it changes when tracking is reset: turned off and on, a VM moved, a disk replaced), the number
counts changes within it. ``*`` asks for every area that holds data (for a full backup).
"""

from __future__ import annotations

import logging
from typing import Any

from pyVmomi import vim, vmodl

from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.vmware.devices import Disk
from vmkeep.transport.extents import Extent, merge

log = logging.getLogger(__name__)


def epoch(change_id: str) -> str:
    return change_id.rsplit("/", 1)[0].strip()


def changed_areas(vm: Any, snapshot: Any, disk: Disk, change_id: str) -> list[Extent]:
    """Every area of ``disk`` in ``snapshot`` changed since ``change_id``; the server answers a
    stretch of the disk per call, so the calls go on until the whole disk is covered."""
    areas: list[Extent] = []
    offset = 0
    while offset < disk.capacity:
        try:
            info = vm.QueryChangedDiskAreas(snapshot=snapshot, deviceKey=disk.key, startOffset=offset,
                                            changeId=change_id)
        except (vim.fault.FileFault, vmodl.fault.InvalidArgument, vim.fault.InvalidState) as exc:
            why = getattr(exc, "msg", None) or type(exc).__name__
            log.debug("QueryChangedDiskAreas(disk %s, offset %d, changeId %s): %s", disk.name, offset, change_id,
                      type(exc).__name__)
            raise HypervisorError(f"changed block tracking of disk {disk.name} cannot answer from changeId "
                                  f"{change_id} ({why})") from exc
        found = info.changedArea or []
        areas.extend(Extent(a.start, a.length) for a in found)
        covered = info.startOffset + info.length
        log.debug("QueryChangedDiskAreas(disk %s, offset %d, changeId %s): %d areas, %d bytes, up to %d",
                  disk.name, offset, change_id, len(found), sum(a.length for a in found), covered)
        if covered <= offset:
            raise HypervisorError(f"changed block tracking of disk {disk.name} answered no progress at offset "
                                  f"{offset}")
        offset = covered
    return [e for e in merge(areas) if e.offset < disk.capacity]
