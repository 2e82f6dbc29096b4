"""Faults during a VM backup: every path releases the job, scratch files and checkpoint, and the
next run succeeds."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import bare_vm
from tests.bare_vm import BareVM, virsh
from tests.conftest import VMKEEP, Cli, MiB, qemu_img_compare
from tests.test_libvirt_backup import backup, scratch_left
from vmkeep.lab.services import LIBVIRTD_ARGS


@pytest.fixture
def busy_vm(cli: Cli, tmp_path: Path) -> Iterator[tuple[BareVM, str]]:
    """A VM with a full backup taken and 480 MiB rewritten since, so the next backup takes a while."""
    machine = bare_vm.create({"vda": (512 * MiB, "qcow2")})
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo)
    try:
        machine.write("vda", 0, 4 * MiB, 0x12)
        backup(cli, machine, repo)
        for i in range(0, 480, 8):
            machine.write("vda", i * MiB, 8 * MiB, 0x40 + i // 8)
        yield machine, repo
    finally:
        bare_vm.destroy(machine)


def start_backup(cli: Cli, vm: BareVM, repo: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([VMKEEP, "backup", vm.name, "--repo", repo, "--transport", "hotadd", "--workers", "1",
                             "--json"], env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not vm.job_running():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    time.sleep(0.2)
    return proc


def finish(proc: subprocess.Popen[str]) -> dict:
    out, _err = proc.communicate(timeout=120)
    return dict(json.loads(out)["vms"][0])


def test_vm_shut_down_during_backup(cli: Cli, busy_vm: tuple[BareVM, str], tmp_path: Path) -> None:
    vm, repo = busy_vm
    before = vm.checkpoints()
    proc = start_backup(cli, vm, repo)
    virsh("destroy", vm.name)
    r = finish(proc)
    assert proc.returncode == 1 and not r["ok"] and "stopped during the backup" in r["error"]
    assert vm.checkpoints() == before and not scratch_left(vm)
    assert len(cli.json("points", vm.name, "--repo", repo)["points"]) == 1
    r = backup(cli, vm, repo)  # shut off now: read from the images
    assert r["ok"] and r["transport"] == "offline"
    out = tmp_path / "vda.qcow2"
    cli.run("restore", vm.name, "--repo", repo, "--disk", "vda", "--output", str(out))
    assert qemu_img_compare(vm.disks["vda"], out)


def test_backup_job_aborted_from_outside(cli: Cli, busy_vm: tuple[BareVM, str]) -> None:
    vm, repo = busy_vm
    before = vm.checkpoints()
    proc = start_backup(cli, vm, repo)
    virsh("domjobabort", vm.name)  # the NBD export goes away under the reader
    r = finish(proc)
    assert proc.returncode == 1 and "ended under vmkeep" in r["error"]
    assert vm.checkpoints() == before and not scratch_left(vm) and not vm.job_running()
    r = backup(cli, vm, repo)
    assert r["ok"] and r["mode"] == "incremental" and r["bytes_read"] == 480 * MiB


def test_libvirtd_restart_mid_backup(cli: Cli, busy_vm: tuple[BareVM, str], tmp_path: Path) -> None:
    vm, repo = busy_vm
    proc = start_backup(cli, vm, repo)
    subprocess.run(["pkill", "-x", "libvirtd"], check=True)
    time.sleep(0.5)
    subprocess.run(["libvirtd", *LIBVIRTD_ARGS], check=True)
    r = finish(proc)
    deadline = time.monotonic() + 30
    while True:  # libvirtd takes a moment to answer again
        try:
            running = vm.job_running()
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert not running and not scratch_left(vm)
    assert len(vm.checkpoints()) == 1
    after = backup(cli, vm, repo)  # whatever the interrupted run achieved, the next one is right
    assert after["ok"]
    snap = vm.snapshot("vda", tmp_path / "now.qcow2")
    out = tmp_path / "r.qcow2"
    cli.run("restore", vm.name, "--repo", repo, "--disk", "vda", "--output", str(out))
    assert qemu_img_compare(snap, out)
    assert r["ok"] or "nothing was committed" in r["error"]
