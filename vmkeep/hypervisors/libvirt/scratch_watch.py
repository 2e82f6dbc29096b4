"""Keeping a backup from leaving its VM paused when the scratch directory fills.

During a pull-mode job QEMU copies each block the guest overwrites into the job's scratch file
before the write goes through. When the scratch filesystem is full that copy fails, the guest's
write fails with ENOSPC, and the disk's error policy pauses the VM — which then stays paused,
even after the job ends, until someone resumes it. The watch polls the VM while the job runs:
when it is paused on an I/O error and the scratch filesystem is full, the job is ended (its
copy-before-write filter goes with it) and the VM resumed; QEMU then retries the failed write on
the disk itself. The san transport's overlays fill the same way; there the proxy lets go of the
frozen bases and the overlays are committed back before the VM resumes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import libvirt

from vmkeep.errors import VmkeepError
from vmkeep.hypervisors.base import HypervisorError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
FULL_BELOW = 1 << 20  # bytes free: QEMU allocates the scratch file in 64 KiB clusters


def nearly_full(directory: Path) -> bool:
    """Whether the filesystem holding ``directory`` has no room for another scratch cluster."""
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        log.debug("cannot tell the free space of %s (%s): taken as not full", directory, exc)
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW


def paused_on_io_error(dom: libvirt.virDomain) -> bool:
    state, reason = dom.state()
    return bool(state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR)


class ScratchWatch:
    """A thread that calls ``release`` and resumes ``dom`` when a full ``scratch`` directory paused it.

    ``released`` says what ``release`` does, for the message; ``tripped`` holds that message once
    the watch acted. Leaving the block checks once more, so a pause in the last moments is
    released too; a failure leaving the block after the watch acted is reported as the watch's.
    """

    def __init__(self, dom: libvirt.virDomain, scratch: Path, release: Callable[[], object], released: str) -> None:
        self.dom, self.scratch, self.release, self.released = dom, scratch, release, released
        self.tripped: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"scratch-watch-{dom.name()}", daemon=True)

    def __enter__(self) -> ScratchWatch:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._check()
        if self.tripped and isinstance(exc, VmkeepError):
            # the reads failed because the watch let go of the export: say why
            raise HypervisorError(f"{self.tripped}; nothing was committed") from None

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS) and not self.tripped:
            self._check()

    def _check(self) -> None:
        if self.tripped:
            return
        try:
            if not (paused_on_io_error(self.dom) and nearly_full(self.scratch)):
                return
            self.tripped = (f"the scratch directory {self.scratch.parent} filled with the guest's writes during the "
                            f"backup and QEMU paused {self.dom.name()} (I/O error); vmkeep {self.released} and "
                            "resumed the VM. Give the scratch directory room for the guest's writes during a backup "
                            "(VMKEEP_SCRATCH_DIR)")
        except libvirt.libvirtError as exc:
            # libvirtd restarting or the VM gone: the backup's own clean-up deals with it
            log.debug("scratch watch: cannot read the state of the VM (%s)", exc.get_error_message())
            return
        log.warning("%s paused on an I/O error with %s full: %s", self.dom.name(), self.scratch.parent, self.released)
        try:
            self.release()
        except (VmkeepError, libvirt.libvirtError) as exc:
            log.warning("releasing after the scratch filled failed: %s", exc)
            self.tripped += f" (releasing failed: {exc})"
        try:
            self.dom.resume()
        except libvirt.libvirtError as exc:
            log.warning("%s not resumed after the scratch filled (%s)", self.dom.name(), exc.get_error_message())
