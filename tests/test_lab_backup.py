"""Backups of a real lab guest: quiesced through its agent, checked against the guest's own view,
and restored as a new VM that boots."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.bare_vm import virsh
from tests.conftest import VMKEEP, Cli, MiB
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


@contextmanager
def guest_beside_tmpfs(directory: Path, size: str) -> Iterator[LabVM]:
    """A tmpfs of ``size`` for scratch files, and a guest started after it was mounted: QEMU runs in
    its own mount namespace and sees only the mounts made before it started."""
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "vmkeep-scratch-test", str(directory)], check=True)
    try:
        vm = create_lab_vm(f"vmkeep-lf-{secrets.token_hex(3)}", disks=2, size=32 * MiB)
        try:
            yield vm
        finally:
            vm.destroy()
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.fixture
def full_scratch(tmp_path: Path) -> Iterator[tuple[Path, LabVM]]:
    """A scratch filesystem with no room for even the scratch files' headers."""
    with guest_beside_tmpfs(tmp_path / "full", "64k") as vm:
        yield tmp_path / "full", vm


def test_a_failure_while_frozen_still_thaws_the_guest(cli: Cli, full_scratch: tuple[Path, LabVM],
                                                      tmp_path: Path) -> None:
    """The scratch filesystem is full: libvirt cannot create the job's scratch files (hotadd) or the
    snapshot overlays (san) while the guest's filesystems are frozen. The guest must be thawed, the
    error must say what to do, and nothing is left: no job, checkpoint, overlay, scratch or point."""
    full, vm = full_scratch
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    vm.make_files("vdb")
    for transport in ("hotadd", "san"):
        frozen_before = len(vm.freeze_log())
        proc = cli.run("backup", vm.name, "--repo", repo, "--transport", transport, "--quiesce", "required",
                       ok=False, env={"VMKEEP_SCRATCH_DIR": str(full)})
        assert proc.returncode != 0
        assert "No space left" in proc.stderr and f"scratch directory {full} is full" in proc.stderr, proc.stderr
        log = vm.freeze_log()[frozen_before:]
        assert [line.split()[1] for line in log] == ["freeze", "thaw"], transport  # froze, then thawed
        status = virsh("qemu-agent-command", vm.name, '{"execute":"guest-fsfreeze-status"}')
        assert json.loads(status)["return"] == "thawed"
        assert vm.run(f"echo {transport} > /mnt/vdb/after && cat /mnt/vdb/after") == f"{transport}\n"
        assert not virsh("checkpoint-list", vm.name, "--name").split()
        assert "backup" not in virsh("domjobinfo", vm.name).lower()
        assert ".vmkeep-overlay" not in virsh("domblklist", vm.name)
        assert not list(full.iterdir())
    assert not cli.json("points", vm.name, "--repo", repo)["points"]
    ok = json.loads(cli.run("backup", vm.name, "--repo", repo, "--transport", "san", "--quiesce", "required",
                            "--json").stdout)["vms"][0]  # the default scratch directory has room
    assert ok["ok"] and ok["mode"] == "full" and ok["consistency"] == "application"
    assert [line.split()[1] for line in vm.freeze_log()[-2:]] == ["freeze", "thaw"]


def point_in_time_held(vm: LabVM, transport: str) -> bool:
    """Whether the backup's point in time is set up: hotadd's job runs, or san's overlays are in use."""
    if transport == "san":
        return ".vmkeep-overlay" in virsh("domblklist", vm.name, check=False)
    return "Backup" in virsh("domjobinfo", vm.name, check=False)


@pytest.mark.parametrize("transport", ["hotadd", "san"])
def test_a_scratch_directory_filling_mid_backup_does_not_leave_the_vm_paused(cli: Cli, tmp_path: Path,
                                                                             transport: str) -> None:
    """The guest writes more than the scratch directory holds while a (paced) backup runs — into
    hotadd's scratch file (old blocks) or san's overlay (new blocks): QEMU pauses the VM on ENOSPC.
    vmkeep lets go (ends the job / stops reading and commits the overlay back) and resumes the VM,
    whose write then completes; the backup fails with the reason and leaves nothing behind."""
    small = tmp_path / "small"
    with guest_beside_tmpfs(small, "8m") as vm:
        repo = str(tmp_path / "repo")
        cli.run("repo", "init", repo, "--encrypt")
        vm.write("vda", 0, 24 * MiB, seed="before")
        proc = subprocess.Popen([VMKEEP, "backup", vm.name, "--repo", repo, "--transport", transport, "--max-rate",
                                 "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**cli.env, "VMKEEP_SCRATCH_DIR": str(small)})
        try:
            deadline = time.monotonic() + 60
            while not point_in_time_held(vm, transport):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.1)
            vm.write("vda", 0, 16 * MiB, seed="during")  # blocks while the VM is paused; completes once resumed
            out, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        result = json.loads(out)["vms"][0]
        assert proc.returncode == 1 and not result["ok"], out + err
        assert "filled with the guest's writes" in result["error"] and "resumed the VM" in result["error"], result
        assert virsh("domstate", vm.name).strip() == "running"
        at_end = vm.checksum("vda")
        assert not virsh("checkpoint-list", vm.name, "--name").split()
        assert "backup" not in virsh("domjobinfo", vm.name).lower()
        assert ".vmkeep-overlay" not in virsh("domblklist", vm.name)
        assert not list(small.iterdir())
        assert not cli.json("points", vm.name, "--repo", repo)["points"]
        ok = cli.json("backup", vm.name, "--repo", repo, "--transport", transport)["vms"][0]  # room again
        assert ok["ok"] and ok["mode"] == "full"
        restored = tmp_path / "vda.raw"
        cli.run("restore", f"{vm.name}@{ok['point']}", "--repo", repo, "--disk", "vda", "--output", str(restored),
                "--format", "raw")
        assert file_sha256(restored) == at_end  # the write the pause held up is on the disk
