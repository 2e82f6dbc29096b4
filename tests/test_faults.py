"""Bad input and faults: each gives a clear error, exits non-zero and leaves stored points intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import VMKEEP, Cli, MiB, free_port, qemu_img_compare
from vmkeep.lab.images import Segment


@pytest.fixture
def repo_with_point(cli: Cli, make_disk, tmp_path: Path) -> tuple[str, Path, dict]:
    image = make_disk(24 * MiB, [Segment(0, 16 * MiB, "random"), Segment(16 * MiB, 4 * MiB, "text")])
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    point = cli.json("disk", "backup", str(image), "--repo", repo, "--name", "vm")
    return repo, image, point


def _chunk_files(repo: str) -> list[Path]:
    return sorted(p for p in Path(repo, "chunks").rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def test_wrong_passphrase(cli: Cli, repo_with_point, tmp_path: Path) -> None:
    repo, image, _ = repo_with_point
    proc = cli.run("disk", "backup", str(image), "--repo", repo, "--name", "vm", ok=False,
                   env={"VMKEEP_PASSPHRASE": "wrong"})
    assert proc.returncode != 0 and "passphrase does not unlock" in proc.stderr
    proc = cli.run("points", "--repo", repo, ok=False, env={"VMKEEP_PASSPHRASE": ""})
    assert proc.returncode != 0 and "VMKEEP_PASSPHRASE" in proc.stderr
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple\n")
    assert len(cli.json("points", "--repo", repo, "--passphrase-file", str(pw), env={"VMKEEP_PASSPHRASE": ""})
               ["points"]) == 1


def test_key_file_repository(cli: Cli, make_disk, tmp_path: Path) -> None:
    image = make_disk(8 * MiB, [Segment(0, 8 * MiB, "random")])
    repo, key = str(tmp_path / "repo"), tmp_path / "repo.key"
    cli.run("repo", "init", repo, "--encrypt", "--key-file", str(key))
    cli.json("disk", "backup", str(image), "--repo", repo, "--name", "vm", "--key-file", str(key))
    proc = cli.run("points", "--repo", repo, ok=False)
    assert proc.returncode != 0 and "--key-file" in proc.stderr
    other = tmp_path / "other.key"
    cli.run("repo", "init", str(tmp_path / "repo2"), "--encrypt", "--key-file", str(other))
    proc = cli.run("points", "--repo", repo, "--key-file", str(other), ok=False)
    assert "belongs to another repository" in proc.stderr
    out = tmp_path / "r.qcow2"
    cli.run("disk", "restore", "vm", "--repo", repo, "--key-file", str(key), "--output", str(out))
    assert qemu_img_compare(image, out)


def test_flipped_byte_is_detected_by_verify_and_restore(cli: Cli, repo_with_point, tmp_path: Path) -> None:
    repo, _image, point = repo_with_point
    victim = _chunk_files(repo)[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    proc = cli.run("repo", "verify", repo, "--json", ok=False)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert list(report["bad_chunks"]) == [victim.name]
    assert f"vm@{point['point']}" in report["broken_points"]
    proc = cli.run("repo", "verify", repo, "--point", f"vm@{point['point']}", "--json", ok=False)
    assert proc.returncode == 1 and list(json.loads(proc.stdout)["bad_chunks"]) == [victim.name]
    out = tmp_path / "r.qcow2"
    proc = cli.run("disk", "restore", "vm", "--repo", repo, "--output", str(out), ok=False)
    assert proc.returncode != 0 and "damaged" in proc.stderr and victim.name in proc.stderr
    assert not out.exists()  # no half-restored image is left behind


def test_missing_chunk_names_the_broken_point(cli: Cli, repo_with_point, tmp_path: Path) -> None:
    repo, _image, point = repo_with_point
    victim = _chunk_files(repo)[-1]
    victim.unlink()
    proc = cli.run("repo", "verify", repo, ok=False)
    assert proc.returncode == 1 and f"vm@{point['point']}" in proc.stdout and "missing" in proc.stdout
    proc = cli.run("disk", "restore", "vm", "--repo", repo, "--output", str(tmp_path / "r.raw"), "--format", "raw",
                   ok=False)
    assert "missing" in proc.stderr and not (tmp_path / "r.raw").exists()


def test_truncated_index_and_other_points_stay_good(cli: Cli, repo_with_point, make_disk, tmp_path: Path) -> None:
    repo, image, first = repo_with_point
    other = make_disk(8 * MiB, [Segment(0, 8 * MiB, "text")])
    cli.json("disk", "backup", str(other), "--repo", repo, "--name", "other")
    index = next(Path(repo, "indexes", "vm").rglob("*.idx"))
    index.write_bytes(index.read_bytes()[:-7])
    proc = cli.run("disk", "restore", "vm", "--repo", repo, "--output", str(tmp_path / "r.qcow2"), ok=False)
    assert proc.returncode != 0 and "damaged or truncated" in proc.stderr
    proc = cli.run("repo", "verify", repo, "--json", ok=False)
    assert list(json.loads(proc.stdout)["broken_points"]) == [f"vm@{first['point']}"]
    proc = cli.run("repo", "gc", repo, ok=False)  # cannot tell what the damaged point needs: sweeps nothing
    assert proc.returncode != 0 and "refusing" in proc.stderr
    out = tmp_path / "other.qcow2"
    cli.run("disk", "restore", "other", "--repo", repo, "--output", str(out))
    assert qemu_img_compare(other, out)


def test_newer_format_is_refused(cli: Cli, repo_with_point) -> None:
    repo, image, _ = repo_with_point
    config = Path(repo, "config.json")
    raw = json.loads(config.read_text())
    raw["format"] = 99
    config.write_text(json.dumps(raw))
    proc = cli.run("disk", "backup", str(image), "--repo", repo, "--name", "vm", ok=False)
    assert proc.returncode != 0 and "newer vmkeep" in proc.stderr and "upgrade" in proc.stderr


def test_not_a_repository_and_double_init(cli: Cli, tmp_path: Path) -> None:
    proc = cli.run("points", "--repo", str(tmp_path), ok=False)
    assert "not a vmkeep repository" in proc.stderr and "repo init" in proc.stderr
    cli.run("repo", "init", str(tmp_path / "r"))
    proc = cli.run("repo", "init", str(tmp_path / "r"), ok=False)
    assert proc.returncode != 0 and "already a vmkeep repository" in proc.stderr


@pytest.fixture(params=["tmpfs", "ext4"])
def small_fs(request: pytest.FixtureRequest, tmp_path: Path):
    """A 40 MiB filesystem: tmpfs (buffered chunk writes) or ext4 on a loop device (O_DIRECT)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if request.param == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], check=True)
    else:
        backing = tmp_path / "small.ext4"
        subprocess.run(["truncate", "-s", "40M", str(backing)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True)
        subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True)
    yield mnt
    if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_existing_points(cli: Cli, make_disk, small_fs: Path, tmp_path: Path) -> None:
    repo = str(small_fs / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    small = make_disk(8 * MiB, [Segment(0, 8 * MiB, "random", "small")])
    cli.json("disk", "backup", str(small), "--repo", repo, "--name", "small")
    big = make_disk(64 * MiB, [Segment(0, 64 * MiB, "random", "big")])
    proc = cli.run("disk", "backup", str(big), "--repo", repo, "--name", "big", ok=False)
    assert proc.returncode != 0 and "full" in proc.stderr
    assert [p["name"] for p in cli.json("points", "--repo", repo)["points"]] == ["small"]
    gc = cli.json("repo", "gc", repo)
    assert gc["bytes_freed"] > 0  # the failed backup's chunks
    assert cli.json("repo", "verify", repo)["ok"]
    out = tmp_path / "small.qcow2"
    cli.run("disk", "restore", "small", "--repo", repo, "--output", str(out))
    assert qemu_img_compare(small, out)


def test_kill_9_mid_backup_then_verify_gc_and_next_backup(cli: Cli, make_disk, tmp_path: Path) -> None:
    image = make_disk(192 * MiB, [Segment(0, 192 * MiB, "random")])
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    proc = subprocess.Popen([VMKEEP, "disk", "backup", str(image), "--repo", repo, "--name", "vm", "--workers", "1"],
                            env=cli.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(_chunk_files(repo)) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, "backup ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", f"qemu-nbd.*{image}"]).returncode != 0, "qemu-nbd outlived its parent"
    assert cli.json("points", "--repo", repo)["points"] == []  # no partial point is visible
    leftover = [d for d in Path(tempfile.gettempdir()).glob(f"vmkeep-nbd-{proc.pid}-*")]
    assert leftover  # the killed process could not clean up; the next export sweeps it
    assert cli.json("repo", "verify", repo)["ok"]
    gc = cli.json("repo", "gc", repo)
    assert gc["stale_sessions_removed"] == 1 and gc["chunks_deleted"] >= 5
    assert not [p for p in Path(repo).rglob("*.tmp")], "temporary files of the killed writer remain"
    result = cli.json("disk", "backup", str(image), "--repo", repo, "--name", "vm")
    assert not any(d.exists() for d in leftover)
    out = tmp_path / "r.qcow2"
    cli.run("disk", "restore", f"vm@{result['point']}", "--repo", repo, "--output", str(out))
    assert qemu_img_compare(image, out)


