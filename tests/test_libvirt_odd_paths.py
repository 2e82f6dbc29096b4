"""Paths holding XML's special characters, through the real local libvirt: a VM whose images and
scratch directory (``VMKEEP_SCRATCH_DIR``) have ``&``, ``'``, ``<``, ``>`` and spaces in their
paths is backed up with hotadd and san. The scratch directory reaches the backup document (scratch
files, NBD socket) and the snapshot document (overlays). VM names cannot carry these characters:
vmkeep refuses them before any XML is written (names become repository keys)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import bare_vm
from tests.bare_vm import BareVM
from tests.conftest import Cli, MiB, qemu_img_compare

ODD = "t &a'b<c>"  # short: the NBD socket path under the scratch directory must fit in 108 bytes


@pytest.fixture
def odd_dirs() -> Iterator[tuple[Path, Path]]:
    """(image store, scratch directory), both under libvirt's images directory (QEMU must see them)."""
    root = bare_vm.IMAGES / ODD
    store, scratch = root / "store", root / "scr"
    store.mkdir(parents=True)
    scratch.mkdir()
    try:
        yield store, scratch
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def vm(odd_dirs: tuple[Path, Path]) -> Iterator[BareVM]:
    machine = bare_vm.create({"vda": (32 * MiB, "qcow2"), "vdb": (8 * MiB, "raw")}, store=odd_dirs[0])
    try:
        yield machine
    finally:
        bare_vm.destroy(machine)


def backup(cli: Cli, vm: BareVM, repo: str, transport: str, scratch: Path) -> dict:
    proc = cli.run("backup", vm.name, "--repo", repo, "--json", "--transport", transport,
                   env={"VMKEEP_SCRATCH_DIR": str(scratch)})
    return dict(json.loads(proc.stdout)["vms"][0])


def test_hotadd_and_san_with_ampersand_quote_and_angle_brackets_in_paths(
        cli: Cli, vm: BareVM, odd_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    scratch = odd_dirs[1]
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")

    vm.write("vda", 4 * MiB, 4 * MiB, 0x11)
    vm.write("vdb", MiB, MiB, 0x12)
    at_hot = {d: vm.snapshot(d, tmp_path / f"hot-{d}.qcow2") for d in vm.disks}
    hot = backup(cli, vm, repo, "hotadd", scratch)
    assert hot["transport"] == "hotadd" and hot["mode"] == "full", hot

    vm.write("vda", 20 * MiB, MiB, 0x21)
    at_san = {d: vm.snapshot(d, tmp_path / f"san-{d}.qcow2") for d in vm.disks}
    san = backup(cli, vm, repo, "san", scratch)
    assert san["transport"] == "san" and san["mode"] == "incremental", san
    assert san["disks"]["vda"]["bytes_read"] == MiB  # the checkpoint hotadd made held

    assert not list(scratch.iterdir()) and not vm.job_running() and len(vm.checkpoints()) == 1
    sources = bare_vm.virsh("domblklist", vm.name)
    assert all(str(p) in sources for p in vm.disks.values())  # back on its own images after san

    for point, states in ((hot["point"], at_hot), (san["point"], at_san)):
        for disk, reference in states.items():
            out = tmp_path / f"r-{point}-{disk}.qcow2"
            cli.run("restore", f"{vm.name}@{point}", "--repo", repo, "--disk", disk, "--output", str(out))
            assert qemu_img_compare(reference, out), f"{disk} of {point} differs"
