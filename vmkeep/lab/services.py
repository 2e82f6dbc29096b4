"""Starting the local libvirt daemons by hand: lab machines have no systemd to do it."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from vmkeep.errors import LabError

LOCAL_URI = "qemu:///system"
DAEMONS = ("virtlogd", "libvirtd")  # virtlogd first: libvirtd hands it the QEMU and console logs




def running(program: str) -> bool:
    """Whether a process of that name runs (read from /proc, as there is no service manager)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == program:
                return True
        except OSError:  # the process ended while we looked
            continue
    return False


def _answers(uri: str) -> tuple[bool, str]:
    try:
        proc = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False, "virsh version did not answer within 30 s"
    return proc.returncode == 0, proc.stderr.strip()


def ensure_libvirtd(timeout: float = 60.0) -> None:
    """Start virtlogd and libvirtd unless they run, then wait until qemu:///system answers.

    Idempotent: a daemon that already runs is left alone, so several test sessions can call it.
    """
    for daemon in DAEMONS:
        if shutil.which(daemon) is None:
            raise LabError(f"{daemon} is not installed: apt-get install qemu-system-x86 libvirt-daemon-system "
                           "libvirt-clients python3-libvirt")
    if shutil.which("virsh") is None:
        raise LabError("virsh is not installed: apt-get install libvirt-clients")
    for daemon in DAEMONS:
        if running(daemon):
            continue
        proc = subprocess.run([daemon, "-d"], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0 and not running(daemon):
            raise LabError(f"cannot start {daemon} ({proc.returncode}): {proc.stderr.strip()}; "
                           f"run `{daemon} -v` by hand to see why")
    deadline = time.monotonic() + timeout
    while True:
        ok, err = _answers(LOCAL_URI)
        if ok:
            return
        if time.monotonic() > deadline:
            state = "runs" if running("libvirtd") else "is not running (it exited)"
            raise LabError(f"libvirtd {state} but {LOCAL_URI} did not answer within {timeout:.0f} s: {err}; "
                           "see /var/log/libvirt/libvirtd.log, or run `libvirtd -v` by hand")
        time.sleep(0.5)