def test_unreachable_s3(cli: Cli, make_disk) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    proc = cli.run("points", "--repo", "s3://nowhere/repo", "--s3-endpoint", endpoint, ok=False, env=env)
    assert proc.returncode != 0 and "cannot reach the S3 endpoint" in proc.stderr


class _Failing(BaseHTTPRequestHandler):
    def _fail(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _fail

    def log_message(self, *args: object) -> None:
        pass


def test_failing_s3(cli: Cli) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
        proc = cli.run("points", "--repo", "s3://bucket/repo", "--s3-endpoint", endpoint, ok=False, env=env)
        assert proc.returncode != 0 and "S3 failed" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        server.shutdown()


def test_damaged_manifest_is_reported_not_fatal(cli: Cli, repo_with_point, make_disk, tmp_path: Path) -> None:
    repo, _image, point = repo_with_point
    other = make_disk(8 * MiB, [Segment(0, 8 * MiB, "random", "other")])
    cli.json("disk", "backup", str(other), "--repo", repo, "--name", "other")
    manifest = Path(repo, "points", "vm", f"{point['point']}.json")
    manifest.write_text(manifest.read_text().replace('"name": "vm"', '"name": "vX"'))  # tampered
    proc = cli.run("repo", "verify", repo, "--json", ok=False)
    assert proc.returncode == 1
    broken = json.loads(proc.stdout)["broken_points"]
    assert list(broken) == [f"points/vm/{point['point']}.json"] and "authentication" in broken[next(iter(broken))][0]
    proc = cli.run("repo", "gc", repo, ok=False)
    assert proc.returncode != 0 and "refusing" in proc.stderr
    proc = cli.run("points", "--repo", repo, ok=False)
    assert proc.returncode != 0 and "repo verify" in proc.stderr
    out = tmp_path / "other.qcow2"
    cli.run("disk", "restore", "other", "--repo", repo, "--output", str(out))
    assert qemu_img_compare(other, out)
