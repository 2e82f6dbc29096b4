"""The scratch directory of backup jobs and san overlays, and the sweep of what dead runs left.

Scratch files and overlays take the guest's writes while a backup runs, so they need room on the
VM's host: ``VMKEEP_SCRATCH_DIR`` moves them off the default directory when its filesystem is small.

A run killed with -9, or whose VM vanished with its job, leaves a directory behind. Only what
can be proven unused goes: directories older than ``SWEEP_AGE`` that are empty, or hold nothing
but an NBD socket nobody listens on. Job scratch files and overlays are never swept here (the
stale-job and stale-overlay clean-ups own those: they know whether libvirt still uses them).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from vmkeep.transport.qemu_nbd import socket_listening

log = logging.getLogger(__name__)

SCRATCH_ROOT = Path("/var/lib/libvirt/images/vmkeep-scratch")
SWEEP_AGE = 600.0  # seconds: a younger directory may belong to a backup that is starting


def scratch_root() -> Path:
    """Where this run puts job scratch files and san overlays: ``VMKEEP_SCRATCH_DIR`` or the default."""
    from vmkeep.settings import settings

    return settings().scratch_dir or SCRATCH_ROOT


def out_of_space(why: str) -> bool:
    """Whether libvirt's or QEMU's error message says a file could not be written for want of room.

    Read from the message: libvirt reports QEMU's failure as VIR_ERR_INTERNAL_ERROR (or
    OPERATION_FAILED) whatever the cause, and passes on no errno; only QEMU's text says ENOSPC."""
    return "no space left" in why.lower()


def explain_full_scratch(why: str, root: Path) -> str | None:
    """The remedy when libvirt failed for want of room in the scratch directory, else None."""
    if not out_of_space(why):
        return None
    return (f"the scratch directory {root} is full; free space there, or set VMKEEP_SCRATCH_DIR to a directory "
            "on the VM's host with room for the guest's writes during a backup (on a filesystem mounted "
            "before the VM started: QEMU does not see later mounts)")


def sweep_scratch(root: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the leftovers of dead runs; returns what was removed."""
    root = scratch_root() if root is None else root
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for d in root.iterdir():
        try:
            if not d.is_dir() or now - d.stat().st_mtime < SWEEP_AGE:
                continue
            content = list(d.iterdir())
        except OSError as exc:
            log.debug("scratch sweep: %s skipped (%s; removed meanwhile by its own run?)", d, exc)
            continue
        if all(p.name == "nbd.sock" and p.is_socket() and not socket_listening(p) for p in content):
            log.info("removing %s, left by a dead run", d)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
