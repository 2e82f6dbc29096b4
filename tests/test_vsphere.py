"""VMware vSphere against govmomi's simulator (vcsim over HTTPS with the lab certificate): inventory,
CBT, snapshots, backups read over the datastore's HTTPS, restores streamed through an NFC import
lease (the lab's simulator really decodes the streamOptimized VMDK) or over the original's disks,
incrementals through the test-only CBT shim, and a policy run by a proxy through the server."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pyVmomi import vim

from tests.conftest import Cli, MiB, free_port, qemu_img_compare
from tests.vcsim_cbt import CbtShim
from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.vmware import devices
from vmkeep.hypervisors.vmware.connector import VsphereConnector
from vmkeep.hypervisors.vmware.session import Session, Target
from vmkeep.hypervisors.vmware.stream_vmdk import StreamVmdk
from vmkeep.lab import vcsim


@pytest.fixture(scope="session")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[vcsim.Vcsim]:
    """A simulator of the tests' own (the lab's `vmkeep lab vcsim`, if running, is left alone)."""
    state = tmp_path_factory.mktemp("vcsim")
    started = vcsim.start(f"127.0.0.1:{free_port()}", lab_vm=False, state=state)
    try:
        yield started
    finally:
        vcsim.stop(state)


@pytest.fixture
def env(cli: Cli, sim: vcsim.Vcsim) -> dict[str, str]:
    cli.env.update(sim.env())
    return cli.env


def session(sim: vcsim.Vcsim) -> Session:
    return Session(Target.parse(sim.address), sim.password, ca_file=sim.ca_file)


def vm_props(sim: vcsim.Vcsim, name: str, paths: list[str]) -> dict[str, Any]:
    s = session(sim)
    try:
        vm = next(o for o, p in s.collect(vim.VirtualMachine, ["name"]) if p["name"] == name)
        return s.one(vm, paths)
    finally:
        s.close()


def new_vm(sim: vcsim.Vcsim, name: str, *extra_modes: str, networks: tuple[str, ...] = ()) -> Path:
    """A VM with the lab's known data in two places of its 64 MiB disk; its flat file."""
    flat = vcsim.create_vm(sim, name, 64 * MiB, extra_disk_modes=extra_modes, networks=networks)
    with flat.open("r+b") as f:
        for offset, length in ((0, 8 * MiB), (32 * MiB, 4 * MiB)):
            f.seek(offset)
            f.write(vcsim.lab_pattern(offset, length))
    return flat


def backup(cli: Cli, address: str, vm: str, repo: str, *args: str) -> dict[str, Any]:
    return backup_logged(cli, address, vm, repo, *args)[0]


def backup_logged(cli: Cli, address: str, vm: str, repo: str, *args: str) -> tuple[dict[str, Any], str]:
    """The backup's result and its standard error (the log lines)."""
    proc = cli.run("backup", vm, "--host", address, "--repo", repo, "--json", *args, ok=False)
    result = json.loads(proc.stdout)["vms"][0]
    assert result["ok"], result
    return dict(result), proc.stderr


def test_inventory_certificate_and_skipped_disks(cli: Cli, sim: vcsim.Vcsim, env: dict[str, str]) -> None:
    new_vm(sim, "vc-mixed", "independent_persistent")
    listed = cli.json("inventory", "--host", sim.address)
    found = {v["name"]: v for v in listed["vms"]}
    estate = listed["topology"]
    assert estate["datacenters"] == ["DC0"] and [c["hosts"] for c in estate["clusters"]] == [["DC0_C0_H0",
                                                                                              "DC0_C0_H1"]]
    assert [d["name"] for d in estate["datastores"]] == ["LocalDS_0"] and estate["datastores"][0]["free"] > 0
    disks = {d["name"]: d for d in found["vc-mixed"]["disks"]}
    assert disks["scsi0-0"]["backup"] and disks["scsi0-0"]["size"] == 64 * MiB
    assert disks["scsi0-0"]["datastore"] == "LocalDS_0" and found["vc-mixed"]["folder"].startswith("DC0")
    assert not disks["scsi0-1"]["backup"] and "independent" in disks["scsi0-1"]["skip_reason"]
    # certificate checks are on: without the lab CA the simulator's certificate is refused
    untrusted = cli.run("inventory", "--host", sim.address, ok=False, env={"VMKEEP_VSPHERE_CA_FILE": ""})
    assert untrusted.returncode != 0 and "does not check out" in untrusted.stderr and "--insecure" in untrusted.stderr
    assert cli.run("inventory", "--host", sim.address, "--insecure", env={"VMKEEP_VSPHERE_CA_FILE": ""})
    wrong = cli.run("inventory", "--host", sim.address, ok=False, env={"VMKEEP_HOST_PASSWORD": "wrong"})
    assert "refused the login" in wrong.stderr


