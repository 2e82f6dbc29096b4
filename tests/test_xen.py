"""XenServer / XCP-ng, backup side, against the lab's XAPI simulator (real qcow2 images, CBT from
persistent bitmaps, NBD over TLS): inventory, full and incremental backups reading only the
changed 64 KiB blocks, the chain checks that force a full backup, clean-up on failure and of
what crashed runs left, quiescing, NBD networks, a pool member's redirect, transient errors."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import Cli, MiB, free_port, qemu_img_compare
from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.xen import cbt
from vmkeep.hypervisors.xen.backup import XenPoint, choose_transport
from vmkeep.hypervisors.xen.connector import XenConnector
from vmkeep.hypervisors.xen.inventory import disk_name
from vmkeep.hypervisors.xen.session import XapiError, XapiSession, parse_uri
from vmkeep.logs import redact
from vmkeep.transport.extents import Extent
from vmkeep.transport.nbd_client import NbdExport

BLOCK = 64 * 1024


# -- units -----------------------------------------------------------------------------------------
def b64(*octets: int) -> str:
    return base64.b64encode(bytes(octets)).decode()


def test_changed_block_bitmap_decodes_msb_first_into_runs() -> None:
    assert cbt.decode(b64(0b1000_0000, 0b0000_0001), 16 * BLOCK) == [Extent(0, BLOCK), Extent(15 * BLOCK, BLOCK)]
    assert cbt.decode(b64(0xFF, 0x00), 16 * BLOCK) == [Extent(0, 8 * BLOCK)]  # neighbours run together
    assert cbt.decode(b64(0x01, 0x80), 16 * BLOCK) == [Extent(7 * BLOCK, 2 * BLOCK)]  # across a byte
    assert cbt.decode(b64(0x00, 0x00), 16 * BLOCK) == []
    # the last block ends where the disk ends; bits past it (padding) mean nothing
    assert cbt.decode(b64(0b0011_1111), 2 * BLOCK + 100) == [Extent(2 * BLOCK, 100)]
    assert cbt.decode("", 0) == []


def test_changed_block_bitmap_that_does_not_fit_is_refused() -> None:
    with pytest.raises(HypervisorError, match="covers 8 blocks"):
        cbt.decode(b64(0xFF), 9 * BLOCK)
    with pytest.raises(HypervisorError, match="not base64"):
        cbt.decode("!!not base64!!", BLOCK)


def test_addresses_disk_names_and_transports() -> None:
    assert parse_uri("xapi://root@xen1.example.com") == ("root", "xen1.example.com", 443)
    assert parse_uri("xapi://root@127.0.0.1:8443") == ("root", "127.0.0.1", 8443)
    with pytest.raises(HypervisorError, match="xapi://USER@HOST"):
        parse_uri("xapi://xen1.example.com")
    assert [disk_name(u) for u in ("0", "1", "25", "26")] == ["xvda", "xvdb", "xvdz", "xvdaa"]
    notes: list[str] = []
    assert choose_transport(["san", "hotadd", "nbd"], notes) == "nbd" and "san:hotadd skipped" in notes[0]
    with pytest.raises(HypervisorError, match="add nbd"):
        choose_transport(["san", "hotadd"], [])


# -- against the simulator -------------------------------------------------------------------------
xapi = pytest.importorskip("vmkeep.lab.xapi")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    state = tmp_path_factory.mktemp("xapi")
    started = xapi.start(f"127.0.0.1:{free_port()}", lab_vm=False, state=state)
    try:
        yield started
    finally:
        xapi.stop(state)


@pytest.fixture
def env(cli: Cli, sim: Any) -> dict[str, str]:
    cli.env.update(sim.env())
    return cli.env


@pytest.fixture
def xs(sim: Any) -> Iterator[XapiSession]:
    """A XAPI session of the test's own, to look at and change the pool as an administrator would."""
    session = XapiSession(sim.address, sim.password, ca_file=sim.ca_file)
    try:
        yield session
    finally:
        session.close()


def connector(sim: Any, **kw: Any) -> XenConnector:
    return XenConnector(sim.address, password=sim.password, ca_file=sim.ca_file, **kw)


