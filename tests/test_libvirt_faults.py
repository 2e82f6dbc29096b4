"""Faults during a VM backup: every path releases the job, scratch files and checkpoint, and the
next run succeeds."""

from __future__ import annotations

import json
import re
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
    cli.run("repo", "init", repo, "--encrypt")
    try:
        machine.write("vda", 0, 4 * MiB, 0x12)
        backup(cli, machine, repo)
        for i in range(0, 480, 8):
            machine.write("vda", i * MiB, 8 * MiB, 0x40 + i // 8)
        yield machine, repo
    finally:
        bare_vm.destroy(machine)


def start_backup(cli: Cli, vm: BareVM, repo: str, transport: str = "hotadd", workers: int = 1) -> subprocess.Popen[str]:
    proc = subprocess.Popen([VMKEEP, "backup", vm.name, "--repo", repo, "--transport", transport, "--workers",
                             str(workers),
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


def nbd_connections(vm: BareVM) -> tuple[str, list[str]]:
    """The VM's running nbd export's port, and the `ss` filter for the connections to it."""
    port = re.search(r"port='(\d+)'", virsh("backup-dumpxml", vm.name))
    assert port, "the nbd transport exports over TCP"
    return port[1], ["state", "established", f"( sport = :{port[1]} )"]


def test_nbd_connection_dropped_mid_backup(cli: Cli, busy_vm: tuple[BareVM, str], tmp_path: Path) -> None:
    """The TCP connections of the nbd transport are cut while data flows (a network fault): the
    reader connects again and retries, and the point is complete and says so."""
    vm, repo = busy_vm
    proc = start_backup(cli, vm, repo, transport="nbd")
    port, connections = nbd_connections(vm)
    deadline = time.monotonic() + 30
    while max(map(int, re.findall(r"bytes_sent:(\d+)", subprocess.run(
            ["ss", "-H", "-t", "-i", *connections], capture_output=True, text=True).stdout)), default=0) < 16 * MiB:
        assert proc.poll() is None and time.monotonic() < deadline  # until data flows
        time.sleep(0.01)
    cut = subprocess.run(["ss", "-K", "-t", *connections], capture_output=True, text=True)
    assert cut.returncode == 0 and f":{port}" in cut.stdout, cut.stdout + cut.stderr
    r = finish(proc)
    assert r["ok"] and r["mode"] == "incremental" and r["bytes_read"] == 480 * MiB, r
    assert any("connection dropped" in n for n in r["notes"]), r["notes"]
    assert len(vm.checkpoints()) == 1 and not scratch_left(vm) and not vm.job_running()
    snap = vm.snapshot("vda", tmp_path / "now.qcow2")
    out = tmp_path / "r.qcow2"
    cli.run("restore", f"{vm.name}@{r['point']}", "--repo", repo, "--disk", "vda", "--output", str(out))
    assert qemu_img_compare(snap, out)


def test_a_disk_is_read_over_several_connections(cli: Cli, busy_vm: tuple[BareVM, str]) -> None:
    vm, repo = busy_vm
    proc = start_backup(cli, vm, repo, transport="nbd", workers=4)
    _port, connections = nbd_connections(vm)
    most = 0
    while proc.poll() is None:
        listing = subprocess.run(["ss", "-H", "-t", *connections], capture_output=True, text=True).stdout
        most = max(most, len(listing.splitlines()))
    assert finish(proc)["ok"]
    assert most >= 4, f"at most {most} NBD connections to the disk's export"


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
    # the interrupted run's point is there whole or not at all, then the next run's
    assert len(cli.json("points", vm.name, "--repo", repo)["points"]) == (3 if r["ok"] else 2)
