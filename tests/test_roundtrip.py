"""Backup and restore round trips through the real command, qemu-nbd and qemu-img compare."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cli, MiB, qemu_img_compare
from vmkeep.lab.images import Segment

CHUNK = 4 * MiB


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize(
    "shape",
    ["random", "sparse", "all-zero", "odd-size", "mixed"],
)
def test_restore_equals_source(cli: Cli, make_disk, tmp_path: Path, shape: str, encrypt: bool) -> None:
    size, segments = {
        "random": (24 * MiB, [Segment(0, 24 * MiB, "random")]),
        "sparse": (256 * MiB, [Segment(3 * MiB, 2 * MiB, "random"), Segment(200 * MiB, 64 * 1024, "text")]),
        "all-zero": (32 * MiB, [Segment(0, 32 * MiB, "zero")]),
        "odd-size": (10 * MiB + 3 * 512, [Segment(0, 10 * MiB + 3 * 512, "random")]),
        "mixed": (40 * MiB, [Segment(0, 10 * MiB, "random"), Segment(10 * MiB, 10 * MiB, "text"),
                             Segment(20 * MiB, 10 * MiB, "zero")]),
    }[shape]
    image = make_disk(size, segments)
    repo = str(tmp_path / "repo")
    if not encrypt:  # a passphrase given to a plain repository is refused
        del cli.env["VMKEEP_PASSPHRASE"]
    cli.run("repo", "init", repo, *(["--encrypt"] if encrypt else []))
    result = cli.json("disk", "backup", str(image), "--repo", repo, "--name", "vm1")
    written = sum(s.length for s in segments if s.kind != "zero")
    if shape == "all-zero":
        assert result["bytes_stored"] == 0
    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"restored.{fmt}"
        cli.run("disk", "restore", f"vm1@{result['point']}", "--repo", repo, "--output", str(out), "--format", fmt)
        assert qemu_img_compare(image, out), f"{shape} restored as {fmt} differs"
    if shape == "sparse":
        # Unallocated space costs nothing: only the chunks holding data were read.
        assert result["bytes_read"] == written
        assert result["bytes_zero"] == size - 3 * CHUNK  # the three chunk slots holding data


def test_raw_source_and_not_an_image(cli: Cli, make_disk, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    raw = make_disk(8 * MiB, [Segment(MiB, MiB, "random")], fmt="raw")
    cli.json("disk", "backup", str(raw), "--repo", repo, "--name", "rawdisk")
    text = tmp_path / "notes.txt"
    text.write_text("this is not a disk image\n")
    proc = cli.run("disk", "backup", str(text), "--repo", repo, "--name", "notes", ok=False)
    assert proc.returncode != 0 and "does not look like a disk image" in proc.stderr
    proc = cli.run("disk", "backup", str(tmp_path / "missing.qcow2"), "--repo", repo, "--name", "x", ok=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert [p["name"] for p in cli.json("points", "--repo", repo)["points"]] == ["rawdisk"]


def test_dedup_across_images_sharing_data(cli: Cli, make_disk, tmp_path: Path) -> None:
    shared = Segment(0, 32 * MiB, "random", seed="template")
    a = make_disk(48 * MiB, [shared, Segment(32 * MiB, 8 * MiB, "random", seed="a")])
    b = make_disk(48 * MiB, [shared, Segment(32 * MiB, 8 * MiB, "random", seed="b")])
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    first = cli.json("disk", "backup", str(a), "--repo", repo, "--name", "vm-a")
    second = cli.json("disk", "backup", str(b), "--repo", repo, "--name", "vm-b")
    assert first["bytes_new"] == 40 * MiB
    assert second["bytes_new"] == 8 * MiB  # only b's own chunks are new
    info = cli.json("repo", "info", repo)
    assert info["names"]["vm-a"]["shared_stored"] == info["names"]["vm-b"]["shared_stored"] > 30 * MiB
    assert info["dedup_ratio"] == pytest.approx(80 / 48, rel=0.01)
    out = tmp_path / "b.qcow2"
    cli.run("disk", "restore", "vm-b", "--repo", repo, "--output", str(out))
    assert qemu_img_compare(b, out)


def test_incremental_reads_only_changed_extents(cli: Cli, make_disk, tmp_path: Path) -> None:
    size = 64 * MiB
    image = make_disk(size, [Segment(0, 48 * MiB, "random")])
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    full = cli.json("disk", "backup", str(image), "--repo", repo, "--name", "vm")
    assert full["bytes_read"] == 48 * MiB

    full_copy = tmp_path / "at-full.qcow2"
    full_copy.write_bytes(image.read_bytes())
    from vmkeep.lab.images import write_segments

    changes = [Segment(5 * MiB, 64 * 1024, "random", "c1"), Segment(50 * MiB, MiB, "text", "c2")]
    write_segments(image, "qcow2", size, changes)
    changed = tmp_path / "changed.txt"
    changed.write_text("".join(f"{c.offset} {c.length}\n" for c in changes))
    incr = cli.json("disk", "backup", str(image), "--repo", repo, "--name", "vm", "--since", full["point"],
                    "--changed", str(changed))
    assert incr["mode"] == "incremental"
    # Only the changed bytes were read from the disk; the rest of the two chunks they touch came
    # from the full's chunks in the repository.
    assert incr["bytes_read"] == 64 * 1024 + MiB
    assert incr["bytes_reused"] == size - 2 * CHUNK

    empty = tmp_path / "nothing.txt"
    empty.write_text("")
    none = cli.json("disk", "backup", str(image), "--repo", repo, "--name", "vm", "--since", "latest",
                    "--changed", str(empty))
    assert none["bytes_read"] == 0 and none["bytes_stored"] == 0

    for point, reference in ((full["point"], full_copy), (incr["point"], image), (none["point"], image)):
        out = tmp_path / f"r-{point}.qcow2"
        cli.run("disk", "restore", f"vm@{point}", "--repo", repo, "--output", str(out))
        assert qemu_img_compare(reference, out)


def test_incremental_from_qcow2_dirty_bitmap(cli: Cli, make_disk, tmp_path: Path) -> None:
    import subprocess

    from vmkeep.lab.images import write_segments

    size = 128 * MiB
    image = make_disk(size, [Segment(0, 64 * MiB, "text")])
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    cli.json("disk", "backup", str(image), "--repo", repo, "--name", "vm")
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b1"], check=True)
    write_segments(image, "qcow2", size, [Segment(70 * MiB, 512 * 1024, "random", "x")])
    incr = cli.json("disk", "backup", str(image), "--repo", repo, "--name", "vm", "--since", "latest",
                    "--bitmap", "b1")
    assert incr["mode"] == "incremental"
    assert incr["bytes_read"] == 512 * 1024  # the chunk holds only that allocated data
    out = tmp_path / "r.raw"
    cli.run("disk", "restore", "vm", "--repo", repo, "--output", str(out), "--format", "raw")
    assert qemu_img_compare(image, out)
    proc = cli.run("disk", "backup", str(image), "--repo", repo, "--name", "vm", "--since", "latest",
                   "--bitmap", "nope", ok=False)
    assert "no persistent bitmap 'nope'" in proc.stderr