def backup(cli: Cli, sim: Any, vm: str, repo: str, *args: str, ok: bool = True) -> dict[str, Any]:
    return backup_logged(cli, sim, vm, repo, *args, ok=ok)[0]


def backup_logged(cli: Cli, sim: Any, vm: str, repo: str, *args: str, ok: bool = True) -> tuple[dict[str, Any], str]:
    """The backup's result and its standard error (the log lines)."""
    proc = cli.run("backup", vm, "--host", sim.address, "--repo", repo, "--json", *args, ok=False)
    assert proc.stdout, proc.stderr
    result = dict(json.loads(proc.stdout)["vms"][0])
    assert result["ok"] == ok, result
    return result, proc.stderr


def new_repo(cli: Cli, tmp_path: Path) -> str:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    return repo


def lab_data(offset: int, length: int) -> bytes:
    seed = f"vmkeep xen {offset} ".encode()
    return (seed * (length // len(seed) + 1))[:length]


def new_vm(sim: Any, name: str, **kw: Any) -> tuple[str, str]:
    """A running VM with data in two places of its 64 MiB disk: (VM uuid, disk VDI uuid)."""
    uuid = xapi.create_vm(sim, name, 64 * MiB, **{"running": True, **kw})
    disk = xapi.disks(sim, uuid)["xvda"]
    for offset, length in ((0, 8 * MiB), (32 * MiB, 4 * MiB)):
        xapi.guest_write(sim, disk, offset, lab_data(offset, length))
    return uuid, disk


def vm_ref(xs: XapiSession, uuid: str) -> str:
    return str(xs.call("VM.get_by_uuid", uuid))


def snapshots_named(xs: XapiSession, uuid: str) -> list[str]:
    return sorted(str(xs.call("VM.get_name_label", s)) for s in xs.call("VM.get_snapshots", vm_ref(xs, uuid)))


def disk_vdis(xs: XapiSession, vm: str) -> list[str]:
    return [str(xs.call("VBD.get_VDI", b)) for b in xs.call("VM.get_VBDs", vm) if xs.call("VBD.get_type", b) == "Disk"]


def ours(xs: XapiSession, uuid: str) -> list[dict[str, Any]]:
    """The VDIs a backup keeps of the VM: CBT metadata marked vmkeep-base."""
    return [v for v in xs.call("VDI.get_all_records").values()
            if (v.get("other_config") or {}).get("vmkeep-base") == uuid]


def restored_equals_live(cli: Cli, sim: Any, repo: str, vm: str, point: str, disk: str, tmp_path: Path) -> bool:
    out = tmp_path / f"{point}.raw"
    cli.run("restore", f"{vm}@{point}", "--repo", repo, "--disk", "xvda", "--output", str(out), "--format", "raw")
    return qemu_img_compare(Path(xapi.image(sim, disk)), out)


def test_inventory_lists_guests_their_disks_and_the_pool(cli: Cli, sim: Any, env: dict[str, str],
                                                         xs: XapiSession) -> None:
    uuid = xapi.create_vm(sim, "xen-inv", 64 * MiB, running=False, cd=True)
    sr = xs.call("SR.get_by_name_label", "Local storage")[0]
    shared = xs.call("VDI.create", {"name_label": "quorum", "name_description": "", "SR": sr,
                                    "virtual_size": str(8 * MiB), "type": "user", "sharable": True,
                                    "read_only": False, "other_config": {}})
    xs.call("VBD.create", {"VM": vm_ref(xs, uuid), "VDI": shared, "userdevice": "1", "bootable": False,
                           "mode": "RW", "type": "Disk", "empty": False, "other_config": {},
                           "qos_algorithm_type": "", "qos_algorithm_params": {}})
    listed = cli.json("inventory", "--host", sim.address)
    names = {v["name"] for v in listed["vms"]}
    assert not any(n.startswith("Control domain") for n in names), names  # dom0, templates: not VMs to back up
    assert not any(v["uuid"] == "" for v in listed["vms"])
    found = next(v for v in listed["vms"] if v["name"] == "xen-inv")
    assert found["state"] == "shut off" and found["uuid"] == uuid and found["host"] == "xen1"
    disks = {d["name"]: d for d in found["disks"]}
    assert disks["xvda"]["backup"] and disks["xvda"]["size"] == 64 * MiB
    assert disks["xvda"]["datastore"] == "Local storage" and disks["xvda"]["change_tracking"] is False
    assert not disks["xvdb"]["backup"] and "sharable" in disks["xvdb"]["skip_reason"]
    (cd,) = [d for n, d in disks.items() if n not in ("xvda", "xvdb")]
    assert not cd["backup"] and "CD" in cd["skip_reason"]
    pool = listed["topology"]
    assert {h["name"] for h in pool["hosts"]} == {"xen1", "xen2"} and len(pool["pools"]) == 1
    srs = {s["name"]: s for s in pool["srs"]}
    assert srs["Local storage"]["type"] == "ext" and srs["Local storage"]["free"] > 0
    assert srs["ISO library"]["content_type"] == "iso"
    nets = {n["name"]: n for n in pool["networks"]}
    assert nets["Pool-wide network associated with eth0"]["purpose"] == ["nbd"]
    table = cli.run("inventory", "--host", sim.address).stdout  # the table and the pool's line
    assert "xen-inv" in table and "hosts: xen1, xen2" in table and "Local storage (" in table, table
    # a name two VMs share is refused rather than guessed
    xapi.create_vm(sim, "xen-twin", 16 * MiB, running=False)
    xapi.create_vm(sim, "xen-twin", 16 * MiB, running=False)
    conn = connector(sim)
    try:
        with pytest.raises(HypervisorError, match="2 VMs are named 'xen-twin'"):
            conn.vm_ref("xen-twin")
        assert conn.exists("xen-twin") and not conn.exists("xen-nobody")
    finally:
        conn.close()
    # certificate checks are on; the password is checked
    untrusted = cli.run("inventory", "--host", sim.address, ok=False, env={"VMKEEP_XAPI_CA_FILE": ""})
    assert untrusted.returncode != 0 and "does not check out" in untrusted.stderr, untrusted.stderr
    wrong = cli.run("inventory", "--host", sim.address, ok=False, env={"VMKEEP_HOST_PASSWORD": "wrong"})
    assert "refused the login" in wrong.stderr


def test_full_then_incremental_reads_only_the_changed_blocks(cli: Cli, sim: Any, env: dict[str, str],
                                                             xs: XapiSession, tmp_path: Path) -> None:
    uuid, disk = new_vm(sim, "xen-incr")
    repo = new_repo(cli, tmp_path)
    full = backup(cli, sim, "xen-incr", repo)
    assert full["mode"] == "full" and full["transport"] == "nbd", full
    assert "changed block tracking was off on xvda" in " ".join(full["notes"])
    assert full["bytes_read"] == 12 * MiB  # only where data is (the export's allocation)
    assert restored_equals_live(cli, sim, repo, "xen-incr", full["point"], disk, tmp_path)
    assert xs.call("VDI.get_cbt_enabled", xs.call("VDI.get_by_uuid", disk))
    (base,) = ours(xs, uuid)
    assert base["type"] == "cbt_metadata" and base["is_a_snapshot"]
    assert snapshots_named(xs, uuid) == [] and xapi.attached(sim) == []

    # the guest writes 1 MiB, and 100 kB across two 64 KiB blocks
    xapi.guest_write(sim, disk, 50 * MiB, os.urandom(MiB))
    xapi.guest_write(sim, disk, 3 * MiB + 10, os.urandom(100_000))
    incr, stderr = backup_logged(cli, sim, "xen-incr", repo, "--debug", "--log-format", "json")
    assert incr["mode"] == "incremental", incr
    # --debug: the calls to XAPI and their answers, never the password nor the session ref
    lines = [json.loads(line) for line in stderr.splitlines()]
    said = {(e["logger"].rsplit(".", 1)[1], e["message"].split(" ", 1)[0]) for e in lines}
    assert {("session", "XAPI"), ("backup", "snapshot"), ("cbt", "disk"), ("vm", "incremental")} <= said, said
    assert sim.password not in stderr
    assert not [e["message"] for e in lines if e["logger"].startswith("vmkeep.hypervisors.xen")
                and "session_id=OpaqueRef:" in e["message"] and "<session>" not in e["message"]]
    assert incr["bytes_read"] == MiB + 2 * BLOCK  # the changed blocks XAPI listed, nothing else
    assert restored_equals_live(cli, sim, repo, "xen-incr", incr["point"], disk, tmp_path)
    # the previous point's base stays until a later point builds on this one (its commit could still fail)
    (new_base,) = [v for v in ours(xs, uuid) if v["uuid"] != base["uuid"]]
    assert {v["uuid"] for v in ours(xs, uuid)} == {base["uuid"], new_base["uuid"]}
    # what went over the wire for the new snapshot: the changed blocks (plus TLS and NBD framing)
    sent = int(xapi.reads(sim, new_base["uuid"]))
    assert MiB + 2 * BLOCK <= sent < MiB + 2 * BLOCK + 256 * 1024, sent
    assert snapshots_named(xs, uuid) == [] and xapi.attached(sim) == []


def test_chain_breaks_make_full_backups_that_say_why(cli: Cli, sim: Any, env: dict[str, str], xs: XapiSession,
                                                      tmp_path: Path) -> None:
    uuid, disk = new_vm(sim, "xen-chain", running=False)
    repo = new_repo(cli, tmp_path)
    first = backup(cli, sim, "xen-chain", repo)
    assert first["mode"] == "full" and first["consistency"] == "application"  # halted: the disks are at rest
    vdi = xs.call("VDI.get_by_uuid", disk)

    # CBT reset by an administrator (off and on again): the log no longer reaches the base
    xs.call("VDI.disable_cbt", vdi)
    xs.call("VDI.enable_cbt", vdi)
    reset = backup(cli, sim, "xen-chain", repo)
    assert reset["mode"] == "full" and "reset" in reset["reason"], reset

    # CBT left off: turned on again, full
    xs.call("VDI.disable_cbt", vdi)
    off = backup(cli, sim, "xen-chain", repo)
    assert off["mode"] == "full" and "changed block tracking was off" in off["reason"], off
    assert backup(cli, sim, "xen-chain", repo)["mode"] == "incremental"

    # the disk grew
    xs.call("VDI.resize", vdi, str(96 * MiB))
    grown = backup(cli, sim, "xen-chain", repo)
    assert grown["mode"] == "full" and "resized" in grown["reason"], grown

    # the previous point's base is gone (someone removed the CBT metadata VDI)
    for gone in ours(xs, uuid):
        xs.call("VDI.destroy", xs.call("VDI.get_by_uuid", gone["uuid"]))
    lost = backup(cli, sim, "xen-chain", repo)
    assert lost["mode"] == "full" and "is gone" in lost["reason"], lost

    # a disk added
    sr = xs.call("SR.get_by_name_label", "Local storage")[0]
    extra = xs.call("VDI.create", {"name_label": "data", "name_description": "", "SR": sr,
                                   "virtual_size": str(16 * MiB), "type": "user", "sharable": False,
                                   "read_only": False, "other_config": {}})
    xs.call("VBD.create", {"VM": vm_ref(xs, uuid), "VDI": extra, "userdevice": "1", "bootable": False,
                           "mode": "RW", "type": "Disk", "empty": False, "other_config": {},
                           "qos_algorithm_type": "", "qos_algorithm_params": {}})
    added = backup(cli, sim, "xen-chain", repo)
    assert added["mode"] == "full" and "xvdb is new" in added["reason"] and set(added["disks"]) == {"xvda", "xvdb"}

    # the disk moved to another SR (a copy plugged in its place)
    nfs = xs.call("SR.get_by_name_label", "Shared NFS")[0]
    copy = xs.call("VDI.copy", vdi, nfs)
    ref = vm_ref(xs, uuid)
    (vbd,) = [b for b in xs.call("VM.get_VBDs", ref) if xs.call("VBD.get_userdevice", b) == "0"]
    xs.call("VBD.destroy", vbd)
    xs.call("VBD.create", {"VM": ref, "VDI": copy, "userdevice": "0", "bootable": True, "mode": "RW",
                           "type": "Disk", "empty": False, "other_config": {}, "qos_algorithm_type": "",
                           "qos_algorithm_params": {}})
    moved = backup(cli, sim, "xen-chain", repo)
    assert moved["mode"] == "full" and "another SR" in moved["reason"], moved
    assert backup(cli, sim, "xen-chain", repo)["mode"] == "incremental"
    assert xapi.attached(sim) == [] and snapshots_named(xs, uuid) == []


def test_a_failed_read_leaves_no_snapshot_and_the_next_backup_works(cli: Cli, sim: Any, env: dict[str, str],
                                                                      xs: XapiSession, tmp_path: Path) -> None:
    uuid, disk = new_vm(sim, "xen-break")
    repo = new_repo(cli, tmp_path)
    assert backup(cli, sim, "xen-break", repo)["mode"] == "full"
    (base,) = ours(xs, uuid)
    xapi.guest_write(sim, disk, 40 * MiB, os.urandom(2 * MiB))
    conn = connector(sim)
    try:
        since = {"disks": {"xvda": {"vdi": base["uuid"], "source": disk, "size": 64 * MiB,
                                    "sr": xs.call("SR.get_uuid", base["SR"])}}}
        for failure in ("read", "interrupt"):
            with pytest.raises(BaseException) as caught, conn.point_in_time(  # noqa: PT012, PT011
                    "xen-break", since=since, previous_disks={"xvda": 64 * MiB}, transports=["nbd"],
                    quiesce="off") as pit:
                assert pit.mode == "incremental" and pit.wire == "tls"
                assert pit.disks["xvda"].changed == [Extent(40 * MiB, 2 * MiB)]
                snap = pit.chain["disks"]["xvda"]["vdi"]
                assert snapshots_named(xs, uuid)[0].startswith("vmkeep-")
                if failure == "interrupt":
                    raise KeyboardInterrupt
                xapi.nbd_break(sim, snap, 256 * 1024)  # the connection is cut mid-read
                export = NbdExport(pit.disks["xvda"].uri)
                try:
                    export.pread(2 * MiB, 40 * MiB)
                finally:
                    export.close()
            assert failure != "interrupt" or caught.type is KeyboardInterrupt
            if failure == "read":  # libnbd's error quotes the URI; its export name carried the session ref
                assert "nbds://" in str(caught.value), caught.value
                for ref in (conn.session.ref, quote(conn.session.ref, safe="")):
                    assert ref not in str(caught.value), caught.value
            # the snapshot VM and its VDIs are gone, nothing is attached, the previous base stays
            assert snapshots_named(xs, uuid) == [] and xapi.attached(sim) == []
            with pytest.raises(XapiError, match="UUID_INVALID"):
                xs.call("VDI.get_by_uuid", snap)
            assert [v["uuid"] for v in ours(xs, uuid)] == [base["uuid"]]
    finally:
        conn.close()
    # XAPI fails after the snapshot, before any read: the backup fails and takes its snapshot along
    xapi.fault(sim, "VDI.get_nbd_info", "INTERNAL_ERROR", 1)
    failed = backup(cli, sim, "xen-break", repo, ok=False)
    assert "INTERNAL_ERROR" in failed["error"], failed
    assert snapshots_named(xs, uuid) == [] and [v["uuid"] for v in ours(xs, uuid)] == [base["uuid"]]
    assert not [v for v in xs.call("VDI.get_all_records").values()
                if v["is_a_snapshot"] and v["type"] != "cbt_metadata" and v["name_label"].startswith("xen-break")]
    after = backup(cli, sim, "xen-break", repo)
    assert after["mode"] == "incremental" and after["bytes_read"] == 2 * MiB, after
    assert restored_equals_live(cli, sim, repo, "xen-break", after["point"], disk, tmp_path)


def other_chains_base(xs: XapiSession, ref: str, uuid: str, name: str) -> str:
    """A base as another repository's chain left it: CBT metadata marked as the VM's."""
    vm = xs.call("VM.snapshot", ref, name)
    (vdi,) = disk_vdis(xs, vm)
    xs.call("VDI.data_destroy", vdi)
    xs.call("VDI.add_to_other_config", vdi, "vmkeep-base", uuid)
    xs.call("VM.destroy", vm)
    return str(vdi)


def gone(xs: XapiSession, vdi: str) -> bool:
    try:
        xs.call("VDI.get_uuid", vdi)
    except XapiError as exc:
        assert exc.code == "HANDLE_INVALID"
        return True
    return False


def test_leftovers_of_a_crashed_run_go_the_administrators_snapshot_stays(cli: Cli, sim: Any, env: dict[str, str],
                                                                         xs: XapiSession, tmp_path: Path) -> None:
    uuid, disk = new_vm(sim, "xen-left")
    repo = new_repo(cli, tmp_path)
    assert backup(cli, sim, "xen-left", repo)["mode"] == "full"
    ref = vm_ref(xs, uuid)
    # a crashed run's snapshot VM (with its VDIs); a run that died between destroying its snapshot VM and
    # its VDIs (marked since the snapshot); four bases other repositories' chains left; the admin's snapshot
    crashed = xs.call("VM.snapshot", ref, "vmkeep-20260101T000000Z")
    crashed_vdis = disk_vdis(xs, crashed)
    orphan_vm = xs.call("VM.snapshot", ref, "vmkeep-20260101T000050Z")
    (orphan,) = disk_vdis(xs, orphan_vm)
    xs.call("VDI.add_to_other_config", orphan, "vmkeep-base", uuid)
    xs.call("VM.destroy", orphan_vm)
    others = [other_chains_base(xs, ref, uuid, f"vmkeep-2026010{i}T000100Z") for i in range(1, 5)]
    admin = xs.call("VM.snapshot", ref, "before the upgrade")
    admin_vdis = disk_vdis(xs, admin)
    xapi.guest_write(sim, disk, 10 * MiB, os.urandom(MiB))
    xapi.fault(sim, "VDI.destroy", "INTERNAL_ERROR", 1)  # the first removal fails: noted, the backup goes on
    done = backup(cli, sim, "xen-left", repo)
    assert done["mode"] == "incremental" and done["bytes_read"] == MiB, done  # the chain survived the clean-up
    assert any("could not be removed" in n and "INTERNAL_ERROR" in n for n in done["notes"]), done["notes"]
    assert "removed snapshot vmkeep-20260101T000000Z that an interrupted backup left" in done["notes"]
    assert snapshots_named(xs, uuid) == ["before the upgrade"]
    # the crashed snapshot's VDI (whose first removal failed: marked before, so found again) and the orphan go
    assert all(gone(xs, v) for v in [*crashed_vdis, orphan]), done["notes"]
    assert sum(gone(xs, v) for v in others) == 1  # the newest 3 other bases of the disk stay
    assert all(xs.call("VDI.get_uuid", v) for v in admin_vdis)
    assert len(ours(xs, uuid)) == 5  # the previous base, the 3 others, the new one


def test_two_repositories_keep_two_chains_incremental(cli: Cli, sim: Any, env: dict[str, str], xs: XapiSession,
                                                      tmp_path: Path) -> None:
    uuid, disk = new_vm(sim, "xen-two")
    repos = {}
    for name in ("a", "b"):
        repos[name] = str(tmp_path / f"repo-{name}")
        cli.run("repo", "init", repos[name], "--encrypt")
        assert backup(cli, sim, "xen-two", repos[name])["mode"] == "full"
    for round_ in range(3):
        xapi.guest_write(sim, disk, (20 + round_) * MiB, os.urandom(MiB))
        for name, repo in repos.items():
            done = backup(cli, sim, "xen-two", repo)
            assert done["mode"] == "incremental", (name, round_, done)
            assert restored_equals_live(cli, sim, repo, "xen-two", done["point"], disk, tmp_path)
        assert len(ours(xs, uuid)) <= 5  # per chain one base in use; of the others the newest 3
    assert snapshots_named(xs, uuid) == [] and xapi.attached(sim) == []


def test_a_snapshot_a_running_backup_reads_stays(cli: Cli, sim: Any, env: dict[str, str], xs: XapiSession,
                                                 tmp_path: Path) -> None:
    uuid, _disk = new_vm(sim, "xen-concurrent")
    repo = new_repo(cli, tmp_path)
    conn = connector(sim)
    try:
        with conn.point_in_time("xen-concurrent", since=None, previous_disks=None, transports=["nbd"],
                                quiesce="off") as pit:
            export = NbdExport(pit.disks["xvda"].uri)
            try:
                first = export.pread(BLOCK, 0)
                other = backup(cli, sim, "xen-concurrent", repo)  # a command-line run meanwhile
                assert other["mode"] == "full", other
                assert any("left as it is" in n and "attached" in n for n in other["notes"]), other["notes"]
                assert len(snapshots_named(xs, uuid)) == 1  # the running backup's
                assert export.pread(BLOCK, 0) == first
            finally:
                export.close()
        assert snapshots_named(xs, uuid) == [] and xapi.attached(sim) == []
        assert len(ours(xs, uuid)) == 2  # both points' bases
    finally:
        conn.close()


def test_a_failure_quoting_the_nbd_uri_names_no_session(cli: Cli, sim: Any, env: dict[str, str], xs: XapiSession,
                                                        tmp_path: Path) -> None:
    uuid, _disk = new_vm(sim, "xen-secret")
    repo = new_repo(cli, tmp_path)
    stop = threading.Event()

    def cut_the_snapshots_reads() -> None:  # once the backup's snapshot exists, its NBD reads break
        while not stop.is_set():
            for snap in xs.call("VM.get_snapshots", vm_ref(xs, uuid)):
                for vdi in disk_vdis(xs, snap):
                    xapi.nbd_break(sim, xs.call("VDI.get_uuid", vdi), 64 * 1024)
                    return
            time.sleep(0.02)

    cutter = threading.Thread(target=cut_the_snapshots_reads)
    cutter.start()
    xapi.fault(sim, "VDI.get_nbd_info", "OTHER_OPERATION_IN_PROGRESS", 3)  # ~1.75 s between snapshot and reads
    try:
        failed, stderr = backup_logged(cli, sim, "xen-secret", repo, "--debug", ok=False)
    finally:
        stop.set()
        cutter.join()
    assert "nbds://" in failed["error"], failed  # the read failed, quoting the URI
    session_ref = re.compile(r"OpaqueRef(?::|%3A)[0-9a-f]{8}-", re.I)
    assert not session_ref.search(failed["error"]), failed["error"]
    leaks = [line for line in stderr.splitlines() if re.search(r"session_id(=|%3D)OpaqueRef", line, re.I)]
    assert not leaks, leaks
    assert snapshots_named(xs, uuid) == [] and xapi.attached(sim) == []
    assert "session_id=***" in redact(f"/{uuid}?session_id={xs.ref}")  # what a log line would show instead


def test_quiescing(cli: Cli, sim: Any, env: dict[str, str], tmp_path: Path) -> None:
    new_vm(sim, "xen-noquiesce")
    new_vm(sim, "xen-vss", vss=True)
    repo = new_repo(cli, tmp_path)
    refused = backup(cli, sim, "xen-noquiesce", repo, "--quiesce", "required", ok=False)
    assert "cannot take a quiesced snapshot" in refused["error"] and "--quiesce try" in refused["error"], refused
    crash = backup(cli, sim, "xen-noquiesce", repo)
    assert crash["consistency"] == "crash" and any("crash-consistent" in n for n in crash["notes"]), crash
    assert backup(cli, sim, "xen-vss", repo, "--quiesce", "required")["consistency"] == "application"
    # the guest's VSS fails this once: crash-consistent with a note, or refused when required
    xapi.fault(sim, "VM.snapshot_with_quiesce", "VM_SNAPSHOT_WITH_QUIESCE_FAILED", 2)
    fell_back = backup(cli, sim, "xen-vss", repo)
    assert fell_back["consistency"] == "crash" and any("quiescing failed" in n for n in fell_back["notes"]), fell_back
    failed = backup(cli, sim, "xen-vss", repo, "--quiesce", "required", ok=False)
    assert "quiesced snapshot failed" in failed["error"], failed


def test_a_suspended_or_paused_vm_is_not_said_to_lack_guest_tools(sim: Any, xs: XapiSession) -> None:
    # the simulator keeps VMs running or halted: the power state as XAPI would give it, refused before any call
    point = XenPoint(session=xs, vm="xen-asleep", since=None, previous_disks=None, transports=["nbd"],
                     quiesce="required", nbd_tls="auto", plain_allowed=False)
    for state in ("Suspended", "Paused"):
        with pytest.raises(HypervisorError, match=f"is {state.lower()}: a quiesced snapshot needs it running") as e:
            point._take_snapshot("OpaqueRef:NULL", {"power_state": state,  # noqa: SLF001
                                                    "allowed_operations": ["snapshot_with_quiesce"]})
        assert "guest tools with VSS" not in str(e.value) and "--quiesce try" in str(e.value)


def test_nbd_networks_decide_how_disks_are_read(cli: Cli, sim: Any, env: dict[str, str], xs: XapiSession,
                                                tmp_path: Path) -> None:
    new_vm(sim, "xen-net")
    repo = new_repo(cli, tmp_path)
    (net,) = xs.call("network.get_by_name_label", "Pool-wide network associated with eth0")
    xs.call("network.remove_purpose", net, "nbd")
    try:
        none = backup(cli, sim, "xen-net", repo, ok=False)
        assert "xe network-param-add param-name=purpose param-key=nbd" in none["error"], none
        assert xs.call("network.get_uuid", net) in none["error"]  # which network is which, to pick from
        xs.call("network.add_purpose", net, "insecure_nbd")
        plain_refused = backup(cli, sim, "xen-net", repo, ok=False)
        assert "plain NBD" in plain_refused["error"] and "--nbd-tls off" in plain_refused["error"], plain_refused
        plain = backup(cli, sim, "xen-net", repo, "--nbd-tls", "off")
        assert any("plain NBD" in n for n in plain["notes"]), plain
        allowed = backup(cli, sim, "xen-net", repo, "--insecure")  # an administrator's allowance, nbd_tls auto
        assert any("plain NBD" in n for n in allowed["notes"]), allowed
        required = backup(cli, sim, "xen-net", repo, "--nbd-tls", "require", "--insecure", ok=False)
        assert "encrypted reads are required" in required["error"], required
        assert xapi.attached(sim) == []
    finally:
        xs.call("network.remove_purpose", net, "insecure_nbd")
        xs.call("network.add_purpose", net, "nbd")


def test_a_pool_member_redirects_to_the_master_and_busy_objects_are_retried(sim: Any, xs: XapiSession) -> None:
    redirected = XapiSession(sim.member_address, sim.password, ca_file=sim.ca_file)
    try:
        assert redirected.host == "127.0.0.1" and redirected.port == xs.port
        assert redirected.call("pool.get_all")
    finally:
        redirected.close()
    new_vm(sim, "xen-busy")
    xapi.fault(sim, "VM.snapshot", "OTHER_OPERATION_IN_PROGRESS", 2)
    xapi.fault(sim, "VDI.data_destroy", "VDI_IN_USE", 2)
    conn = connector(sim)
    try:
        with conn.point_in_time("xen-busy", since=None, previous_disks=None, transports=["nbd"],
                                quiesce="off") as pit:
            assert pit.mode == "full" and pit.consistency == "crash"
            snap = pit.chain["disks"]["xvda"]["vdi"]
        assert xs.call("VDI.get_type", xs.call("VDI.get_by_uuid", snap)) == "cbt_metadata"
    finally:
        conn.close()
