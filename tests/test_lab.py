"""Lab VMs: a real TCG guest from Debian packages, driven over its serial console and guest agent."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from typer.testing import CliRunner

from tests.conftest import Cli
from vmkeep.cli import lab_cmds
from vmkeep.errors import LabError
from vmkeep.lab import LOCAL_URI
from vmkeep.lab.guest import pattern
from vmkeep.lab.vm import LabVM, create_lab_vm, destroy_lab_vm, list_lab_vms, vm_dir

MiB = 1 << 20


def virsh(*args: str) -> str:
    proc = subprocess.run(["virsh", "-c", LOCAL_URI, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"virsh {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def lab_vm() -> Iterator[LabVM]:
    """One lab VM for the whole file: booting a TCG guest takes seconds, and the machine has 2 cores."""
    vm = create_lab_vm(f"vmkeep-lt-{secrets.token_hex(3)}", disks=2, size=32 * MiB)
    try:
        yield vm
    finally:
        vm.destroy()


def test_console_commands_keep_output_and_status(lab_vm: LabVM) -> None:
    assert lab_vm.run("echo hello") == "hello\n"
    assert lab_vm.run("printf 'a\\nb'") == "a\nb"  # no trailing newline added or lost
    assert lab_vm.run("echo '<<<VMK-END 0 0>>>'; echo after") == "<<<VMK-END 0 0>>>\nafter\n"
    assert lab_vm.run("echo oops >&2; exit 3", check=False) == "oops\n"
    with pytest.raises(LabError, match=r"exit 4.*oops"):
        lab_vm.run("echo oops; exit 4")
    with pytest.raises(LabError, match="killed after 1 s"):
        lab_vm.run("sleep 30", timeout=1)
    assert lab_vm.run("echo still here") == "still here\n"


def test_write_changes_checksum_with_the_promised_bytes(lab_vm: LabVM) -> None:
    before = lab_vm.checksum("vda")
    offset, length = 3 * MiB + 4096, 2 * MiB + 512
    lab_vm.write("vda", offset, length, seed="one")
    after = lab_vm.checksum("vda")
    assert after != before
    region = lab_vm.run(f"dd if=/dev/vda bs=512 skip={offset // 512} count={length // 512} 2>/dev/null | sha256sum")
    assert region.split()[0] == hashlib.sha256(pattern("one", offset, length)).hexdigest()
    lab_vm.write("vda", offset, length, seed="one")  # same seed, same bytes
    assert lab_vm.checksum("vda") == after
    with pytest.raises(LabError, match="multiples of 512"):
        lab_vm.write("vda", 100, 512)
    with pytest.raises(LabError, match="no disk 'vdz'"):
        lab_vm.checksum("vdz")


def test_host_image_holds_what_the_guest_wrote(lab_vm: LabVM, tmp_path: Path) -> None:
    offset, length = 20 * MiB, MiB
    lab_vm.write("vda", offset, length, seed="host-view")  # synced by write()
    in_guest = lab_vm.checksum("vda")
    raw = tmp_path / "vda.raw"
    virsh("suspend", lab_vm.name)
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(lab_vm.disks["vda"]), str(raw)], check=True)
    finally:
        virsh("resume", lab_vm.name)
    data = raw.read_bytes()
    assert hashlib.sha256(data).hexdigest() == in_guest
    assert data[offset:offset + length] == pattern("host-view", offset, length)


def test_guest_agent_answers(lab_vm: LabVM) -> None:
    lab_vm.agent_ping()
    reply = json.loads(virsh("qemu-agent-command", lab_vm.name, '{"execute":"guest-ping"}'))
    assert reply == {"return": {}}


def ext_features(image: Path, scratch: Path) -> tuple[int, int]:
    """(compat, incompat) feature flags of the ext2/3/4 superblock on a qcow2 image, read from the host."""
    subprocess.run(["qemu-img", "dd", "-U", "-f", "qcow2", "-O", "raw", f"if={image}", f"of={scratch}",
                    "bs=4096", "count=1"], capture_output=True, check=True)
    superblock = scratch.read_bytes()[1024:2048]
    assert superblock[0x38:0x3A] == b"\x53\xef", "no ext superblock"
    return int.from_bytes(superblock[0x5C:0x60], "little"), int.from_bytes(superblock[0x60:0x64], "little")


def test_fsfreeze_runs_the_hook(lab_vm: LabVM, tmp_path: Path) -> None:
    files = lab_vm.make_files("vdb")
    assert set(files) >= {"hello.txt", "etc/numbers.txt", "data/blob.bin"}
    assert "/dev/vdb on /mnt/vdb type ext4" in lab_vm.run("mount")
    compat, incompat = ext_features(lab_vm.disks["vdb"], tmp_path / "head.raw")
    assert compat & 0x4 and incompat & 0x40, "not ext4: no journal or no extents"  # has_journal, extents
    seen = len(lab_vm.freeze_log())
    assert "Froze 1 filesystem" in virsh("domfsfreeze", lab_vm.name)
    try:
        assert lab_vm.run("touch /run/not-frozen && echo ok") == "ok\n"  # the console loop lives on tmpfs
    finally:
        assert "Thawed 1 filesystem" in virsh("domfsthaw", lab_vm.name)
    assert [line.split()[1] for line in lab_vm.freeze_log()[seen:]] == ["freeze", "thaw"]
    assert lab_vm.run("echo again > /mnt/vdb/after-thaw && cat /mnt/vdb/after-thaw") == "again\n"


def test_cli_finds_the_vm_by_name(lab_vm: LabVM) -> None:
    runner = CliRunner()
    assert lab_vm.name in list_lab_vms()
    got = runner.invoke(lab_cmds.app, ["checksum", lab_vm.name, "--disk", "vda", "--json"])
    assert got.exit_code == 0, got.output
    first = json.loads(got.stdout)["sha256"]
    assert first == lab_vm.checksum("vda")
    got = runner.invoke(lab_cmds.app, ["write", lab_vm.name, "--disk", "vda", "--offset", "28M", "--length", "64K"])
    assert got.exit_code == 0, got.output
    got = runner.invoke(lab_cmds.app, ["checksum", lab_vm.name, "--disk", "vda"])
    assert got.exit_code == 0 and got.stdout.strip() not in ("", first)


def test_failed_create_leaves_nothing_behind() -> None:
    name = f"vmkeep-lt-{secrets.token_hex(3)}"
    with pytest.raises(LabError, match="did not answer"):
        create_lab_vm(name, size=MiB, boot_timeout=0.1)  # no guest boots that fast
    assert name not in virsh("list", "--all", "--name").split()
    assert not vm_dir(name).exists()


def test_destroy_spares_other_domains_and_cleans_leftovers() -> None:
    name = f"vmkeep-lt-{secrets.token_hex(3)}"
    conn = libvirt.open(LOCAL_URI)
    try:
        dom = conn.defineXML(f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>"
                             "<os><type arch='x86_64'>hvm</type></os></domain>")
        try:
            with pytest.raises(LabError, match="not a vmkeep lab VM"):
                destroy_lab_vm(name)
            assert name in virsh("list", "--all", "--name").split()
        finally:
            dom.undefine()
    finally:
        conn.close()
    vm_dir(name).mkdir(parents=True)
    (vm_dir(name) / "vda.qcow2").write_bytes(b"")
    destroy_lab_vm(name)  # a half-created VM: files, no domain
    assert not vm_dir(name).exists()


def test_lab_commands_create_fill_and_destroy_a_vm(cli: Cli) -> None:
    """The lab's commands as an administrator types them, through the installed executable."""
    name = f"vmkeep-lc-{secrets.token_hex(3)}"
    try:
        made = cli.json("lab", "create", name, "--disks", "2", "--size", "24M")
        assert set(made["disks"]) == {"vda", "vdb"}
        for image in made["disks"].values():
            info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", image], capture_output=True,
                                             text=True, check=True).stdout)
            assert (info["format"], info["virtual-size"], info["format-specific"]["data"]["compat"]) == \
                ("qcow2", 24 * MiB, "1.1")  # qcow2 v3: persistent bitmaps
        assert "<domain type='qemu'" in virsh("dumpxml", name)  # TCG
        files = cli.json("lab", "files", name, "--disk", "vdb")
        assert files["mountpoint"] == "/mnt/vdb" and "hello.txt" in files["files"]
        assert name in cli.json("lab", "list")["vms"]
        # right after a start, a lab command waits for the guest instead of losing its line
        virsh("destroy", name)
        virsh("start", name)
        started = time.monotonic()
        cli.run("lab", "write", name, "--disk", "vda", "--length", "1M")
        assert time.monotonic() - started < 60
        cli.run("lab", "destroy", name)
        assert name not in virsh("list", "--all", "--name").split() and not vm_dir(name).exists()
    finally:
        destroy_lab_vm(name)
