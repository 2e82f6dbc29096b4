"""File-level restore through libguestfs over a point's NBD export: listing, copying out with
metadata, searching across points, hostile guest filesystems and damaged points."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli, MiB

MTIME = 1577934245.0  # 2020-01-02 03:04:05 UTC


@pytest.fixture(scope="module")
def guest_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A crafted ext4 disk: a few files with known modes and times, and two hostile links (one
    up and out of any output directory, one to the host's /etc). Yields (tree, image)."""
    base = tmp_path_factory.mktemp("guestfs")
    tree = base / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "data" / "deep").mkdir(parents=True)
    (tree / "etc" / "app.conf").write_text("key=value\n")
    (tree / "etc" / "app.conf").chmod(0o640)
    (tree / "data" / "blob.bin").write_bytes(os.urandom(300_000))
    (tree / "data" / "deep" / "note.txt").write_text("deep inside\n")
    (tree / "escape").symlink_to("../../../../../../tmp/vmkeep-escape-target")
    (tree / "hostetc").symlink_to("/etc")
    for p in [*tree.rglob("*"), tree]:
        if not p.is_symlink():
            os.utime(p, (MTIME, MTIME))
    image = base / "fs.img"
    subprocess.run(["truncate", "-s", str(32 * MiB), str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image)], check=True)
    yield tree, image


@pytest.fixture
def files_env(cli: Cli) -> Cli:
    return cli


def backed_up(cli: Cli, image: Path, repo: str) -> str:
    cli.run("repo", "init", repo, "--encrypt")
    return str(cli.json("disk", "backup", str(image), "--repo", repo, "--name", "fsvm", "--format", "raw")["point"])


def test_list_get_and_find(files_env: Cli, guest_fs: tuple[Path, Path], tmp_path: Path) -> None:
    cli = files_env
    tree, image = guest_fs
    repo = str(tmp_path / "repo")
    point = backed_up(cli, image, repo)

    entries = cli.json("files", "ls", "fsvm", "/etc", "--repo", repo, "--disk", "disk")["entries"]
    listed = {e["path"]: e for e in entries}
    conf = listed["/etc/app.conf"]
    assert conf["kind"] == "file" and conf["mode"] == 0o640 and conf["size"] == 10 and conf["mtime"] == MTIME

    out = tmp_path / "out"
    got = cli.json("files", "get", f"fsvm@{point}", "/", "--repo", repo, "--disk", "disk", "--output", str(out))
    assert got["point"] == point
    for original in [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]:
        copy = out / original.relative_to(tree)
        assert copy.read_bytes() == original.read_bytes(), copy
        assert copy.stat().st_mode == original.stat().st_mode and copy.stat().st_mtime == MTIME, copy
    assert (out / "data" / "deep").stat().st_mtime == MTIME  # directories keep their times too
    # hostile links come back as links, exactly as the guest wrote them, and are never followed
    assert os.readlink(out / "escape") == "../../../../../../tmp/vmkeep-escape-target"
    assert os.readlink(out / "hostetc") == "/etc"
    assert not Path("/tmp/vmkeep-escape-target").exists()
    assert all(Path(w).resolve().is_relative_to(out.resolve()) or Path(w).is_symlink() for w in got["written"])

    one = cli.json("files", "get", "fsvm", "/data/deep/note.txt", "--repo", repo, "--disk", "disk", "--output",
                   str(tmp_path / "one"))
    assert one["written"] == [str((tmp_path / "one" / "note.txt").resolve())]
    # a second copy into the same place never overwrites what is there
    again = cli.run("files", "get", "fsvm", "/data/deep/note.txt", "--repo", repo, "--disk", "disk", "--output",
                    str(tmp_path / "one"), ok=False)
    assert again.returncode != 0 and "File exists" in again.stderr

    found = cli.json("files", "find", "fsvm", "*.conf", "--repo", repo, "--disk", "disk")
    assert [(m["point"], m["path"]) for m in found["matches"]] == [(point, "/etc/app.conf")]


def test_a_damaged_point_fails_file_restore_clearly(files_env: Cli, guest_fs: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    cli = files_env
    _tree, image = guest_fs
    repo = tmp_path / "repo"
    backed_up(cli, image, str(repo))
    chunks = sorted((p for p in (repo / "chunks").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    for victim in chunks:  # every stored chunk damaged: whatever the file, its bytes are gone
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    out = tmp_path / "out"
    failed = cli.run("files", "get", "fsvm", "/data/blob.bin", "--repo", str(repo), "--disk", "disk", "--output",
                     str(out), ok=False)
    assert failed.returncode != 0
    assert "repo verify" in failed.stderr or "damaged" in failed.stderr, failed.stderr
    assert not (out / "blob.bin").exists()  # no half-copied file is left
    shutil.rmtree(out, ignore_errors=True)


def test_files_from_a_fat_filesystem(files_env: Cli, tmp_path: Path) -> None:
    cli = files_env
    image = tmp_path / "fat.img"
    subprocess.run(["truncate", "-s", str(32 * MiB), str(image)], check=True)
    subprocess.run(["mkfs.vfat", "-n", "VMKEEP", str(image)], check=True, capture_output=True)
    readme = tmp_path / "README.TXT"
    readme.write_text("a FAT volume, as UEFI system partitions and USB sticks are\n")
    os.utime(readme, (MTIME, MTIME))
    subprocess.run(["mmd", "-i", str(image), "::/EFI"], check=True)
    subprocess.run(["mcopy", "-m", "-i", str(image), str(readme), "::/EFI/README.TXT"], check=True)
    repo = str(tmp_path / "repo")
    point = backed_up(cli, image, repo)
    out = tmp_path / "out"
    cli.json("files", "get", f"fsvm@{point}", "/EFI", "--repo", repo, "--disk", "disk", "--output", str(out))
    copy = out / "EFI" / "README.TXT"
    assert copy.read_text() == readme.read_text() and abs(copy.stat().st_mtime - MTIME) <= 2  # FAT: 2 s steps
