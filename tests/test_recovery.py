"""Restore points used without restoring them first: a disk served over NBD from the repository,
and a lab VM booted straight from its point, then moved to real storage while it runs."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VMKEEP, Cli, MiB, free_port, fresh_cli
from vmkeep.engine import instant
from vmkeep.engine.boot_check import boot_check
from vmkeep.errors import UsageError
from vmkeep.hypervisors.connect import open_connector
from vmkeep.hypervisors.libvirt.instant import OVERLAYS
from vmkeep.lab.guest import LAB_ROOT
from vmkeep.lab.vm import LabVM, create_lab_vm, destroy_lab_vm


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabVM, str, str, dict[str, str]]]:
    """A lab VM with files on vdb, backed up once: (guest, repository, point, file checksums)."""
    cli = fresh_cli()
    guest = create_lab_vm(f"vmkeep-ir-{secrets.token_hex(3)}", disks=2, size=48 * MiB)
    try:
        files = guest.make_files("vdb")
        guest.write("vda", 0, 8 * MiB, seed="instant")
        repo = str(tmp_path_factory.mktemp("recovery") / "repo")
        cli.run("repo", "init", repo, "--encrypt")
        result = json.loads(cli.run("backup", guest.name, "--repo", repo, "--json").stdout)["vms"][0]
        assert result["ok"], result
        yield guest, repo, result["point"], files
    finally:
        guest.destroy()


def test_mount_serves_a_point_over_nbd(cli: Cli, backed_up: tuple[LabVM, str, str, dict[str, str]],
                                       tmp_path: Path) -> None:
    guest, repo, point, _files = backed_up
    restored = tmp_path / "vdb.raw"
    cli.run("restore", f"{guest.name}@{point}", "--repo", repo, "--disk", "vdb", "--output", str(restored),
            "--format", "raw")
    port = free_port()
    proc = subprocess.Popen([VMKEEP, "mount", f"{guest.name}@{point}", "--repo", repo, "--disk", "vdb", "--port",
                             str(port), "--json"], env=cli.env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        announced = json.loads(proc.stdout.readline())
        assert announced["uri"] == f"nbd://127.0.0.1:{port}" and announced["point"] == point
        for _ in range(100):
            if subprocess.run(["nbdinfo", "--size", announced["uri"]], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", announced["uri"], str(restored)],
                              capture_output=True, text=True)
        assert same.returncode == 0, same.stdout + same.stderr
        holes = subprocess.run(["nbdinfo", "--map", announced["uri"]], capture_output=True, text=True).stdout
        assert "hole,zero" in holes  # unused chunks are reported as holes, never fetched
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0  # Ctrl-C stops it cleanly
    assert subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], capture_output=True).returncode != 0


def cleanup(name: str) -> None:
    if (instant.STATE / name / "state.json").exists():
        running = instant.InstantVM.load(name)
        connector = open_connector(running.uri)
        try:
            instant.discard(connector, running)
        finally:
            connector.close()
    destroy_lab_vm(name)


def guest_files(vm: LabVM) -> dict[str, str]:
    out = vm.run("mkdir -p /mnt/vdb && (grep -q ' /mnt/vdb ' /proc/mounts || mount -t ext4 /dev/vdb /mnt/vdb) && "
                 "cd /mnt/vdb && find . -type f ! -name new.txt | sort | xargs sha256sum")
    return {p.removeprefix("./"): h for h, p in (line.split(None, 1) for line in out.splitlines() if line.strip())}


def test_instant_recovery_boots_then_moves_to_storage(cli: Cli, backed_up: tuple[LabVM, str, str, dict[str, str]],
                                                     tmp_path: Path) -> None:
    guest, repo, point, files = backed_up
    copy = f"{guest.name}-i"
    try:
        started = cli.json("instant-restore", f"{guest.name}@{point}", "--repo", repo, "--as", copy)
        assert set(started["overlays"]) == {"vda", "vdb"}
        vm = LabVM.open(copy)
        vm.wait_ready()
        vm.agent_ping()
        assert guest_files(vm) == files  # the guest reads its files from the repository, intact
        vm.run("echo written-during-recovery > /mnt/vdb/new.txt && sync")

        finished = cli.run("instant-restore", "finish", copy, "--storage", str(tmp_path / "moved"))
        bars = [line for line in finished.stderr.splitlines() if line.lstrip().startswith("move vd")]
        assert len(bars) == 2 and not any("/0 bytes" in b or "0.0/0" in b for b in bars), finished.stderr
        moved = {"disks": {d: str(tmp_path / "moved" / f"{copy}-{d}.qcow2") for d in ("vda", "vdb")}}
        assert all(Path(p).exists() for p in moved["disks"].values())
        assert f"{copy}: moved to {tmp_path / 'moved'}" in "".join(finished.stdout.split("\n")), finished.stdout
        assert vm.is_running() and vm.run("cat /mnt/vdb/new.txt").strip() == "written-during-recovery"
        assert guest_files(vm) == files
        assert not (instant.STATE / copy).exists() and not (OVERLAYS / copy).exists()
        for disk in moved["disks"].values():  # standalone images: the repository is out of the picture
            info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", disk], capture_output=True,
                                             text=True, check=True).stdout)
            assert "backing-filename" not in info, info
        assert f"{copy}-vdb.qcow2" in subprocess.run(["virsh", "dumpxml", "--inactive", copy], capture_output=True,
                                                     text=True).stdout  # the definition follows the move
    finally:
        cleanup(copy)


def test_instant_recovery_discard_leaves_nothing(cli: Cli, backed_up: tuple[LabVM, str, str, dict[str, str]]) -> None:
    guest, repo, point, _files = backed_up
    copy = f"{guest.name}-d"
    try:
        cli.json("instant-restore", f"{guest.name}@{point}", "--repo", repo, "--as", copy)
        pids = json.loads((instant.STATE / copy / "state.json").read_text())["exports"].values()
        taken = cli.run("instant-restore", f"{guest.name}@{point}", "--repo", repo, "--as", copy, ok=False)
        assert "already exists" in taken.stderr
        cli.json("instant-restore", "finish", copy, "--discard")
        assert subprocess.run(["virsh", "domstate", copy], capture_output=True).returncode != 0
        assert not (instant.STATE / copy).exists() and not (OVERLAYS / copy).exists()
        assert all(not Path(f"/proc/{pid}").exists() for pid in pids)  # the exports stopped
        unknown = cli.run("instant-restore", "finish", copy, "--discard", ok=False)
        assert "no instant recovery named" in unknown.stderr
    finally:
        cleanup(copy)


class BackupOnly:
    """A connector without the optional capabilities (vSphere's, for one)."""

    kind, uri, is_local = "other", "other://host", True

    def exists(self, name: str) -> bool:
        return False

    def close(self) -> None:
        pass


def test_a_connector_without_the_capability_is_refused() -> None:
    with pytest.raises(UsageError, match="cannot run a VM straight from a restore point"):
        instant.start(None, None, BackupOnly(), "vm", None, "copy")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="cannot boot a restore point in a sandbox"):
        boot_check(None, None, BackupOnly(), "vm", None)  # type: ignore[arg-type]


