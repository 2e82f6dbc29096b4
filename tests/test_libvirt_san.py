"""The san transport on the real local libvirt: external snapshot, base read directly, commit back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import libvirt
import pytest

from tests import bare_vm
from tests.bare_vm import BareVM, virsh
from tests.conftest import VMKEEP, Cli, MiB, qemu_img_compare
from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.libvirt.connector import LibvirtConnector
from vmkeep.hypervisors.libvirt.domain_xml import DiskSpec, disk_specs
from vmkeep.hypervisors.libvirt.point_in_time import choose_transport
from vmkeep.hypervisors.libvirt.san import OVERLAY_SUFFIX, frozen_bases
from vmkeep.hypervisors.libvirt.scratch import SCRATCH_ROOT


@pytest.fixture
def vm() -> Iterator[BareVM]:
    with bare_vm.running({"vda": (64 * MiB, "qcow2"), "vdb": (32 * MiB, "raw")}) as machine:
        yield machine


@pytest.fixture
def repo(cli: Cli, tmp_path: Path) -> str:
    path = str(tmp_path / "repo")
    cli.run("repo", "init", path, "--encrypt")
    return path


def backup(cli: Cli, vm: BareVM, repo: str, *args: str) -> dict:
    proc = cli.run("backup", vm.name, "--repo", repo, "--json", *args)
    return dict(json.loads(proc.stdout)["vms"][0])


def sources(vm: BareVM) -> dict[str, str]:
    """What the VM writes to now, per disk (an overlay while a san backup runs)."""
    lines = virsh("domblklist", vm.name).splitlines()[2:]
    return dict(line.split(None, 1) for line in lines if line.strip())


def settled(vm: BareVM) -> bool:
    """Back on its own images, with no overlay or scratch left behind."""
    left = list(SCRATCH_ROOT.glob(f"{vm.name}-*")) if SCRATCH_ROOT.exists() else []
    return sources(vm) == {d: str(p) for d, p in vm.disks.items()} and not left


def guest_view(vm: BareVM, disk: str, dest: Path) -> Path:
    """The disk as the guest sees it now, through any overlay, copied while the VM is paused."""
    virsh("suspend", vm.name)
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", sources(vm)[disk], str(dest)], check=True)
    finally:
        virsh("resume", vm.name)
    return dest


def restore_equals(cli: Cli, vm: BareVM, repo: str, point: str, states: dict[str, Path], tmp: Path) -> None:
    for disk, reference in states.items():
        out = tmp / f"r-{point}-{disk}.qcow2"
        cli.run("restore", f"{vm.name}@{point}", "--repo", repo, "--disk", disk, "--output", str(out))
        assert qemu_img_compare(reference, out), f"{disk} of {point} differs"


def test_san_full_incremental_then_other_transports(cli: Cli, vm: BareVM, repo: str, tmp_path: Path) -> None:
    vm.write("vda", 8 * MiB, 8 * MiB, 0x11)
    vm.write("vdb", 4 * MiB, 2 * MiB, 0x12)
    at_full = {d: vm.snapshot(d, tmp_path / f"full-{d}.qcow2") for d in vm.disks}
    full = backup(cli, vm, repo, "--transport", "san:hotadd")
    assert full["mode"] == "full" and full["transport"] == "san"
    raw_read = full["bytes_read"] - 8 * MiB  # the allocated qcow2 data, then what the raw disk holds
    assert 2 * MiB <= raw_read <= 2 * MiB + 64 * 1024
    assert settled(vm) and len(vm.checkpoints()) == 1

    vm.write("vda", 0, 64 * 1024, 0x21)
    at_san = {d: vm.snapshot(d, tmp_path / f"san-{d}.qcow2") for d in vm.disks}
    incr = backup(cli, vm, repo, "--transport", "san")
    assert incr["mode"] == "incremental" and incr["transport"] == "san"
    assert incr["bytes_read"] == 64 * 1024 + raw_read  # the write, and the raw disk again
    assert settled(vm) and len(vm.checkpoints()) == 1

    # the checkpoint made beside the snapshot tracks on after the commit: a hotadd incremental
    # sees exactly what was written since the san point
    vm.write("vda", 40 * MiB, MiB, 0x31)
    at_hot = {d: vm.snapshot(d, tmp_path / f"hot-{d}.qcow2") for d in vm.disks}
    hot = backup(cli, vm, repo, "--transport", "hotadd")
    assert hot["mode"] == "incremental" and hot["bytes_read"] == MiB + raw_read

    for point, states in ((full["point"], at_full), (incr["point"], at_san), (hot["point"], at_hot)):
        restore_equals(cli, vm, repo, point, states, tmp_path)


def test_san_skipped_when_the_proxy_cannot_open_the_images() -> None:
    connector = LibvirtConnector(bare_vm.URI)
    try:
        notes: list[str] = []
        far = [DiskSpec("vda", "/nonexistent/datastore/vda.qcow2", "qcow2", True, "")]
        assert choose_transport(connector.connection, ["san", "nbd"], far, notes) == "nbd"
        assert notes and "san skipped" in notes[0] and "vda" in notes[0]
        with pytest.raises(HypervisorError, match="add nbd"):
            choose_transport(connector.connection, ["san"], far, [])
    finally:
        connector.close()


def _stop_when_overlaid(proc: subprocess.Popen[str], vm: BareVM) -> None:
    """Freeze the vmkeep process the moment its overlays are in place and the guest runs again."""
    conn = libvirt.open(bare_vm.URI)
    try:
        dom = conn.lookupByName(vm.name)
        deadline = time.monotonic() + 60
        while not (OVERLAY_SUFFIX in dom.XMLDesc() and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGSTOP)
    finally:
        conn.close()


def test_killed_san_backup_is_merged_back_next_run(cli: Cli, vm: BareVM, repo: str, tmp_path: Path) -> None:
    vm.write("vda", 0, 48 * MiB, 0x41)
    backup(cli, vm, repo, "--transport", "san")
    vm.write("vda", 0, 48 * MiB, 0x42)
    proc = subprocess.Popen([VMKEEP, "backup", vm.name, "--repo", repo, "--transport", "san", "--workers", "1"],
                            env=cli.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _stop_when_overlaid(proc, vm)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    vm.write("vda", 50 * MiB, MiB, 0x43)  # lands in the overlay the dead run left
    assert not settled(vm)
    expected = guest_view(vm, "vda", tmp_path / "expected.qcow2")

    r = backup(cli, vm, repo, "--transport", "hotadd")
    assert any("did not finish" in n for n in r["notes"]), r["notes"]
    assert r["mode"] == "incremental" and settled(vm)
    restore_equals(cli, vm, repo, r["point"], {"vda": expected}, tmp_path)


def test_vm_stopped_during_san_backup(cli: Cli, vm: BareVM, repo: str, tmp_path: Path) -> None:
    vm.write("vda", 0, 48 * MiB, 0x51)
    backup(cli, vm, repo, "--transport", "san")
    vm.write("vda", 0, 48 * MiB, 0x52)
    at_point = vm.snapshot("vda", tmp_path / "at-point.qcow2")
    proc = subprocess.Popen([VMKEEP, "backup", vm.name, "--repo", repo, "--transport", "san", "--json"],
                            env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _stop_when_overlaid(proc, vm)
    vm.write("vda", 50 * MiB, MiB, 0x53)  # in the overlay only
    virsh("destroy", vm.name)  # SIGTERM: QEMU closes the images cleanly
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    r = json.loads(out)["vms"][0]
    assert r["ok"] and r["transport"] == "san"
    # the overlay was merged offline into the base: nothing the guest wrote is lost
    assert sources(vm) == {d: str(p) for d, p in vm.disks.items()}
    assert not any(SCRATCH_ROOT.glob(f"{vm.name}-*"))
    dump = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P 0x53 {50 * MiB} {MiB}",
                           str(vm.disks["vda"])], capture_output=True, text=True)
    assert "Pattern verification failed" not in dump.stdout and dump.returncode == 0, dump.stdout
    # the bitmaps could not follow an offline merge: no checkpoint is trusted, the next backup is full
    assert vm.checkpoints() == []
    restore_equals(cli, vm, repo, r["point"], {"vda": at_point}, tmp_path)
    nxt = backup(cli, vm, repo)
    assert nxt["mode"] == "full" and nxt["transport"] == "offline"


def _served(image: Path) -> bool:
    """Whether a qemu-nbd serves ``image`` now."""
    return subprocess.run(["pgrep", "-f", f"^qemu-nbd .*{image}$"], capture_output=True).returncode == 0


def test_checkpoint_refused_after_the_snapshot_stops_the_served_bases(
        cli: Cli, vm: BareVM, repo: str, tmp_path: Path) -> None:
    """qemu-nbd starts on the frozen bases while the checkpoint is being made: when libvirt then
    refuses the checkpoint (here: one of a disk the VM does not have), those servers stop before
    the overlays are committed into the bases, and the next backup builds on the previous point
    as if nothing had happened."""
    vm.write("vda", 0, 8 * MiB, 0x61)
    backup(cli, vm, repo, "--transport", "san")
    [previous] = vm.checkpoints()
    vm.write("vda", 16 * MiB, MiB, 0x62)
    at_point = {d: vm.snapshot(d, tmp_path / f"at-{d}.qcow2") for d in vm.disks}
    conn = libvirt.open(bare_vm.URI)
    try:
        dom = conn.lookupByName(vm.name)
        eligible = [s for s in disk_specs(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)) if s.eligible]
        refused = "<domaincheckpoint><disks><disk name='vdz'/></disks></domaincheckpoint>"
        with (pytest.raises(HypervisorError, match="cannot snapshot"),
              frozen_bases(dom, eligible, {s.target: dom.blockInfo(s.target)[0] for s in eligible},
                           SCRATCH_ROOT / f"{vm.name}-refused", refused, previous, "test",
                           lambda: nullcontext("crash"))):
            pass
    finally:
        conn.close()
    assert not any(_served(image) for image in vm.disks.values())
    assert settled(vm) and vm.checkpoints() == [previous]

    nxt = backup(cli, vm, repo, "--transport", "san")
    assert nxt["mode"] == "incremental" and nxt["bytes_read"] >= MiB
    restore_equals(cli, vm, repo, nxt["point"], at_point, tmp_path)


def test_more_workers_than_a_server_would_take_at_once(cli: Cli, vm: BareVM, repo: str, tmp_path: Path) -> None:
    """Every 4 MiB slot of vda holds data and each worker thread opens its own connection to the
    qemu-nbd serving the frozen base: with --workers 32 that is 16 threads on vda, one more than
    a server capped at 16 clients lets in (the 17th waits forever instead of being refused)."""
    vm.write("vda", 0, 48 * MiB, 0x71)
    vm.write("vda", 48 * MiB, 16 * MiB, 0x72)
    at_point = {d: vm.snapshot(d, tmp_path / f"at-{d}.qcow2") for d in vm.disks}
    proc = subprocess.run([VMKEEP, "backup", vm.name, "--repo", repo, "--transport", "san", "--workers", "32",
                           "--json"], env=cli.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    r = json.loads(proc.stdout)["vms"][0]
    assert r["transport"] == "san" and r["bytes_read"] >= 64 * MiB and settled(vm)
    restore_equals(cli, vm, repo, r["point"], at_point, tmp_path)