def test_raw_device_mappings_are_skipped_with_their_name() -> None:
    rdm = vim.vm.device.VirtualDisk(key=2001, controllerKey=1000, unitNumber=1, capacityInKB=1024,
                                    backing=vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo(
                                        compatibilityMode="physicalMode", fileName="[ds] a/a_1.vmdk"))
    scsi = vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0)
    (disk,) = devices.disks([scsi, rdm])
    assert not disk.backup and disk.name == "scsi0-1" and "raw device mapping" in disk.skip_reason


def test_full_backup_and_restore_as_a_new_vm(cli: Cli, sim: vcsim.Vcsim, env: dict[str, str],
                                            tmp_path: Path) -> None:
    flat = new_vm(sim, "vc-full", "independent_persistent", networks=("VM Network", "DC0_DVPG0"))
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    assert not vm_props(sim, "vc-full", ["config.changeTrackingEnabled"]).get("config.changeTrackingEnabled")
    at_backup = tmp_path / "at-backup.raw"
    at_backup.write_bytes(flat.read_bytes())
    full = backup(cli, sim.address, "vc-full", repo)
    assert full["mode"] == "full" and full["transport"] == "https"
    notes = " ".join(full["notes"])
    assert "changed block tracking was off: turned on" in notes and "VDDK" in notes and "independent" in notes
    assert list(full["disks"]) == ["scsi0-0"]
    after = vm_props(sim, "vc-full", ["config.changeTrackingEnabled", "snapshot"])
    assert after["config.changeTrackingEnabled"] and not getattr(after.get("snapshot"), "rootSnapshotList", None)

    restored = cli.json("restore", "vc-full", "--host", sim.address, "--repo", repo, "--as", "vc-full-copy",
                        "--no-start")
    assert restored["disks"] == {"scsi0-0": "[LocalDS_0] vc-full-copy/vc-full-copy.vmdk"}
    (lease,) = [x for x in sim.nfc_leases() if x["vm"] == "vc-full-copy"]
    assert lease["state"] == "done" and list(lease["uploads"]) == ["vc-full-copy.vmdk"]
    assert lease["bytes"] < 2 * MiB  # 12 MiB of the lab's (very compressible) pattern in a 64 MiB disk
    copy = Path(sim.datastores[0]) / "vc-full-copy" / "vc-full-copy-flat.vmdk"
    assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(at_backup), str(copy)]
                          ).returncode == 0
    made = vm_props(sim, "vc-full-copy", ["config.annotation", "config.uuid", "runtime.powerState", "network",
                                          "config.hardware.device"])
    original = vm_props(sim, "vc-full", ["config.uuid", "network", "config.hardware.device"])
    assert "restored by vmkeep" in made["config.annotation"] and str(made["runtime.powerState"]) == "poweredOff"
    assert made["config.uuid"] != original["config.uuid"]  # a new identity

    def nics(props: dict[str, Any]) -> list[str]:
        return [d.macAddress for d in props["config.hardware.device"]
                if isinstance(d, vim.vm.device.VirtualEthernetCard)]

    assert len(nics(made)) == 2 and not set(nics(made)) & set(nics(original))  # its own MACs
    assert sorted(n._moId for n in made["network"]) == sorted(n._moId for n in original["network"])  # same networks
    again = cli.run("restore", "vc-full", "--host", sim.address, "--repo", repo, "--as", "vc-full-copy", ok=False)
    assert "already exists" in again.stderr
    assert not list(Path("/tmp").glob("vmkeep-restore-vc-full-*"))  # nothing staged on the proxy

    # placed where the administrator says: another host, another folder
    s = session(sim)
    try:
        dc = s.content.rootFolder.childEntity[0]
        dc.vmFolder.CreateFolder("restored")
    finally:
        s.close()
    lost = cli.run("restore", "vc-full", "--host", sim.address, "--repo", repo, "--as", "vc-placed", "--folder",
                   "DC0/nowhere", ok=False)
    assert "no VM folder 'DC0/nowhere'" in lost.stderr and not list(Path("/tmp").glob("vmkeep-restore-vc-*"))
    cli.run("restore", "vc-full", "--host", sim.address, "--repo", repo, "--as", "vc-placed", "--no-start",
            "--folder", "DC0/restored", "--esx-host", "DC0_C0_H1")
    placed = vm_props(sim, "vc-placed", ["parent", "runtime.host"])
    s = session(sim)
    try:
        assert s.one(placed["parent"], ["name"])["name"] == "restored"
        assert s.one(placed["runtime.host"], ["name"])["name"] == "DC0_C0_H1"
    finally:
        s.close()

    # over the original: its disk back as it was, and tracking reset so the next backup is full
    with flat.open("r+b") as f:
        f.write(b"ransomware" * 1000)
    cli.run("restore", "vc-full", "--host", sim.address, "--repo", repo, "--overwrite")
    assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(at_backup), str(flat)]
                          ).returncode == 0
    assert not list(Path("/tmp").glob("vmkeep-restore-vc-full-*"))
    s = session(sim)
    try:
        vm = next(o for o, p in s.collect(vim.VirtualMachine, ["name"]) if p["name"] == "vc-full")
        s.wait(vm.CreateSnapshot_Task(name="mine", memory=False, quiesce=False), "snapshot")
    finally:
        s.close()
    refused = cli.run("restore", "vc-full", "--host", sim.address, "--repo", repo, "--overwrite", ok=False)
    assert refused.returncode != 0 and "has snapshots" in refused.stderr