def test_verify_boot_records_pass_and_fail_on_the_point(cli: Cli, backed_up: tuple[LabVM, str, str, dict[str, str]],
                                                        tmp_path: Path) -> None:
    guest, repo, point, _files = backed_up
    passed = cli.json("verify-boot", f"{guest.name}@{point}", "--repo", repo, "--timeout", "120")
    assert passed["passed"] and passed["seconds_to_heartbeat"] is not None and passed["chunks_checked"] > 0
    sandbox = passed["sandbox"]
    assert subprocess.run(["virsh", "domstate", sandbox], capture_output=True).returncode != 0  # removed
    assert not (instant.STATE / sandbox).exists()
    assert not (LAB_ROOT / sandbox).exists()  # its console log's directory went with it
    listed = {p["point"]: p for p in cli.json("points", guest.name, "--repo", repo)["points"]}
    assert listed[point]["boot_check"]["passed"] is True

    # a script that finds something wrong fails the check, with its output
    script = tmp_path / "check.sh"
    script.write_text("#!/bin/sh\n"
                      "virsh -c \"$VMKEEP_VERIFY_URI\" domiflist \"$VMKEEP_VERIFY_VM\" | grep -q network && exit 0\n"
                      "echo \"$VMKEEP_VERIFY_VM has no network: sandboxed\"; exit 3\n")
    script.chmod(0o755)
    failed = cli.run("verify-boot", f"{guest.name}@{point}", "--repo", repo, "--script", str(script), "--json",
                     ok=False)
    result = json.loads(failed.stdout)
    assert failed.returncode == 1 and not result["passed"] and result["script"]["exit"] == 3
    assert "sandboxed" in result["reason"]
    listed = {p["point"]: p for p in cli.json("points", guest.name, "--repo", repo)["points"]}
    assert listed[point]["boot_check"]["passed"] is False  # the latest check is the one kept


def test_a_corrupted_point_fails_verify_boot_without_booting(cli: Cli,
                                                           backed_up: tuple[LabVM, str, str, dict[str, str]],
                                                           tmp_path: Path) -> None:
    guest, repo, point, _files = backed_up
    damaged = tmp_path / "damaged"
    shutil.copytree(repo, damaged)
    victim = next(p for p in (damaged / "chunks").rglob("*") if p.is_file() and len(p.name) == 64)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    failed = cli.run("verify-boot", f"{guest.name}@{point}", "--repo", str(damaged), "--json", ok=False)
    result = json.loads(failed.stdout)
    assert failed.returncode == 1 and "does not read back" in result["reason"] and "sandbox" not in result


def test_policy_boot_checks_each_new_point(cli: Cli, backed_up: tuple[LabVM, str, str, dict[str, str]],
                                           database: str, tmp_path: Path) -> None:
    from tests.test_scale_out import master_with_repository, run_to_end, start_proxy, stop, wait_for
    from tests.test_server import launch

    guest, _repo, _point, _files = backed_up
    with launch(cli, database, tmp_path) as master:
        admin, repo = master_with_repository(master, cli, tmp_path)
        assert admin.post("/api/hypervisors/local/discover").status_code == 200
        assert admin.post("/api/policies", json={"name": "sure", "repository": "main", "vms": [guest.name],
                                                 "transports": "hotadd", "verify_boot": True}).status_code == 201
        token = admin.post("/api/tokens", json={"name": "proxy"}).json()["token"]
        proxy = start_proxy(master, token, "p1")
        try:
            wait_for("the proxy", lambda: any(p["up"] for p in admin.get("/api/proxies").json()))
            done = run_to_end(admin, "sure", {guest.name: "queued"})[guest.name]
        finally:
            stop(proxy)
    check = done["boot_check"]
    assert check["passed"] and check["point"] == done["point_id"] and check["seconds_to_heartbeat"] is not None
    listed = {p["point"]: p for p in cli.json("points", guest.name, "--repo", repo)["points"]}
    assert listed[done["point_id"]]["boot_check"]["passed"] is True
