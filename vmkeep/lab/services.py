"""Configuring and starting the local libvirt daemons by hand: lab machines have no systemd.

The lab's QEMU runs as root (lab images, scratch files and export sockets live in root-owned
directories), pull-mode backup exports can use TLS with the lab certificates, and libvirtd
listens for ``qemu+tls://`` so that a proxy on another network can reach it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vmkeep.errors import LabError
from vmkeep.lab import LOCAL_URI
from vmkeep.lab.tls import QEMU_BACKUP_DIR, ensure_lab_pki

DAEMONS = ("virtlogd", "libvirtd")  # virtlogd first: libvirtd hands it the QEMU and console logs
LIBVIRTD_ARGS = ("-d", "--listen")  # --listen: qemu+tls:// for proxies on other machines
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# qemu.conf as it was before a temporary override; present only while one is in force, or when
# the process that made it died before putting the file back.
QEMU_CONF_SAVED = QEMU_CONF.with_name("qemu.conf.vmkeep-saved")
QEMU_SETTINGS = {"user": '"root"', "group": '"root"', "backup_tls_x509_cert_dir": f'"{QEMU_BACKUP_DIR}"',
                 "backup_tls_x509_verify": "1"}


def _undo_dead_override() -> bool:
    """Put back qemu.conf as it was before an override whose process died; whether there was one."""
    if not QEMU_CONF_SAVED.exists():
        return False
    QEMU_CONF_SAVED.replace(QEMU_CONF)
    return True


def _configure_qemu() -> bool:
    """Add the lab's settings to qemu.conf where it does not set them; whether it changed."""
    undone = _undo_dead_override()
    text = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
    set_here = {line.split("=", 1)[0].strip() for line in text.splitlines() if "=" in line
                and not line.lstrip().startswith("#")}
    missing = [f"{k} = {v}" for k, v in QEMU_SETTINGS.items() if k not in set_here]
    if not missing:
        return undone
    QEMU_CONF.write_text(text.rstrip("\n") + "\n\n# vmkeep lab\n" + "\n".join(missing) + "\n")
    return True


def _pids(program: str) -> list[Path]:
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == program:
                found.append(comm.parent)
        except OSError:  # the process ended while we looked
            continue
    return found


def _listening_libvirtd() -> bool:
    for proc in _pids("libvirtd"):
        try:
            if b"--listen" in (proc / "cmdline").read_bytes().split(b"\0"):
                return True
        except OSError:
            continue
    return False


def _stop(program: str) -> None:
    subprocess.run(["pkill", "-x", program], check=False)
    deadline = time.monotonic() + 30
    while running(program) and time.monotonic() < deadline:
        time.sleep(0.1)


def running(program: str) -> bool:
    """Whether a process of that name runs (read from /proc, as there is no service manager)."""
    return bool(_pids(program))


def _answers(uri: str) -> tuple[bool, str]:
    try:
        proc = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False, "virsh version did not answer within 30 s"
    return proc.returncode == 0, proc.stderr.strip()


def ensure_libvirtd(timeout: float = 60.0) -> None:
    """Configure and start virtlogd and libvirtd unless they run so, then wait until qemu:///system
    answers.

    Idempotent: a daemon that already runs as configured is left alone (several test sessions
    call this); one that runs with other settings is restarted (running VMs carry on). A
    ``qemu_conf_override`` whose process died is undone first.
    """
    for daemon in DAEMONS:
        if shutil.which(daemon) is None:
            raise LabError(f"{daemon} is not installed: apt-get install qemu-system-x86 libvirt-daemon-system "
                           "libvirt-clients python3-libvirt")
    if shutil.which("virsh") is None:
        raise LabError("virsh is not installed: apt-get install libvirt-clients")
    ensure_lab_pki()
    if (_configure_qemu() or not _listening_libvirtd()) and running("libvirtd"):
        _stop("libvirtd")
    _start_daemons_and_wait(timeout)


def _start_daemons_and_wait(timeout: float = 60.0) -> None:
    """Start whichever daemon is not running, then wait until qemu:///system answers."""
    for daemon in DAEMONS:
        if running(daemon):
            continue
        args = LIBVIRTD_ARGS if daemon == "libvirtd" else ("-d",)
        proc = subprocess.run([daemon, *args], capture_output=True, text=True, timeout=60)
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


def restart_libvirtd() -> None:
    """Stop libvirtd and start it again as configured, so it reads qemu.conf anew (VMs run on)."""
    _stop("libvirtd")
    ensure_libvirtd()


@contextmanager
def qemu_conf_override(key: str, value: str) -> Iterator[None]:
    """libvirtd running with one qemu.conf setting changed, for the duration (tests of hosts set up
    otherwise than the lab).

    The original is kept beside qemu.conf until it is put back, so that if this process is killed
    meanwhile, the next ``ensure_libvirtd`` (set-up, any test session) restores it instead of
    leaving the lab configured for one test.
    """
    if QEMU_CONF_SAVED.exists():
        raise LabError(f"{QEMU_CONF_SAVED} exists: another override is in force (or died); run "
                       "`python -m vmkeep.lab.services` to put qemu.conf back first")
    saved = QEMU_CONF.read_text()
    partial = QEMU_CONF_SAVED.with_name(QEMU_CONF_SAVED.name + ".partial")
    partial.write_text(saved)
    partial.replace(QEMU_CONF_SAVED)  # whole or absent: a kill mid-write must not restore half a file
    lines = [line for line in saved.splitlines() if line.split("=", 1)[0].strip() != key]
    QEMU_CONF.write_text("\n".join([*lines, f"{key} = {value}"]) + "\n")
    try:
        _stop("libvirtd")
        _start_daemons_and_wait()
        yield
    finally:
        restart_libvirtd()  # the same undo as after a dead override: the saved original goes back


if __name__ == "__main__":
    ensure_libvirtd()
