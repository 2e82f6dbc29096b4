"""The lab's libvirt set-up: a temporary qemu.conf change never outlives the process that made it."""

from __future__ import annotations

import subprocess
import sys

from vmkeep.lab import services
from vmkeep.lab.services import QEMU_CONF, QEMU_CONF_SAVED, ensure_libvirtd

KILLED_INSIDE_OVERRIDE = """
import os, signal
from vmkeep.lab.services import qemu_conf_override
with qemu_conf_override("backup_tls_x509_verify", "0"):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _libvirtd_pids() -> set[str]:
    return {p.name for p in services._pids("libvirtd")}


def test_an_override_killed_midway_is_undone_by_the_next_start() -> None:
    """A test killed while libvirtd ran with its qemu.conf change must not leave the lab so: the next
    ensure_libvirtd (set-up, any test session) puts the file back and restarts libvirtd on it."""
    ensure_libvirtd()
    original = QEMU_CONF.read_text()
    killed = subprocess.run([sys.executable, "-c", KILLED_INSIDE_OVERRIDE], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    try:
        assert QEMU_CONF.read_text() != original and "backup_tls_x509_verify = 0" in QEMU_CONF.read_text()
        assert QEMU_CONF_SAVED.read_text() == original
        overridden = _libvirtd_pids()
        assert overridden  # libvirtd runs with the override
    finally:
        ensure_libvirtd()
    assert QEMU_CONF.read_text() == original
    assert not QEMU_CONF_SAVED.exists()
    assert _libvirtd_pids() and not _libvirtd_pids() & overridden  # restarted on the original file


def test_an_override_is_put_back_when_it_ends() -> None:
    ensure_libvirtd()
    original = QEMU_CONF.read_text()
    with services.qemu_conf_override("backup_tls_x509_verify", "0"):
        assert "backup_tls_x509_verify = 0" in QEMU_CONF.read_text()
        assert QEMU_CONF_SAVED.exists()
    assert QEMU_CONF.read_text() == original and not QEMU_CONF_SAVED.exists()