def test_restore_streams_only_the_data(cli: Cli, sim: vcsim.Vcsim, env: dict[str, str], tmp_path: Path) -> None:
    """A 512 MiB disk holding 17 MiB of random data: the import moves about 17 MiB, and the new
    VM's disk reads back byte for byte; over the original, the PUT brings the disk back too."""
    flat = vcsim.create_vm(sim, "vc-sparse", 512 * MiB)
    with flat.open("r+b") as f:
        f.write(os.urandom(MiB))
        f.seek(300 * MiB + 4096)  # not on a grain boundary: two partial grains at the ends
        f.write(os.urandom(16 * MiB))
    at_backup = tmp_path / "at-backup.raw"
    at_backup.write_bytes(flat.read_bytes())
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    backup(cli, sim.address, "vc-sparse", repo)
    cli.run("restore", "vc-sparse", "--host", sim.address, "--repo", repo, "--as", "vc-sparse-copy", "--no-start")
    copy = Path(sim.datastores[0]) / "vc-sparse-copy" / "vc-sparse-copy-flat.vmdk"
    assert qemu_img_compare(at_backup, copy) and copy.stat().st_size == 512 * MiB
    (lease,) = [x for x in sim.nfc_leases() if x["vm"] == "vc-sparse-copy"]
    assert lease["state"] == "done"
    assert 17 * MiB < lease["bytes"] < 17 * MiB * 1.02 + 256 * 1024, lease  # the data, not the 512 MiB

    with flat.open("r+b") as f:
        f.seek(200 * MiB)
        f.write(os.urandom(MiB))  # where the point has zeros: the PUT must send them
    cli.run("restore", "vc-sparse", "--host", sim.address, "--repo", repo, "--overwrite")
    assert qemu_img_compare(at_backup, flat) and flat.stat().st_size == 512 * MiB


def _connector(sim: vcsim.Vcsim) -> VsphereConnector:
    return VsphereConnector(sim.address + "?insecure=1", password=sim.password)


def _saved_config(connector: VsphereConnector, vm: str) -> dict[str, Any]:
    props = connector.session.one(connector.vm(vm), ["config", "config.hardware.device"])
    return devices.saved_config(props["config"], props["config.hardware.device"],
                                {"datacenter": "DC0", "datastore": "LocalDS_0", "folder": "", "pool": None,
                                 "host": None})


