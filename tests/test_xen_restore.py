"""Restores onto a XenServer / XCP-ng pool (the lab's XAPI simulator: real qcow2 images behind
the VDIs, PUT /import_raw_vdi decoding XAPI's chunked format): a point restored as a new VM byte
for byte with new MACs and the networks asked, only the data on the wire; over the halted
original; the refusals that come before anything is made; failures that leave nothing behind."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, MiB, free_port, fresh_cli, qemu_img_compare
from vmkeep.engine.vm import disk_sizes, restore_vm_as, vm_config
from vmkeep.hypervisors.base import HypervisorError
from vmkeep.hypervisors.xen import inventory, restore, upload
from vmkeep.hypervisors.xen.connector import XenConnector
from vmkeep.hypervisors.xen.session import XapiError, XapiSession
from vmkeep.lab import xapi
from vmkeep.lab.xapi import api_vm as xapi_vm
from vmkeep.repository.backends import open_backend
from vmkeep.repository.config import Credentials
from vmkeep.repository.repo import Repository

SOURCE = "xr-source"
NET0, NET1 = "Pool-wide network associated with eth0", "Lab network 1"
# what the guest wrote: (disk, offset, length); everything else reads as zeros
WRITES = (("xvda", 0, 1 * MiB), ("xvda", 40 * MiB, 192 << 10), ("xvdb", 8 * MiB, 320 << 10))
DATA = sum(length for _disk, _offset, length in WRITES)
IMPORTED = re.compile(r"disk (\w+) of (\S+): imported (\d+) data bytes in (\d+) chunks \((\d+) body bytes\)")


def pattern(offset: int, length: int) -> bytes:
    """Bytes no two places of a disk share, none of them a zero block."""
    piece = b"".join(f"{offset + at:016x}".encode() for at in range(0, 4096, 16))
    return (piece * (length // len(piece) + 1))[:length]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[xapi.Xapi]:
    state = tmp_path_factory.mktemp("xapi-restore")
    started = xapi.start(f"127.0.0.1:{free_port()}", lab_vm=False, state=state)
    try:
        yield started
    finally:
        xapi.stop(state)


def session(sim: xapi.Xapi) -> XapiSession:
    return XapiSession(sim.address, sim.password, ca_file=sim.env()["VMKEEP_XAPI_CA_FILE"])


@pytest.fixture
def connector(sim: xapi.Xapi, monkeypatch: pytest.MonkeyPatch) -> Iterator[XenConnector]:
    """The connector in this process, trusting the lab CA."""
    monkeypatch.setenv("VMKEEP_XAPI_CA_FILE", sim.ca_file)
    opened = XenConnector(sim.address, credentials=("root", sim.password))
    try:
        yield opened
    finally:
        opened.close()


def vm_named(s: XapiSession, name: str) -> dict[str, Any] | None:
    found = inventory.vms_named(s, name)
    return found[0][1] if found else None


def disks_of(s: XapiSession, vm: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """disk name -> VDI record (with its SR's name as "sr_name")."""
    out = {}
    for vbd_ref in vm["VBDs"]:
        vbd = s.call("VBD.get_record", vbd_ref)
        if vbd["type"] != "Disk":
            continue
        vdi = s.call("VDI.get_record", vbd["VDI"])
        vdi["sr_name"] = s.call("SR.get_name_label", vdi["SR"])
        out[f"xvd{chr(97 + int(vbd['userdevice']))}"] = vdi
    return out


def vifs_of(s: XapiSession, vm: dict[str, Any]) -> list[tuple[str, str]]:
    """(MAC, network name) of each VIF, by device."""
    vifs = sorted((s.call("VIF.get_record", v) for v in vm["VIFs"]), key=lambda v: v["device"])
    return [(v["MAC"], s.call("network.get_name_label", v["network"])) for v in vifs]


def raw_copy(sim: xapi.Xapi, vdi_uuid: str, target: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(xapi.image(sim, vdi_uuid)), str(target)],
                   check=True)
    return target


