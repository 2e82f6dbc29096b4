"""VM replicas: a powered-off copy on another libvirt host kept at each new point by writing only
the slots that changed, failed over (started) and failed back (its changes copied into the
original). "Another host" is the lab's libvirtd reached over qemu+tls:// from the proxy network
namespace, so every byte goes through libvirt volume uploads and downloads; the local data path
(files written in place) is checked beside it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import bare_vm
from tests.bare_vm import BareVM
from tests.conftest import VMKEEP, Cli, MiB, fresh_cli, qemu_img_compare
from vmkeep.lab.netns import create_proxy_network, destroy_proxy_network
from vmkeep.lab.tls import PROXY_NETWORK_GATEWAY

REMOTE_URI = f"qemu+tls://{PROXY_NETWORK_GATEWAY}/system"
LOCAL_URI = bare_vm.URI
NS = "https://vmkeep.dev/xmlns/replica/1"  # where a replica keeps its record in its domain metadata
SLOT = 4 * MiB  # the repository's chunk size: what a replica update writes per changed slot


@dataclass
class Lab:
    vm: BareVM
    repo: str
    proxy: list[str]  # runs a command in the other network namespace
    storage: Path
    cli: Cli

    def backup(self) -> dict:
        out = self.cli.json("backup", self.vm.name, "--repo", self.repo)["vms"][0]
        assert out["ok"], out
        return dict(out)

    def remote(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        """`vmkeep ARGS` from the other network: the host is not this machine for it."""
        proc = subprocess.run([*self.proxy, VMKEEP, *args], capture_output=True, text=True, env=self.cli.env,
                              timeout=300)
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
        return proc

    def replicate(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        return self.remote("replicate", self.vm.name, "--to", REMOTE_URI, "--repo", self.repo, *args, ok=ok)

    def replicas(self) -> dict[str, dict]:
        listed = json.loads(self.remote("replicas", "--to", REMOTE_URI, "--json").stdout)["replicas"]
        return {r["name"]: r for r in listed}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    proxy = create_proxy_network()
    try:
        with bare_vm.running({"vda": (64 * MiB, "qcow2")}) as vm:
            cli = fresh_cli()
            repo = str(tmp_path_factory.mktemp("replica") / "repo")
            cli.run("repo", "init", repo, "--encrypt")
            yield Lab(vm, repo, proxy, bare_vm.IMAGES / vm.name / "replicas", cli)
    finally:
        destroy_proxy_network()


def state(name: str) -> str:
    return bare_vm.virsh("domstate", name).strip()


def test_replica_follows_points_fails_over_and_back(lab: Lab, tmp_path: Path) -> None:
    vm = lab.vm
    replica = f"{vm.name}-replica"
    vm.extra.append(replica)
    disk = lab.storage / f"{replica}-vda.raw"
    vm.write("vda", 0, 6 * MiB, 0x11)  # slots 0 and 1
    vm.write("vda", 40 * MiB, 2 * MiB, 0x12)  # slot 10
    at = vm.snapshot("vda", tmp_path / "p0.qcow2")
    lab.backup()

    full = json.loads(lab.replicate("--storage", str(lab.storage), "--network", "none", "--json").stdout)
    assert full["mode"] == "full" and full["bytes_written"] == 3 * SLOT and full["extents"] == 2, full
    assert state(replica) == "shut off" and qemu_img_compare(at, disk)
    assert disk.stat().st_blocks * 512 <= 3 * SLOT + MiB  # the holes stayed holes
    assert "<interface" not in bare_vm.virsh("dumpxml", replica)  # --network none
    assert lab.replicas()[replica]["state"] == "standby"

    # three incrementals: the replica gets exactly the slots that changed, zeroed ones included
    steps = [
        ([(20 * MiB, MiB, 0x21)], [], 1, 1),  # slot 5
        ([(8 * MiB, 2 * MiB, 0x22), (60 * MiB, 4 * MiB, 0x23)], [], 2, 2),  # slots 2 and 15
        ([(13 * MiB, MiB, 0x24)], [(40 * MiB, 4 * MiB)], 2, 2),  # slot 3, and slot 10 trimmed to zeros
    ]
    for writes, discards, slots, runs in steps:
        for offset, length, pattern in writes:
            vm.write("vda", offset, length, pattern)
        for offset, length in discards:
            vm.discard("vda", offset, length)
        at = vm.snapshot("vda", tmp_path / "at.qcow2")
        point = lab.backup()["point"]
        step = json.loads(lab.replicate("--json").stdout)
        assert step["mode"] == "incremental" and step["point"] == point, step
        assert step["bytes_written"] == slots * SLOT and step["extents"] == runs, step
        assert step["bytes_zeroed"] == (SLOT if discards else 0) and step["bytes_read_back"] == 0
        assert qemu_img_compare(at, disk), f"replica differs from point {point}"
    assert json.loads(lab.replicate("--json").stdout)["mode"] == "unchanged"

    # failover: the replica starts; it is not updated while it runs
    lab.remote("failover", vm.name, "--to", REMOTE_URI, "--network", "none")
    assert state(replica) == "running" and lab.replicas()[replica]["state"] == "failed-over"
    running = lab.replicate(ok=False)
    assert "is running" in running.stderr and lab.replicas()[replica]["state"] == "failed-over"
    BareVM(replica, {"vda": disk}).write("vda", 30 * MiB, MiB, 0x31)  # slot 7, from the replica's "guest"
    refused = lab.cli.run("failback", vm.name, "--to", LOCAL_URI, "--repo", lab.repo, ok=False)
    assert "is running" in refused.stderr
    bare_vm.virsh("destroy", replica)
    refused = lab.cli.run("failback", vm.name, "--to", LOCAL_URI, "--repo", lab.repo, ok=False)
    assert "running" in refused.stderr and f"VM {vm.name}" in refused.stderr  # the original must be off too
    assert lab.replicas()[replica]["state"] == "failed-over"

    # failback: only the slot the replica changed goes into the original
    bare_vm.virsh("destroy", vm.name)
    back = lab.cli.json("failback", vm.name, "--to", LOCAL_URI, "--repo", lab.repo)
    assert back["bytes_written"] == SLOT and back["extents"] == 1 and back["bytes_read_back"] > 0, back
    assert qemu_img_compare(vm.disks["vda"], disk)
    assert lab.replicas()[replica]["state"] == "diverged"

    # the original runs again; its next point has the failback (the dirty bitmap saw it) and a
    # new write; the replica's update reads it back, compares, and writes only what differs
    bare_vm.virsh("start", vm.name)
    vm.write("vda", 50 * MiB, MiB, 0x41)  # slot 12
    at = vm.snapshot("vda", tmp_path / "after.qcow2")
    after = lab.backup()
    assert after["mode"] == "incremental" and after["bytes_read"] == SLOT + MiB, after
    restored = tmp_path / "after-restored.qcow2"
    lab.cli.run("restore", vm.name, "--repo", lab.repo, "--disk", "vda", "--output", str(restored))
    assert qemu_img_compare(at, restored)
    again = json.loads(lab.replicate("--json").stdout)
    assert again["mode"] == "compare" and again["bytes_written"] == SLOT and again["extents"] == 1, again
    assert qemu_img_compare(at, disk) and lab.replicas()[replica]["state"] == "standby"


def test_local_replica_and_refusals(lab: Lab, tmp_path: Path) -> None:
    """On the proxy's own host the disks are written as files; a name taken by a VM that is not a
    replica is refused and nothing is touched."""
    vm = lab.vm
    before = bare_vm.virsh("dumpxml", "--inactive", vm.name)
    taken = lab.replicate("--name", vm.name, "--storage", str(lab.storage / "taken"), ok=False)
    assert "not a vmkeep replica" in taken.stderr
    assert bare_vm.virsh("dumpxml", "--inactive", vm.name) == before and not (lab.storage / "taken").exists()

    local = f"{vm.name}-local"
    vm.extra.append(local)
    disk = lab.storage / f"{local}-vda.raw"
    at = vm.snapshot("vda", tmp_path / "p.qcow2")
    lab.backup()
    first = lab.cli.json("replicate", vm.name, "--to", LOCAL_URI, "--repo", lab.repo, "--name", local,
                         "--storage", str(lab.storage))
    assert first["mode"] == "full" and qemu_img_compare(at, disk)
    vm.write("vda", 33 * MiB, 2 * MiB, 0x51)  # slot 8
    vm.write("vda", 40 * MiB, MiB, 0x52)  # slot 10, zero before
    at = vm.snapshot("vda", tmp_path / "q.qcow2")
    lab.backup()
    second = lab.cli.json("replicate", vm.name, "--to", LOCAL_URI, "--repo", lab.repo, "--name", local)
    assert second["mode"] == "incremental" and second["bytes_written"] == 2 * SLOT and second["extents"] == 2
    assert qemu_img_compare(at, disk)

    # an update that died half-way (its metadata says so, one slot holds garbage): the next run
    # reads the disk back and rewrites that slot alone
    with disk.open("r+b") as f:
        f.seek(3 * SLOT + 5000)
        f.write(b"half-written" * 1000)
    record = bare_vm.virsh("metadata", local, NS, "--config").strip()
    bare_vm.virsh("metadata", local, NS, "--config", "--key", "vmkeep-replica", "--set",
                  record.replace('state="standby"', 'state="updating"'))
    third = lab.cli.json("replicate", vm.name, "--to", LOCAL_URI, "--repo", lab.repo, "--name", local)
    assert third["mode"] == "compare" and third["bytes_written"] == SLOT and third["bytes_read_back"] > 0, third
    assert qemu_img_compare(at, disk)
