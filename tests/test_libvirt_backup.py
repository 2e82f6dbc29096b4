"""VM backup and restore through the real local libvirt (pull-mode jobs, checkpoints, NBD)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import bare_vm
from tests.bare_vm import BareVM, virsh
from tests.conftest import VMKEEP, Cli, MiB, qemu_img_compare
from vmkeep.engine.image import restore_image
from vmkeep.engine.vm import backup_vm
from vmkeep.hypervisors.libvirt.connector import LibvirtConnector
from vmkeep.hypervisors.libvirt.scratch import SCRATCH_ROOT
from vmkeep.repository.backends.fs import FilesystemBackend
from vmkeep.repository.config import Credentials
from vmkeep.repository.points import Manifest
from vmkeep.repository.repo import Repository


@pytest.fixture
def vm() -> Iterator[BareVM]:
    with bare_vm.running({"vda": (64 * MiB, "qcow2"), "vdb": (32 * MiB, "qcow2")}) as machine:
        yield machine


@pytest.fixture
def repo(cli: Cli, tmp_path: Path) -> str:
    path = str(tmp_path / "repo")
    cli.run("repo", "init", path, "--encrypt")
    return path


def backup(cli: Cli, vm: BareVM, repo: str, *args: str, ok: bool = True) -> dict:
    proc = cli.run("backup", vm.name, "--repo", repo, "--json", *args, ok=ok)
    return dict(json.loads(proc.stdout)["vms"][0])


def scratch_left(vm: BareVM) -> list[Path]:
    return [p for p in SCRATCH_ROOT.glob(f"{vm.name}-*")] if SCRATCH_ROOT.exists() else []


def test_full_then_incremental_reads_only_the_writes(cli: Cli, vm: BareVM, repo: str, tmp_path: Path) -> None:
    vm.write("vda", 16 * MiB, 8 * MiB, 0x11)
    vm.write("vdb", 20 * MiB, 2 * MiB, 0x22)
    at_full = {d: vm.snapshot(d, tmp_path / f"full-{d}.qcow2") for d in vm.disks}
    full = backup(cli, vm, repo, "--transport", "hotadd")
    assert full["mode"] == "full" and full["transport"] == "hotadd" and full["consistency"] == "crash"
    assert full["bytes_read"] == 10 * MiB  # only allocated data
    assert len(vm.checkpoints()) == 1

    vm.write("vda", 0, 64 * 1024, 0x33)  # chunk 0 of vda held nothing before
    vm.write("vdb", 4 * MiB, MiB, 0x44)  # chunk 1 of vdb likewise
    at_incr = {d: vm.snapshot(d, tmp_path / f"incr-{d}.qcow2") for d in vm.disks}
    incr = backup(cli, vm, repo, "--transport", "nbd")
    assert incr["mode"] == "incremental" and incr["transport"] == "nbd"
    assert incr["bytes_read"] == 64 * 1024 + MiB  # exactly what was written
    assert incr["bytes_reused"] == 96 * MiB - 2 * 4 * MiB
    assert len(vm.checkpoints()) == 1  # the older checkpoint was pruned
    assert not scratch_left(vm) and not vm.job_running()

    for point, states in ((full["point"], at_full), (incr["point"], at_incr)):
        for disk, reference in states.items():
            out = tmp_path / f"r-{point}-{disk}.qcow2"
            cli.run("restore", f"{vm.name}@{point}", "--repo", repo, "--disk", disk, "--output", str(out))
            assert qemu_img_compare(reference, out), f"{disk} of {point} differs"


def test_incremental_reads_what_changed_and_is_still_allocated(cli: Cli, vm: BareVM, repo: str,
                                                                 tmp_path: Path) -> None:
    """Written then trimmed since the last point: dirty but unallocated, so not read; the restore
    has zeros there."""
    vm.write("vda", 0, 8 * MiB, 0x51)
    backup(cli, vm, repo)
    vm.write("vda", 8 * MiB, 4 * MiB, 0x52)  # chunks 2 and 3: new data, then half of it trimmed
    vm.discard("vda", 10 * MiB, 2 * MiB)
    vm.discard("vda", 2 * MiB, 2 * MiB)  # old data trimmed: dirty, nothing to read
    at_incr = vm.snapshot("vda", tmp_path / "incr.qcow2")
    r = backup(cli, vm, repo, "--transport", "hotadd")
    assert r["mode"] == "incremental" and r["disks"]["vda"]["bytes_read"] == 2 * MiB, r
    out = tmp_path / "r.qcow2"
    cli.run("restore", vm.name, "--repo", repo, "--disk", "vda", "--output", str(out))
    assert qemu_img_compare(at_incr, out)


def test_drift_falls_back_to_full(cli: Cli, vm: BareVM, repo: str, tmp_path: Path) -> None:
    vm.write("vda", 0, MiB, 0x01)
    backup(cli, vm, repo)
    virsh("checkpoint-delete", vm.name, vm.checkpoints()[0])  # removed by hand
    r = backup(cli, vm, repo)
    assert r["mode"] == "full" and "gone" in r["reason"]
    virsh("blockresize", vm.name, "vdb", "48M")
    r = backup(cli, vm, repo)
    assert r["mode"] == "full" and "disks changed" in r["reason"]
    assert backup(cli, vm, repo)["mode"] == "incremental"
    added = bare_vm.IMAGES / vm.name / "vdc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(added), "16M"], check=True)
    virsh("attach-disk", vm.name, str(added), "vdc", "--driver", "qemu", "--subdriver", "qcow2", "--live")
    r = backup(cli, vm, repo)
    assert r["mode"] == "full" and "disks changed" in r["reason"] and "vdc" in r["reason"]
    assert backup(cli, vm, repo)["mode"] == "incremental"
    other = str(tmp_path / "other")  # the previous point is not in this repository
    cli.run("repo", "init", other, "--encrypt")
    r = backup(cli, vm, other)
    assert r["mode"] == "full" and "no previous restore point" in r["reason"]
    assert backup(cli, vm, repo, "--full")["mode"] == "full"


@pytest.mark.parametrize("transport", ["hotadd", "san"])
def test_bitmap_lost_behind_libvirt_falls_back_to_full(cli: Cli, vm: BareVM, repo: str, transport: str) -> None:
    """libvirt still lists the checkpoint, but QEMU no longer has its bitmap (the image was replaced
    or reverted outside libvirt): an incremental from it would miss writes, so the backup is full."""
    vm.write("vda", 0, MiB, 0x01)
    backup(cli, vm, repo, "--transport", transport)
    (checkpoint,) = vm.checkpoints()
    vm.drop_bitmap("vda", checkpoint)
    vm.write("vda", 8 * MiB, MiB, 0x02)
    r = backup(cli, vm, repo, "--transport", transport)
    assert r["mode"] == "full" and "bitmap" in r["reason"] and checkpoint in r["reason"], r["reason"]
    assert r["bytes_read"] == 2 * MiB  # every allocated byte, not only the write
    assert checkpoint not in vm.checkpoints() and len(vm.checkpoints()) == 1
    r = backup(cli, vm, repo, "--transport", transport)
    assert r["mode"] == "incremental" and r["bytes_read"] == 0


def test_shut_off_vm_is_read_from_its_images(cli: Cli, vm: BareVM, repo: str, tmp_path: Path) -> None:
    vm.write("vda", 8 * MiB, 3 * MiB, 0x55)
    virsh("destroy", vm.name)
    r = backup(cli, vm, repo)
    assert r["transport"] == "offline" and r["mode"] == "full" and r["bytes_read"] == 3 * MiB
    out = tmp_path / "vda.qcow2"
    cli.run("restore", vm.name, "--repo", repo, "--disk", "vda", "--output", str(out))
    assert qemu_img_compare(vm.disks["vda"], out)


def test_failed_backup_releases_job_scratch_and_checkpoint(cli: Cli, vm: BareVM, tmp_path: Path) -> None:
    good = str(tmp_path / "good")
    cli.run("repo", "init", good, "--encrypt")
    vm.write("vda", 0, 4 * MiB, 0x66)
    backup(cli, vm, good)
    before = vm.checkpoints()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    try:
        cli.run("repo", "init", str(small / "repo"), "--encrypt", "--compression", "0")
        vm.write("vda", 16 * MiB, 24 * MiB, 0x77)
        r = backup(cli, vm, str(small / "repo"), ok=False)
        assert not r["ok"] and "full" in r["error"]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    assert vm.checkpoints() == before and not scratch_left(vm) and not vm.job_running()
    r = backup(cli, vm, good)
    assert r["ok"] and r["mode"] == "incremental" and r["bytes_read"] == 24 * MiB


def on_overlay(vm: BareVM) -> bool:
    """Whether a san backup holds the VM on its snapshot overlays."""
    return ".vmkeep-overlay" in virsh("domblklist", vm.name)


@pytest.mark.parametrize("transport", ["hotadd", "san"])
def test_ctrl_c_mid_backup_cleans_up(cli: Cli, repo: str, transport: str) -> None:
    machine = bare_vm.create({"vda": (512 * MiB, "qcow2")})
    try:
        machine.write("vda", 0, 4 * MiB, 0x12)
        backup(cli, machine, repo)
        before = machine.checkpoints()
        for i in range(0, 480, 8):  # many distinct chunks, so the incremental takes a while
            machine.write("vda", i * MiB, 8 * MiB, 0x80 + i // 8)
        proc = subprocess.Popen([VMKEEP, "backup", machine.name, "--repo", repo, "--transport", transport,
                                 "--workers", "1"], env=cli.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (on_overlay(machine) if transport == "san" else machine.job_running()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "interrupted" in err
        assert machine.checkpoints() == before and not scratch_left(machine) and not machine.job_running()
        assert not on_overlay(machine)  # san: the overlay was committed back and the VM pivoted
        assert len(cli.json("points", machine.name, "--repo", repo)["points"]) == 1  # nothing partial
        r = backup(cli, machine, repo)
        assert r["ok"] and r["mode"] == "incremental" and r["bytes_read"] == 480 * MiB
    finally:
        bare_vm.destroy(machine)


def test_restore_as_new_vm_and_over_the_original(cli: Cli, vm: BareVM, repo: str, tmp_path: Path) -> None:
    vm.write("vda", 2 * MiB, MiB, 0x21)
    vm.write("vdb", 0, MiB, 0x43)
    at_backup = {d: vm.snapshot(d, tmp_path / f"{d}.qcow2") for d in vm.disks}
    point = backup(cli, vm, repo)["point"]
    new = f"{vm.name}-copy"
    vm.extra.append(new)
    storage = bare_vm.IMAGES / vm.name / "copy"
    res = cli.json("restore", vm.name, "--repo", repo, "--as", new, "--storage", str(storage))
    assert res["started"] and virsh("domstate", new).strip() == "running"
    dumped = virsh("dumpxml", new)
    assert vm.name + "-copy" in dumped and virsh("domuuid", new) != virsh("domuuid", vm.name)
    assert bare_vm.MAC in virsh("domiflist", vm.name)
    copy_macs = re.findall(r"<mac address='([0-9a-f:]+)'/>", dumped)
    assert len(copy_macs) == 1 and copy_macs[0] != bare_vm.MAC  # one card, with a new address
    for disk, reference in at_backup.items():
        assert qemu_img_compare(reference, Path(res["disks"][disk]))
    proc = cli.run("restore", vm.name, "--repo", repo, "--as", new, ok=False)
    assert proc.returncode != 0 and "already exists" in proc.stderr

    vm.write("vda", 2 * MiB, MiB, 0x99)  # damage after the backup
    proc = cli.run("restore", vm.name, "--repo", repo, "--overwrite", ok=False)
    assert proc.returncode != 0 and "shut it off" in proc.stderr
    virsh("destroy", vm.name)
    cli.json("restore", f"{vm.name}@{point}", "--repo", repo, "--overwrite")
    assert qemu_img_compare(at_backup["vda"], vm.disks["vda"])
    assert vm.checkpoints() == []  # they described the replaced images
    virsh("start", vm.name)
    assert backup(cli, vm, repo)["mode"] == "full"


def test_uefi_variables_and_configuration_are_kept_sealed(cli: Cli, repo: str, tmp_path: Path) -> None:
    with bare_vm.running({"vda": (16 * MiB, "qcow2")}, uefi=True, start=False) as machine:
        variables = bare_vm.IMAGES / machine.name / "VARS.fd"
        with variables.open("r+b") as f:  # variables the guest set, as firmware would store them
            f.seek(0x50000)
            f.write(b"vmkeep-boot-order" * 64)
        saved = variables.read_bytes()
        point = backup(cli, machine, repo)["point"]
        # an encrypted repository keeps the configuration (XML with its passwords, the
        # variables) encrypted: nothing of it shows in the stored manifest
        stored = (Path(repo) / "points" / machine.name / f"{point}.json").read_bytes()
        assert b"domain" not in stored and b"OVMF" not in stored and b"vmkeep-boot-order" not in stored

        new = f"{machine.name}-copy"
        machine.extra.append(new)
        storage = bare_vm.IMAGES / machine.name / "copy"
        cli.json("restore", machine.name, "--repo", repo, "--as", new, "--storage", str(storage), "--no-start")
        copied = storage / f"{new}_VARS.fd"
        assert copied.read_bytes() == saved and f"<nvram>{copied}</nvram>" in virsh("dumpxml", new)

        variables.write_bytes(bare_vm.OVMF_VARS.read_bytes())  # the variables were reset since
        cli.json("restore", machine.name, "--repo", repo, "--overwrite")
        assert variables.read_bytes() == saved


def test_quiesce_modes_without_an_agent(cli: Cli, vm: BareVM, repo: str) -> None:
    r = backup(cli, vm, repo, "--quiesce", "required", ok=False)
    assert not r["ok"] and "cannot quiesce" in r["error"]
    assert vm.checkpoints() == [] and not vm.job_running()
    r = backup(cli, vm, repo, "--quiesce", "try")
    assert r["consistency"] == "crash" and any("not quiesced" in n for n in r["notes"])
    assert backup(cli, vm, repo, "--quiesce", "off")["consistency"] == "crash"


def test_raw_and_shareable_disks(cli: Cli, repo: str, tmp_path: Path) -> None:
    readonly = tmp_path / "readonly.qcow2"  # a read-only data volume: libvirt will not back it up
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(readonly), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(readonly)], check=True,
                   capture_output=True)
    vdd = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{readonly}'/>"
           "<target dev='vdd' bus='virtio'/><readonly/></disk>")
    machine = bare_vm.create({"vda": (16 * MiB, "qcow2"), "vdb": (8 * MiB, "raw"), "vdc": (8 * MiB, "raw")},
                             shareable=("vdc",), devices=vdd)
    try:
        machine.write("vdb", 0, MiB, 0x42)
        first = backup(cli, machine, repo, "--transport", "hotadd")
        assert set(first["disks"]) == {"vda", "vdb", "vdd"}  # the read-only disk from its image
        assert any("vdc is shareable" in n for n in first["notes"])
        assert any("vdb is raw" in n for n in first["notes"])
        assert any("vdd is read-only" in n for n in first["notes"]), first["notes"]
        assert first["disks"]["vdd"]["bytes_read"] == 2 * MiB
        machine.write("vda", 0, 64 * 1024, 0x01)
        second = backup(cli, machine, repo, "--transport", "san")
        assert second["mode"] == "incremental", second["reason"]
        assert second["disks"]["vdd"]["mode"] == "full" and second["disks"]["vdd"]["bytes_read"] == 2 * MiB
        out = tmp_path / "vdd.qcow2"
        cli.run("restore", machine.name, "--repo", repo, "--disk", "vdd", "--output", str(out))
        assert qemu_img_compare(readonly, out)
        assert second["disks"]["vdb"]["mode"] == "full" and second["disks"]["vda"]["mode"] == "incremental"
        assert second["bytes_read"] == 64 * 1024 + MiB + 2 * MiB  # vdb's and vdd's data read again in full
    finally:
        bare_vm.destroy(machine)


def test_inventory_and_a_passthrough_lun(cli: Cli, repo: str, tmp_path: Path) -> None:
    """A LUN handed through to the VM (the RDM case) can be neither snapshotted nor read through
    QEMU: the inventory marks it skipped and the backup names it; the other disks are described
    with their format, size and allocation, and backed up."""
    backing = tmp_path / "lun.img"
    with backing.open("wb") as f:
        f.truncate(8 * MiB)
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                          check=True).stdout.strip()
    lun = (f"<disk type='block' device='lun'><driver name='qemu' type='raw'/><source dev='{loop}'/>"
           "<target dev='sda' bus='scsi'/></disk>")
    machine = bare_vm.create({"vda": (32 * MiB, "qcow2"), "vdb": (8 * MiB, "raw")}, start=False, devices=lun)
    try:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 3M", str(machine.disks["vda"])],
                       check=True, capture_output=True)
        listed = {v["name"]: v for v in cli.json("inventory")["vms"]}
        me = listed[machine.name]
        assert me["state"] == "shut off" and me["host"]
        disks = {d["name"]: d for d in me["disks"]}
        assert (disks["vda"]["format"], disks["vda"]["size"], disks["vda"]["backup"]) == ("qcow2", 32 * MiB, True)
        assert 3 * MiB <= disks["vda"]["allocation"] < 32 * MiB  # what the image file holds
        assert (disks["vdb"]["format"], disks["vdb"]["size"]) == ("raw", 8 * MiB)
        assert not disks["sda"]["backup"] and "passthrough LUN" in disks["sda"]["skip_reason"]
        r = backup(cli, machine, repo)
        assert r["ok"] and set(r["disks"]) == {"vda", "vdb"} and r["disks"]["vda"]["bytes_read"] == 3 * MiB
        assert any("sda is a passthrough LUN" in n for n in r["notes"])
    finally:
        bare_vm.destroy(machine)
        subprocess.run(["losetup", "--detach", loop], check=False)


def test_several_vms_at_once(cli: Cli, repo: str) -> None:
    """--parallel 3: the three backup jobs run at the same time, each with its own progress bar
    (bytes, throughput, ETA) per disk."""
    machines = [bare_vm.create({"vda": (128 * MiB, "qcow2"), "vdb": (16 * MiB, "qcow2")}) for _ in range(3)]
    try:
        for i, m in enumerate(machines):
            m.write("vda", 0, 96 * MiB, 0x10 + i)  # distinct chunks: each backup takes a moment
            m.write("vdb", 0, MiB, 0x20 + i)
        proc = subprocess.Popen([VMKEEP, "backup", *(m.name for m in machines), "--repo", repo, "--parallel", "3",
                                 "--transport", "hotadd", "--workers", "1"], env=cli.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        most = 0
        while proc.poll() is None:  # backup jobs alive at one moment
            most = max(most, sum(m.job_running() for m in machines))
        out, bars = proc.communicate()
        assert proc.returncode == 0, bars
        assert most >= 2, "the VMs were backed up one after another"
        for m in machines:
            assert re.search(rf"{m.name} vda .* 96\.0/96\.0 MiB +[0-9.]+ [kMG]?B/s +\d+:\d\d:\d\d", bars), bars
            assert re.search(rf"{m.name} vdb .* 1\.0/1\.0 MiB", bars), bars
            assert m.name in out
        assert {p["name"] for p in cli.json("points", "--repo", repo)["points"]} == {m.name for m in machines}
        missing = cli.run("backup", machines[0].name, "no-such-vm", "--repo", repo, "--json", ok=False)
        assert missing.returncode == 1  # one VM failing fails the run, the other still gets its point
        by_vm = {r["vm"]: r for r in json.loads(missing.stdout)["vms"]}
        assert by_vm[machines[0].name]["ok"] and "no VM named 'no-such-vm'" in by_vm["no-such-vm"]["error"]
    finally:
        for m in machines:
            bare_vm.destroy(m)


def _stop_cleanly(vm: BareVM) -> None:
    """Stop QEMU the way a guest shutdown would: images closed, bitmaps stored consistently."""
    virsh("qemu-monitor-command", vm.name, '{"execute":"quit"}', check=False)
    deadline = time.monotonic() + 30
    while virsh("domstate", vm.name).strip() != "shut off":
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_shut_off_vm_incremental_from_its_bitmap(cli: Cli, vm: BareVM, repo: str, tmp_path: Path) -> None:
    vm.write("vda", 0, 4 * MiB, 0x01)
    backup(cli, vm, repo)
    vm.write("vda", 8 * MiB, MiB, 0x02)
    _stop_cleanly(vm)
    off = backup(cli, vm, repo)
    assert off["transport"] == "offline" and off["mode"] == "incremental", off["reason"]
    assert off["bytes_read"] == MiB
    out = tmp_path / "off.qcow2"
    cli.run("restore", vm.name, "--repo", repo, "--disk", "vda", "--output", str(out))
    assert qemu_img_compare(vm.disks["vda"], out)

    virsh("start", vm.name)
    vm.write("vda", 16 * MiB, MiB, 0x03)
    on = backup(cli, vm, repo)
    assert on["mode"] == "incremental" and on["bytes_read"] == 2 * MiB  # a superset: since the checkpoint
    snap = vm.snapshot("vda", tmp_path / "now.qcow2")
    out2 = tmp_path / "on.qcow2"
    cli.run("restore", vm.name, "--repo", repo, "--disk", "vda", "--output", str(out2))
    assert qemu_img_compare(snap, out2)

    vm.write("vda", 24 * MiB, MiB, 0x04)
    qemu_pid = int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text())
    os.kill(qemu_pid, signal.SIGKILL)  # a crash: the bitmap is left marked in use
    deadline = time.monotonic() + 30
    while virsh("domstate", vm.name).strip() != "shut off":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    crashed = backup(cli, vm, repo)
    assert crashed["mode"] == "full" and "cannot be used" in crashed["reason"]
    out3 = tmp_path / "crashed.qcow2"
    cli.run("restore", vm.name, "--repo", repo, "--disk", "vda", "--output", str(out3))
    assert qemu_img_compare(vm.disks["vda"], out3)


def test_leftovers_of_dead_runs_are_swept(cli: Cli, vm: BareVM, repo: str) -> None:
    hour_ago = time.time() - 3600
    made = {}
    for kind in ("empty", "dead-socket", "live-socket", "scratch-file", "fresh"):
        d = SCRATCH_ROOT / f"vmkeep-sweep-{kind}-{os.getpid()}"
        d.mkdir(parents=True)
        made[kind] = d
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(made["dead-socket"] / "nbd.sock"))
    dead.close()  # bound, never listening: what a killed qemu-nbd or QEMU export leaves
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(made["live-socket"] / "nbd.sock"))
    live.listen()
    (made["scratch-file"] / "vda.qcow2").write_bytes(b"QFI\xfb")
    for kind, d in made.items():
        if kind != "fresh":
            os.utime(d, (hour_ago, hour_ago))
    try:
        vm.write("vda", 0, MiB, 0x31)
        assert backup(cli, vm, repo, "--transport", "hotadd")["ok"]
        assert {k for k, d in made.items() if d.exists()} == {"live-socket", "scratch-file", "fresh"}
    finally:
        live.close()
        for d in made.values():
            shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("transport", ["hotadd", "san"])
def test_the_vm_is_let_go_once_the_reads_are_done(vm: BareVM, tmp_path: Path, transport: str) -> None:
    """Once the engine's last read returned, the san overlays are committed back (the VM runs on
    its own images again) or the backup job ends, while the point is still being stored. A failure
    after that still drops the new checkpoint, and the next incremental sees every write."""
    repo = Repository.init(FilesystemBackend(tmp_path / "repo"), chunk_size=MiB, compression=1, encrypt=False,
                           credentials=Credentials())
    connector = LibvirtConnector(bare_vm.URI)

    def holding() -> bool:
        return on_overlay(vm) if transport == "san" else vm.job_running()

    def back_up() -> Manifest:
        return backup_vm(repo, connector, vm.name, transports=[transport], quiesce="off")

    held_at_commit: list[bool] = []

    def commit_fails(manifest: Manifest) -> None:
        deadline = time.monotonic() + 10
        while holding() and time.monotonic() < deadline:
            time.sleep(0.01)
        held_at_commit.append(holding())
        raise OSError(28, "No space left on device")  # the repository fills up at the very end

    try:
        vm.write("vda", 0, MiB, 0x01)
        back_up()
        parent = vm.checkpoints()
        vm.write("vda", 8 * MiB, MiB, 0x02)
        repo.commit_point = commit_fails  # type: ignore[method-assign]
        with pytest.raises(OSError, match="No space"):
            back_up()
        assert held_at_commit == [False]  # let go before the point was to be committed
        assert vm.checkpoints() == parent and not scratch_left(vm) and not vm.job_running()
        assert not on_overlay(vm) and len(repo.list_points(vm.name)) == 1
        del repo.commit_point
        at_point = vm.snapshot("vda", tmp_path / "at.qcow2")
        point = back_up()
        assert point.meta["mode"] == "incremental" and point.disks["vda"].stats["bytes_read"] == MiB
        restore_image(repo, vm.name, point.point_id, tmp_path / "vda.qcow2", disk="vda", workers=2)
        assert qemu_img_compare(at_point, tmp_path / "vda.qcow2")
    finally:
        connector.close()
