"""Servers vmkeep starts die with it, including when it is killed before they are set up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from vmkeep.transport.qemu_nbd import dying_with

START_A_SERVER = """
import os, subprocess, sys
from vmkeep.transport.qemu_nbd import dying_with
child = subprocess.Popen(["sleep", "60"], preexec_fn=dying_with(os.getpid()))
print(child.pid, flush=True)
sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_server_dies_with_a_killed_vmkeep() -> None:
    parent = subprocess.Popen([sys.executable, "-c", START_A_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None
    server = int(parent.stdout.readline())
    assert _alive(server)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(server)


def test_server_whose_parent_died_before_the_request_exits_at_once() -> None:
    """The request only covers a parent still alive when it is made: a child whose parent is
    already gone (here: a pid that is not its parent) must not stay up."""
    started = time.monotonic()
    proc = subprocess.run(["sleep", "60"], preexec_fn=dying_with(os.getpid() + 1_000_000), timeout=30)
    assert proc.returncode == 1 and time.monotonic() - started < 10