def image_files(sim: xapi.Xapi) -> list[str]:
    """The image files of every SR of the simulator."""
    files = sorted(str(p) for p in (Path(sim.state) / "sr").rglob("*") if p.is_file())
    assert files
    return files


class Backed:
    """The source VM backed up once for the module: its repository and its disks as they were."""

    def __init__(self, cli: Cli, repo: str, expected: dict[str, Path], vdis: dict[str, str]) -> None:
        self.cli = cli
        self.repo = repo
        self.expected = expected  # disk -> raw file of the source at the backup
        self.vdis = vdis  # disk -> the source's VDI uuid

    def open(self) -> Repository:
        return Repository.open(open_backend(self.repo), Credentials(self.cli.env["VMKEEP_PASSPHRASE"].encode()))


@pytest.fixture(scope="module")
def backed(sim: xapi.Xapi, tmp_path_factory: pytest.TempPathFactory) -> Backed:
    """SOURCE (two disks, an empty CD, a VIF on each network, halted) backed up through the CLI."""
    work = tmp_path_factory.mktemp("xen-restore-backup")
    cli = fresh_cli()
    cli.env.update(sim.env())
    uuid = xapi.create_vm(sim, SOURCE, [64 * MiB, 16 * MiB], running=False, networks=[NET0, NET1], cd=True)
    s = session(sim)
    try:  # a UEFI guest's variables and Windows' update device: a restore keeps both
        ref = s.call("VM.get_by_uuid", uuid)
        s.call("VM.set_NVRAM", ref, {"EFI-variables": "ZWZpLXZhcnM="})
        s.call("VM.set_has_vendor_device", ref, True)
    finally:
        s.close()
    vdis = xapi.disks(sim, uuid)
    for disk, offset, length in WRITES:
        xapi.guest_write(sim, vdis[disk], offset, pattern(offset, length))
    repo = str(work / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    cli.run("backup", SOURCE, "--host", sim.address, "--repo", repo)
    assert sorted(vdis) == ["xvda", "xvdb"]
    return Backed(cli, repo, {d: raw_copy(sim, vdi, work / f"{d}.raw") for d, vdi in vdis.items()}, vdis)


def test_restore_as_a_new_vm_sends_only_the_data(sim: xapi.Xapi, backed: Backed) -> None:
    """`restore --as` makes a VM with a new UUID and new MACs on the network asked, whose VDIs hold
    the point byte for byte; the import bodies carry the written data and their headers only."""
    proc = backed.cli.run("-v", "restore", SOURCE, "--host", sim.address, "--repo", backed.repo, "--as", "xr-copy",
                          "--network", NET1)
    s = session(sim)
    try:
        source, copy = vm_named(s, SOURCE), vm_named(s, "xr-copy")
        assert source is not None and copy is not None
        assert copy["uuid"] != source["uuid"] and copy["power_state"] == "Running"
        assert restore.MARK in copy["other_config"]
        for kept in ("memory_static_max", "HVM_boot_params", "NVRAM", "has_vendor_device", "PV_bootloader_args",
                     "hardware_platform_version", "HVM_shadow_multiplier", "platform"):
            assert copy[kept] == source[kept], kept
        # XAPI derives a VIF's MAC from the VM's mac_seed: the copy has a seed of its own
        seed = copy["other_config"]["mac_seed"]
        assert seed and seed != source["other_config"]["mac_seed"]
        restored = disks_of(s, copy)
        assert sorted(restored) == ["xvda", "xvdb"]
        for disk, vdi in restored.items():
            assert vdi["uuid"] != backed.vdis[disk] and vdi["sr_name"] == "Local storage"
            assert int(vdi["virtual_size"]) == backed.expected[disk].stat().st_size
            assert qemu_img_compare(xapi.image(sim, vdi["uuid"]), backed.expected[disk]), disk
        cds = [s.call("VBD.get_record", b) for b in copy["VBDs"]]
        assert [b["empty"] for b in cds if b["type"] == "CD"] == [True]
        old, new = vifs_of(s, source), vifs_of(s, copy)
        assert [n for _m, n in old] == [NET0, NET1] and [n for _m, n in new] == [NET1, NET1]
        assert not {m for m, _n in old} & {m for m, _n in new} and all(m for m, _n in new)
        assert [m for m, _n in new] == [xapi_vm.seeded_mac(seed, d) for d in (0, 1)]
    finally:
        s.close()
    # what the simulator decoded from the bodies (its log), and what the connector put on the wire
    log = (Path(sim.state) / "xapi.log").read_text()
    received = {u: int(n) for n, u in re.findall(r"imported (\d+) bytes into VDI (\S+) \(chunked\)", log)}
    assert sum(received[v["uuid"]] for v in restored.values()) == DATA
    sent = {m.group(1): (int(m.group(3)), int(m.group(4)), int(m.group(5))) for m in IMPORTED.finditer(proc.stderr)}
    assert sorted(sent) == ["xvda", "xvdb"] and sum(data for data, _c, _b in sent.values()) == DATA, proc.stderr
    for data, chunks, body in sent.values():
        assert body == data + 12 * (chunks + 1)  # a header per chunk and the one that ends the body


def test_restore_elsewhere_without_network(sim: xapi.Xapi, backed: Backed, connector: XenConnector) -> None:
    """--storage puts the VDIs on another SR, --esx-host starts the VM there, --network none
    leaves it without VIFs; restore_choices names what may be asked."""
    backed.cli.run("restore", SOURCE, "--host", sim.address, "--repo", backed.repo, "--as", "xr-elsewhere",
                   "--storage", "Shared NFS", "--network", "none", "--esx-host", "xen2")
    s = session(sim)
    try:
        vm = vm_named(s, "xr-elsewhere")
        assert vm is not None and vm["VIFs"] == [] and vm["power_state"] == "Running"
        assert s.call("host.get_name_label", vm["resident_on"]) == "xen2" == s.call("host.get_name_label",
                                                                                  vm["affinity"])
        restored = disks_of(s, vm)
        assert {v["sr_name"] for v in restored.values()} == {"Shared NFS"}
        assert qemu_img_compare(xapi.image(sim, restored["xvda"]["uuid"]), backed.expected["xvda"])
    finally:
        s.close()
    assert connector.restore_choices() == {"networks": sorted([NET0, NET1]), "hosts": ["xen1", "xen2"]}


def test_refusals_come_before_anything_is_made(sim: xapi.Xapi, backed: Backed, connector: XenConnector) -> None:
    """A taken name, a running original, an unknown SR / network / host and a point of another
    kind are refused with what to do, and nothing is made."""
    s = session(sim)
    before = (sorted(s.call("VM.get_all")), sorted(s.call("VDI.get_all")))

    def refused(*args: str) -> str:
        proc = backed.cli.run("restore", SOURCE, "--host", sim.address, "--repo", backed.repo, *args, ok=False)
        assert proc.returncode != 0
        return proc.stderr

    try:
        assert "already exists" in refused("--as", SOURCE)
        assert "no storage repository 'nowhere'" in refused("--as", "xr-x", "--storage", "nowhere")
        assert "no network 'nonet'" in refused("--as", "xr-x", "--network", "nonet")
        assert "no host 'xen9'" in refused("--as", "xr-x", "--esx-host", "xen9")
        s.call("VM.start", inventory.vms_named(s, SOURCE)[0][0], False, False)
        try:
            assert "shut it down first" in refused("--overwrite")
        finally:
            s.call("VM.hard_shutdown", inventory.vms_named(s, SOURCE)[0][0])
        for config, kind in (({"domain_xml": "<domain/>"}, "libvirt"), ({"kind": "vsphere"}, "vsphere")):
            with pytest.raises(HypervisorError, match=f"point is of a {kind} VM: restore it onto"):
                connector.restore_vm(config, name="xr-x", disks={"vda": MiB}, as_new=True)
        with pytest.raises(HypervisorError, match="no restore made"):
            connector.remove_restored(SOURCE)
        assert (sorted(s.call("VM.get_all")), sorted(s.call("VDI.get_all"))) == before
    finally:
        s.close()


def test_failures_mid_upload_leave_nothing(sim: xapi.Xapi, backed: Backed, connector: XenConnector,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """XAPI failing the import, or the connection dying half-way through a body: the VM, its VBDs,
    VIFs and VDIs go again. A retry removes what a dead attempt left (marked) and restores."""
    s = session(sim)
    before = (sorted(s.call("VM.get_all")), sorted(s.call("VDI.get_all")))
    images = image_files(sim)
    try:
        xapi.fault(sim, "import_raw_vdi", "VDI_IO_ERROR", 1)
        proc = backed.cli.run("restore", SOURCE, "--host", sim.address, "--repo", backed.repo, "--as", "xr-fail",
                              ok=False)
        assert proc.returncode != 0 and "VDI_IO_ERROR" in proc.stderr, proc.stderr
        assert (sorted(s.call("VM.get_all")), sorted(s.call("VDI.get_all"))) == before

        repo = backed.open()
        manifest = repo.find_point(SOURCE, None)
        real_write = upload.ChunkedImport.write

        def dying(self: upload.ChunkedImport, encoded: Any, offset: int) -> None:
            real_write(self, encoded, offset)
            if offset == 0:  # the first chunks are out: the connection dies before the next
                self.conn.sock.close()

        monkeypatch.setattr(upload.ChunkedImport, "write", dying)
        with pytest.raises(HypervisorError, match="sending disk xvda of xr-dies to XAPI failed after"):
            restore_vm_as(repo, connector, SOURCE, None, "xr-dies")
        assert vm_named(s, "xr-dies") is None
        assert (sorted(s.call("VM.get_all")), sorted(s.call("VDI.get_all"))) == before
        assert image_files(sim) == images
        monkeypatch.setattr(upload.ChunkedImport, "write", real_write)
        # an attempt that died without cleaning up (its process killed): made, never undone
        config, sizes = vm_config(repo, manifest), disk_sizes(manifest)
        restore._create(s, config, "xr-retried", sizes, restore._plan(s, config, sizes, None, {}), restore.Made())
        assert vm_named(s, "xr-retried") is not None
        with pytest.raises(HypervisorError, match="already exists"):
            restore_vm_as(repo, connector, SOURCE, None, "xr-retried", start=False)
        done = restore_vm_as(repo, connector, SOURCE, None, "xr-retried", start=False, retry=True)
        vm = vm_named(s, "xr-retried")
        assert vm is not None and vm["power_state"] == "Halted"
        restored = disks_of(s, vm)
        assert set(done.disks) == {"xvda", "xvdb"} and done.disks["xvda"] == f"Local storage/{restored['xvda']['uuid']}"
        assert qemu_img_compare(xapi.image(sim, restored["xvdb"]["uuid"]), backed.expected["xvdb"])
        assert len(inventory.vms_named(s, "xr-retried")) == 1
        assert set(s.call("VDI.get_all")) - set(before[1]) == {s.call("VDI.get_by_uuid", v["uuid"])
                                                                for v in restored.values()}
    finally:
        s.close()


def test_overwrite_the_halted_original(sim: xapi.Xapi, backed: Backed, tmp_path: Path) -> None:
    """--overwrite puts the point back into the original's own VDIs, zeros included where the disk
    holds data now; --disk --output writes a file as for every kind."""
    xapi.guest_write(sim, backed.vdis["xvda"], 0, b"\xee" * (64 << 10))  # over the point's data
    xapi.guest_write(sim, backed.vdis["xvda"], 20 * MiB, b"\xee" * MiB)  # where the point has zeros
    xapi.guest_write(sim, backed.vdis["xvdb"], 15 * MiB, b"\xee" * MiB)
    assert not qemu_img_compare(xapi.image(sim, backed.vdis["xvda"]), backed.expected["xvda"])
    out = backed.cli.json("restore", SOURCE, "--host", sim.address, "--repo", backed.repo, "--overwrite")
    first_point = out["point"]
    assert out["disks"] == {d: f"Local storage/{u}" for d, u in backed.vdis.items()}
    for disk, uuid in backed.vdis.items():
        assert qemu_img_compare(xapi.image(sim, uuid), backed.expected[disk]), disk
    # CBT did not see the rewrite as a guest's: the next backup reads everything, and holds the point
    again = backed.cli.json("backup", SOURCE, "--host", sim.address, "--repo", backed.repo)["vms"][0]
    assert again["ok"] and again["mode"] == "full", again
    s = session(sim)
    try:
        s.call("VDI.resize", s.call("VDI.get_by_uuid", backed.vdis["xvdb"]), str(32 * MiB))
    finally:
        s.close()
    proc = backed.cli.run("restore", SOURCE, "--host", sim.address, "--repo", backed.repo, "--overwrite", ok=False)
    assert proc.returncode != 0 and f"disk xvdb of {SOURCE} is {32 * MiB} bytes now" in proc.stderr, proc.stderr
    target = tmp_path / "xvda.raw"
    backed.cli.run("restore", f"{SOURCE}@{first_point}", "--repo", backed.repo, "--disk", "xvda", "--output",
                   str(target), "--format", "raw")
    assert qemu_img_compare(target, backed.expected["xvda"])


def test_vm_create_records(sim: xapi.Xapi, backed: Backed) -> None:
    """VM.create refuses a record without a field XAPI's datamodel gives no default; the record a
    restore sends carries every one of them, also from a point saved before the connector kept
    them, and none of the original's identity (its mac_seed)."""
    seed = "0d6b8e0c-6c52-4b7c-9a52-1f0e3c7d9a11"
    old_point: dict[str, Any] = {"vm": {
        "name_label": SOURCE, "memory_static_max": "268435456", "memory_static_min": "134217728",
        "memory_dynamic_max": "268435456", "memory_dynamic_min": "268435456", "VCPUs_max": "1",
        "VCPUs_at_startup": "1", "domain_type": "hvm", "platform": {}, "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart", "actions_after_crash": "restart",
        "other_config": {"mac_seed": seed, "vmkeep-base": "x", "xensource_internal": "true", "folder": "/web"}}}
    record = restore._vm_record(old_point, "xr-old", "test", None)
    assert not set(xapi_vm.VM_REQUIRED) - set(record)
    assert record["PV_bootloader_args"] == "" and record["HVM_boot_policy"] == "BIOS order"
    assert set(record["other_config"]) == {"folder", restore.MARK}
    s = session(sim)
    try:
        for missing in ("PV_bootloader_args", "PCI_bus", "recommendations", "user_version"):
            with pytest.raises(XapiError) as refused:
                s.call("VM.create", {k: v for k, v in record.items() if k != missing})
            assert refused.value.details == ["FIELD_TYPE_ERROR", missing]
        ref = s.call("VM.create", record)
        try:
            made = s.call("VM.get_record", ref)
            assert made["other_config"]["mac_seed"] not in ("", seed)
            assert made["NVRAM"] == {} and made["domain_type"] == "hvm"
        finally:
            s.call("VM.destroy", ref)
    finally:
        s.close()


def test_import_replies_and_bodies() -> None:
    """XAPI's answers to an import: a 200 with an error page inside is a failure (its known
    quirk), a 500 names its code; a new disk's body leaves zero blocks out of its chunks."""
    upload.check_reply(200, b"", "disk xvda")
    for status, body, code in ((200, b"HTTP/1.1 500 Internal Error\r\n\r\nVDI_IO_ERROR short body", "VDI_IO_ERROR"),
                               (500, b"VDI_IN_USE OpaqueRef:1 import", "VDI_IN_USE"), (401, b"", "")):
        with pytest.raises(upload.ImportFailed) as failed:
            upload.check_reply(status, body, "disk xvda")
        assert failed.value.code == code and (code or "HTTP 401") in str(failed.value)
    block = 64 << 10
    data = bytes(block) + b"a" * block + bytes(2 * block) + b"b" * 100
    assert [(at, len(piece)) for at, piece in upload.data_pieces(data, MiB)] == [(MiB + block, block),
                                                                              (MiB + 4 * block, 100)]
