"""VM replicas: a powered-off copy on another libvirt host kept at each new point by writing only
the slots that changed, failed over (started) and failed back (its changes copied into the
original). "Another host" is the lab's libvirtd reached over qemu+tls:// from the proxy network
namespace, so every byte goes through libvirt volume uploads and downloads; the local data path
(files written in place) is checked beside it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import bare_vm
from tests.bare_vm import BareVM
from tests.conftest import VMKEEP, Cli, MiB, fresh_cli, qemu_img_compare
from vmkeep.engine.replica_sync import write_slots
from vmkeep.errors import UsageError
from vmkeep.hypervisors.libvirt.replica import _replica_xml, check_pool
from vmkeep.hypervisors.libvirt.replica_disks import FileDisk, volume_stamp
from vmkeep.lab.netns import create_proxy_network, destroy_proxy_network
from vmkeep.lab.tls import PROXY_NETWORK_GATEWAY
from vmkeep.repository.index import DiskIndex
from vmkeep.repository.repo import Repository

REMOTE_URI = f"qemu+tls://{PROXY_NETWORK_GATEWAY}/system"
LOCAL_URI = bare_vm.URI
NS = "https://vmkeep.dev/xmlns/replica/1"  # where a replica keeps its record in its domain metadata
SLOT = 4 * MiB  # the repository's chunk size: what a replica update writes per changed slot


@dataclass
class Lab:
    vm: BareVM  # vda (qcow2, written); vdb read-only (raw, 1 MiB of data); vdc shareable (skipped by backup)
    readonly: Path  # vdb's image
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
    readonly = bare_vm.IMAGES / f"vmkeep-t-ro-{secrets.token_hex(3)}.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(readonly), str(4 * MiB)], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x61 {MiB} {MiB}", str(readonly)], check=True,
                   capture_output=True)
    vdb = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{readonly}'/>"
           "<target dev='vdb' bus='virtio'/><readonly/></disk>")
    try:
        vm = bare_vm.create({"vda": (64 * MiB, "qcow2"), "vdc": (4 * MiB, "raw")}, shareable=("vdc",), devices=vdb)
        try:
            cli = fresh_cli()
            repo = str(tmp_path_factory.mktemp("replica") / "repo")
            cli.run("repo", "init", repo, "--encrypt")
            yield Lab(vm, readonly, repo, proxy, bare_vm.IMAGES / vm.name / "replicas", cli)
        finally:
            bare_vm.destroy(vm)
    finally:
        readonly.unlink(missing_ok=True)
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
    # vda's three slots, and vdb's one: a read-only disk is in the point, and so in the replica
    assert full["mode"] == "full" and full["bytes_written"] == 4 * SLOT and full["extents"] == 3, full
    assert state(replica) == "shut off" and qemu_img_compare(at, disk)
    assert qemu_img_compare(lab.readonly, lab.storage / f"{replica}-vdb.raw")
    assert disk.stat().st_blocks * 512 <= 3 * SLOT + MiB  # the holes stayed holes
    xml = bare_vm.virsh("dumpxml", replica)
    assert "<interface" not in xml  # --network none
    targets = [t.get("dev") for t in ET.fromstring(xml).iter("target") if t.get("dev", "").startswith("vd")]
    assert sorted(targets) == ["vda", "vdb"] and str(lab.vm.disks["vdc"]) not in xml  # the shareable disk left out
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

    # a standby replica written outside vmkeep (its record still says standby): the next run sees
    # its disk's stamp changed (here through the volume's timestamps) and compares
    scribble(disk, 9 * SLOT)
    touched = json.loads(lab.replicate("--json").stdout)
    assert touched["mode"] == "compare" and touched["bytes_written"] == SLOT and touched["extents"] == 1, touched
    assert qemu_img_compare(at, disk) and json.loads(lab.replicate("--json").stdout)["mode"] == "unchanged"

    # the original keeps running after its last point (slot 14: no point has it), then is lost
    vm.write("vda", 56 * MiB, MiB, 0x3A)

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

    # failback: the original becomes the replica, whatever it held: the slot the replica changed
    # (7) and the one the original wrote after its point (14, back to the replica's zeros) go in
    bare_vm.virsh("destroy", vm.name)
    back = lab.cli.json("failback", vm.name, "--to", LOCAL_URI, "--repo", lab.repo)
    assert back["bytes_written"] == 2 * SLOT and back["extents"] == 2 and back["bytes_zeroed"] == SLOT, back
    assert back["bytes_read_back"] >= 2 * 3 * SLOT, back  # both disks read (their data slots at least)
    assert qemu_img_compare(vm.disks["vda"], disk)
    assert lab.replicas()[replica]["state"] == "diverged"

    # the original runs again; its next point has the failback (the dirty bitmap saw it) and a
    # new write; the replica's update reads it back, compares, and writes only what differs
    bare_vm.virsh("start", vm.name)
    vm.write("vda", 50 * MiB, MiB, 0x41)  # slot 12
    at = vm.snapshot("vda", tmp_path / "after.qcow2")
    after = lab.backup()
    # vda: slots 7 and 14 of the failback and the new MiB; vdb (read-only) is read whole, as allocated
    read_only = lab.readonly.stat().st_blocks * 512
    assert after["mode"] == "incremental" and after["bytes_read"] == 2 * SLOT + MiB + read_only, after
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

    # a standby replica written outside vmkeep keeps its record: its file's stamp tells, and the
    # next run (same point) compares and repairs the slot instead of finding nothing to do
    scribble(disk, 6 * SLOT)
    fourth = lab.cli.json("replicate", vm.name, "--to", LOCAL_URI, "--repo", lab.repo, "--name", local)
    assert fourth["mode"] == "compare" and fourth["bytes_written"] == SLOT, fourth
    assert qemu_img_compare(at, disk)
    # booted and stopped outside vmkeep (a bare VM writes nothing): a compare pass that writes nothing
    bare_vm.virsh("start", local)
    bare_vm.virsh("destroy", local)
    fifth = lab.cli.json("replicate", vm.name, "--to", LOCAL_URI, "--repo", lab.repo, "--name", local)
    assert fifth["mode"] == "compare" and fifth["bytes_written"] == 0, fifth
    assert lab.cli.json("replicate", vm.name, "--to", LOCAL_URI, "--repo", lab.repo, "--name", local)["mode"] == \
        "unchanged"


def scribble(disk: Path, offset: int) -> None:
    """Write into a replica's disk file behind vmkeep's back."""
    with disk.open("r+b") as f:
        f.seek(offset + 5000)
        f.write(b"outside" * 1000)


def test_replica_configuration_and_pools() -> None:
    """Disks the point does not hold are left out of the replica's configuration (they would name
    the original host's shared image or LUN); pools whose new volumes may hold old data are refused."""
    xml = ("<domain><name>web</name><devices>"
           "<disk type='file' device='disk'><driver type='qcow2'/><source file='/i/web.qcow2'/><target dev='vda'/>"
           "</disk><disk type='file' device='disk'><driver type='raw'/><source file='/i/ro.raw'/><target dev='vdb'/>"
           "<readonly/></disk><disk type='file' device='disk'><source file='/i/shared.raw'/><target dev='vdc'/>"
           "<shareable/></disk><disk type='block' device='lun'><source dev='/dev/sdz'/><target dev='sda'/></disk>"
           "<disk type='file' device='cdrom'><target dev='hdc'/></disk></devices></domain>")
    out = ET.fromstring(_replica_xml(xml, "web-replica", {"vda": Path("/r/a.raw"), "vdb": Path("/r/b.raw")}, None))
    disks = {d.find("target").get("dev"): d for d in out.iter("disk")}  # type: ignore[union-attr]
    assert list(disks) == ["vda", "vdb", "hdc"]
    assert disks["vdb"].find("readonly") is not None and disks["vdb"].find("source").get("file") == "/r/b.raw"  # type: ignore[union-attr]
    assert {d.find("driver").get("type") for t, d in disks.items() if t != "hdc"} == {"raw"}  # type: ignore[union-attr]

    for kind in ("logical", "iscsi", "disk", "rbd"):
        with pytest.raises(UsageError, match=f"type '{kind}'.*give --storage a pool of type dir, fs, netfs"):
            check_pool("vg0", f"<pool type='{kind}'><name>vg0</name><target><path>/dev/vg0</path></target></pool>",
                       "dr-host")
    for kind in ("dir", "fs", "netfs"):
        check_pool("p", f"<pool type='{kind}'><name>p</name><target><path>/p</path></target></pool>", "dr-host")

    # libvirt writes a volume's times as SECONDS[.NANOSECONDS]: the same stamp as a local stat's
    vol = ("<volume><capacity unit='bytes'>67108864</capacity><target><timestamps><atime>1.5</atime>"
           "<mtime>1700000000.000001200</mtime><ctime>1700000001</ctime></timestamps></target></volume>")
    assert volume_stamp(vol) == f"67108864:{1700000000 * 10**9 + 1200}:{1700000001 * 10**9}"


def test_zeroed_slots_counted_in_one_thread(tmp_path: Path) -> None:
    """A local file is zeroed by the workers; the count of zeroed bytes is kept by the caller alone."""
    slots, size = 2000, 4096
    with (tmp_path / "disk.raw").open("w+b") as f:
        os.ftruncate(f.fileno(), slots * size)
        stats = write_slots(Repository.__new__(Repository), DiskIndex.empty(slots * size, size),
                            FileDisk(f.fileno(), slots * size), list(range(slots)), workers=8)
    assert stats.bytes_zeroed == stats.bytes_written == slots * size and stats.extents == 1
