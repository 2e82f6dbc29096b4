"""The scratch directory of backup jobs and san overlays, and the sweep of what dead runs left.

A run killed with -9, or whose VM vanished with its job, leaves a directory behind. Only what
can be proven unused goes: directories older than ``SWEEP_AGE`` that are empty, or hold nothing
but an NBD socket nobody listens on. Job scratch files and overlays are never swept here (the
stale-job and stale-overlay clean-ups own those: they know whether libvirt still uses them).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from vmkeep.transport.qemu_nbd import socket_listening

SCRATCH_ROOT = Path("/var/lib/libvirt/images/vmkeep-scratch")
SWEEP_AGE = 600.0  # seconds: a younger directory may belong to a backup that is starting


def sweep_scratch(root: Path = SCRATCH_ROOT, now: float | None = None) -> list[Path]:
    """Remove the leftovers of dead runs; returns what was removed."""
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for d in root.iterdir():
        try:
            if not d.is_dir() or now - d.stat().st_mtime < SWEEP_AGE:
                continue
            content = list(d.iterdir())
        except OSError:
            continue  # removed meanwhile by its own run
        if all(p.name == "nbd.sock" and p.is_socket() and not socket_listening(p) for p in content):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
