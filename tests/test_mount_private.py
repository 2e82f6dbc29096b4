"""`vmkeep mount` without --socket or --port serves on a private socket, prints its URI, and
removes it when stopped."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import VMKEEP, Cli, MiB
from vmkeep.lab.images import Segment
from vmkeep.transport.nbd_client import open_export, unix_socket_of
from vmkeep.transport.qemu_nbd import probe_image, serve_image


def test_mount_on_a_private_socket(cli: Cli, make_disk: Callable[..., Path], tmp_path: Path) -> None:
    image = make_disk(8 * MiB, [Segment(MiB, 2 * MiB, "random")])
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt")
    cli.run("disk", "backup", str(image), "--repo", repo, "--name", "img")
    proc = subprocess.Popen([VMKEEP, "mount", "img", "--repo", repo, "--disk", "disk", "--json"], env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        served = json.loads(proc.stdout.readline())
        socket = Path(unix_socket_of(served["uri"]))
        assert socket.parent.name.startswith("vmkeep-mount-") and socket.parent.stat().st_mode & 0o077 == 0
        with serve_image(probe_image(image)) as source, open_export(source) as original:
            expected = original.pread(8 * MiB, 0)
        with open_export(served["uri"]) as export:  # waits for the socket inside open_export's connect
            assert export.pread(8 * MiB, 0) == expected
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert not socket.parent.exists()  # the private directory goes with the export
