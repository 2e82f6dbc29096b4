"""What `--debug --log-format json` shows of a real backup and restore: one JSON object per line,
the engine's decision with its reason, the NBD servers and the storage asked, and no secret."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from tests.conftest import S3_SECRET, Cli, MiB, qemu_img_compare
from vmkeep.lab.images import Segment

LOGGING = ("--debug", "--log-format", "json")


def _lines(stderr: str) -> list[dict[str, Any]]:
    """Every line of standard error, each of which must be one JSON object."""
    lines = []
    for raw in stderr.splitlines():
        entry = json.loads(raw)  # a line that is not JSON fails here, quoted in the error
        assert isinstance(entry, dict) and {"time", "level", "logger", "message"} <= entry.keys(), raw
        lines.append(entry)
    return lines


def _from(lines: list[dict[str, Any]], logger: str, *words: str) -> list[dict[str, Any]]:
    return [e for e in lines if e["logger"] == logger and all(w in e["message"] for w in words)]


def test_disk_backup_and_restore_log_their_decisions_and_no_secret(cli: Cli, make_disk, tmp_path: Path) -> None:
    passphrase = cli.env["VMKEEP_PASSPHRASE"]
    image = make_disk(12 * MiB, [Segment(0, 4 * MiB, "random"), Segment(8 * MiB, MiB, "text")])
    repo = str(tmp_path / "repo")
    init = cli.run("repo", "init", repo, "--encrypt", *LOGGING)
    backup = cli.run("disk", "backup", str(image), "--repo", repo, "--name", "vm1", "--json", *LOGGING)
    point = json.loads(backup.stdout)["point"]
    out = tmp_path / "restored.qcow2"
    # without --json too: progress bars stay off standard error while it carries JSON lines
    restore = cli.run("disk", "restore", f"vm1@{point}", "--repo", repo, "--output", str(out), *LOGGING)
    assert qemu_img_compare(image, out)

    lines = _lines(backup.stderr)
    decision = _from(lines, "vmkeep.engine.image", "full backup", "no earlier point")
    assert decision and decision[0]["level"] == "info" and decision[0]["vm"] == "vm1"
    assert _from(lines, "vmkeep.transport.qemu_nbd", "qemu-img info")  # what was asked and answered
    started = _from(lines, "vmkeep.transport.qemu_nbd", "started qemu-nbd")
    assert started and "pid" in started[0]["message"]
    assert _from(lines, "vmkeep.transport.qemu_nbd", "stopped qemu-nbd")
    assert _from(lines, "vmkeep.engine.backup", "point", "committed")
    assert _from(lines, "vmkeep.engine.backup", "disk disk: full")

    restored = _lines(restore.stderr)
    assert _from(restored, "vmkeep.engine.image", "restoring vm1@")
    assert any(e["logger"].startswith("vmkeep.transport.") for e in restored)  # the writer's NBD server
    for proc in (init, backup, restore):
        assert passphrase not in proc.stderr and passphrase not in proc.stdout


def test_s3_requests_are_logged_without_the_secret_key(cli: Cli, s3_env: dict[str, str], make_disk) -> None:
    repo = f"s3://vmkeep-{secrets.token_hex(4)}/backups"
    image = make_disk(8 * MiB, [Segment(0, 4 * MiB, "random")])
    procs = [cli.run("repo", "init", repo, "--encrypt", *LOGGING, env=s3_env),
             cli.run("disk", "backup", str(image), "--repo", repo, "--name", "vm1", "--json", *LOGGING, env=s3_env)]
    lines = _lines(procs[1].stderr)
    assert _from(lines, "vmkeep.repository.backends.s3", "S3 client for", s3_env["AWS_ENDPOINT_URL"])
    assert _from(lines, "vmkeep.repository.backends.s3", "HTTP 200")  # a request and its answer
    for proc in procs:
        assert S3_SECRET not in proc.stderr and S3_SECRET not in proc.stdout
        assert cli.env["VMKEEP_PASSPHRASE"] not in proc.stderr
