"""The README's main command, run as a user would."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.bare_vm import virsh
from tests.conftest import VMKEEP, Cli


def test_demo_round_trip_on_a_lab_vm(cli: Cli, tmp_path: Path) -> None:
    proc = subprocess.run([VMKEEP, "demo", "--size", "64", "--workdir", str(tmp_path)],
                          env={**cli.env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("= guest checksum") == 2  # both restored points equal the guest's view
    assert "agent answers" in proc.stdout and "incremental after the guest wrote" in proc.stdout
    assert "DIFFERENT" not in proc.stdout and "DID NOT BOOT" not in proc.stdout
    assert "vmkeep-demo" not in virsh("list", "--all", "--name")  # the demo leaves no VM behind