@pytest.mark.parametrize("failure", ["broken stream", "ctrl-c"])
def test_a_failed_restore_leaves_no_vm_and_no_lease(sim: vcsim.Vcsim, failure: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the connector protocol: a stream the simulator cannot decode (HTTP 400) or a
    Ctrl-C in the middle of the upload: the lease is aborted and the half-made VM removed."""
    new_vm(sim, "vc-src")
    name = f"vc-broken-{failure.split()[0]}"
    connector = _connector(sim)
    try:
        config = _saved_config(connector, "vc-src")
        if failure == "broken stream":  # a connector breaking the format is refused
            monkeypatch.setattr(StreamVmdk, "trailer", lambda self: b"\0" * 1536)
        expected: type[BaseException] = HypervisorError if failure == "broken stream" else KeyboardInterrupt
        with (pytest.raises(expected) as raised,
              connector.restore_vm(config, name=name, disks={"scsi0-0": 64 * MiB}, as_new=True) as restoring):
            assert connector.exists(name)
            (lease,) = [x for x in sim.nfc_leases() if x["vm"] == name]
            assert lease["state"] == "ready"
            with restoring.disk("scsi0-0", 64 * MiB) as writer:
                assert writer.sequential
                writer.write(writer.encode(os.urandom(4 * MiB), 0), 0)
                writer.zero(4 * MiB, 60 * MiB)
                if failure == "ctrl-c":
                    raise KeyboardInterrupt
            restoring.finish(start=False)
        if failure == "broken stream":
            assert "refused it with 400 not a readable VMDK" in str(raised.value)
        assert not connector.exists(name)
        (lease,) = [x for x in sim.nfc_leases() if x["vm"] == name]
        assert lease["state"] == "aborted", lease
        assert failure == "ctrl-c" or lease["bytes"] > 4 * MiB  # the whole (broken) stream arrived
    finally:
        connector.close()


def test_the_import_lease_through_the_protocol(sim: vcsim.Vcsim, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The connector driven as the engine drives it: the lease is kept alive while the disk
    uploads, completed by finish, and the disk reads back; a body that is not a streamOptimized
    VMDK is refused by the simulator and puts the lease in its error state."""
    from vmkeep.hypervisors.vmware import nfc

    monkeypatch.setattr(nfc, "PROGRESS_EVERY", 0.05)
    new_vm(sim, "vc-proto")
    connector = _connector(sim)
    try:
        config = _saved_config(connector, "vc-proto")
        source = bytearray(64 * MiB)
        source[8 * MiB: 12 * MiB] = os.urandom(4 * MiB)
        with connector.restore_vm(config, name="vc-proto-copy", disks={"scsi0-0": 64 * MiB},
                                  as_new=True) as restoring:
            with restoring.disk("scsi0-0", 64 * MiB) as writer:
                writer.zero(0, 8 * MiB)
                for at in (8 * MiB, 12 * MiB):
                    writer.write(writer.encode(bytes(source[at:at + 4 * MiB]), at), at)
                writer.zero(16 * MiB, 48 * MiB)
                time.sleep(0.3)  # the keeper reports progress meanwhile
            placed = restoring.finish(start=False)
        assert placed == {"scsi0-0": "[LocalDS_0] vc-proto-copy/vc-proto-copy.vmdk"}
        (lease,) = [x for x in sim.nfc_leases() if x["vm"] == "vc-proto-copy"]
        assert lease["state"] == "done" and lease["progress"] > 0, lease
        expected = tmp_path / "expected.raw"
        expected.write_bytes(source)
        assert qemu_img_compare(expected, Path(sim.datastores[0]) / "vc-proto-copy" / "vc-proto-copy-flat.vmdk")

        with connector.restore_vm(config, name="vc-proto-junk", disks={"scsi0-0": 64 * MiB},
                                  as_new=True) as restoring:
            reply = httpx.post(restoring.lease.urls[0], content=b"not a disk" * 100, verify=False,
                               headers={"Content-Type": nfc.STREAM_VMDK})
            assert reply.status_code == 400 and "not a sparse VMDK" in reply.text
            state = connector.session.one(restoring.lease.lease, ["state"])["state"]
            assert state == "error"
        (junk,) = [x for x in sim.nfc_leases() if x["vm"] == "vc-proto-junk"]
        assert junk["state"] == "aborted" and not connector.exists("vc-proto-junk")
    finally:
        connector.close()


def test_restore_refuses_before_writing(sim: vcsim.Vcsim) -> None:
    """A taken name, a disk the configuration does not have, a resized original: refused before
    any lease or upload."""
    new_vm(sim, "vc-refuse")
    connector = _connector(sim)
    try:
        config = _saved_config(connector, "vc-refuse")
        leases = len(sim.nfc_leases())
        with pytest.raises(HypervisorError, match="already exists"):
            connector.restore_vm(config, name="vc-refuse", disks={"scsi0-0": 64 * MiB}, as_new=True).__enter__()
        with pytest.raises(HypervisorError, match="no disk scsi0-9"):
            connector.restore_vm(config, name="vc-refuse-2", disks={"scsi0-9": MiB}, as_new=True).__enter__()
        with pytest.raises(HypervisorError, match="is 67108864 bytes now, the point's is 1048576"):
            connector.restore_vm(config, name="vc-refuse", disks={"scsi0-0": MiB}, as_new=False).__enter__()
        with pytest.raises(HypervisorError, match="libvirt"):
            connector.restore_vm({"kind": "libvirt"}, name="x", disks={}, as_new=True)
        assert len(sim.nfc_leases()) == leases and not connector.exists("vc-refuse-2")
    finally:
        connector.close()


def test_incrementals_read_only_what_cbt_reports(cli: Cli, sim: vcsim.Vcsim, env: dict[str, str],
                                                 tmp_path: Path) -> None:
    flat = new_vm(sim, "vc-incr")
    shim = CbtShim(sim)
    try:
        repo = str(tmp_path / "repo")
        cli.run("repo", "init", repo, "--encrypt")
        full = backup(cli, shim.address, "vc-incr", repo, "--insecure")
        assert full["mode"] == "full" and full["bytes_read"] == 12 * MiB  # only where data is (CBT "*")
        with flat.open("r+b") as f:  # the guest writes 1 MiB, and 100 kB across two 64 KiB blocks
            f.seek(50 * MiB)
            f.write(os.urandom(MiB))
            f.seek(3 * MiB + 10)
            f.write(os.urandom(100_000))
        at_incr = tmp_path / "at-incr.raw"
        at_incr.write_bytes(flat.read_bytes())
        incr, stderr = backup_logged(cli, shim.address, "vc-incr", repo, "--insecure", "--debug", "--log-format",
                                     "json")
        assert incr["mode"] == "incremental", incr
        # --debug: the login (never the password), the snapshot, CBT's answers and the decision
        lines = [json.loads(line) for line in stderr.splitlines()]
        said = {(e["logger"].rsplit(".", 1)[1], e["message"].split(" ", 1)[0]) for e in lines}
        assert {("session", "vSphere"), ("connector", "snapshot"), ("cbt", "QueryChangedDiskAreas(disk"),
                ("vm", "incremental")} <= said, said
        assert sim.password not in stderr
        assert incr["bytes_read"] == MiB + 2 * 64 * 1024  # the changed areas CBT reported, nothing else
        assert shim.queries >= 2 * 4  # the whole disk, 16 MiB per call, for "*" and for the changes
        out = tmp_path / "incr.raw"
        cli.run("restore", f"vc-incr@{incr['point']}", "--repo", repo, "--disk", "scsi0-0", "--output", str(out),
                "--format", "raw")
        assert qemu_img_compare(at_incr, out)

        # tracking reset (turned off and on): the next backup is full, and says why
        through_shim = Session(Target.parse(shim.address), sim.password)
        try:
            vm = next(o for o, p in through_shim.collect(vim.VirtualMachine, ["name"]) if p["name"] == "vc-incr")
            for on in (False, True):
                through_shim.wait(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=on)), "reconfigure")
        finally:
            through_shim.close()
        reset = backup(cli, shim.address, "vc-incr", repo, "--insecure")
        assert reset["mode"] == "full" and "reset" in reset["reason"], reset
    finally:
        shim.close()


