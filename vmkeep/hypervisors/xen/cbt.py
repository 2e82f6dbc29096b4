"""Changed block tracking of XAPI: what ``VDI.list_changed_blocks`` answers, as extents.

XAPI answers a base64 bitmap with one bit per 64 KiB block of the newer snapshot's virtual size,
most significant bit first (bit 7 of byte 0 is block 0), set where the block changed between the
two snapshots. XAPI refuses the call while either VDI is attached (VDI_IN_USE), so it is asked
before any NBD connection to the snapshot is opened.
"""

from __future__ import annotations

import base64
import binascii
import logging

from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.xen.session import XapiSession
from vmkeep.transport.extents import Extent

log = logging.getLogger(__name__)

BLOCK = 64 * 1024


def decode(bitmap: str | bytes, size: int) -> list[Extent]:
    """The changed extents a base64 ``bitmap`` marks on a disk of ``size`` bytes: neighbouring
    blocks run together, the last one ends at the disk's end."""
    try:
        raw = base64.b64decode(bitmap, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HypervisorError(f"XAPI answered a changed-block bitmap that is not base64 ({exc})") from exc
    blocks = -(-size // BLOCK)
    if len(raw) * 8 < blocks:
        raise HypervisorError(f"XAPI's changed-block bitmap covers {len(raw) * 8} blocks of 64 KiB, the disk has "
                              f"{blocks} ({size} bytes): the snapshot and the bitmap disagree on its size")
    extents: list[Extent] = []
    start: int | None = None
    for block in range(blocks + 1):
        changed = block < blocks and bool(raw[block >> 3] & (0x80 >> (block & 7)))
        if changed and start is None:
            start = block
        elif not changed and start is not None:
            offset = start * BLOCK
            extents.append(Extent(offset, min(block * BLOCK, size) - offset))
            start = None
    return extents


def changed_extents(session: XapiSession, base: str, snapshot: str, size: int, disk: str) -> list[Extent]:
    """What changed on ``disk`` between the snapshot VDI ``base`` (now CBT metadata) and
    ``snapshot`` (refs); XapiError (VDI_NO_CBT_METADATA: the log does not chain) otherwise."""
    bitmap = session.call("VDI.list_changed_blocks", base, snapshot)
    extents = decode(bitmap, size)
    log.debug("disk %s: %d changed extents, %d bytes of %d", disk, len(extents), sum(e.length for e in extents), size)
    return extents
