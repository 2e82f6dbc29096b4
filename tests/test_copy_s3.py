"""`vmkeep copy` with real S3 (SeaweedFS): an offsite under Object Lock and back, and the pull
mode, where the offsite's copy reads the primary's bucket with read-only credentials and the
primary cannot touch the offsite's bucket."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.conftest import S3_SECRET, S3_USER, Cli, MiB, fresh_cli
from tests.test_copy import Source, chunk_names, restores_equal, visible_points
from vmkeep.lab.images import Segment, make_image, write_segments

# The identities tests/conftest.py's seaweed fixture gives SeaweedFS, each limited to one bucket.
PRIMARY_BUCKET, OFFSITE_BUCKET = "vmkeep-copy-primary", "vmkeep-copy-offsite"
PROFILES = {"primary": ("vmkeep-primary", "primary-secret"), "reader": ("vmkeep-reader", "reader-secret"),
            "offsite": ("vmkeep-offsite", "offsite-secret"), "admin": (S3_USER, S3_SECRET)}


def _s3(endpoint: str, profile: str = "admin") -> Any:
    key, secret = PROFILES[profile]
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1")


@pytest.fixture(scope="module")
def s3_source(seaweed: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """A local encrypted repository with two points of one VM (one chunk apart); the command's
    environment reaches SeaweedFS as the admin identity."""
    work = tmp_path_factory.mktemp("copy-s3")
    cli = fresh_cli()
    cli.env.update({"AWS_ACCESS_KEY_ID": S3_USER, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": seaweed})
    src = Source(work / "repo", cli, work)
    cli.run("repo", "init", str(src.repo), "--encrypt")
    image = make_image(work / "vm.qcow2", 32 * MiB, [Segment(0, 24 * MiB, "random", "s3"),
                                                      Segment(24 * MiB, 4 * MiB, "text", "s3")])
    src.backup(image, "vm")
    write_segments(image, "qcow2", 32 * MiB, [Segment(4 * MiB, MiB, "random", "s3-2")])
    src.backup(image, "vm")
    yield src


def _versions(s3: Any, bucket: str, prefix: str = "") -> set[tuple[str, str, str]]:
    """Every version of every object (key, version, etag): what a write or a delete would change."""
    page = s3.list_object_versions(Bucket=bucket, Prefix=prefix)
    return {(v["Key"], v["VersionId"], v["ETag"]) for v in page.get("Versions", [])} | \
        {(m["Key"], m["VersionId"], "delete marker") for m in page.get("DeleteMarkers", [])}


def test_offsite_under_object_lock_and_back(s3_source: Source, seaweed: str, tmp_path: Path) -> None:
    cli = s3_source.cli
    bucket = f"vmkeep-{secrets.token_hex(4)}"
    offsite = f"s3://{bucket}/offsite"
    cli.run("repo", "init", offsite, "--like", str(s3_source.repo), "--immutable-days", "1")
    every = s3_source.labels()
    report = cli.json("copy", str(s3_source.repo), offsite)
    assert report["mode"] == "raw" and report["points_copied"] == every
    assert report["bytes_sent"] == sum(r["bytes_stored"] for r in s3_source.backups.values())
    for label in every:
        assert restores_equal(cli, offsite, label, s3_source.images[label], tmp_path / "out.raw"), label

    s3 = _s3(seaweed)
    chunk = s3.list_objects_v2(Bucket=bucket, Prefix="offsite/chunks/")["Contents"][0]["Key"]
    manifest = s3.list_objects_v2(Bucket=bucket, Prefix="offsite/points/")["Contents"][0]["Key"]
    for key in (chunk, manifest):
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ObjectLockMode"] == "COMPLIANCE", key
        with pytest.raises(ClientError):  # under retention: not even the bucket's owner destroys it
            s3.delete_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])
        assert s3.head_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])["ContentLength"] > 0
    # vmkeep's own retention keeps them too: prune keeps locked points, gc frees nothing.
    assert cli.json("repo", "prune", offsite, "--keep-last", "1")["names"]["vm"]["remove"] == []
    assert cli.json("repo", "gc", offsite)["chunks_deleted"] == 0
    assert visible_points(cli, offsite) == every
    assert cli.json("repo", "verify", offsite)["ok"]

    # An attacker hides every chunk behind a delete marker: the locked versions still copy back.
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix="offsite/chunks/")["Contents"]:
        s3.delete_object(Bucket=bucket, Key=obj["Key"])
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="offsite/chunks/")
    back = tmp_path / "back"  # the offsite copied back to a new local repository
    cli.run("repo", "init", str(back), "--like", offsite)
    home = cli.json("copy", offsite, str(back))
    assert home["mode"] == "raw" and home["points_copied"] == every
    assert chunk_names(back) == chunk_names(s3_source.repo)
    for label in every:
        assert restores_equal(cli, str(back), label, s3_source.images[label], tmp_path / "out.raw"), label


@pytest.fixture(scope="module")
def profiles(s3_source: Source, seaweed: str, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """The command with an AWS shared credentials file holding each site's profile and no default
    credentials: every S3 request goes as the profile a command names (AWS_PROFILE or --s3-profile)."""
    path = tmp_path_factory.mktemp("aws") / "credentials"
    path.write_text("".join(f"[{name}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
                            for name, (key, secret) in PROFILES.items()))
    env = {k: v for k, v in s3_source.cli.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(path)
    s3 = _s3(seaweed)
    s3.create_bucket(Bucket=PRIMARY_BUCKET)
    s3.create_bucket(Bucket=OFFSITE_BUCKET, ObjectLockEnabledForBucket=True)
    return Cli(env)


def test_pull_mode(s3_source: Source, profiles: Cli, seaweed: str, tmp_path: Path) -> None:
    cli = profiles
    as_primary, as_offsite = {"AWS_PROFILE": "primary"}, {"AWS_PROFILE": "offsite"}
    primary, offsite = f"s3://{PRIMARY_BUCKET}/site", f"s3://{OFFSITE_BUCKET}/copies"
    # The primary site backs up into its own bucket with its own identity.
    cli.run("repo", "init", primary, "--encrypt", env=as_primary)
    image = s3_source.images[s3_source.labels()[-1]]
    first = cli.json("disk", "backup", str(image), "--repo", primary, "--name", "vm", env=as_primary)
    labels = [f"vm@{first['point']}"]
    # The offsite makes its repository like the primary's, reading it as `reader`.
    cli.run("repo", "init", offsite, "--like", primary, "--like-s3-profile", "reader", "--s3-profile", "offsite",
            "--immutable-days", "1")
    admin = _s3(seaweed)
    source_before = _versions(admin, PRIMARY_BUCKET)

    # The offsite's copy reads the primary's bucket with read-only credentials.
    pulled = cli.json("copy", primary, offsite, "--s3-profile", "reader", "--target-s3-profile", "offsite")
    assert pulled["mode"] == "raw" and pulled["points_copied"] == labels
    assert _versions(admin, PRIMARY_BUCKET) == source_before  # never written, touched or deleted
    assert restores_equal(cli, offsite, labels[0], image, tmp_path / "out.raw", env=as_offsite)

    # A later point: only its new chunk travels, still by read-only access.
    later = tmp_path / "later.qcow2"
    later.write_bytes(image.read_bytes())
    write_segments(later, "qcow2", 32 * MiB, [Segment(0, 4 * MiB, "random", "later")])
    second = cli.json("disk", "backup", str(later), "--repo", primary, "--name", "vm", env=as_primary)
    labels.append(f"vm@{second['point']}")
    source_before = _versions(admin, PRIMARY_BUCKET)
    again = cli.json("copy", primary, offsite, "--s3-profile", "reader", "--target-s3-profile", "offsite")
    assert again["points_copied"] == labels[1:] and again["points_present"] == labels[:1]
    assert again["chunks_sent"] == 1 and again["bytes_sent"] == second["bytes_stored"]
    assert _versions(admin, PRIMARY_BUCKET) == source_before
    assert restores_equal(cli, offsite, labels[1], later, tmp_path / "out.raw", env=as_offsite)

    # The reader cannot write the primary's bucket; the primary cannot read, list, write or delete
    # anything in the offsite's bucket: S3 refuses, and nothing there changes.
    reader, primary_s3 = _s3(seaweed, "reader"), _s3(seaweed, "primary")
    some_key = next(k for k, _v, _e in source_before if "/chunks/" in k)
    with pytest.raises(ClientError, match="AccessDenied"):
        reader.put_object(Bucket=PRIMARY_BUCKET, Key=some_key, Body=b"ransom")
    with pytest.raises(ClientError, match="AccessDenied"):
        reader.delete_object(Bucket=PRIMARY_BUCKET, Key=some_key)
    offsite_before = _versions(admin, OFFSITE_BUCKET)
    chunk = next(k for k, _v, _e in offsite_before if "/chunks/" in k)
    manifest = next(k for k, _v, _e in offsite_before if "/points/" in k)
    for attempt in (lambda: primary_s3.delete_object(Bucket=OFFSITE_BUCKET, Key=chunk),
                    lambda: primary_s3.put_object(Bucket=OFFSITE_BUCKET, Key=manifest, Body=b"{}"),
                    lambda: primary_s3.copy_object(Bucket=OFFSITE_BUCKET, Key=chunk,
                                                   CopySource={"Bucket": PRIMARY_BUCKET, "Key": some_key}),
                    lambda: primary_s3.list_objects_v2(Bucket=OFFSITE_BUCKET),
                    lambda: primary_s3.get_object(Bucket=OFFSITE_BUCKET, Key=manifest)):
        with pytest.raises(ClientError, match="AccessDenied"):
            attempt()
    try:  # a batch delete is refused whole, or item by item
        batch = primary_s3.delete_objects(Bucket=OFFSITE_BUCKET,
                                          Delete={"Objects": [{"Key": chunk}, {"Key": manifest}]})
        assert not batch.get("Deleted") and len(batch["Errors"]) == 2, batch
    except ClientError as exc:
        assert "AccessDenied" in str(exc)
    assert _versions(admin, OFFSITE_BUCKET) == offsite_before
    # With the primary's own credentials the offsite is out of reach for vmkeep too.
    proc = cli.run("points", "--repo", offsite, ok=False, env=as_primary)
    assert proc.returncode != 0 and "AccessDenied" in proc.stderr, proc.stderr
    assert visible_points(cli, offsite, env=as_offsite) == labels
    assert cli.json("repo", "verify", offsite, env=as_offsite)["ok"]


def test_an_immutable_copy_keeps_reused_chunks_as_long_as_the_new_point(s3_source: Source, seaweed: str) -> None:
    """A later point reuses chunks an earlier copy wrote: their retention is extended to the new
    point's, so the offsite never holds a locked manifest whose chunks could be deleted sooner."""
    cli = s3_source.cli
    bucket = f"vmkeep-{secrets.token_hex(4)}"
    offsite = f"s3://{bucket}/offsite"
    cli.run("repo", "init", offsite, "--like", str(s3_source.repo), "--immutable-days", "1")
    first, second = s3_source.labels()
    cli.json("copy", str(s3_source.repo), offsite, "--point", first.split("@")[1])
    s3 = _s3(seaweed)

    def retained() -> dict[str, Any]:
        return {o["Key"]: s3.head_object(Bucket=bucket, Key=o["Key"])["ObjectLockRetainUntilDate"]
                for o in s3.list_objects_v2(Bucket=bucket, Prefix="offsite/chunks/")["Contents"]}

    before = retained()
    time.sleep(1.1)  # S3 keeps retention dates to the second
    report = cli.json("copy", str(s3_source.repo), offsite)
    assert report["points_copied"] == [second] and report["chunks_sent"] == 1
    after = retained()
    extended = [key for key in before if after[key] > before[key]]
    # the second point shares every chunk of the first but the one its 1 MiB write replaced
    assert len(extended) == len(before) - 1, (before, after)
