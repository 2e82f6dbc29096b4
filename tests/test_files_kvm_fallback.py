"""File restore on a host where KVM exists but the appliance cannot run under it (nested KVM:
"failed to set MSR 0x10a"): vmkeep starts it again emulated and says so in one line. libguestfs
and QEMU run for real; the only stand-in is the host's QEMU binary, a wrapper that refuses KVM as
such a host does (given to libguestfs' own handle, so no variable of the user's is involved)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cli, MiB
from vmkeep.engine import files
from vmkeep.engine.mount import PointSpec

WRAPPER = """#!/bin/sh
case "$*" in
  *-kernel*accel=kvm*|*accel=kvm*-kernel*) echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x0" >&2
    exit 1 ;;
esac
exec {qemu} "$@"
"""


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="the fallback is for hosts that have /dev/kvm")
def test_an_appliance_refused_by_kvm_starts_emulated(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello.txt").write_text("hello from the point\n")
    image = tmp_path / "fs.raw"
    subprocess.run(["truncate", "-s", str(32 * MiB), str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(content), str(image)], check=True)
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    secret = tmp_path / "passphrase"
    secret.write_text(cli.env["VMKEEP_PASSPHRASE"])
    point = json.loads(cli.run("disk", "backup", str(image), "--repo", repo, "--name", "fs", "--json").stdout)
    wrapper = tmp_path / "qemu-nested"
    wrapper.write_text(WRAPPER.format(qemu="/usr/bin/qemu-system-x86_64"))
    wrapper.chmod(0o755)
    import guestfs

    class NestedHost(guestfs.GuestFS):  # type: ignore[misc]
        """libguestfs' handle on a host whose QEMU refuses KVM."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.set_hv(str(wrapper))

    monkeypatch.setattr(guestfs, "GuestFS", NestedHost)
    monkeypatch.setattr(files, "_runs_in_a_vm", lambda: False)  # not caught by the VM check: a real failure
    spec = PointSpec(repo, "fs", point["point"], "disk", passphrase_file=str(secret))
    with caplog.at_level(logging.WARNING, logger="vmkeep.engine.files"), files.open_point_files(spec) as guest:
        assert [e.path for e in guest.listdir("/") if e.kind == "file"] == ["/hello.txt"]
        assert guest.entry("/hello.txt").size == len("hello from the point\n")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "did not start with KVM" in warnings[0] and "emulated" in warnings[0], warnings
