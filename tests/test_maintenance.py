"""Prune, garbage collection (also while backups run), concurrent writers, repository info."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.conftest import VMKEEP, Cli, MiB, qemu_img_compare
from vmkeep.lab.images import Segment
from vmkeep.repository.backends import FilesystemBackend
from vmkeep.repository.config import Credentials
from vmkeep.repository.gc import collect
from vmkeep.repository.points import Manifest
from vmkeep.repository.prune import RetentionPolicy, select
from vmkeep.repository.repo import Repository, chunk_key
from vmkeep.repository.sessions import WriterSession


def _point(created: datetime, n: int) -> Manifest:
    return Manifest("vm", f"p{n:03d}", created.isoformat(), None, {}, 4 * MiB)


def test_retention_selection() -> None:
    start = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    points = [_point(start + timedelta(hours=6 * i), i) for i in range(60)]  # 15 days, 4 per day
    daily = select(points, RetentionPolicy(daily=7))
    kept = sorted(daily.keep)
    assert len(kept) == 7
    assert kept[-1] == "p059"  # the newest point of each day is the one kept
    assert all(int(p[1:]) % 4 == 3 for p in kept)
    both = select(points, RetentionPolicy(last=3, weekly=2))
    assert {"p059", "p058", "p057"} <= set(both.keep)
    assert len(both.keep) + len(both.remove) == 60
    assert "last" in both.keep["p059"] and "weekly" in both.keep["p059"]


def test_prune_then_gc_frees_space_and_keeps_the_rest(cli: Cli, make_disk, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    images = []
    for i in range(3):
        segments = [Segment(0, 8 * MiB, "random", "common"), Segment(8 * MiB, 8 * MiB, "random", f"v{i}")]
        img = make_disk(16 * MiB, segments, name=f"gen{i}.qcow2")
        images.append(img)
        cli.json("disk", "backup", str(img), "--repo", repo, "--name", "vm")
    dry = cli.json("repo", "prune", repo, "--keep-last", "1", "--dry-run")
    assert len(dry["names"]["vm"]["remove"]) == 2
    assert len(cli.json("points", "--repo", repo)["points"]) == 3
    cli.json("repo", "prune", repo, "--keep-last", "1")
    assert len(cli.json("points", "--repo", repo)["points"]) == 1
    gc = cli.json("repo", "gc", repo)
    assert gc["chunks_deleted"] == 4  # the two pruned generations' own 8 MiB each
    assert gc["bytes_freed"] > 16 * MiB
    assert gc["indexes_deleted"] == 2
    assert cli.json("repo", "verify", repo)["ok"]
    out = tmp_path / "r.qcow2"
    cli.run("disk", "restore", "vm", "--repo", repo, "--output", str(out))
    assert qemu_img_compare(images[-1], out)
    proc = cli.run("repo", "prune", repo, ok=False)
    assert proc.returncode == 2 and "--keep" in proc.stderr


def _open(tmp_path: Path) -> Repository:
    return Repository.init(FilesystemBackend(tmp_path / "repo"), chunk_size=MiB, compression=1, encrypt=False,
                           credentials=Credentials())


def test_gc_spares_chunks_of_a_running_backup(tmp_path: Path) -> None:
    repo = _open(tmp_path)
    data = os.urandom(MiB)
    cid = repo.keys.chunk_id(data)
    with WriterSession(repo.backend, protects=[]):
        assert repo.store_chunk(cid, data) > 0
        report = collect(repo)
        assert report.sessions_live == 1 and report.chunks_deleted == 0
        assert repo.backend.stat(chunk_key(cid)) is not None
    report = collect(repo)  # the backup ended without committing: now it is garbage
    assert report.chunks_deleted == 1 and repo.backend.stat(chunk_key(cid)) is None


def test_gc_spares_an_old_chunk_a_running_backup_dedups_against(tmp_path: Path) -> None:
    repo = _open(tmp_path)
    data = os.urandom(MiB)
    cid = repo.keys.chunk_id(data)
    repo.store_chunk(cid, data)
    path = tmp_path / "repo" / chunk_key(cid)
    old = time.time() - 3600
    os.utime(path, (old, old))  # an orphan left by a pruned point an hour ago
    with WriterSession(repo.backend, protects=[]):
        assert repo.store_chunk(cid, data) == 0  # dedup hit: not stored again, but touched
        assert collect(repo).chunks_deleted == 0
    assert path.exists()


def test_gc_spares_the_parent_of_a_running_backup_pruned_meanwhile(cli: Cli, make_disk, tmp_path: Path) -> None:
    image = make_disk(8 * MiB, [Segment(0, 8 * MiB, "random")])
    repo_dir = tmp_path / "repo"
    cli.run("repo", "init", str(repo_dir), "--encrypt")
    cli.json("disk", "backup", str(image), "--repo", str(repo_dir), "--name", "vm")
    repo = Repository.open(FilesystemBackend(repo_dir), Credentials(cli.env["VMKEEP_PASSPHRASE"].encode()))
    parent = repo.list_points("vm")[0]
    with WriterSession(repo.backend, protects=[e.index_key for e in parent.disks.values()]):
        repo.delete_points([parent])  # a prune races with the backup that builds on this point
        past = time.time() - 3600
        for p in (repo_dir / "chunks").rglob("*"):
            os.utime(p, (past, past))
        report = collect(repo)
        assert report.chunks_deleted == 0 and report.chunks_live == 2
    assert collect(repo).chunks_deleted == 2  # once the backup is over, they go


def test_two_writers_at_once_both_succeed_and_dedup(cli: Cli, make_disk, tmp_path: Path) -> None:
    shared = Segment(0, 64 * MiB, "random", "shared")
    a = make_disk(80 * MiB, [shared, Segment(64 * MiB, 16 * MiB, "text", "a")])
    b = make_disk(80 * MiB, [shared, Segment(64 * MiB, 16 * MiB, "text", "b")])
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    procs = [subprocess.Popen([VMKEEP, "disk", "backup", str(img), "--repo", repo, "--name", name, "--json"],
                              env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for img, name in ((a, "a"), (b, "b"))]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    info = cli.json("repo", "info", repo)
    assert info["unique_plain_bytes"] == 96 * MiB  # shared data stored once
    assert info["chunks"] == 24
    for img, name in ((a, "a"), (b, "b")):
        out = tmp_path / f"{name}.qcow2"
        cli.run("disk", "restore", name, "--repo", repo, "--output", str(out))
        assert qemu_img_compare(img, out)
    assert cli.json("repo", "verify", repo)["ok"]
