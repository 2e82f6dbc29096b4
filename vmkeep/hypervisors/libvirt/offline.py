"""The point in time of a shut-off VM: its image files, served read-only by qemu-nbd (which also
keeps the VM from starting and writing to them meanwhile)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from vmkeep.errors import ImageError
from vmkeep.hypervisors.base import HypervisorError, PointInTimeInfo
from vmkeep.hypervisors.libvirt.point_source import PointSource
from vmkeep.hypervisors.libvirt.san import serve_images

log = logging.getLogger(__name__)


@contextmanager
def offline(source: PointSource) -> Iterator[PointInTimeInfo]:
    """The images as they are; with a previous point, the bitmap of its checkpoint (stored cleanly
    in the qcow2 when QEMU stopped) gives the changes.

    No new checkpoint is made: the point keeps the previous one as its chain, whose bitmap goes on
    tracking from there when the VM runs again, so the next incremental reads a superset of what
    changed, never less.
    """
    vm, connection = source.vm, source.connection
    if not connection.is_local:
        raise HypervisorError(f"VM {vm} is shut off on {connection.host}: offline backups read its image "
                              "files, so run the proxy on that host")
    parent_cp, reason = source.base(source.disks)
    with ExitStack() as stack:
        try:
            disks = serve_images(stack, vm, source.disks, parent_cp)
        except ImageError as exc:
            if parent_cp is None:
                raise
            # the bitmap is missing or was left in use by a QEMU that crashed: read it all
            stack.close()
            reason = f"the bitmap of checkpoint {parent_cp} cannot be used ({exc})"
            log.info("%s: full backup instead: %s", vm, reason)
            parent_cp = None
            disks = serve_images(stack, vm, source.disks, None)
        log.info("%s is shut off: qemu-nbd serves %s from its image files", vm, ", ".join(disks))
        yield PointInTimeInfo(
            vm=vm, transport="offline", consistency="application",
            mode="incremental" if parent_cp else "full",
            reason=(f"the VM is shut off: {reason}, read from its image files" if parent_cp
                    else f"the VM is shut off: read from its image files ({reason})"),
            disks=disks, config=source.config,
            chain=dict(source.since or {}) if parent_cp else {"checkpoint": None, "disks": []}, notes=source.notes,
        )
