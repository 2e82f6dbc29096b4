"""A proxy on another network: libvirt over qemu+tls://, disks over NBD with TLS, from a network
namespace that reaches the host only across the lab's veth link."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import bare_vm
from tests.bare_vm import BareVM
from tests.conftest import VMKEEP, Cli, MiB, qemu_img_compare
from tests.ssh_server import ssh_server
from vmkeep.hypervisors.libvirt.scratch import SCRATCH_ROOT
from vmkeep.lab.netns import create_proxy_network, destroy_proxy_network
from vmkeep.lab.services import qemu_conf_override
from vmkeep.lab.tls import PROXY_NETWORK_GATEWAY

REMOTE_URI = f"qemu+tls://{PROXY_NETWORK_GATEWAY}/system"


@pytest.fixture(scope="module")
def proxy() -> Iterator[list[str]]:
    prefix = create_proxy_network()
    try:
        yield prefix
    finally:
        destroy_proxy_network()


@pytest.fixture
def vm() -> Iterator[BareVM]:
    with bare_vm.running({"vda": (64 * MiB, "qcow2")}) as machine:
        yield machine


def remote_backup(cli: Cli, proxy: list[str], vm: BareVM, repo: str, *args: str) -> dict:
    proc = subprocess.run([*proxy, VMKEEP, "backup", vm.name, "--host", REMOTE_URI, "--repo", repo, "--json", *args],
                          capture_output=True, text=True, env=cli.env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(json.loads(proc.stdout)["vms"][0])


def test_proxy_in_another_network_namespace(cli: Cli, proxy: list[str], vm: BareVM, tmp_path: Path) -> None:
    # the namespace really is another machine's network: the host's loopback is out of reach
    local = subprocess.run([*proxy, "virsh", "-c", "qemu+tls://127.0.0.1/system", "version"], capture_output=True,
                           text=True, timeout=60)
    assert local.returncode != 0
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    vm.write("vda", 4 * MiB, 6 * MiB, 0x61)
    at_full = vm.snapshot("vda", tmp_path / "full.qcow2")
    full = remote_backup(cli, proxy, vm, repo, "--transport", "hotadd:nbd", "--nbd-tls", "require")
    assert full["ok"] and full["transport"] == "nbd" and full["mode"] == "full"
    assert any("hotadd skipped" in n for n in full["notes"]), full["notes"]
    assert any("encrypted with TLS" in n for n in full["notes"]), full["notes"]

    vm.write("vda", 32 * MiB, MiB, 0x62)
    at_incr = vm.snapshot("vda", tmp_path / "incr.qcow2")
    incr = remote_backup(cli, proxy, vm, repo, "--transport", "nbd", "--nbd-tls", "require")
    assert incr["mode"] == "incremental" and incr["bytes_read"] == MiB

    for point, reference in ((full["point"], at_full), (incr["point"], at_incr)):
        out = tmp_path / f"{point}.qcow2"
        cli.run("restore", f"{vm.name}@{point}", "--repo", repo, "--disk", "vda", "--output", str(out))
        assert qemu_img_compare(reference, out)


def test_nbd_tls_without_client_certificates(cli: Cli, vm: BareVM, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    vm.write("vda", 0, MiB, 0x71)
    no_certs = {"VMKEEP_NBD_TLS_DIR": str(tmp_path / "no-certs")}
    refused = cli.run("backup", vm.name, "--repo", repo, "--transport", "nbd", "--nbd-tls", "require", "--json",
                      ok=False, env=no_certs)
    result = json.loads(refused.stdout)["vms"][0]
    assert not result["ok"] and "no NBD client certificates" in result["error"]
    assert vm.checkpoints() == [] and not vm.job_running()
    assert not list(SCRATCH_ROOT.glob(f"{vm.name}-*"))  # no scratch directory made for the refused job
    plain = json.loads(cli.run("backup", vm.name, "--repo", repo, "--transport", "nbd", "--json",
                               env=no_certs).stdout)["vms"][0]
    assert plain["ok"] and any("not encrypted" in n for n in plain["notes"]), plain["notes"]


def test_nbd_tls_when_the_host_cannot_serve_it(cli: Cli, vm: BareVM, tmp_path: Path,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    """The proxy has client certificates, the host has none: `require` refuses with the remedy and
    leaves nothing; `auto` backs up over plain NBD and says why."""
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    vm.write("vda", 4 * MiB, 2 * MiB, 0x54)
    at_full = vm.snapshot("vda", tmp_path / "full.qcow2")
    # libvirt's refusal names this directory: its path must not contain the words matched
    # libvirtd with an empty backup TLS directory: the host's admin never put certificates there
    with qemu_conf_override("backup_tls_x509_cert_dir", f'"{tmp_path_factory.mktemp("no-server-certs")}"'):
        refused = cli.run("backup", vm.name, "--repo", repo, "--transport", "nbd", "--nbd-tls", "require", "--json",
                          ok=False)
        error = json.loads(refused.stdout)["vms"][0]["error"]
        assert refused.returncode != 0 and "cannot encrypt" in error and "backup_tls_x509_cert_dir" in error, error
        assert vm.checkpoints() == [] and not vm.job_running()
        assert not list(SCRATCH_ROOT.glob(f"{vm.name}-*"))
        plain = json.loads(cli.run("backup", vm.name, "--repo", repo, "--transport", "nbd", "--json").stdout)["vms"][0]
    assert plain["ok"] and plain["transport"] == "nbd" and plain["bytes_read"] == 2 * MiB
    assert any("not encrypted: the host refused TLS" in n for n in plain["notes"]), plain["notes"]
    out = tmp_path / "r.qcow2"
    cli.run("restore", vm.name, "--repo", repo, "--disk", "vda", "--output", str(out))
    assert qemu_img_compare(at_full, out)
    again = json.loads(cli.run("backup", vm.name, "--repo", repo, "--transport", "nbd", "--nbd-tls", "require",
                               "--json").stdout)["vms"][0]  # the host's certificates are back
    assert again["ok"] and again["mode"] == "incremental" and any("encrypted with TLS" in n for n in again["notes"])


def test_proxy_reaches_libvirt_over_ssh(cli: Cli, proxy: list[str], vm: BareVM, tmp_path: Path) -> None:
    """qemu+ssh://: libvirt's control connection through ssh from the other network; the disks
    still come over NBD straight from the host."""
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    vm.write("vda", 8 * MiB, 3 * MiB, 0x63)
    at_full = vm.snapshot("vda", tmp_path / "full.qcow2")
    with ssh_server(PROXY_NETWORK_GATEWAY, tmp_path / "ssh") as server:
        # the private sshd's key file and unknown host key: options only --insecure accepts
        listed = subprocess.run([*proxy, VMKEEP, "inventory", "--host", server.uri(), "--insecure", "--json"],
                                capture_output=True, text=True, env=cli.env, timeout=120)
        assert listed.returncode == 0, listed.stderr
        assert vm.name in {v["name"] for v in json.loads(listed.stdout)["vms"]}
        proc = subprocess.run([*proxy, VMKEEP, "backup", vm.name, "--host", server.uri(), "--insecure", "--repo",
                               repo, "--transport", "hotadd:nbd", "--json"],
                              capture_output=True, text=True, env=cli.env, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    full = json.loads(proc.stdout)["vms"][0]
    assert full["ok"] and full["transport"] == "nbd" and full["bytes_read"] == 3 * MiB
    assert any("hotadd skipped" in n for n in full["notes"]), full["notes"]
    # --nbd-tls auto with the client certificates in place: the disks came over TLS
    assert any("encrypted with TLS" in n for n in full["notes"]), full["notes"]
    out = tmp_path / "r.qcow2"
    cli.run("restore", vm.name, "--repo", repo, "--disk", "vda", "--output", str(out))
    assert qemu_img_compare(at_full, out)


def test_restore_onto_a_host_the_proxy_does_not_run_on(cli: Cli, proxy: list[str], vm: BareVM,
                                                       tmp_path: Path) -> None:
    """From another network, a VM restore uploads each disk into a storage volume on the host
    (holes as holes), which the host converts to qcow2; a restore over the original is refused
    there with what to do, and a failed upload leaves no volume behind."""
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    vm.write("vda", 4 * MiB, 3 * MiB, 0x71)
    vm.write("vda", 60 * MiB, MiB, 0x72)
    at_backup = vm.snapshot("vda", tmp_path / "at.qcow2")
    point = remote_backup(cli, proxy, vm, repo, "--transport", "nbd")["point"]
    new = f"{vm.name}-remote"
    vm.extra.append(new)
    storage = bare_vm.IMAGES / vm.name / "remote-copy"  # no storage pool of the host covers it yet

    def remote_restore(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*proxy, VMKEEP, "restore", f"{vm.name}@{point}", "--repo", repo, "--host", REMOTE_URI,
                               "--json", *args], capture_output=True, text=True, env=cli.env, timeout=300)

    proc = remote_restore("--as", new, "--storage", str(storage), "--no-start")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    restored = Path(json.loads(proc.stdout)["disks"]["vda"])
    assert restored == storage / f"{new}-vda.qcow2" and qemu_img_compare(at_backup, restored)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(restored)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["actual-size"] < 16 * MiB  # the 64 MiB disk's holes stayed holes
    assert sorted(p.name for p in storage.iterdir()) == [restored.name]  # the uploaded raw volume is gone
    assert "vmkeep-restore-" not in bare_vm.virsh("pool-list", "--all")  # the transient pool too
    assert restored.as_posix() in bare_vm.virsh("dumpxml", new)

    proc = remote_restore("--overwrite")
    assert proc.returncode != 0 and "runs on that host" in proc.stderr, proc.stderr

    taken = remote_restore("--as", new, "--storage", str(storage), "--no-start")
    assert taken.returncode != 0 and "already exists" in taken.stderr
    assert sorted(p.name for p in storage.iterdir()) == [restored.name]

    victims = sorted(p for p in Path(repo, "chunks").rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    victims[-1].write_bytes(b"damaged")  # the upload fails part of the way
    failed = remote_restore("--as", f"{new}-2", "--storage", str(storage), "--no-start")
    assert failed.returncode != 0 and "truncated" in failed.stderr, failed.stderr
    assert sorted(p.name for p in storage.iterdir()) == [restored.name]  # its volumes went again
    assert f"{new}-2" not in bare_vm.virsh("list", "--all", "--name")
