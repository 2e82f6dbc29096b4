"""Guest filesystems frozen through the QEMU guest agent while a point in time is fixed, so the
point is application-consistent; without an agent (or with --quiesce off) it is crash-consistent."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import libvirt

from vmkeep.hypervisors.base import Consistency, HypervisorError, Quiesce

log = logging.getLogger(__name__)

THAW_ATTEMPTS = 5


@contextmanager
def quiesced(dom: libvirt.virDomain, quiesce: Quiesce, notes: list[str]) -> Iterator[Consistency]:
    """Guest filesystems frozen for the block; yields the consistency gained."""
    frozen = False
    if quiesce != "off":
        try:
            log.debug("fsfreeze of %s", dom.name())
            dom.fsFreeze()
            frozen = True
        except libvirt.libvirtError as exc:
            why = exc.get_error_message()
            if quiesce == "required":
                raise HypervisorError(f"cannot quiesce {dom.name()} through the guest agent ({why}); use "
                                      "--quiesce try to accept a crash-consistent point") from exc
            log.info("%s not quiesced: %s", dom.name(), why)
            notes.append(f"not quiesced: {why}")
    try:
        yield "application" if frozen else "crash"
    finally:
        if frozen:
            thaw(dom, notes)


def thaw(dom: libvirt.virDomain, notes: list[str]) -> None:
    """fsthaw, tried a few times: a guest left frozen stops writing altogether."""
    for attempt in range(THAW_ATTEMPTS):
        try:
            dom.fsThaw()
            log.debug("fsthaw of %s", dom.name())
            return
        except libvirt.libvirtError as exc:
            log.warning("fsthaw of %s failed (attempt %d): %s", dom.name(), attempt + 1, exc.get_error_message())
            if attempt == THAW_ATTEMPTS - 1:
                notes.append(f"fsthaw failed: {exc.get_error_message()}")
            time.sleep(0.2)
