"""Backups of a real lab guest: quiesced through its agent, checked against the guest's own view,
and restored as a new VM that boots."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bare_vm import virsh
from tests.conftest import Cli, MiB
from vmkeep.lab.images import file_sha256
from vmkeep.lab.vm import LabVM, create_lab_vm, destroy_lab_vm


@pytest.fixture
def guest() -> Iterator[LabVM]:
    vm = create_lab_vm(f"vmkeep-lb-{secrets.token_hex(3)}", disks=2, size=32 * MiB)
    try:
        yield vm
    finally:
        vm.destroy()


def test_quiesced_backup_matches_the_guest_and_restores_a_booting_vm(cli: Cli, guest: LabVM,
                                                                    tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    guest.make_files("vdb")  # a mounted filesystem for the agent to freeze
    guest.write("vda", 0, 4 * MiB, seed="first")
    at_full = guest.checksum("vda")
    frozen_before = len(guest.freeze_log())
    full = json.loads(cli.run("backup", guest.name, "--repo", repo, "--transport", "hotadd", "--quiesce", "required",
                              "--json").stdout)
    full = full["vms"][0]
    assert full["ok"] and full["transport"] == "hotadd" and full["consistency"] == "application"
    log = guest.freeze_log()[frozen_before:]
    assert [line.split()[1] for line in log] == ["freeze", "thaw"]  # the guest really froze, then thawed

    guest.write("vda", 8 * MiB, MiB, seed="second")
    at_incr = guest.checksum("vda")
    frozen_before = len(guest.freeze_log())
    incr = json.loads(cli.run("backup", guest.name, "--repo", repo, "--transport", "san", "--quiesce", "required",
                              "--json").stdout)["vms"][0]
    assert incr["mode"] == "incremental" and incr["disks"]["vda"]["bytes_read"] == MiB
    assert incr["transport"] == "san" and incr["consistency"] == "application"
    log = guest.freeze_log()[frozen_before:]
    assert [line.split()[1] for line in log] == ["freeze", "thaw"]  # frozen around the snapshot too

    for point, expected in ((full["point"], at_full), (incr["point"], at_incr)):
        out = tmp_path / f"vda-{point}.raw"
        cli.run("restore", f"{guest.name}@{point}", "--repo", repo, "--disk", "vda", "--output", str(out),
                "--format", "raw")
        assert file_sha256(out) == expected  # the guest's checksum at backup time

    copy = f"{guest.name}-copy"
    try:
        cli.json("restore", guest.name, "--repo", repo, "--as", copy, "--storage", str(tmp_path / "copy"))
        reply = ""
        for _ in range(60):  # the copy boots: its own guest agent answers
            reply = virsh("qemu-agent-command", copy, '{"execute":"guest-ping"}', check=False)
            if '"return"' in reply:
                break
            time.sleep(1)
        assert '"return"' in reply, reply
    finally:
        destroy_lab_vm(copy)  # the copy carries the lab's metadata, so the lab can remove it