def test_leftover_snapshot_of_a_crashed_run_is_removed(cli: Cli, sim: vcsim.Vcsim, env: dict[str, str],
                                                       tmp_path: Path) -> None:
    new_vm(sim, "vc-crash")
    s = session(sim)
    try:
        vm = next(o for o, p in s.collect(vim.VirtualMachine, ["name"]) if p["name"] == "vc-crash")
        s.wait(vm.CreateSnapshot_Task(name="vmkeep-20260101T000000Z", memory=False, quiesce=False), "snapshot")
        s.wait(vm.CreateSnapshot_Task(name="before-upgrade", memory=False, quiesce=False), "snapshot")
    finally:
        s.close()
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    result = backup(cli, sim.address, "vc-crash", repo)
    assert any("removed snapshot vmkeep-20260101T000000Z" in n for n in result["notes"]), result["notes"]
    tree = vm_props(sim, "vc-crash", ["snapshot"])["snapshot"].rootSnapshotList
    names = []
    while tree:
        node = tree.pop()
        names.append(node.name)
        tree.extend(node.childSnapshotList or [])
    assert names == ["before-upgrade"]  # the administrator's own snapshot stays


def test_policy_run_by_a_proxy_through_the_server(cli: Cli, sim: vcsim.Vcsim, env: dict[str, str], database: str,
                                                  tmp_path: Path) -> None:
    """The master registers the vCenter (password sealed), discovers it, and a proxy backs a VM
    up for a policy; the restore point is the VM's disk."""
    from tests.test_scale_out import register_discovered, run_to_end, start_proxy, stop, wait_for
    from tests.test_server import ADMIN_PASSWORD, launch

    flat = new_vm(sim, "vc-policy")
    at_backup = tmp_path / "at-backup.raw"
    at_backup.write_bytes(flat.read_bytes())
    password = env.pop("VMKEEP_HOST_PASSWORD")  # the master's sealed copy is the only one
    with launch(cli, database, tmp_path) as master:
        admin = master.client(master.login("admin", ADMIN_PASSWORD))
        repo, vms = register_discovered(cli, admin, tmp_path, "vc", "vsphere", sim.address, password)
        assert vms["vc-policy"]["disks"][0]["datastore"] == "LocalDS_0"
        assert admin.post("/api/policies", json={"name": "vc", "repository": "main", "vms": ["vc-policy"],
                                                 "transports": "nbd", "folders": ["DC0*"]}).status_code == 201
        token = admin.post("/api/tokens", json={"name": "proxy"}).json()["token"]
        proxy = start_proxy(master, token, "p1", reaches="*", transports="nbd")
        try:
            wait_for("the proxy", lambda: any(p["up"] for p in admin.get("/api/proxies").json()))
            done = run_to_end(admin, "vc", {"vc-policy": "queued"})["vc-policy"]
        finally:
            stop(proxy)
        assert done["transport"] == "https" and done["mode"] == "full", done
        out = tmp_path / "restored.raw"
        cli.run("restore", f"vc-policy@{done['point_id']}", "--repo", repo, "--disk", "scsi0-0", "--output", str(out),
                "--format", "raw")
        assert qemu_img_compare(at_backup, out)


