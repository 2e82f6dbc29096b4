"""The S3 backend against a real SeaweedFS server on loopback."""

from __future__ import annotations

import secrets
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.conftest import Cli, MiB, qemu_img_compare
from vmkeep.lab.images import Segment
from vmkeep.repository.backends.s3 import S3Backend


def _bucket() -> str:
    return f"vmkeep-{secrets.token_hex(4)}"


def test_s3_round_trip_verify_gc(cli: Cli, s3_env: dict[str, str], make_disk, tmp_path: Path) -> None:
    repo = f"s3://{_bucket()}/backups"
    env = s3_env
    cli.run("repo", "init", repo, "--encrypt", env=env)
    v1 = make_disk(24 * MiB, [Segment(0, 16 * MiB, "random", "v1"), Segment(16 * MiB, 4 * MiB, "text")])
    v2 = make_disk(24 * MiB, [Segment(0, 16 * MiB, "random", "v2"), Segment(16 * MiB, 4 * MiB, "text")])
    first = cli.json("disk", "backup", str(v1), "--repo", repo, "--name", "vm", env=env)
    second = cli.json("disk", "backup", str(v2), "--repo", repo, "--name", "vm", env=env)
    assert second["bytes_new"] == 16 * MiB  # the text chunk deduplicated against the first point
    for point, image in ((first["point"], v1), (second["point"], v2)):
        out = tmp_path / f"{point}.qcow2"
        cli.run("disk", "restore", f"vm@{point}", "--repo", repo, "--output", str(out), env=env)
        assert qemu_img_compare(image, out)
    assert cli.json("repo", "verify", repo, env=env)["ok"]
    cli.json("repo", "prune", repo, "--keep-last", "1", env=env)
    gc = cli.json("repo", "gc", repo, env=env)
    assert gc["chunks_deleted"] == 4 and gc["bytes_freed"] > 12 * MiB

    # Bit rot in the object store is caught by verify.
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    bucket = repo.split("/")[2]
    key = s3.list_objects_v2(Bucket=bucket, Prefix="backups/chunks/")["Contents"][0]["Key"]
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[100] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    proc = cli.run("repo", "verify", repo, "--json", ok=False, env=env)
    assert proc.returncode == 1 and key.rsplit("/", 1)[1] in proc.stdout


def test_conditional_writes(s3_env: dict[str, str]) -> None:
    backend = S3Backend(f"s3://{_bucket()}/p", endpoint=s3_env["AWS_ENDPOINT_URL"])
    backend.ensure_bucket()
    assert backend.put("chunks/aa/x", b"first", if_absent=True)
    assert not backend.put("chunks/aa/x", b"second", if_absent=True)
    assert backend.get("chunks/aa/x") == b"first"
    assert [o.key for o in backend.list("chunks/")] == ["chunks/aa/x"]


def test_immutable_repository_resists_deletion(cli: Cli, s3_env: dict[str, str], make_disk, tmp_path: Path) -> None:
    bucket = _bucket()
    repo = f"s3://{bucket}/locked"
    env = s3_env
    cli.run("repo", "init", repo, "--encrypt", "--immutable-days", "1", env=env)
    image = make_disk(12 * MiB, [Segment(0, 12 * MiB, "random")])
    cli.json("disk", "backup", str(image), "--repo", repo, "--name", "vm", env=env)
    cli.json("disk", "backup", str(image), "--repo", repo, "--name", "vm", env=env)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="locked/chunks/")["Contents"]]
    head = s3.head_object(Bucket=bucket, Key=keys[0])
    assert head["ObjectLockMode"] == "COMPLIANCE"
    with pytest.raises(ClientError):  # not even the owner can destroy a locked version
        s3.delete_object(Bucket=bucket, Key=keys[0], VersionId=head["VersionId"])
    for key in keys:  # an attacker hides every chunk behind delete markers …
        s3.delete_object(Bucket=bucket, Key=key)
    out = tmp_path / "r.qcow2"  # … and the restore still reads the locked versions
    cli.run("disk", "restore", "vm", "--repo", repo, "--output", str(out), env=env)
    assert qemu_img_compare(image, out)
    pruned = cli.json("repo", "prune", repo, "--keep-last", "1", env=env)
    assert pruned["names"]["vm"]["remove"] == []  # points under retention are kept
    assert len(cli.json("points", "--repo", repo, env=env)["points"]) == 2
    proc = cli.run("repo", "init", str(tmp_path / "fsrepo"), "--immutable-days", "3", ok=False)
    assert proc.returncode == 2 and "S3" in proc.stderr


def test_two_writers_at_once_into_s3(cli: Cli, s3_env: dict[str, str], make_disk, tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import VMKEEP

    repo = f"s3://{_bucket()}/shared"
    cli.run("repo", "init", repo, "--encrypt", env=s3_env)
    shared = Segment(0, 16 * MiB, "random", "common")
    images = {n: make_disk(24 * MiB, [shared, Segment(16 * MiB, 4 * MiB, "text", n)]) for n in ("a", "b")}
    procs = [subprocess.Popen([VMKEEP, "disk", "backup", str(img), "--repo", repo, "--name", n, "--json"],
                              env={**cli.env, **s3_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, img in images.items()]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    info = cli.json("repo", "info", repo, env=s3_env)
    assert info["unique_plain_bytes"] == 24 * MiB  # the shared 16 MiB stored once
    for n, img in images.items():
        out = tmp_path / f"{n}.qcow2"
        cli.run("disk", "restore", n, "--repo", repo, "--output", str(out), env=s3_env)
        assert qemu_img_compare(img, out)
