"""Restored disks in the host's storage pools, so libvirt manages them: a pool named with
--storage, or by default the pool the original's disks are in; `virsh undefine
--remove-all-storage` then removes the copy's disks as it would any VM's."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import bare_vm
from tests.bare_vm import virsh
from tests.conftest import Cli, MiB, qemu_img_compare


@contextmanager
def transient_pool(directory: Path) -> Iterator[str]:
    name = f"vmkeep-test-{secrets.token_hex(3)}"
    directory.mkdir(parents=True, exist_ok=True)
    virsh("pool-create-as", name, "dir", "--target", str(directory))
    try:
        yield name
    finally:
        virsh("pool-destroy", name, check=False)


def test_restores_go_into_storage_pools(cli: Cli, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    with bare_vm.running({"vda": (32 * MiB, "qcow2")}) as vm:
        vm.write("vda", MiB, 2 * MiB, 0x5c)
        at_backup = vm.snapshot("vda", tmp_path / "at.qcow2")
        point = json.loads(cli.run("backup", vm.name, "--repo", repo, "--json").stdout)["vms"][0]["point"]

        # a pool named with --storage
        with transient_pool(bare_vm.IMAGES / vm.name / "pool") as pool:
            copy = f"{vm.name}-p"
            vm.extra.append(copy)
            res = cli.json("restore", f"{vm.name}@{point}", "--repo", repo, "--as", copy, "--storage", pool,
                           "--no-start")
            disk = Path(res["disks"]["vda"])
            assert disk.parent == bare_vm.IMAGES / vm.name / "pool" and qemu_img_compare(at_backup, disk)
            assert disk.name in virsh("vol-list", pool)
            virsh("undefine", copy, "--remove-all-storage")  # libvirt removes the disks it manages
            assert not disk.exists()

        # by default, the pool the original's disks are in
        with transient_pool(bare_vm.IMAGES / vm.name) as pool:
            copy = f"{vm.name}-d"
            vm.extra.append(copy)
            res = cli.json("restore", f"{vm.name}@{point}", "--repo", repo, "--as", copy, "--no-start")
            disk = Path(res["disks"]["vda"])
            assert disk.parent == bare_vm.IMAGES / vm.name and qemu_img_compare(at_backup, disk)
            assert disk.name in virsh("vol-list", pool)
            virsh("undefine", copy, "--remove-all-storage")
            assert not disk.exists() and vm.disks["vda"].exists()

        refused = cli.run("restore", vm.name, "--repo", repo, "--as", f"{vm.name}-x", "--storage", "no-such-pool",
                          ok=False)
        assert refused.returncode != 0 and "no active storage pool 'no-such-pool'" in refused.stderr