def test_quiesce_needs_vmware_tools(cli: Cli, sim: vcsim.Vcsim, env: dict[str, str], tmp_path: Path) -> None:
    new_vm(sim, "vc-running")
    s = session(sim)
    try:
        vm = next(o for o, p in s.collect(vim.VirtualMachine, ["name"]) if p["name"] == "vc-running")
        s.wait(vm.PowerOnVM_Task(), "power on")  # the simulator's guest has no Tools running
    finally:
        s.close()
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    refused = cli.run("backup", "vc-running", "--host", sim.address, "--repo", repo, "--quiesce", "required", "--json",
                      ok=False)
    result = json.loads(refused.stdout)["vms"][0]
    assert not result["ok"] and "VMware Tools are not running" in result["error"], result
    assert not getattr(vm_props(sim, "vc-running", ["snapshot"]).get("snapshot"), "rootSnapshotList", None)
    crash = backup(cli, sim.address, "vc-running", repo, "--quiesce", "try")
    assert crash["consistency"] == "crash" and any("Tools are not running" in n for n in crash["notes"]), crash


def test_vddk_is_detected_and_its_parameters_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmkeep.transport import nbdkit

    found = nbdkit.Vddk.find()  # Debian's nbdkit has no vddk plugin: the note says so
    assert isinstance(found, str) and "vddk plugin" in found
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "nbdkit-vddk-plugin.so").touch()
    monkeypatch.setenv(nbdkit.PLUGIN_DIR_ENV, str(plugins))
    monkeypatch.setenv(nbdkit.VDDK_ENV, str(tmp_path / "vddk"))
    missing = nbdkit.Vddk.find()
    assert isinstance(missing, str) and "libvixDiskLib.so" in missing
    (tmp_path / "vddk" / "lib64").mkdir(parents=True)
    (tmp_path / "vddk" / "lib64" / "libvixDiskLib.so.8").touch()
    vddk = nbdkit.Vddk.find()
    assert isinstance(vddk, nbdkit.Vddk)
    args = vddk.arguments(server="vc", user="u", password_file="+/run/pw", thumbprint="AA:BB", vm_moref="vm-1",
                          snapshot_moref="snapshot-2", file="[ds] a/a.vmdk", transports=["hotadd", "nbdssl"])
    assert "vm=moref=vm-1" in args and "snapshot=snapshot-2" in args and "transports=hotadd:nbdssl" in args
    assert "password=+/run/pw" in args  # a file, never the password itself
