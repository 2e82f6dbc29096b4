"""`vmkeep copy` between local repositories, through the real command: what travels, atomicity
after kill -9, garbage collection of the target meanwhile, refusals that change nothing, and a
source that is only ever read."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VMKEEP, Cli, MiB, fresh_cli, qemu_img_compare
from vmkeep.lab.images import Segment, make_image, write_segments

CHUNK = 4 * MiB
BIG = 256 * MiB  # random data: 64 chunks, none shared with the other names
TARGET_PASSPHRASE = "the offsite's own passphrase"


@dataclass
class Source:
    """A local encrypted repository with known points, shared by the module's tests."""

    repo: Path
    cli: Cli
    work: Path
    images: dict[str, Path] = field(default_factory=dict)  # "name@point" -> the disk as backed up
    backups: dict[str, dict[str, Any]] = field(default_factory=dict)  # "name@point" -> `disk backup --json`

    def backup(self, image: Path, name: str) -> str:
        """Back ``image`` up as ``name``; keep a copy of it as it was; return "name@point"."""
        result = self.cli.json("disk", "backup", str(image), "--repo", str(self.repo), "--name", name)
        label = f"{name}@{result['point']}"
        kept = self.work / f"{label}.qcow2"
        shutil.copyfile(image, kept)
        self.images[label], self.backups[label] = kept, result
        return label

    def labels(self, name: str | None = None) -> list[str]:
        """Every point of the repository (of ``name``), oldest first, as `vmkeep copy` names them."""
        rows = self.cli.json("points", "--repo", str(self.repo))["points"]
        return [f"{r['name']}@{r['point']}" for r in rows if name is None or r["name"] == name]

    def like(self, target: Path, **kw: Any) -> str:
        """A new repository sharing the source's keys (its own passphrase is the source's)."""
        self.cli.run("repo", "init", str(target), "--like", str(self.repo), **kw)
        return str(target)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """vm-a (two points, 2 chunks apart), vm-b (one), big (256 MiB random, for the long copies)."""
    work = tmp_path_factory.mktemp("copy-source")
    cli = fresh_cli()
    src = Source(work / "repo", cli, work)
    cli.run("repo", "init", str(src.repo), "--encrypt")
    a = make_image(work / "a.qcow2", 64 * MiB, [Segment(0, 40 * MiB, "random", "a"),
                                                Segment(40 * MiB, 8 * MiB, "text", "a")])
    src.backup(a, "vm-a")
    write_segments(a, "qcow2", 64 * MiB, [Segment(8 * MiB, MiB, "random", "a2"),
                                          Segment(56 * MiB, 2 * MiB, "random", "a2")])
    src.backup(a, "vm-a")
    src.backup(make_image(work / "b.qcow2", 16 * MiB, [Segment(0, 16 * MiB, "random", "b")]), "vm-b")
    src.backup(make_image(work / "big.qcow2", BIG, [Segment(0, BIG, "random", "big")]), "big")
    yield src


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` with its size and mtime: any write shows."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def chunk_names(repo: Path) -> set[str]:
    return {p.name for p in (repo / "chunks").rglob("*") if p.is_file() and not p.name.endswith(".tmp")}


def copy(cli: Cli, src: Source | str, target: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return cli.json("copy", str(src.repo if isinstance(src, Source) else src), target, *args, env=env)


def restores_equal(cli: Cli, repo: str, label: str, image: Path, out: Path,
                   env: dict[str, str] | None = None) -> bool:
    cli.run("disk", "restore", label, "--repo", repo, "--output", str(out), "--format", "raw", env=env)
    try:
        return qemu_img_compare(image, out)
    finally:
        out.unlink()


def visible_points(cli: Cli, repo: str, env: dict[str, str] | None = None) -> list[str]:
    return [f"{r['name']}@{r['point']}" for r in cli.json("points", "--repo", repo, env=env)["points"]]


def refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """A failure that says what went wrong (every word in it), not a traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, f"{word!r} not in: {proc.stderr}"
    return proc.stderr


def test_raw_copy_then_nothing_then_only_the_new_chunks(source: Source, tmp_path: Path) -> None:
    cli = source.cli
    own = {"VMKEEP_PASSPHRASE": TARGET_PASSPHRASE}
    # The target has its own passphrase and the source's key material.
    (tmp_path / "source-pass").write_text(cli.env["VMKEEP_PASSPHRASE"])
    target = str(tmp_path / "offsite")
    cli.run("repo", "init", target, "--like", str(source.repo), "--like-passphrase-file",
            str(tmp_path / "source-pass"), env=own)
    to_target = {"VMKEEP_TARGET_PASSPHRASE": TARGET_PASSPHRASE}
    every = source.labels()
    first = copy(cli, source, target, env=to_target)
    assert first["mode"] == "raw"
    assert first["points_copied"] == every and first["points_present"] == []
    stored = {label: r["bytes_stored"] for label, r in source.backups.items() if label in every}
    assert first["bytes_sent"] == sum(stored.values())  # each stored chunk once, as stored
    assert first["chunks_sent"] == sum(r["chunks_new"] for label, r in source.backups.items() if label in every)
    assert first["bytes_logical"] == sum(r["size"] for label, r in source.backups.items() if label in every)
    assert chunk_names(Path(target)) == chunk_names(source.repo)  # the same chunk ids: copied, not re-keyed
    for label in every:
        assert restores_equal(cli, target, label, source.images[label], tmp_path / "out.raw", env=own), label
    assert visible_points(cli, target, env=own) == every

    again = copy(cli, source, target, env=to_target)
    assert again["points_copied"] == [] and again["points_present"] == every
    assert again["chunks_sent"] == 0 and again["bytes_sent"] == 0

    # A new point sharing all but one chunk with vm-b: only that chunk travels.
    late = tmp_path / "late.qcow2"
    shutil.copyfile(source.images[next(label for label in every if label.startswith("vm-b@"))], late)
    write_segments(late, "qcow2", 16 * MiB, [Segment(CHUNK, CHUNK, "random", "late")])
    label = source.backup(late, "late")
    assert source.backups[label]["chunks_new"] == 1
    third = copy(cli, source, target, env=to_target)
    assert third["points_copied"] == [label] and third["points_present"] == every
    assert third["chunks_sent"] == 1 and third["bytes_sent"] == source.backups[label]["bytes_stored"]
    assert third["chunks_present"] == 3
    assert restores_equal(cli, target, label, late, tmp_path / "out.raw", env=own)
    verify = cli.json("repo", "verify", target, env=own)
    assert verify["ok"] and verify["points"] == len(every) + 1


def test_reencrypt_into_a_target_with_its_own_keys(source: Source, tmp_path: Path) -> None:
    cli = source.cli
    own = {"VMKEEP_PASSPHRASE": TARGET_PASSPHRASE}
    target = str(tmp_path / "other-keys")
    cli.run("repo", "init", target, "--encrypt", env=own)
    proc = cli.run("copy", str(source.repo), target, "--name", "vm-*",
                   env={"VMKEEP_TARGET_PASSPHRASE": TARGET_PASSPHRASE})
    assert "re-encrypt" in proc.stdout, proc.stdout
    wanted = source.labels("vm-a") + source.labels("vm-b")
    assert visible_points(cli, target, env=own) == sorted(wanted, key=wanted.index)
    for label in wanted:
        assert restores_equal(cli, target, label, source.images[label], tmp_path / "out.raw", env=own), label
    again = copy(cli, source, target, "--name", "vm-*", env={"VMKEEP_TARGET_PASSPHRASE": TARGET_PASSPHRASE})
    assert again["mode"] == "re-encrypt" and again["chunks_sent"] == 0 and sorted(again["points_present"]) == \
        sorted(wanted)
    # Named and encrypted under the target's keys: not one chunk file of the source's.
    theirs = chunk_names(Path(target))
    assert len(theirs) == sum(r["chunks_new"] for label, r in source.backups.items() if label in wanted)
    assert not theirs & chunk_names(source.repo)
    assert cli.json("repo", "verify", target, env=own)["ok"]


def test_choosing_points_and_throttling(source: Source, tmp_path: Path) -> None:
    cli = source.cli
    a1, a2 = source.labels("vm-a")
    [b1] = source.labels("vm-b")
    target = source.like(tmp_path / "chosen")
    newest = copy(cli, source, target, "--name", "vm-*", "--latest", "1")
    assert newest["points_copied"] == [a2, b1]
    assert visible_points(cli, target) == [a2, b1]
    older = copy(cli, source, target, "--point", a1.split("@")[1][:-2])  # a unique prefix
    assert older["points_copied"] == [a1]
    assert older["chunks_sent"] == 1  # a2 is there: only the one chunk a1 has of its own travels
    assert visible_points(cli, target) == [a1, a2, b1]
    proc = cli.run("copy", str(source.repo), target, "--point", "29991231", ok=False)
    refused(proc, "no restore point matches")

    paced = source.like(tmp_path / "paced")
    rate = 8  # MiB/s
    started = time.monotonic()
    slow = copy(cli, source, paced, "--name", "vm-b", "--max-rate", str(rate))
    took = time.monotonic() - started
    assert slow["points_copied"] == [b1] and slow["bytes_sent"] > 15 * MiB
    assert took >= 0.8 * slow["bytes_sent"] / (rate * MiB), took  # 16 MiB at 8 MiB/s: about 2 s


def _copy_in_background(cli: Cli, source: Source, target: str, rate: int) -> subprocess.Popen[bytes]:
    """A paced copy of the big point (--json: no progress output to fill a pipe)."""
    return subprocess.Popen([VMKEEP, "copy", str(source.repo), target, "--name", "big", "--max-rate", str(rate),
                             "--json"], env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when_chunks_arrived(proc: subprocess.Popen[bytes], target: Path, count: int) -> int:
    """SIGKILL the copy once ``count`` chunks are in the target; how many had arrived."""
    deadline = time.monotonic() + 60
    while len(chunk_names(target)) < count:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, "the copy sent no chunks"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    return len(chunk_names(target))


def test_kill_9_mid_copy_leaves_nothing_visible_and_resumes(source: Source, tmp_path: Path) -> None:
    cli = source.cli
    [big] = source.labels("big")
    target = source.like(tmp_path / "killed")
    arrived = _kill_when_chunks_arrived(_copy_in_background(cli, source, target, 32), Path(target), 12)
    assert 12 <= arrived < BIG // CHUNK
    assert visible_points(cli, target) == []
    assert not list((Path(target) / "points").rglob("*.json"))

    resumed = copy(cli, source, target, "--name", "big", "--verify")
    assert resumed["points_copied"] == [big] and resumed["verified"]
    assert resumed["chunks_present"] >= arrived
    assert resumed["chunks_sent"] + resumed["chunks_present"] == BIG // CHUNK
    total = source.backups[big]["bytes_stored"]
    assert resumed["bytes_sent"] <= total * (BIG // CHUNK - arrived) / (BIG // CHUNK) + 4096
    assert resumed["bytes_sent"] < total
    assert visible_points(cli, target)[-1] == big
    assert restores_equal(cli, target, big, source.images[big], tmp_path / "out.raw")


def test_gc_of_the_target_during_a_copy_sweeps_nothing_it_needs(source: Source, tmp_path: Path) -> None:
    cli = source.cli
    [big] = source.labels("big")
    target = Path(source.like(tmp_path / "collected"))
    # An earlier copy killed half-way left chunks no point references, an hour old by now:
    # garbage, unless the copy running now relies on them.
    _kill_when_chunks_arrived(_copy_in_background(cli, source, str(target), 64), target, 12)
    hour_ago = time.time() - 3600
    for p in (target / "chunks").rglob("*"):
        os.utime(p, (hour_ago, hour_ago))
    orphans = len(chunk_names(target))
    proc = _copy_in_background(cli, source, str(target), 48)
    while len(chunk_names(target)) <= orphans:  # collect once the copy is past the orphans it reuses
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    runs = []
    while proc.poll() is None:
        runs.append(cli.json("repo", "gc", str(target)))
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert any(r["sessions_live"] >= 1 for r in runs), runs  # collections ran while the copy did
    assert visible_points(cli, str(target)) == [big]
    after = cli.json("repo", "gc", str(target))
    assert after["chunks_deleted"] == 0 and after["chunks_live"] == BIG // CHUNK
    assert cli.json("repo", "verify", str(target))["ok"]
    assert restores_equal(cli, str(target), big, source.images[big], tmp_path / "out.raw")


def test_refusals_say_what_to_do_and_change_nothing(source: Source, tmp_path: Path) -> None:
    cli = source.cli
    before = tree(source.repo)
    refused(cli.run("copy", str(source.repo), str(source.repo), ok=False), "same repository")

    other_size = tmp_path / "one-mib"
    cli.run("repo", "init", str(other_size), "--encrypt", "--chunk-size", "1M")
    kept = tree(other_size)
    refused(cli.run("copy", str(source.repo), str(other_size), ok=False), "--like", str(source.repo))
    assert tree(other_size) == kept

    own_keys = tmp_path / "own-keys"
    cli.run("repo", "init", str(own_keys), "--encrypt", env={"VMKEEP_PASSPHRASE": TARGET_PASSPHRASE})
    kept = tree(own_keys)
    refused(cli.run("copy", str(source.repo), str(own_keys), ok=False,  # the source's passphrase is not the target's
                    env={"VMKEEP_TARGET_PASSPHRASE": "not it"}), str(own_keys), "VMKEEP_TARGET_PASSPHRASE")
    refused(cli.run("copy", str(source.repo), str(own_keys), ok=False), str(own_keys), "passphrase")
    assert tree(own_keys) == kept

    unencrypted = tmp_path / "unencrypted"  # the backups would lie there in plain text
    cli.run("repo", "init", str(unencrypted), env={"VMKEEP_PASSPHRASE": ""})
    plain_kept = tree(unencrypted)
    refused(cli.run("copy", str(source.repo), str(unencrypted), ok=False), "plain text", "--like")
    assert tree(unencrypted) == plain_kept

    plain_dir = tmp_path / "not-a-repo"
    plain_dir.mkdir()
    refused(cli.run("copy", str(plain_dir), str(own_keys), ok=False, env={"VMKEEP_TARGET_PASSPHRASE": "x"}),
            "not a vmkeep repository")
    refused(cli.run("copy", str(source.repo), str(plain_dir), ok=False), "repo init", "--like")
    assert tree(own_keys) == kept and list(plain_dir.iterdir()) == []
    assert tree(source.repo) == before


def test_target_full(source: Source, tmp_path: Path) -> None:
    cli = source.cli
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        target = source.like(mount / "repo")
        proc = cli.run("copy", str(source.repo), target, "--name", "vm-b", ok=False)
        refused(proc, target)
        assert "full" in proc.stderr and "free" in proc.stderr, proc.stderr
        assert visible_points(cli, target) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_damaged_source_chunk_stops_the_copy(tmp_path: Path) -> None:
    cli = fresh_cli()
    repo = tmp_path / "damaged"
    cli.run("repo", "init", str(repo), "--encrypt")
    image = make_image(tmp_path / "d.qcow2", 12 * MiB, [Segment(0, 12 * MiB, "random", "d")])
    cli.json("disk", "backup", str(image), "--repo", str(repo), "--name", "vm")
    bad = sorted(p for p in (repo / "chunks").rglob("*") if p.is_file())[1]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    before = tree(repo)
    raw = tmp_path / "raw"
    cli.run("repo", "init", str(raw), "--like", str(repo))
    own = tmp_path / "own"
    cli.run("repo", "init", str(own), "--encrypt")
    for target in (raw, own):  # copied as stored, or decrypted: either way the damage is caught
        refused(cli.run("copy", str(repo), str(target), ok=False), bad.name)
        assert visible_points(cli, str(target)) == []
    assert tree(repo) == before


def test_the_source_is_never_written(source: Source, tmp_path: Path) -> None:
    cli = source.cli
    before = tree(source.repo)
    raw = copy(cli, source, source.like(tmp_path / "raw"), "--name", "vm-*", "--verify")
    assert raw["verified"] and raw["points_copied"]
    own = tmp_path / "own"
    cli.run("repo", "init", str(own), "--encrypt")
    assert copy(cli, source, str(own), "--name", "vm-b", "--verify")["mode"] == "re-encrypt"
    assert tree(source.repo) == before
